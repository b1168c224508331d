"""Quorum approvals and the tenant-key lifecycle, on the real daemon over TLS gRPC.

Every refusal of the issue is a named case that checks the gRPC code, the
message, and that nothing changed (log size, the proposal's verdicts, the
tenant's state). Expiry runs on the harness's FakeClock; key buffers are
looked at directly to check that expiry, deactivation and seal zero them.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.connect import rpc_errors
from keyquorum.cli.main import main as cli_main
from keyquorum.hsm.daemon import tenant_keys
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum import canonical, shamir
from keyquorum.quorum import log as qlog
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    KeyquorumError,
    SealedError,
    StateError,
    StorageError,
)
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.log import Entry, ExecutionPayload, ShredPayload
from keyquorum.quorum.operations import NewVersion
from keyquorum.quorum.replay import replay
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.statements import render_time
from keyquorum.v1 import custodian_pb2 as pb
from tests.custodian_steps import (
    TENANT,
    K,
    approve,
    ceremony,
    key_bytes,
    propose,
    run,
    unseal,
    zeroed,
)
from tests.harness import (
    Custodian,
    InProcessDaemon,
    in_process_daemon,
    make_custodians,
    signed_proposal,
    status,
)

BOOKING = "keyquorum://backend/booking"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(
        tmp_path_factory.mktemp("pki"), server_names=["localhost"], clients=["backend/booking"]
    )


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"))


@pytest.fixture(scope="module")
def outsiders(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("outsiders"), names=("henry", "mallory"))


@pytest.fixture
def sealed(tmp_path: Path, pki: DevPki, custodians: list[Custodian]) -> Iterator[InProcessDaemon]:
    with in_process_daemon(tmp_path / "data", pki) as d:
        ceremony(d, custodians)
        yield d


@pytest.fixture
def daemon(sealed: InProcessDaemon, custodians: list[Custodian]) -> InProcessDaemon:
    unseal(sealed, custodians[:K])
    return sealed


def refuse(d: InProcessDaemon, c: Custodian, pid: str) -> pb.VerdictResponse:
    return actions.verdict(d.stub, pid, c.fingerprint, lambda _text: c.credential, verdict="refuse")


def create_and_activate(
    d: InProcessDaemon, custodians: list[Custodian], tenant: str = TENANT, duration: int = 3600
) -> None:
    run(d, custodians, "create-tenant", tenant=tenant)
    run(d, custodians, "activate-tenant", tenant=tenant, duration_seconds=duration)


def entries(d: InProcessDaemon) -> list[Entry]:
    return [Entry.from_bytes(raw) for raw in d.store.read_all()]


def proposal(d: InProcessDaemon, pid: str) -> pb.Proposal:
    return d.stub.GetProposal(pb.GetProposalRequest(id=pid))


def refused(
    d: InProcessDaemon, fn: Callable[[], object], *, code: grpc.StatusCode, match: str
) -> None:
    """`fn` fails with `code` and `match` in its message; the log and state stay as they were."""
    before_size = status(d.stub).log_size
    before_state, _ = d.daemon.log_snapshot()
    with pytest.raises(KeyquorumError) as info, rpc_errors():
        fn()
    assert getattr(info.value, "code", None) == code, str(info.value)
    assert match in str(info.value), str(info.value)
    assert status(d.stub).log_size == before_size
    after_state, _ = d.daemon.log_snapshot()
    assert after_state == before_state


# -- proposals and statements ---------------------------------------------------


def test_proposal_is_logged_with_the_statement_custodians_sign(daemon: InProcessDaemon) -> None:
    p = propose(daemon, "create-tenant", tenant=TENANT)
    assert (p.status, p.required, p.operation) == ("pending", K, "create-tenant")
    last = entries(daemon)[-1]
    assert last.type == "proposal"
    assert p.log_position == last.seq
    assert p.approve_statement == (
        "keyquorum statement v2: APPROVE\n"
        "deployment: test-deployment\n"
        f"summary: I approve: create tenant {TENANT}: a new 256-bit key, made in the daemon "
        "and kept only wrapped\n"
        f"proposal: {p.id}\n"
        f"proposed: {render_time(daemon.clock.now)}, at log position {last.seq}\n"
        # The proposer's default: the policy's TTL less a margin for clock skew.
        f"expires: {render_time(daemon.clock.now + DEFAULT_LIMITS.proposal_ttl_seconds - 300)}\n"
        f"approvals needed: {K} of the 7 custodians\n"
        "operation: create-tenant\n"
        f"  tenant: {TENANT}\n"
    )
    assert p.refuse_statement.startswith("keyquorum statement v2: REFUSE\n")
    listed = daemon.stub.ListProposals(pb.ListProposalsRequest()).proposals
    assert [x.id for x in listed] == [p.id]


@pytest.mark.parametrize(
    ("op", "params", "code", "match"),
    [
        ("no-such-op", {"tenant": "a"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown operation"),
        ("create-tenant", {"tenant": "Bad Name"}, grpc.StatusCode.INVALID_ARGUMENT, "valid"),
        ("create-tenant", {}, grpc.StatusCode.INVALID_ARGUMENT, "missing tenant"),
        (
            "activate-tenant",
            {"tenant": TENANT, "duration_seconds": "1h"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "decimal",
        ),
        (
            "activate-tenant",
            {"tenant": TENANT, "duration_seconds": DEFAULT_LIMITS.activation_max_seconds + 1},
            grpc.StatusCode.INVALID_ARGUMENT,
            "exceeds the policy",
        ),
        (
            "activate-tenant",
            {"tenant": "nobody", "duration_seconds": 60},
            grpc.StatusCode.FAILED_PRECONDITION,
            "unknown tenant",
        ),
        (
            "grant",
            {"tenant": TENANT, "backend": "keyquorum://auditor/eve"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a backend",
        ),
    ],
    ids=[
        "unknown-operation",
        "bad-tenant-name",
        "missing-parameter",
        "non-decimal-duration",
        "duration-over-policy-max",
        "unknown-tenant",
        "auditor-is-not-a-backend",
    ],
)
def test_bad_proposals_are_refused(
    daemon: InProcessDaemon, op: str, params: dict[str, object], code: grpc.StatusCode, match: str
) -> None:
    refused(daemon, lambda: propose(daemon, op, **params), code=code, match=match)


def test_proposal_expiry_beyond_the_policy_is_refused(daemon: InProcessDaemon) -> None:
    refused(
        daemon,
        lambda: propose(
            daemon,
            "create-tenant",
            expires_in=DEFAULT_LIMITS.proposal_ttl_seconds + 1,
            tenant=TENANT,
        ),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        match="expires 1 to",
    )


# -- the quorum rule ------------------------------------------------------------


def test_create_tenant_wraps_a_fresh_key_and_binds_its_salt(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    p = propose(daemon, "create-tenant", tenant=TENANT)
    for i, c in enumerate(custodians[: K - 1], start=1):
        r = approve(daemon, c, p.id)
        assert (len(r.proposal.approved_by), r.executed) == (i, False)
    size = status(daemon.stub).log_size
    r = approve(daemon, custodians[K - 1], p.id)
    assert r.executed
    assert r.proposal.status == "executed"
    # The k-th approval and the execution: two entries, one append.
    log = entries(daemon)
    assert status(daemon.stub).log_size == size + 2
    assert [e.type for e in log[-2:]] == ["approval", "execution"]
    assert log[-2].time == log[-1].time
    execution = log[-1].payload
    assert isinstance(execution, ExecutionPayload)
    result = execution.result
    assert isinstance(result, NewVersion)
    assert (result.tenant, result.version) == (TENANT, 1)
    assert len(result.wrapped_key) == tenant_keys.WRAPPED_SIZE
    assert result.wrapped_key[0] == tenant_keys.WRAP_FORMAT
    salt = daemon.store.get_shred_salt(TENANT, 1)
    assert salt is not None
    assert hashlib.sha256(salt).digest() == result.shred_salt_sha256
    # The salt itself is nowhere in the log; the key is not active yet.
    assert all(salt.hex() not in raw.decode() for raw in daemon.store.read_all())
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(TENANT)


def test_activation_needs_k_approvals_then_the_key_is_usable(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    run(daemon, custodians, "create-tenant", tenant=TENANT)
    p = propose(daemon, "activate-tenant", tenant=TENANT, duration_seconds=3600)
    for c in custodians[: K - 1]:
        assert not approve(daemon, c, p.id).executed
        with pytest.raises(StateError, match="not active"):
            daemon.daemon.tenant_key(TENANT)
    assert approve(daemon, custodians[K - 1], p.id).executed
    version, key = daemon.daemon.tenant_key(TENANT)
    with key:
        assert version == 1
        assert len(key) == 32
        # The key unwraps from the log's wrapped key with the stored salt.
        record = daemon.daemon.state.tenants[TENANT]
        salt = daemon.store.get_shred_salt(TENANT, 1)
        assert salt is not None
        with daemon.daemon._r.custody.master() as (master, _generation):
            again = tenant_keys.unwrap(master, salt, TENANT, 1, record.current.wrapped_key)
        with again:
            assert again.equals(key)
    (t,) = daemon.stub.ListTenants(pb.ListTenantsRequest()).tenants
    assert (t.name, t.unwrapped, t.active_until) == (TENANT, True, daemon.clock.now + 3600)


@pytest.mark.parametrize(
    ("op", "params"),
    [
        ("deactivate-tenant", {"tenant": TENANT}),
        ("revoke", {"tenant": TENANT, "backend": "booking"}),
    ],
    ids=["deactivate", "revoke"],
)
def test_narrowing_operations_need_one_custodian(
    daemon: InProcessDaemon, custodians: list[Custodian], op: str, params: dict[str, object]
) -> None:
    create_and_activate(daemon, custodians)
    run(daemon, custodians, "grant", tenant=TENANT, backend=BOOKING)
    buffers = daemon.daemon.tenant_key_buffers_for_test(TENANT)
    p = propose(daemon, op, **params)
    assert p.required == 1
    r = approve(daemon, custodians[6], p.id)
    assert r.executed
    if op == "deactivate-tenant":
        assert zeroed(buffers)
        with pytest.raises(StateError, match="not active"):
            daemon.daemon.tenant_key(TENANT)
    else:
        with pytest.raises(AccessDeniedError, match="not granted"):
            daemon.daemon.data_key("booking", TENANT)


def test_grant_binds_the_backend_certificate_identity(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    run(daemon, custodians, "create-tenant", tenant=TENANT)
    assert not daemon.daemon.state.granted("booking", TENANT)
    with pytest.raises(AccessDeniedError):
        daemon.daemon.data_key("booking", TENANT)
    r = run(daemon, custodians, "grant", tenant=TENANT, backend=BOOKING)
    assert [(x.key, x.value) for x in r.proposal.parameters] == [
        ("backend", "booking"),
        ("tenant", TENANT),
    ]
    assert daemon.daemon.state.granted("booking", TENANT)
    # Past the grant, the refusal is the tenant's state (never activated).
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.data_key("booking", TENANT)
    with pytest.raises(AccessDeniedError, match="not granted"):
        daemon.daemon.data_key("documents", TENANT)


def test_data_key_checks_the_grant_before_anything_it_could_reveal(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    """`Daemon.data_key`: not granted is refused first, whatever else is wrong.

    An ungranted backend learns neither whether the tenant exists, nor how
    many versions it has, nor whether it is active or the service sealed.
    """
    create_and_activate(daemon, custodians)
    d = daemon.daemon
    with pytest.raises(AccessDeniedError, match="backend booking is not granted"):
        d.data_key("booking", TENANT)
    run(daemon, custodians, "grant", tenant=TENANT, backend="booking")
    version, held = d.data_key("booking", TENANT)
    assert version == 1
    assert bytes(held.view()) == key_bytes(daemon)
    assert not held.cipher.closed
    for backend, tenant, number in [
        ("documents", TENANT, 99),  # another backend, a version never made
        ("documents", "no-such-tenant", None),
        ("keyquorum://backend/booking", TENANT, None),  # a URI is not a name
    ]:
        with pytest.raises(AccessDeniedError, match="not granted"):
            d.data_key(backend, tenant, number)
    with pytest.raises(DeserializationError, match=r"names key version 2 .* which has 1"):
        d.data_key("booking", TENANT, 2)
    d.seal_for_shutdown("test")
    with pytest.raises(AccessDeniedError, match="not granted"):
        d.data_key("documents", TENANT, 99)
    with pytest.raises(DeserializationError, match="which has 1"):
        d.data_key("booking", TENANT, 99)
    with pytest.raises(SealedError):
        d.data_key("booking", TENANT, 1)
    # What it handed out was the keyring's own version, not a copy: the seal closed it.
    assert held.cipher.closed
    with pytest.raises(StateError, match="wiped"):
        held.view()


# -- refusals ----------------------------------------------------------------------


def signed(d: InProcessDaemon, c: Custodian, pid: str) -> pb.VerdictRequest:
    """`c`'s approval of `pid`, made directly (without the CLI's pending check)."""
    statement = actions.proposal_statement(proposal(d, pid), "approve")
    sig = c.credential.sign("approve", statement.message())
    return pb.VerdictRequest(proposal=pid, custodian=c.fingerprint, signature=sig.to_bytes())


def _forged(d: InProcessDaemon, pid: str, signer: Custodian, claimed: Custodian) -> None:
    """`signer` signs the real statement but claims to be `claimed`."""
    statement = actions.proposal_statement(proposal(d, pid), "approve")
    sig = signer.credential.sign("approve", statement.message())
    d.stub.Approve(
        pb.VerdictRequest(proposal=pid, custodian=claimed.fingerprint, signature=sig.to_bytes())
    )


def _captured(d: InProcessDaemon, c: Custodian, pid: str) -> pb.VerdictRequest:
    """The request `c` would send to approve `pid`, captured instead of sent."""
    captured: list[pb.VerdictRequest] = []

    class Recorder:
        def __getattr__(self, name: str) -> object:
            return getattr(d.stub, name)

        def Approve(self, request: pb.VerdictRequest) -> pb.VerdictResponse:
            captured.append(request)
            return pb.VerdictResponse()

    actions.verdict(
        Recorder(),  # type: ignore[arg-type]
        pid,
        c.fingerprint,
        lambda _t: c.credential,
        verdict="approve",
    )
    return captured[0]


REFUSALS = [
    (
        "forged-signature-other-custodians-key",
        lambda d, cs, out, pid, other: _forged(d, pid, cs[1], cs[3]),
        grpc.StatusCode.PERMISSION_DENIED,
        "does not verify",
    ),
    (
        "garbage-signature-bytes",
        lambda d, cs, out, pid, other: d.stub.Approve(
            pb.VerdictRequest(proposal=pid, custodian=cs[3].fingerprint, signature=b"\x01" * 40)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "",
    ),
    (
        "replayed-from-another-proposal",
        lambda d, cs, out, pid, other: d.stub.Approve(
            pb.VerdictRequest(
                proposal=pid,
                custodian=cs[2].fingerprint,
                signature=_captured(d, cs[2], other).signature,
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "does not verify",
    ),
    (
        "refusal-signature-as-approval",
        lambda d, cs, out, pid, other: d.stub.Approve(
            pb.VerdictRequest(
                proposal=pid,
                custodian=cs[2].fingerprint,
                signature=cs[2]
                .credential.sign(
                    "refuse", actions.proposal_statement(proposal(d, pid), "refuse").message()
                )
                .to_bytes(),
            )
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "does not verify",
    ),
    (
        "twice-by-one-custodian",
        lambda d, cs, out, pid, other: approve(d, cs[0], pid),
        grpc.StatusCode.ALREADY_EXISTS,
        "custodian alice",
    ),
    (
        "same-signature-resent",
        lambda d, cs, out, pid, other: d.stub.Approve(_captured(d, cs[0], pid)),
        grpc.StatusCode.ALREADY_EXISTS,
        "already approved",
    ),
    (
        "refuse-after-approving",
        lambda d, cs, out, pid, other: refuse(d, cs[0], pid),
        grpc.StatusCode.ALREADY_EXISTS,
        "already approved",
    ),
    (
        "not-a-custodian",
        lambda d, cs, out, pid, other: approve(d, out[1], pid),
        grpc.StatusCode.PERMISSION_DENIED,
        "not on the roster",
    ),
    (
        "unknown-proposal",
        lambda d, cs, out, pid, other: approve(d, cs[3], "00" * 16),
        grpc.StatusCode.NOT_FOUND,
        "unknown proposal",
    ),
    (
        "malformed-proposal-id",
        lambda d, cs, out, pid, other: d.stub.Approve(
            pb.VerdictRequest(proposal="zz", custodian=cs[3].fingerprint, signature=b"")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hex",
    ),
]


@pytest.mark.parametrize(
    ("action", "code", "match"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_bad_approvals_are_refused_and_change_nothing(
    daemon: InProcessDaemon,
    custodians: list[Custodian],
    outsiders: list[Custodian],
    action: Callable[..., object],
    code: grpc.StatusCode,
    match: str,
) -> None:
    run(daemon, custodians, "create-tenant", tenant=TENANT)
    p = propose(daemon, "activate-tenant", tenant=TENANT, duration_seconds=600)
    other = propose(daemon, "rotate-tenant", tenant=TENANT)
    approve(daemon, custodians[0], p.id)
    refused(
        daemon,
        lambda: action(daemon, custodians, outsiders, p.id, other.id),
        code=code,
        match=match,
    )
    assert list(proposal(daemon, p.id).approved_by) == [custodians[0].fingerprint]


def test_expired_proposal_is_refused(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    run(daemon, custodians, "create-tenant", tenant=TENANT)
    p = propose(daemon, "activate-tenant", expires_in=60, tenant=TENANT, duration_seconds=600)
    for c in custodians[: K - 1]:
        approve(daemon, c, p.id)
    daemon.clock.advance(60)
    assert proposal(daemon, p.id).status == "expired"
    assert daemon.stub.ListProposals(pb.ListProposalsRequest()).proposals == []
    # A valid signature over the statement, sent after the expiry.
    refused(
        daemon,
        lambda: daemon.stub.Approve(signed(daemon, custodians[K - 1], p.id)),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="expired",
    )
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(TENANT)


def test_executed_proposal_takes_no_more_approvals(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    r = run(daemon, custodians, "create-tenant", tenant=TENANT)
    refused(
        daemon,
        lambda: daemon.stub.Approve(signed(daemon, custodians[6], r.proposal.id)),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="already executed",
    )


def test_a_refusal_is_logged(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    p = propose(daemon, "create-tenant", tenant=TENANT)
    size = status(daemon.stub).log_size
    r = refuse(daemon, custodians[3], p.id)
    assert list(r.proposal.refused_by) == [custodians[3].fingerprint]
    assert status(daemon.stub).log_size == size + 1
    last = entries(daemon)[-1]
    assert last.type == "refusal"
    # The refusing custodian cannot approve afterwards; the others still can.
    refused(
        daemon,
        lambda: approve(daemon, custodians[3], p.id),
        code=grpc.StatusCode.ALREADY_EXISTS,
        match="already refused",
    )
    others = [c for i, c in enumerate(custodians) if i != 3]
    for c in others[:K]:
        r = approve(daemon, c, p.id)
    assert r.executed


def test_execution_needing_the_master_key_is_refused_while_sealed(
    sealed: InProcessDaemon, custodians: list[Custodian]
) -> None:
    p = propose(sealed, "create-tenant", tenant=TENANT)
    for c in custodians[: K - 1]:
        assert not approve(sealed, c, p.id).executed  # logged while sealed
    refused(
        sealed,
        lambda: approve(sealed, custodians[K - 1], p.id),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="needs the master key",
    )
    assert len(proposal(sealed, p.id).approved_by) == K - 1
    unseal(sealed, custodians[:K])
    assert approve(sealed, custodians[K - 1], p.id).executed


def test_a_failed_store_write_logs_neither_approval_nor_execution(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    run(daemon, custodians, "create-tenant", tenant=TENANT)
    p = propose(daemon, "activate-tenant", tenant=TENANT, duration_seconds=600)
    for c in custodians[: K - 1]:
        approve(daemon, c, p.id)
    before, _ = daemon.daemon.log_snapshot()
    size = status(daemon.stub).log_size
    calls: list[int] = []

    def failing_append(records: object, **kw: object) -> None:
        calls.append(len(records))  # type: ignore[arg-type]
        raise StorageError("disk full")

    monkeypatch.setattr(daemon.store, "append", failing_append)
    with pytest.raises(KeyquorumError, match="disk full"), rpc_errors():
        approve(daemon, custodians[K - 1], p.id)
    monkeypatch.undo()
    assert calls == [2]  # approval and execution were one write
    assert status(daemon.stub).log_size == size
    assert daemon.daemon.log_snapshot()[0] == before
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(TENANT)
    assert approve(daemon, custodians[K - 1], p.id).executed


# -- expiry, seal, restart --------------------------------------------------------------


def test_activation_expiry_refuses_access_at_once_and_the_sweep_wipes(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    """The data plane compares the end itself; wiping is the sweeper's, never a call's."""
    create_and_activate(daemon, custodians, duration=600)
    buffers = daemon.daemon.tenant_key_buffers_for_test(TENANT)
    assert buffers
    assert not zeroed(buffers)
    daemon.clock.advance(599)
    assert len(key_bytes(daemon)) == 32
    daemon.clock.advance(1)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(TENANT)
    assert not zeroed(buffers)  # refused, but nothing was swept by the calls
    daemon.daemon.sweep()
    assert zeroed(buffers)


def test_the_sweeper_wipes_an_ended_activation_without_any_call(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    create_and_activate(daemon, custodians, duration=600)
    buffers = daemon.daemon.tenant_key_buffers_for_test(TENANT)
    daemon.clock.advance(600)
    deadline = time.monotonic() + 5
    while not zeroed(buffers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert zeroed(buffers)


def test_seal_wipes_every_tenant_key(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    create_and_activate(daemon, custodians, tenant="t-one")
    create_and_activate(daemon, custodians, tenant="t-two")
    buffers = [
        *daemon.daemon.tenant_key_buffers_for_test("t-one"),
        *daemon.daemon.tenant_key_buffers_for_test("t-two"),
    ]
    assert len(buffers) == 2
    assert not zeroed(buffers)
    actions.seal(
        daemon.stub,
        custodians[6],
        lambda _t: custodians[6].credential,
        reason="test",
        now=daemon.clock.now,
    )
    assert zeroed(buffers)
    with pytest.raises(SealedError):
        daemon.daemon.tenant_key("t-one")
    # The log still says active; the key is simply not in memory.
    t = {x.name: x for x in daemon.stub.ListTenants(pb.ListTenantsRequest()).tenants}
    assert t["t-one"].active_until > 0
    assert not t["t-one"].unwrapped


def test_restart_and_unseal_restore_only_still_valid_activations(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    with in_process_daemon(tmp_path / "data", pki) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        create_and_activate(d, custodians, tenant="long", duration=3600)
        create_and_activate(d, custodians, tenant="short", duration=600)
        long_key = key_bytes(d, "long")
        clock = d.clock
    clock.advance(700)
    with in_process_daemon(tmp_path / "data", pki, clock=clock) as d:
        assert status(d.stub).sealed
        with pytest.raises(SealedError):
            d.daemon.tenant_key("long")
        unseal(d, custodians[2:])
        assert key_bytes(d, "long") == long_key
        with pytest.raises(StateError, match="not active"):
            d.daemon.tenant_key("short")
        assert d.daemon.tenant_key_buffers_for_test("short") == []


# -- rotation, disable, destroy ---------------------------------------------------------


def test_rotation_adds_a_version_and_old_ones_work_until_disabled(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    create_and_activate(daemon, custodians)
    v1 = key_bytes(daemon)
    run(daemon, custodians, "rotate-tenant", tenant=TENANT)
    version, key = daemon.daemon.tenant_key(TENANT)
    with key:
        assert version == 2
        assert not key.equals(v1)
    assert key_bytes(daemon, version=1) == v1
    refused(
        daemon,
        lambda: propose(daemon, "disable-version", tenant=TENANT, version=2),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="current one",
    )
    before = daemon.daemon.tenant_key_buffers_for_test(TENANT)
    run(daemon, custodians, "disable-version", tenant=TENANT, version=1)
    with pytest.raises(StateError, match="disabled"):
        daemon.daemon.tenant_key(TENANT, 1)
    assert sum(1 for b in before if b == bytearray(32)) == 1
    assert daemon.daemon.tenant_key(TENANT)[0] == 2


def test_destroy_waits_can_be_cancelled_then_shreds_for_good(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    create_and_activate(daemon, custodians)
    run(daemon, custodians, "grant", tenant=TENANT, backend=BOOKING)
    buffers = daemon.daemon.tenant_key_buffers_for_test(TENANT)
    run(daemon, custodians, "destroy-tenant", tenant=TENANT)
    assert zeroed(buffers)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(TENANT)
    # During the wait, one custodian cancels it; the salts are still there.
    r = run(daemon, custodians[6:], "cancel-destroy", tenant=TENANT)
    assert r.proposal.required == 1
    assert daemon.store.get_shred_salt(TENANT, 1) is not None
    run(daemon, custodians, "destroy-tenant", tenant=TENANT)
    wait = DEFAULT_LIMITS.destroy_wait_seconds
    daemon.clock.advance(wait - 1)
    daemon.daemon.sweep()
    assert entries(daemon)[-1].type == "execution"
    daemon.clock.advance(1)
    daemon.daemon.sweep()
    last = entries(daemon)[-1]
    assert isinstance(last.payload, ShredPayload)
    assert last.payload.tenant == TENANT
    assert daemon.store.get_shred_salt(TENANT, 1) is None
    (t,) = daemon.stub.ListTenants(pb.ListTenantsRequest()).tenants
    assert (t.destroyed, list(t.backends)) == (True, [])
    with pytest.raises(StateError, match="destroyed"):
        daemon.daemon.tenant_key(TENANT)
    # The backend that held the grant is told the truth; any other learns nothing.
    with pytest.raises(StateError, match=f"tenant {TENANT!r} was destroyed") as told:
        daemon.daemon.data_key("booking", TENANT)
    assert not isinstance(told.value, AccessDeniedError)
    with pytest.raises(AccessDeniedError, match="not granted"):
        daemon.daemon.data_key("documents", TENANT)
    # No later quorum brings it back: the name is never reused, nothing is possible.
    for op, params in [
        ("create-tenant", {"tenant": TENANT}),
        ("activate-tenant", {"tenant": TENANT, "duration_seconds": 60}),
        ("cancel-destroy", {"tenant": TENANT}),
    ]:
        refused(
            daemon,
            lambda op=op, params=params: propose(daemon, op, **params),
            code=grpc.StatusCode.FAILED_PRECONDITION,
            match="destroyed",
        )
    state, raws = daemon.daemon.log_snapshot()
    assert replay(raws) == state


# -- roster change ----------------------------------------------------------------


def _old_share_request(
    d: InProcessDaemon, c: Custodian, genesis_share: pb.EncryptedShare
) -> Callable[[], object]:
    """`c` sends the share they kept from before the roster change."""

    class OldShare:
        def __getattr__(self, name: str) -> object:
            return getattr(d.stub, name)

        def GetEncryptedShare(self, request: object) -> pb.EncryptedShare:
            return genesis_share

    return lambda: actions.submit_share(OldShare(), c.credential)  # type: ignore[arg-type]


def test_roster_change_rotates_the_master_key_and_old_shares_unseal_nothing(
    daemon: InProcessDaemon, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    henry, grace = outsiders[0], custodians[6]
    old_shares = {
        c.name: daemon.stub.GetEncryptedShare(pb.GetEncryptedShareRequest(custodian=c.fingerprint))
        for c in custodians
    }
    create_and_activate(daemon, custodians)
    tenant_key = key_bytes(daemon)
    old_wrapped = daemon.daemon.state.tenants[TENANT].current.wrapped_key
    pending = propose(daemon, "grant", tenant=TENANT, backend="booking")
    old_master = daemon.daemon.master_key_buffer_for_test()
    assert old_master is not None
    new_roster = [*custodians[:6], henry]
    p = daemon.stub.Propose(
        signed_proposal(
            daemon.stub,
            custodians[0].credential,
            "change-roster",
            {"roster": ",".join(c.fingerprint for c in new_roster), "threshold": 4},
            now=daemon.clock(),
            public_credentials=(henry.public_path.read_bytes(),),
        )
    )
    # What the custodians sign names who comes and who goes, by name and fingerprint;
    # henry's public credential is in the proposal's entry, so replay renders the same.
    lines = p.approve_statement.splitlines()
    assert f"  added: {henry.credential.public().label}" in lines
    assert f"  removed: {grace.credential.public().label}" in lines
    assert f"  threshold: {K} of 7 now, 4 of 7 after" in lines
    assert f"  share 7 after: {henry.credential.public().label}" in lines
    (logged,) = [e for e in entries(daemon) if e.type == "proposal" and e.payload.id.hex() == p.id]
    assert [c.fingerprint for c in logged.payload.credentials] == [henry.fingerprint]
    for c in custodians[:K]:
        r = approve(daemon, c, p.id)
    assert r.executed
    # The daemon holds a new master key; the old buffer is zeroed.
    assert old_master == bytearray(32)
    assert daemon.daemon.master_key_buffer_for_test() is not None
    new_wrapped = daemon.daemon.state.tenants[TENANT].current.wrapped_key
    assert new_wrapped != old_wrapped
    assert key_bytes(daemon) == tenant_key
    # Other pending proposals were cancelled; the removed custodian approves nothing.
    assert proposal(daemon, pending.id).status == "cancelled"
    refused(
        daemon,
        lambda: daemon.stub.Approve(signed(daemon, custodians[0], pending.id)),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="cancelled",
    )
    fresh = propose(daemon, "rotate-tenant", tenant=TENANT)
    assert fresh.required == 4
    refused(
        daemon,
        lambda: approve(daemon, grace, fresh.id),
        code=grpc.StatusCode.PERMISSION_DENIED,
        match="not on the roster",
    )
    # Seal; the removed custodian's old share is refused, so are the old shares
    # of those who stayed; four new shares unseal, the activation comes back.
    actions.seal(
        daemon.stub, custodians[0], lambda _t: custodians[0].credential,
        reason="roster test", now=daemon.clock.now,
    )  # fmt: skip
    refused(
        daemon,
        lambda: actions.submit_share(daemon.stub, grace.credential),
        code=grpc.StatusCode.PERMISSION_DENIED,
        match="not on the roster",
    )
    refused(
        daemon,
        _old_share_request(daemon, grace, old_shares["grace"]),
        code=grpc.StatusCode.PERMISSION_DENIED,
        match="not on the roster",
    )
    refused(
        daemon,
        _old_share_request(daemon, custodians[0], old_shares["alice"]),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        match="another split",
    )
    for c in [custodians[1], custodians[2], henry]:
        assert actions.submit_share(daemon.stub, c.credential).sealed
    assert not actions.submit_share(daemon.stub, custodians[3].credential).sealed
    assert key_bytes(daemon) == tenant_key
    # Five old shares still combine into the old master key, which opens nothing
    # the log holds now.
    old_master_key = _combine_old(old_shares, custodians[2:7])
    salt = daemon.store.get_shred_salt(TENANT, 1)
    assert salt is not None
    with old_master_key, pytest.raises(KeyquorumError, match="does not open"):
        tenant_keys.unwrap(old_master_key, salt, TENANT, 1, new_wrapped)
    state, raws = daemon.daemon.log_snapshot()
    assert replay(raws) == state


def _combine_old(old: dict[str, pb.EncryptedShare], holders: list[Custodian]) -> SecretBytes:
    shares = []
    commitments = shamir.SplitCommitments.from_json(
        canonical.decode(old[holders[0].name].split_commitments)
    )
    for c in holders:
        enc = old[c.name]
        info = qlog.share_info(
            enc.deployment, bytes.fromhex(enc.split_id), c.fingerprint, enc.index
        )
        with c.credential.open_sealed(enc.ciphertext, info) as plain:
            shares.append(shamir.Share.from_bytes(plain.view()))
    return shamir.combine(shares, commitments)


def test_roster_change_needs_the_new_custodians_credentials(
    daemon: InProcessDaemon, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    roster = ",".join(c.fingerprint for c in [*custodians[:6], outsiders[0]])
    refused(
        daemon,
        lambda: propose(daemon, "change-roster", roster=roster, threshold=4),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="give their public file",
    )


# -- the CLI ------------------------------------------------------------------------


def test_cli_approve_prints_the_exact_statement_before_the_passphrase(
    daemon: InProcessDaemon, pki: DevPki, custodians: list[Custodian]
) -> None:
    conn = ["--server", daemon.target, "--ca", str(pki.ca_cert)]
    runner = CliRunner()
    alice = custodians[0]
    daemon.clock.now = max(daemon.clock.now, int(time.time()))  # the CLI signs by its clock
    result = runner.invoke(
        cli_main,
        ["proposal", "new", "create-tenant", "--param", f"tenant={TENANT}", *conn,
         "--credential", str(alice.private_path), "--expires-in", "1h"],
        input=alice.passphrase.decode() + "\n",
        catch_exceptions=False,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The propose statement was shown before the passphrase was asked for.
    assert result.output.index("PROPOSE") < result.output.index("Passphrase for")
    (p,) = daemon.stub.ListProposals(pb.ListProposalsRequest()).proposals
    assert p.approve_statement in result.output
    result = runner.invoke(
        cli_main,
        ["custodian", "approve", p.id, *conn, "--credential", str(alice.private_path)],
        input=alice.passphrase.decode() + "\n",
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    shown = result.output.index(p.approve_statement)
    asked = result.output.index("Passphrase for")
    assert shown < asked
    assert "approved: 1 of 5; not executed yet" in result.output
    result = runner.invoke(cli_main, ["proposal", "show", p.id, *conn], catch_exceptions=False)
    assert p.approve_statement in result.output
    assert "approvals 1 of 5" in result.output


def test_cli_refuses_to_sign_a_statement_that_does_not_match_the_proposal(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    p = propose(daemon, "create-tenant", tenant=TENANT)
    honest = proposal(daemon, p.id)
    lying = pb.Proposal()
    lying.CopyFrom(honest)
    lying.approve_statement = honest.approve_statement.replace(TENANT, "other-tenant")
    shown: list[str] = []

    class Liar:
        def __getattr__(self, name: str) -> object:
            return getattr(daemon.stub, name)

        def GetProposal(self, request: object) -> pb.Proposal:
            return lying

    with pytest.raises(KeyquorumError, match="does not match"):
        actions.verdict(
            Liar(),  # type: ignore[arg-type]
            p.id,
            custodians[0].fingerprint,
            lambda text: shown.append(text) or custodians[0].credential,  # type: ignore[func-returns-value]
            verdict="approve",
        )
    assert shown == []


def test_daemon_state_is_the_replay_of_its_store(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    create_and_activate(daemon, custodians)
    run(daemon, custodians, "grant", tenant=TENANT, backend=BOOKING)
    refuse(daemon, custodians[1], propose(daemon, "rotate-tenant", tenant=TENANT).id)
    state, raws = daemon.daemon.log_snapshot()
    assert replay(raws) == state


def test_new_key_salt_is_stored_in_the_same_append_as_its_execution(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    p = propose(daemon, "create-tenant", tenant=TENANT)
    for c in custodians[: K - 1]:
        approve(daemon, c, p.id)
    real_append = daemon.store.append
    calls: list[tuple[list[str], list[tuple[str, int]]]] = []

    def recording_append(records: list[tuple[int, bytes, bytes]], **kw: object) -> None:
        salts = kw.get("shred_salts", ())
        calls.append(
            (
                [Entry.from_bytes(raw).type for _seq, _h, raw in records],
                [(t, v) for t, v, _s in salts],  # type: ignore[attr-defined]
            )
        )
        real_append(records, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(daemon.store, "append", recording_append)
    assert approve(daemon, custodians[K - 1], p.id).executed
    assert calls == [(["approval", "execution"], [(TENANT, 1)])]
