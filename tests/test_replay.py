"""Replay: the state a valid log yields, and a named refusal for every bad entry.

Each attack case builds a valid log, then one bad entry, and checks that
`Replayer.apply` refuses it with `LogIntegrityError` naming that entry's
seq, the reason in the message, the underlying error class as its cause
where one exists, and the state left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from keyquorum.quorum import canonical
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    ExpiredError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    NotOnRosterError,
    ReplayError,
    SignatureError,
    StateError,
    ThresholdError,
    UnverifiedNoteError,
)
from keyquorum.quorum.log import (
    ApprovalPayload,
    Entry,
    ExecutionPayload,
    ShredPayload,
)
from keyquorum.quorum.note import NoteSigner, SignatureType
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    LogKeyRotated,
    NewVersion,
    Rewrapped,
    RosterChanged,
    request_for,
)
from keyquorum.quorum.replay import LogState, Replayer, WitnessPolicy, replay, verify_log
from tests.logfactory import (
    DEPLOYMENT,
    Counter,
    LogFactory,
    custodians,
    next_log_signer,
    outsider,
    resigned,
    standard_log,
)

C = custodians(5)


@pytest.fixture(scope="module")
def standard() -> LogFactory:
    return standard_log()


def test_standard_log_replays_to_the_state_built_alongside(standard: LogFactory) -> None:
    state = replay(standard.entries)
    assert state == standard.state
    assert state.size == len(standard.entries)
    assert state.deployment == DEPLOYMENT
    assert state.threshold == 3
    assert [c.fingerprint for c in state.roster] == [c.fingerprint for c in C]
    assert set(state.confirmations) == {c.fingerprint for c in C}
    assert state.initialized
    assert state.custodian(C[2].fingerprint) == C[2].public()
    assert state.share_index(C[2].fingerprint) == 3
    assert state.custodian(outsider().fingerprint) is None
    assert state.unsealed == {}  # sealed at the end
    t0, t1, t2 = (state.tenants[f"tenant-{i}"] for i in range(3))
    assert [v.state for v in t0.versions] == ["disabled", "active"]
    assert t1.active_until is None
    assert t2.destroyed
    assert state.grants == {
        ("booking.example", "tenant-0"): state.grants[("booking.example", "tenant-0")]
    }
    ops = [e.operation for e in state.executions]
    assert ops.count("create-tenant") == 3
    assert ops[-1] == "destroy-tenant"
    rotation = next(e for e in state.executions if e.operation == "rotate-tenant")
    assert len(rotation.approvers) == 3
    assert all(p.status == "executed" for p in state.proposals.values())


def test_replay_is_deterministic(standard: LogFactory) -> None:
    first = replay(standard.entries)
    second = replay([bytes(raw) for raw in standard.entries])
    assert first == second
    assert first is not second


def test_every_entry_round_trips_byte_exact(standard: LogFactory) -> None:
    types = set()
    for raw in standard.entries:
        entry = Entry.from_bytes(raw)
        assert entry.to_bytes() == raw
        types.add(entry.type)
    assert types == {
        "genesis", "confirm", "unseal", "unseal-reset", "seal", "proposal", "approval", "refusal",
        "execution", "shred",
    }  # fmt: skip


def test_replay_of_an_empty_log_is_refused() -> None:
    with pytest.raises(LogIntegrityError, match="no genesis") as info:
        replay([])
    assert info.value.seq == 0
    with pytest.raises(StateError):
        _ = LogState().roster
    assert not LogState().initialized
    assert LogState().share_index("00" * 32) is None


@pytest.mark.parametrize(
    ("now", "active"),
    [(0, True), (3599, True), (3600, False), (10**6, False)],
    ids=["at-activation", "last-second", "at-active-until", "long-after"],
)
def test_tenant_active_window(now: int, active: bool) -> None:
    f = LogFactory()
    f.run("create-tenant", tenant="t1")
    start = f.time
    f.run("activate-tenant", tenant="t1", duration_seconds=3600)
    assert f.state.tenant_active("t1", start + now) is active
    assert not f.state.tenant_active("unknown", start)


def test_destroyed_tenant_is_never_active_again_and_its_name_not_reused() -> None:
    f = LogFactory()
    f.run("create-tenant", tenant="t1")
    f.run("activate-tenant", tenant="t1", duration_seconds=3600)
    f.run("grant", backend="docs.example", tenant="t1")
    f.run("destroy-tenant", tenant="t1")
    assert not f.state.tenant_active("t1", f.time)  # deactivated while waiting
    f.tick(f.policy.destroy_wait_seconds)
    f.shred("t1")
    assert f.state.tenants["t1"].destroyed
    assert not f.state.granted("docs.example", "t1")
    for op, params in [
        ("create-tenant", {"tenant": "t1"}),
        ("activate-tenant", {"tenant": "t1", "duration_seconds": 60}),
        ("cancel-destroy", {"tenant": "t1"}),
    ]:
        bad = f.build("proposal", f.make_proposal(op, **params))
        with pytest.raises(LogIntegrityError, match="destroyed"):
            f.replayer.apply(bad)


def test_cancel_destroy_then_activate_again() -> None:
    f = LogFactory()
    f.run("create-tenant", tenant="t1")
    f.run("destroy-tenant", tenant="t1")
    f.tick(10)
    f.run("cancel-destroy", tenant="t1")
    assert f.state.tenants["t1"].destroy_at is None
    f.run("activate-tenant", tenant="t1", duration_seconds=60)
    assert f.state.tenant_active("t1", f.time)
    bad = f.build("shred", ShredPayload("t1"))
    with pytest.raises(LogIntegrityError, match="not scheduled"):
        f.replayer.apply(bad)


def test_roster_change_puts_the_new_roster_in_force() -> None:
    f = LogFactory()
    f.run("create-tenant", tenant="t1")
    f.run("rotate-tenant", tenant="t1")
    pending = f.propose("create-tenant", tenant="t2")
    new = custodians(7)[2:7]  # drops custodians 0 and 1, adds 5 and 6
    old_versions = f.state.tenants["t1"].versions
    f.run("change-roster", roster=",".join(c.fingerprint for c in new), threshold=4)
    state = f.state
    assert state.threshold == 4
    assert len(state.rosters) == 2
    assert [c.fingerprint for c in state.roster] == [c.fingerprint for c in new]
    assert state.confirmations == {}
    assert state.proposals[pending].status == "cancelled"
    new_versions = state.tenants["t1"].versions
    # Every version re-wrapped, under a fresh salt (the old one is erased).
    pairs = list(zip(old_versions, new_versions, strict=True))
    assert all(a.wrapped_key != b.wrapped_key for a, b in pairs)
    assert all(a.shred_salt_sha256 != b.shred_salt_sha256 for a, b in pairs)
    # 4. the cancelled proposal takes no more approvals
    late = f.build("approval", f.make_verdict(pending, new[0]))
    with pytest.raises(LogIntegrityError, match="cancelled"):
        f.replayer.apply(late)
    # A removed custodian no longer counts; a new one does.
    pid = f.propose("create-tenant", tenant="t3")
    removed = f.build("approval", f.make_verdict(pid, C[0]))
    with pytest.raises(LogIntegrityError, match="not on the roster"):
        f.replayer.apply(removed)
    f.approve(pid, custodians(7)[6])
    f.confirm(custodians(7)[5])
    assert replay(f.entries) == f.state


def _roster_proposal(f: LogFactory, credentials: tuple[object, ...] | None) -> bytes:
    """A change-roster adding custodians 5 and 6, carrying `credentials` (None: the right ones)."""
    new = custodians(7)[2:7]
    payload = f.make_proposal(
        "change-roster", roster=",".join(c.fingerprint for c in new), threshold=4
    )
    if credentials is not None:
        payload = dataclasses.replace(payload, credentials=credentials)  # type: ignore[arg-type]
    return f.build("proposal", payload)


NEWCOMER_CASES = {
    "none-carried": (lambda: (), "exactly the custodians it adds"),
    "one-missing": (lambda: (custodians(7)[5].public(),), "exactly the custodians it adds"),
    "wrong-order": (
        lambda: (custodians(7)[6].public(), custodians(7)[5].public()),
        "in roster order",
    ),
    "a-member-already-on-the-roster": (
        lambda: (custodians(7)[2].public(), custodians(7)[5].public(), custodians(7)[6].public()),
        "exactly the custodians it adds",
    ),
    "a-stranger": (
        lambda: (custodians(7)[5].public(), outsider().public()),
        "exactly the custodians it adds",
    ),
}


@pytest.mark.parametrize(
    ("carried", "match"), list(NEWCOMER_CASES.values()), ids=list(NEWCOMER_CASES)
)
def test_a_roster_change_must_carry_exactly_its_newcomers_credentials(
    carried: Callable[[], tuple[object, ...]], match: str
) -> None:
    """Their names are in what custodians sign: the log must hold exactly those credentials."""
    f = LogFactory()
    size = f.state.size
    with pytest.raises(LogIntegrityError, match=match):
        f.replayer.apply(_roster_proposal(f, carried()))
    assert f.state.size == size
    f.replayer.apply(_roster_proposal(f, None))


def test_credentials_on_another_operation_are_refused() -> None:
    f = LogFactory()
    raw = f.build("proposal", f.make_proposal("create-tenant", tenant="t1"))
    obj = json.loads(raw)
    obj["payload"]["credentials"] = [outsider().public().to_json()]
    with pytest.raises(LogIntegrityError, match="unknown field credentials"):
        f.replayer.apply(canonical.encode(obj))


def test_the_roster_change_statement_names_the_newcomers_from_the_log() -> None:
    f = LogFactory()
    new = custodians(7)[2:7]
    pid = f.propose("change-roster", roster=",".join(c.fingerprint for c in new), threshold=4)
    text = request_for(f.state.proposals[pid], f.state).statement("approve").render()
    assert (
        f"  added: {custodians(7)[5].public().label}, {custodians(7)[6].public().label}\n" in text
    )
    assert f"  removed: {C[0].public().label}, {C[1].public().label}\n" in text
    # Replay of the whole log, from bytes alone, renders the same text.
    again = replay(f.entries)
    assert request_for(again.proposals[pid], again).statement("approve").render() == text


# -- attacks -----------------------------------------------------------------

Attack = Callable[[LogFactory], bytes]


class _Base(LogFactory):
    """Genesis, two confirms, an unsealed replica, tenant t1 active, two proposals pending.

    `pid` (rotate t1) has one approval, by custodian 0; `other` (a grant) has none.
    """

    def __init__(self) -> None:
        super().__init__()
        self.confirm(C[0])
        self.confirm(C[1])
        self.unseal("replica-a", C[:3])
        self.run("create-tenant", tenant="t1")
        self.run("activate-tenant", tenant="t1", duration_seconds=600)
        self.tick()
        self.pid = self.propose("rotate-tenant", tenant="t1")
        self.approve(self.pid, C[0])
        self.other = self.propose("grant", backend="docs.example", tenant="t1")


def _base() -> _Base:
    return _Base()


def _pid(f: LogFactory) -> bytes:
    assert isinstance(f, _Base)
    return f.pid


def _other(f: LogFactory) -> bytes:
    assert isinstance(f, _Base)
    return f.other


def _roster_result(f: LogFactory, pid: bytes) -> RosterChanged:
    result = f.make_result(pid)
    assert isinstance(result, RosterChanged)
    return result


def _with_entry(f: LogFactory, **changes: object) -> bytes:
    """A valid next proposal entry with its envelope fields changed."""
    entry = Entry.from_bytes(f.build("proposal", f.make_proposal("create-tenant", tenant="t9")))
    return dataclasses.replace(entry, **changes).to_bytes()  # type: ignore[arg-type]


def _approval(f: LogFactory, cred_index: int = 1, sign_for: bytes | None = None) -> bytes:
    return f.build("approval", f.make_verdict(_pid(f), C[cred_index], sign_for=sign_for))


def _execute(f: LogFactory, pid: bytes, result: object = None) -> bytes:
    proposal = f.state.proposals[pid]
    res = f.make_result(pid) if result is None else result
    return f.build("execution", ExecutionPayload(pid, proposal.operation, res))  # type: ignore[arg-type]


def _approved(f: LogFactory, op: str, n: int, **params: str | int) -> bytes:
    pid = f.propose(op, **params)
    for cred in C[:n]:
        f.approve(pid, cred)
    return pid


def _replace_result(
    f: LogFactory, op: str, n: int, change: Callable[[object], object], **params: str | int
) -> bytes:
    pid = _approved(f, op, n, **params)
    return _execute(f, pid, change(f.make_result(pid)))


def _expired_approval(f: LogFactory) -> bytes:
    f.tick(3600)
    return _approval(f)


def _shred_early(f: LogFactory) -> bytes:
    f.run("destroy-tenant", tenant="t1")
    f.tick(f.policy.destroy_wait_seconds - 1)
    return f.build("shred", ShredPayload("t1"))


def _operation_on_destroyed(f: LogFactory) -> bytes:
    f.run("destroy-tenant", tenant="t1")
    f.tick(f.policy.destroy_wait_seconds)
    f.shred("t1")
    return f.build("proposal", f.make_proposal("grant", backend="x.example", tenant="t1"))


def _execution_after_expiry(f: LogFactory) -> bytes:
    pid = _approved(f, "create-tenant", 3, tenant="t2")
    f.tick(3600)
    return _execute(f, pid)


def _unseal(f: LogFactory, creds: tuple[int, ...], **kw: object) -> bytes:
    payload = f.make_unseal("replica-b", [C[i] for i in creds])
    return f.build("unseal", dataclasses.replace(payload, **kw))  # type: ignore[arg-type]


def _reused_session(f: LogFactory) -> bytes:
    session = f.state.unsealed["replica-a"].session
    return f.build("unseal", f.make_unseal("replica-b", C[:3], session=session))


def _unseal_signed_for_other_replica(f: LogFactory) -> bytes:
    good = f.make_unseal("replica-b", C[:3])
    return f.build("unseal", dataclasses.replace(good, replica="replica-c"))


def _reset(f: LogFactory, **kw: object) -> bytes:
    good = f.make_unseal_reset("replica-a", C[1], C[:1])
    return f.build("unseal-reset", dataclasses.replace(good, **kw))


def _reset_of_a_used_session(f: LogFactory) -> bytes:
    """A reset naming a session that already unsealed: a session ends once."""
    payload = f.make_unseal("replica-a", C[:3])
    f.append("unseal", payload)
    return f.build("unseal-reset", f.make_unseal_reset("replica-a", C[1], session=payload.session))


def _reset_then_unseal_of_that_session(f: LogFactory) -> bytes:
    """Shares of a reset session cannot unseal afterwards."""
    reset = f.make_unseal_reset("replica-a", C[1])
    f.append("unseal-reset", reset)
    return f.build("unseal", f.make_unseal("replica-a", C[:3], session=reset.session))


def _seal_forged(f: LogFactory) -> bytes:
    good = f.make_seal("replica-a", C[0])
    return f.build("seal", dataclasses.replace(good, reason="another reason"))


def _seal_request_replayed(f: LogFactory) -> bytes:
    """A captured, signed seal request sent again (after a restart, to another replica)."""
    payload = f.make_seal("replica-a", C[0])
    f.append("seal", payload)
    return f.build("seal", payload)


def _seal_by_outsider(f: LogFactory) -> bytes:
    return f.build("seal", f.make_seal("replica-a", outsider()))


def _confirm(f: LogFactory, cred: object, **kw: object) -> bytes:
    payload = f.make_confirm(cred)  # type: ignore[arg-type]
    return f.build("confirm", dataclasses.replace(payload, **kw))  # type: ignore[arg-type]


def _refusal_as_approval(f: LogFactory) -> bytes:
    refusal = f.make_verdict(_pid(f), C[1], verdict="refuse")
    return f.build(
        "approval", ApprovalPayload(refusal.proposal, refusal.custodian, refusal.signature)
    )


def _signature_of_another_custodian(f: LogFactory) -> bytes:
    good = f.make_verdict(_pid(f), C[2])
    return f.build("approval", ApprovalPayload(_pid(f), C[1].fingerprint, good.signature))


def _verdict_after_refusal(f: LogFactory) -> bytes:
    f.refuse(_pid(f), C[3])
    return _approval(f, 3)


def _narrowing_without_approval(f: LogFactory) -> bytes:
    pid = f.propose("deactivate-tenant", tenant="t1")
    return _execute(f, pid)


def _wrong_operation(f: LogFactory) -> bytes:
    pid = _approved(f, "deactivate-tenant", 1, tenant="t1")
    return f.build("execution", ExecutionPayload(pid, "cancel-destroy", f.make_result(pid)))


def _rewrap_missing(f: LogFactory) -> bytes:
    new = custodians(7)[2:7]
    pid = _approved(f, "change-roster", 3, roster=",".join(c.fingerprint for c in new), threshold=3)
    result = _roster_result(f, pid)
    return _execute(f, pid, dataclasses.replace(result, rewrapped=()))


def _roster_not_proposed(f: LogFactory) -> bytes:
    new = custodians(7)[2:7]
    pid = _approved(f, "change-roster", 3, roster=",".join(c.fingerprint for c in new), threshold=3)
    result = _roster_result(f, pid)
    other = custodians(7)[1:6]
    split, shares = f._sharing(other, 3)
    roster = tuple(c.public() for c in other)
    changed = dataclasses.replace(result, roster=roster, split=split, encrypted_shares=shares)
    return _execute(f, pid, changed)


def _duplicate_rewrap(f: LogFactory) -> bytes:
    new = custodians(7)[2:7]
    pid = _approved(f, "change-roster", 3, roster=",".join(c.fingerprint for c in new), threshold=3)
    result = _roster_result(f, pid)
    extra = (*result.rewrapped, Rewrapped("t1", 1, b"\x01" * 60, b"\x02" * 32))
    return _execute(f, pid, dataclasses.replace(result, rewrapped=extra))


def _second_genesis(f: LogFactory) -> bytes:
    return _with_entry(f, type="genesis", payload=f.make_genesis())


def _unsigned(f: LogFactory, type_: str, payload: object) -> bytes:
    """An entry the daemon writes on its own, without the log key's signature."""
    return f.build(type_, payload, signed=False)  # type: ignore[arg-type]


def _signed_by(f: LogFactory, type_: str, payload: object, signer: NoteSigner) -> bytes:
    """An entry the daemon writes, signed by some other key."""
    raw = f.build(type_, payload, signed=False)  # type: ignore[arg-type]
    return resigned(raw, signer)


def _executed_by_other_key(f: LogFactory) -> bytes:
    pid = _approved(f, "grant", 3, backend="docs.example", tenant="t1")
    payload = ExecutionPayload(pid, "grant", f.make_result(pid))
    return _signed_by(f, "execution", payload, next_log_signer(3))


def _edited_after_signing(f: LogFactory) -> bytes:
    """A shred's log signature moved onto another tenant's shred."""
    f.run("create-tenant", tenant="t2")
    for tenant in ("t1", "t2"):
        f.run("destroy-tenant", tenant=tenant)
    f.tick(f.policy.destroy_wait_seconds)
    signed = Entry.from_bytes(f.build("shred", ShredPayload("t1")))
    assert isinstance(signed.payload, ShredPayload)
    moved = ShredPayload("t2", signed.payload.log_signature)
    return f.build("shred", moved, signed=False)


def _unknown_proposer(f: LogFactory) -> bytes:
    return f.build("proposal", f.make_proposal("create-tenant", tenant="t9", by=outsider()))


def _proposal_signed_for_other(f: LogFactory) -> bytes:
    """A custodian's signature over one proposal, carried by another."""
    one = f.make_proposal("create-tenant", tenant="t9")
    two = f.make_proposal("create-tenant", tenant="t8")
    return f.build("proposal", dataclasses.replace(two, signature=one.signature))


def _remove_proposer_misnamed(f: LogFactory) -> bytes:
    """A removal whose statement would show another name than the one registered."""
    ops = custodians(9)[8]
    f.run("add-proposer", proposer=ops.fingerprint, name=ops.public().name)
    return f.build(
        "proposal", f.make_proposal("remove-proposer", proposer=ops.fingerprint, name="alice")
    )


def _proposal_by_removed_proposer(f: LogFactory) -> bytes:
    ops = custodians(9)[8]
    f.run("add-proposer", proposer=ops.fingerprint, name=ops.public().name)
    f.propose("create-tenant", by=ops, tenant="t7")  # registered: accepted
    f.run("remove-proposer", proposer=ops.fingerprint, name=ops.public().name)
    return f.build("proposal", f.make_proposal("create-tenant", tenant="t9", by=ops))


def _rotation(f: LogFactory, change: Callable[[LogKeyRotated], LogKeyRotated]) -> bytes:
    pid = _approved(f, "rotate-log-key", 3, log_key=next_log_signer(1).verifier_key())
    result = f.make_result(pid)
    assert isinstance(result, LogKeyRotated)
    return f.build("execution", ExecutionPayload(pid, "rotate-log-key", change(result)))


def _rewrap_reusing_a_salt(f: LogFactory) -> bytes:
    new = custodians(7)[2:7]
    pid = _approved(f, "change-roster", 3, roster=",".join(c.fingerprint for c in new), threshold=3)
    result = _roster_result(f, pid)
    old = f.state.tenants["t1"].versions[0].shred_salt_sha256
    first = dataclasses.replace(result.rewrapped[0], shred_salt_sha256=old)
    changed = dataclasses.replace(result, rewrapped=(first, *result.rewrapped[1:]))
    return f.build("execution", ExecutionPayload(pid, "change-roster", changed))


def _witness(n: int) -> str:
    return NoteSigner.generate(
        f"witness-{n}.example", sig_type=SignatureType.COSIGNATURE_V1,
        random_bytes=Counter(b"witness %d" % n),
    ).verifier_key()  # fmt: skip


ATTACKS: list[tuple[str, Attack, str, type[Exception] | None]] = [
    # 5. what the daemon writes on its own carries the log key's signature
    (
        "shred-unsigned",
        lambda f: _unsigned(f, "shred", ShredPayload("t1")),
        "not signed",
        SignatureError,
    ),
    (
        "daemon-seal-unsigned",
        lambda f: _unsigned(f, "seal", f.make_seal("replica-a", None)),
        "not signed",
        SignatureError,
    ),
    (
        "execution-signed-by-another-key",
        _executed_by_other_key,
        "not signed by the log key",
        SignatureError,
    ),
    ("shred-signature-moved", _edited_after_signing, "not signed by the log key", SignatureError),
    # 3. proposals are signed by a custodian or a registered proposer
    ("proposal-by-unknown-proposer", _unknown_proposer, "neither a custodian", AccessDeniedError),
    (
        "proposal-signature-of-another",
        _proposal_signed_for_other,
        "does not verify",
        SignatureError,
    ),
    (
        "proposal-by-removed-proposer",
        _proposal_by_removed_proposer,
        "neither a custodian",
        AccessDeniedError,
    ),
    (
        "add-proposer-who-is-a-custodian",
        lambda f: f.build(
            "proposal",
            f.make_proposal("add-proposer", proposer=C[2].fingerprint, name=C[2].public().name),
        ),
        "custodians propose anyway",
        None,
    ),
    (
        "remove-unknown-proposer",
        lambda f: f.build(
            "proposal", f.make_proposal("remove-proposer", proposer="ab" * 32, name="x")
        ),
        "not a registered proposer",
        None,
    ),
    ("remove-proposer-by-another-name", _remove_proposer_misnamed, "registered as", None),
    # witnesses and their threshold
    (
        "witness-threshold-above-count",
        lambda f: f.build(
            "proposal", f.make_proposal("add-witness", witness=_witness(1), witness_threshold=2)
        ),
        "exceeds the 1 witness",
        InvalidInputError,
    ),
    (
        "remove-unknown-witness",
        lambda f: f.build(
            "proposal", f.make_proposal("remove-witness", witness=_witness(1), witness_threshold=0)
        ),
        "not a registered witness",
        None,
    ),
    # the log key changes only by a rotation signed by the old key
    (
        "rotation-from-another-key",
        lambda f: _rotation(
            f, lambda r: LogKeyRotated(next_log_signer(2).verifier_key(), r.log_key)
        ),
        "previous log key",
        None,
    ),
    (
        "rotation-to-another-key-than-proposed",
        lambda f: _rotation(
            f, lambda r: LogKeyRotated(r.previous_log_key, next_log_signer(2).verifier_key())
        ),
        "new log key than the proposal",
        None,
    ),
    (
        "rotation-to-the-key-in-force",
        lambda f: f.build("proposal", f.make_proposal("rotate-log-key", log_key=f.state.log_key)),
        "used by this log before",
        None,
    ),
    (
        "rotation-to-another-origin",
        lambda f: f.build(
            "proposal",
            f.make_proposal(
                "rotate-log-key",
                log_key=NoteSigner.generate("other-log", random_bytes=Counter(b"x")).verifier_key(),
            ),
        ),
        "named other-log",
        None,
    ),
    # 4. a roster change re-wraps under fresh salts
    ("roster-change-reuses-a-salt", _rewrap_reusing_a_salt, "fresh shred salt", None),
    # 0. form, chain, order, time
    ("wrong-sequence", lambda f: _with_entry(f, seq=f.state.size + 1), "sequence number", None),
    ("repeated-sequence", lambda f: _with_entry(f, seq=f.state.size - 1), "sequence number", None),
    ("broken-hash-chain", lambda f: _with_entry(f, prev=b"\x07" * 32), "hash chain", None),
    ("time-goes-backwards", lambda f: _with_entry(f, time=f.time - 1), "goes back", None),
    ("second-genesis", _second_genesis, "second genesis", None),
    (
        "not-canonical",
        lambda f: f.build("shred", ShredPayload("t1")).replace(b'{"', b'{ "', 1),
        "malformed",
        DeserializationError,
    ),
    # 1. signatures of confirm / unseal / seal
    (
        "confirm-by-non-custodian",
        lambda f: _confirm(f, outsider()),
        "not on the roster",
        NotOnRosterError,
    ),
    ("confirm-wrong-index", lambda f: _confirm(f, C[2], index=4), "holds share 3", None),
    (
        "confirm-other-split",
        lambda f: _confirm(f, C[2], split_id=b"\x05" * 16),
        "not the current",
        None,
    ),
    ("confirm-twice", lambda f: _confirm(f, C[0]), "already confirmed", None),
    (
        "confirm-signed-by-another",
        lambda f: _confirm(f, C[2], signature=f.make_confirm(C[3]).signature),
        "does not verify",
        SignatureError,
    ),
    ("unseal-below-threshold", lambda f: _unseal(f, (0, 1)), "threshold is 3", None),
    ("unseal-custodian-twice", lambda f: _unseal(f, (0, 1, 1)), "takes part twice", None),
    ("unseal-reused-session", _reused_session, "used before", None),
    (
        "unseal-signed-for-other-replica",
        _unseal_signed_for_other_replica,
        "does not verify",
        SignatureError,
    ),
    (
        "unseal-log-size-in-future",
        lambda f: _unseal(f, (0, 1, 2), session_log_size=f.state.size + 5),
        "beyond this entry",
        None,
    ),
    (
        "unseal-other-split",
        lambda f: _unseal(f, (0, 1, 2), split_id=b"\x05" * 16),
        "not the current",
        None,
    ),
    (
        "reset-signed-by-another",
        lambda f: _reset(f, custodian=C[2].fingerprint),
        "does not verify",
        SignatureError,
    ),
    (
        "reset-of-another-session",
        lambda f: _reset(f, session=b"\x07" * 16),
        "does not verify",
        SignatureError,
    ),
    (
        "reset-by-non-custodian",
        lambda f: f.build("unseal-reset", f.make_unseal_reset("replica-a", outsider())),
        "not on the roster",
        NotOnRosterError,
    ),
    (
        "reset-discarding-a-stranger",
        lambda f: _reset(f, discarded=(outsider().fingerprint,)),
        "not on the roster",
        None,
    ),
    (
        "reset-requested-in-future",
        lambda f: _reset(f, requested_at=f.time + 10),
        "after the entry's time",
        None,
    ),
    ("reset-of-a-used-session", _reset_of_a_used_session, "used or reset before", ReplayError),
    ("unseal-of-a-reset-session", _reset_then_unseal_of_that_session, "used before", None),
    ("seal-altered-reason", _seal_forged, "does not verify", SignatureError),
    ("seal-by-non-custodian", _seal_by_outsider, "not on the roster", NotOnRosterError),
    ("seal-request-replayed", _seal_request_replayed, "already used", ReplayError),
    (
        "seal-requested-in-future",
        lambda f: f.build(
            "seal", dataclasses.replace(f.make_seal("replica-a", None), requested_at=f.time + 1)
        ),
        "after the entry",
        None,
    ),
    # 2. approvals
    (
        "approval-by-non-custodian",
        lambda f: f.build("approval", f.make_verdict(_pid(f), outsider())),
        "not on the roster",
        NotOnRosterError,
    ),
    ("approval-counted-twice", lambda f: _approval(f, 0), "already approved", ReplayError),
    ("approval-after-refusal", _verdict_after_refusal, "already refused", ReplayError),
    (
        "approval-signed-for-another-proposal",
        lambda f: _approval(f, sign_for=_other(f)),
        "does not verify",
        SignatureError,
    ),
    ("refusal-signature-as-approval", _refusal_as_approval, "does not verify", SignatureError),
    (
        "approval-signature-of-another-custodian",
        _signature_of_another_custodian,
        "does not verify",
        SignatureError,
    ),
    ("approval-after-expiry", _expired_approval, "expired", ExpiredError),
    (
        "approval-for-unknown-proposal",
        lambda f: f.build(
            "approval",
            ApprovalPayload(b"\x09" * 16, C[1].fingerprint, f.make_confirm(C[1]).signature),
        ),
        "unknown proposal",
        None,
    ),
    (
        "approval-after-execution",
        lambda f: f.build("approval", f.make_verdict(next(iter(f.state.proposals)), C[4])),
        "already executed",
        None,
    ),
    # 3. proposals
    (
        "proposal-id-reused",
        lambda f: f.build("proposal", f.make_proposal("create-tenant", pid=_pid(f), tenant="t9")),
        "already taken",
        None,
    ),
    (
        "proposal-expires-in-past",
        lambda f: f.build("proposal", f.make_proposal("create-tenant", ttl=0, tenant="t9")),
        "expires 1 to 86400 s after it is made",
        None,
    ),
    (
        "proposal-ttl-beyond-policy",
        lambda f: f.build("proposal", f.make_proposal("create-tenant", ttl=86401, tenant="t9")),
        "expires 1 to 86400 s after it is made.*got 86401",
        None,
    ),
    (
        "activation-beyond-policy",
        lambda f: f.build(
            "proposal",
            f.make_proposal("activate-tenant", tenant="t1", duration_seconds=8 * 3600 + 1),
        ),
        "exceeds",
        None,
    ),
    (
        "roster-threshold-above-count",
        lambda f: f.build(
            "proposal",
            f.make_proposal(
                "change-roster", roster=f"{C[0].fingerprint},{C[1].fingerprint}", threshold=3
            ),
        ),
        "exceeds",
        None,
    ),
    (
        "create-existing-tenant",
        lambda f: f.build("proposal", f.make_proposal("create-tenant", tenant="t1")),
        "exists",
        None,
    ),
    (
        "activate-unknown-tenant",
        lambda f: f.build(
            "proposal", f.make_proposal("activate-tenant", tenant="nobody", duration_seconds=60)
        ),
        "unknown tenant",
        None,
    ),
    (
        "revoke-missing-grant",
        lambda f: f.build(
            "proposal", f.make_proposal("revoke", backend="docs.example", tenant="t1")
        ),
        "no grant",
        None,
    ),
    (
        "disable-current-version",
        lambda f: f.build("proposal", f.make_proposal("disable-version", tenant="t1", version=1)),
        "current one",
        None,
    ),
    (
        "disable-missing-version",
        lambda f: f.build("proposal", f.make_proposal("disable-version", tenant="t1", version=7)),
        "no version 7",
        None,
    ),
    (
        "cancel-destroy-not-scheduled",
        lambda f: f.build("proposal", f.make_proposal("cancel-destroy", tenant="t1")),
        "not scheduled",
        None,
    ),
    ("operation-on-destroyed-tenant", _operation_on_destroyed, "destroyed", None),
    # 3. executions
    (
        "execution-without-k-approvals",
        lambda f: _execute(f, _pid(f)),
        "1 of 3 approvals",
        ThresholdError,
    ),
    ("narrowing-without-approval", _narrowing_without_approval, "0 of 1 approvals", ThresholdError),
    ("execution-after-expiry", _execution_after_expiry, "expired", ExpiredError),
    ("execution-of-another-operation", _wrong_operation, "for a deactivate-tenant", None),
    (
        "execution-twice",
        lambda f: _execute(f, next(iter(f.state.proposals))),
        "already executed",
        None,
    ),
    (
        "activation-window-altered",
        lambda f: _replace_result(
            f,
            "activate-tenant",
            3,
            lambda r: Activated("t1", r.active_until + 1),  # type: ignore[attr-defined]
            tenant="t1",
            duration_seconds=60,
        ),
        "active_until",
        None,
    ),
    (
        "result-for-another-tenant",
        lambda f: _replace_result(
            f,
            "activate-tenant",
            3,
            lambda r: Activated("t2", r.active_until),  # type: ignore[attr-defined]
            tenant="t1",
            duration_seconds=60,
        ),
        "names tenant",
        None,
    ),
    (
        "version-skipped",
        lambda f: _replace_result(
            f,
            "rotate-tenant",
            3,
            lambda r: dataclasses.replace(r, version=3),  # type: ignore[type-var]
            tenant="t1",
        ),
        "expected 2",
        None,
    ),
    (
        "destroy-wait-shortened",
        lambda f: _replace_result(
            f,
            "destroy-tenant",
            3,
            lambda r: DestroyScheduled("t1", r.destroy_at - 1),  # type: ignore[attr-defined]
            tenant="t1",
        ),
        "destroy_at",
        None,
    ),
    ("roster-change-drops-a-tenant-key", _rewrap_missing, "rewrapped", None),
    ("roster-change-rewraps-twice", _duplicate_rewrap, "rewrapped", None),
    (
        "roster-change-not-the-proposed-roster",
        _roster_not_proposed,
        "not the one the proposal",
        None,
    ),
    ("shred-before-wait-ends", _shred_early, "may not be shredded", None),
    (
        "shred-unknown-tenant",
        lambda f: f.build("shred", ShredPayload("nobody")),
        "unknown tenant",
        None,
    ),
]


@pytest.mark.parametrize(
    ("attack", "message", "cause"),
    [a[1:] for a in ATTACKS],
    ids=[a[0] for a in ATTACKS],
)
def test_bad_entry_is_refused_and_changes_nothing(
    attack: Attack, message: str, cause: type[Exception] | None
) -> None:
    f = _base()
    bad = attack(f)
    before = f.state.copy()
    seq = f.state.size
    with pytest.raises(LogIntegrityError, match=message) as info:
        f.replayer.apply(bad)
    assert info.value.seq == seq
    assert str(info.value).startswith(f"entry {seq}: ")
    # The typed refusal a caller about to append these bytes is given, its class intact.
    assert isinstance(info.value.refusal, KeyquorumError), repr(info.value.refusal)
    assert info.value.__cause__ is info.value.refusal
    if cause is not None:
        assert isinstance(info.value.refusal, cause), repr(info.value.refusal)
    assert f.state == before
    # The same bytes at the same place in a fresh replay fail the same way.
    with pytest.raises(LogIntegrityError) as again:
        replay([*f.entries, bad])
    assert again.value.seq == seq


def test_expired_approval_cause_is_expiry() -> None:
    f = _base()
    f.tick(3600)
    with pytest.raises(LogIntegrityError, match="expired") as info:
        f.replayer.apply(_approval(f))
    assert isinstance(info.value.__cause__, ExpiredError)


def test_check_does_not_change_the_state() -> None:
    f = _base()
    raw = _approval(f)
    before = f.state.copy()
    entry = f.replayer.check(raw)
    assert entry.type == "approval"
    assert f.state == before
    f.replayer.apply(raw)
    assert f.state != before


def test_first_entry_must_be_genesis() -> None:
    f = _base()
    proposal = f.make_proposal("create-tenant", tenant="t9")
    raw = Entry(0, bytes(32), "proposal", f.time, proposal).to_bytes()
    with pytest.raises(LogIntegrityError, match="not the genesis") as info:
        Replayer().apply(raw)
    assert info.value.seq == 0


def test_new_version_result_round_trip() -> None:
    result = NewVersion("t1", 2, b"\x01" * 60, b"\x02" * 32)
    assert NewVersion.from_json(result.to_json(), "result") == result


# -- the log key's chain and the witness policy --------------------------------------------


def test_a_rotation_puts_the_new_key_in_force_from_the_next_checkpoint() -> None:
    f = LogFactory()
    f.run("create-tenant", tenant="t1")
    before = f.state.size
    new = next_log_signer(1)
    f.run("rotate-log-key", log_key=new.verifier_key())
    rotation = f.state.size - 1
    f.run("create-tenant", tenant="t2")  # its execution is signed by the new key
    state = f.state
    assert state.log_key == new.verifier_key()
    assert state.log_keys == [(1, log_signer_key()), (rotation + 1, new.verifier_key())]
    assert state.key_at(before) == log_signer_key()
    assert state.key_at(rotation) == log_signer_key()  # the rotation entry itself: the old key
    assert state.key_at(rotation + 1) == new.verifier_key()
    # The whole log verifies under either key of its chain as the trusted one.
    for trusted in (log_signer_key(), new.verifier_key()):
        assert verify_log(f.entries, f.checkpoint(), trusted) == state
        assert verify_log(f.entries, f.checkpoint(before), trusted) == state
    # A checkpoint after the rotation signed by the old key is not the log's.
    from tests.logfactory import log_signer

    stale = log_signer().sign_checkpoint(f.state.size, _root(f.entries))
    with pytest.raises(UnverifiedNoteError):
        verify_log(f.entries, stale, log_signer_key())
    # A key of no rotation of this log is refused as the trusted one, naming both.
    with pytest.raises(LogIntegrityError, match="not one this log names") as info:
        verify_log(f.entries, f.checkpoint(), next_log_signer(2).verifier_key())
    assert new.verifier_key() in str(info.value)


def test_the_witness_policy_follows_the_log() -> None:
    f = LogFactory()
    w1, w2 = _witness(1), _witness(2)
    assert f.state.witness_policy.threshold == 0
    f.run("add-witness", witness=w1, witness_threshold=1)
    first = f.state.size
    f.run("add-witness", witness=w2, witness_threshold=2)
    second = f.state.size
    f.run("remove-witness", witness=w1, witness_threshold=1)
    state = f.state
    assert state.witnesses_at(first - 1).witnesses == ()
    assert state.witnesses_at(first) == WitnessPolicy(first, (w1,), 1)
    assert state.witnesses_at(second) == WitnessPolicy(second, (w1, w2), 2)
    assert state.witness_policy == WitnessPolicy(state.size, (w2,), 1)
    # A second witness with a taken name is refused.
    same_name = NoteSigner.generate(
        "witness-2.example", sig_type=SignatureType.COSIGNATURE_V1
    ).verifier_key()
    bad = f.build(
        "proposal", f.make_proposal("add-witness", witness=same_name, witness_threshold=1)
    )
    with pytest.raises(LogIntegrityError, match="already registered"):
        f.replayer.apply(bad)


def log_signer_key() -> str:
    from tests.logfactory import log_signer

    return log_signer().verifier_key()


def _root(entries: list[bytes]) -> bytes:
    from keyquorum.quorum.merkle import CompactRange, leaf_hash

    tree = CompactRange()
    for raw in entries:
        tree.append(leaf_hash(raw))
    return tree.root()
