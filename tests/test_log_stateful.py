"""Random governance histories against a small model (hypothesis stateful testing).

Each rule builds one entry, valid or deliberately invalid, and offers it to
the replayer. A small independent model (tenants, grants, verdicts and
expiries, written from docs/log-format.md, not from replay.py) says which
entries must be accepted; anything it calls invalid must be refused with
`LogIntegrityError` and leave both the log and the state unchanged.

After every step:
- the replayed state equals a fresh replay of the log so far;
- every tenant that is active has an activation carried by at least k
  distinct custodians of the roster, re-checked here from the approval
  entries in the log with `statements.verify_approvals`;
- a tenant once destroyed stays destroyed, never active, never re-created;
- the model and the state agree on which tenants exist, are destroyed and
  are active, and on the grants.

The log's trust rules are operations too: proposals signed by a custodian
or by a proposer the quorum registered (add-proposer / remove-proposer),
and refused when unsigned, forged or by anyone else; witnesses added and
removed with their threshold m; the log key rotated by the quorum, after
which the daemon's entries must carry the new key's signature and an old
key's is refused; an entry the daemon writes on its own refused without
its signature. The model tracks the proposers, the witness set and m,
and the log key in force, and the state must agree after every step.

Roster changes are covered by tests/test_replay.py, not here: the model
keeps one roster (5 custodians, threshold 3) so that steps stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from keyquorum.quorum.errors import LogIntegrityError
from keyquorum.quorum.log import (
    ApprovalPayload,
    Entry,
    ExecutionPayload,
    Policy,
    ProposalPayload,
    ShredPayload,
)
from keyquorum.quorum.note import NoteSigner, SignatureType
from keyquorum.quorum.operations import OPERATIONS, request_for
from keyquorum.quorum.replay import replay
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.statements import SignedStatement, verify_approvals
from tests.logfactory import (
    Counter,
    LogFactory,
    custodians,
    log_signer,
    next_log_signer,
    outsider,
    resigned,
)

N, K = 5, 3
CREDS = custodians(N)
#: Credentials a quorum may register as proposers (on no roster).
PROPOSERS = custodians(9)[N:]
#: Witness keys a quorum may add.
WITNESSES = tuple(
    NoteSigner.generate(
        f"w{i}.example", sig_type=SignatureType.COSIGNATURE_V1, random_bytes=Counter(b"sw%d" % i)
    ).verifier_key()
    for i in range(3)
)
#: The keys a log may rotate to, in order.
NEXT_KEYS = tuple(next_log_signer(n) for n in (1, 2, 3))
TENANTS = ("t1", "t2")
BACKENDS = ("booking.example", "docs.example")
POLICY = Policy(activation_max_seconds=600, destroy_wait_seconds=300, proposal_ttl_seconds=400)
NARROWING = {name for name, op in OPERATIONS.items() if not op.widening}
# create-tenant first: hypothesis shrinks towards it, and everything else needs a tenant.
#: Operations on the deployment itself, driven by their own rules below (approve-restore
#: only follows `admin restore --abandon-checkpoint`: tests/test_backup.py).
DEPLOYMENT_OPS = {
    "change-roster", "add-proposer", "remove-proposer", "add-witness", "remove-witness",
    "rotate-log-key", "approve-restore",
}  # fmt: skip
OPS = st.sampled_from(
    ["create-tenant", *sorted(OPERATIONS.keys() - DEPLOYMENT_OPS - {"create-tenant"})]
)


@dataclass
class ModelTenant:
    versions: int = 1
    disabled: set[int] = field(default_factory=set)
    active_until: int | None = None
    destroy_at: int | None = None
    destroyed: bool = False


@dataclass
class ModelProposal:
    op: str
    params: dict[str, str | int]
    expires_at: int
    voters: set[int] = field(default_factory=set)
    approvals: int = 0
    done: bool = False


class GovernanceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.f = LogFactory(N, K, seed=b"stateful", policy=POLICY)
        self.tenants: dict[str, ModelTenant] = {}
        self.grants: set[tuple[str, str]] = set()
        self.proposals: dict[bytes, ModelProposal] = {}
        self.ever_destroyed: set[str] = set()
        self.registered: set[str] = set()
        self.witnesses: list[str] = []
        self.witness_threshold = 0
        self.log_keys: list[NoteSigner] = [log_signer()]

    # -- plumbing --------------------------------------------------------

    def offer(self, raw: bytes, valid: bool) -> bool:
        """Apply `raw`; it must be accepted iff `valid`. A refusal changes nothing."""
        before_entries = list(self.f.entries)
        before_state = self.f.state.copy()
        refusal: LogIntegrityError | None = None
        try:
            self.f.replayer.apply(raw)
        except LogIntegrityError as e:
            refusal = e
        if refusal is not None:
            assert not valid, f"valid entry refused: {refusal}"
            assert refusal.seq == len(before_entries)
            assert self.f.entries == before_entries
            assert self.f.state == before_state
            event(f"refused {Entry.from_bytes(raw).type}")
            return False
        kind = Entry.from_bytes(raw)
        assert valid, f"invalid {kind.type} accepted"
        self.f.entries.append(raw)
        if isinstance(kind.payload, ExecutionPayload):
            event(f"executed {kind.payload.operation}")
        elif kind.type in ("shred", "refusal"):
            event(f"accepted {kind.type}")
        return True

    def open_proposals(self) -> list[bytes]:
        return [
            pid for pid, p in self.proposals.items() if not p.done and self.f.time < p.expires_at
        ]

    def possible(self, op: str, params: dict[str, str | int]) -> bool:
        """The model's answer: may `op` with `params` be proposed or executed now?"""
        name = str(params.get("tenant"))
        tenant = self.tenants.get(name)
        live = tenant is not None and not tenant.destroyed
        if op == "create-tenant":
            return tenant is None
        if op in ("activate-tenant", "rotate-tenant", "destroy-tenant"):
            return live and tenant is not None and tenant.destroy_at is None
        if op == "grant":
            scheduled = tenant is not None and tenant.destroy_at is not None
            return live and not scheduled and (str(params["backend"]), name) not in self.grants
        if op == "deactivate-tenant":
            return live
        if op == "disable-version":
            v = int(params["version"])
            return (
                live
                and tenant is not None
                and 1 <= v < tenant.versions
                and v not in tenant.disabled
            )
        if op == "cancel-destroy":
            return (
                live
                and tenant is not None
                and tenant.destroy_at is not None
                and self.f.time < tenant.destroy_at
            )
        return (str(params["backend"]), name) in self.grants  # revoke

    def effect(self, op: str, params: dict[str, str | int]) -> None:
        name = str(params.get("tenant"))
        now = self.f.time
        if op == "create-tenant":
            self.tenants[name] = ModelTenant()
            return
        tenant = self.tenants[name]
        if op == "activate-tenant":
            tenant.active_until = now + int(params["duration_seconds"])
        elif op == "rotate-tenant":
            tenant.versions += 1
        elif op == "destroy-tenant":
            tenant.destroy_at = now + POLICY.destroy_wait_seconds
            tenant.active_until = None
        elif op == "grant":
            self.grants.add((str(params["backend"]), name))
        elif op == "revoke":
            self.grants.discard((str(params["backend"]), name))
        elif op == "deactivate-tenant":
            tenant.active_until = None
        elif op == "disable-version":
            tenant.disabled.add(int(params["version"]))
        elif op == "cancel-destroy":
            tenant.destroy_at = None

    # -- rules -----------------------------------------------------------

    @rule(seconds=st.sampled_from([1, 30, 200, 450]))
    def tick(self, seconds: int) -> None:
        self.f.tick(seconds)

    def _params(
        self, op: str, tenant: str, backend: str, duration: int, version: int
    ) -> dict[str, str | int]:
        params: dict[str, str | int] = {"tenant": tenant}
        if op in ("grant", "revoke"):
            params["backend"] = backend
        if op == "activate-tenant":
            params["duration_seconds"] = duration
        if op == "disable-version":
            params["version"] = version
        return params

    def _propose(self, op: str, params: dict[str, str | int]) -> bytes | None:
        payload = self.f.make_proposal(op, ttl=300, **params)  # type: ignore[arg-type]
        duration = int(params.get("duration_seconds", 0))
        within = duration <= POLICY.activation_max_seconds
        valid = self.possible(op, params) and within
        if self.offer(self.f.build("proposal", payload), valid):
            self.proposals[payload.id] = ModelProposal(op, params, payload.expires_at)
            return payload.id
        return None

    @rule(
        op=OPS,
        tenant=st.sampled_from(TENANTS),
        backend=st.sampled_from(BACKENDS),
        duration=st.sampled_from([60, 600, 601]),
        version=st.integers(1, 3),
    )
    def propose(self, op: str, tenant: str, backend: str, duration: int, version: int) -> None:
        self._propose(op, self._params(op, tenant, backend, duration, version))

    @rule(
        op=OPS,
        tenant=st.sampled_from(TENANTS),
        backend=st.sampled_from(BACKENDS),
        version=st.integers(1, 3),
    )
    def enact(self, op: str, tenant: str, backend: str, version: int) -> None:
        """Propose, gather the approvals needed, execute: the whole valid path at once."""
        pid = self._propose(op, self._params(op, tenant, backend, 600, version))
        if pid is not None:
            self.gather_quorum(0, pid)
            self.execute(0, pid)

    @initialize()
    def create_tenants(self) -> None:
        for tenant in TENANTS:
            self.enact("create-tenant", tenant, BACKENDS[0], 1)
            self.enact("activate-tenant", tenant, BACKENDS[0], 1)
            self.enact("grant", tenant, BACKENDS[0], 1)

    @rule(tenant=st.sampled_from(TENANTS))
    def destroy_for_good(self, tenant: str) -> None:
        """Destroy, wait the policy's delay, shred: the crypto-shredding path."""
        self.enact("destroy-tenant", tenant, BACKENDS[0], 1)
        self.f.tick(POLICY.destroy_wait_seconds)
        self.shred(tenant)

    @precondition(lambda self: bool(self.open_proposals()))
    @rule(pick=st.integers(0, 50), who=st.integers(0, N - 1), refuse=st.booleans())
    def verdict(self, pick: int, who: int, refuse: bool) -> None:
        """A valid approval or refusal by a custodian who has not voted yet."""
        candidates = [pid for pid in self.open_proposals() if who not in self.proposals[pid].voters]
        if not candidates:
            return
        pid = candidates[pick % len(candidates)]
        payload = self.f.make_verdict(pid, CREDS[who], verdict="refuse" if refuse else "approve")
        raw = self.f.build("refusal" if refuse else "approval", payload)
        assert self.offer(raw, valid=True)
        model = self.proposals[pid]
        model.voters.add(who)
        model.approvals += not refuse

    @precondition(lambda self: bool(self.open_proposals()))
    @rule(pick=st.integers(0, 50))
    def gather_quorum(self, pick: int, pid: bytes | None = None) -> None:
        """Valid approvals by fresh custodians until the proposal has what it needs."""
        pids = self.open_proposals()
        if not pids:
            return
        pid = pids[pick % len(pids)] if pid is None else pid
        model = self.proposals[pid]
        needed = 1 if model.op in NARROWING else K
        for who in range(N):
            if model.approvals >= needed:
                break
            if who in model.voters:
                continue
            raw = self.f.build("approval", self.f.make_verdict(pid, CREDS[who]))
            assert self.offer(raw, valid=True)
            model.voters.add(who)
            model.approvals += 1

    @precondition(lambda self: bool(self.open_proposals()))
    @rule(pick=st.integers(0, 50), kind=st.sampled_from(["outsider", "twice", "misdirected"]))
    def bad_approval(self, pick: int, kind: str) -> None:
        """An approval that must be refused: outsider, counted twice, or signed for another."""
        pids = self.open_proposals()
        if not pids:
            return
        pid = pids[pick % len(pids)]
        model = self.proposals[pid]
        if kind == "outsider":
            payload = self.f.make_verdict(pid, outsider())
        elif kind == "twice":
            if not model.voters:
                return
            payload = self.f.make_verdict(pid, CREDS[min(model.voters)])
        else:
            others = [p for p in self.f.state.proposals if p != pid]
            if not others:
                return
            fresh = [i for i in range(N) if i not in model.voters]
            if not fresh:
                return
            payload = self.f.make_verdict(pid, CREDS[fresh[0]], sign_for=others[pick % len(others)])
        self.offer(self.f.build("approval", payload), valid=False)

    @precondition(lambda self: any(not p.done for p in self.proposals.values()))
    @rule(pick=st.integers(0, 50))
    def late_approval(self, pick: int) -> None:
        """An approval after the proposal expired."""
        expired = [
            pid
            for pid, p in self.proposals.items()
            if not p.done and self.f.time >= p.expires_at and len(p.voters) < N
        ]
        if not expired:
            return
        pid = expired[pick % len(expired)]
        who = next(i for i in range(N) if i not in self.proposals[pid].voters)
        self.offer(self.f.build("approval", self.f.make_verdict(pid, CREDS[who])), valid=False)

    @precondition(lambda self: any(not p.done for p in self.proposals.values()))
    @rule(pick=st.integers(0, 50))
    def execute(self, pick: int, pid: bytes | None = None) -> None:
        """Execute a proposal; valid iff open, approved enough and still possible."""
        pids = [pid for pid, p in self.proposals.items() if not p.done]
        if not pids:
            return
        pid = pids[pick % len(pids)] if pid is None else pid
        model = self.proposals[pid]
        needed = 1 if model.op in NARROWING else K
        valid = (
            self.f.time < model.expires_at
            and model.approvals >= needed
            and self.possible(model.op, model.params)
        )
        result = self.f.make_result(pid)
        raw = self.f.build("execution", ExecutionPayload(pid, model.op, result))
        if self.offer(raw, valid):
            model.done = True
            self.effect(model.op, model.params)

    @rule(tenant=st.sampled_from(TENANTS))
    def shred(self, tenant: str) -> None:
        model = self.tenants.get(tenant)
        valid = (
            model is not None
            and not model.destroyed
            and model.destroy_at is not None
            and self.f.time >= model.destroy_at
        )
        if self.offer(self.f.build("shred", ShredPayload(tenant)), valid) and model is not None:
            model.destroyed = True
            model.active_until = None
            self.ever_destroyed.add(tenant)
            self.grants = {g for g in self.grants if g[1] != tenant}

    # -- the log's trust rules -------------------------------------------

    def _enact_deployment(self, op: str, params: dict[str, str | int], valid: bool) -> bool:
        """Propose and carry a deployment operation; it is accepted iff `valid`."""
        payload = self.f.make_proposal(op, ttl=300, **params)  # type: ignore[arg-type]
        if not self.offer(self.f.build("proposal", payload), valid):
            return False
        self.proposals[payload.id] = ModelProposal(op, params, payload.expires_at)
        needed = 1 if op in NARROWING else K
        for who in range(needed):
            assert self.offer(self.f.build("approval", self.f.make_verdict(payload.id, CREDS[who])),
                              valid=True)  # fmt: skip
        result = self.f.make_result(payload.id)
        assert self.offer(self.f.build("execution", ExecutionPayload(payload.id, op, result)), True)
        self.proposals[payload.id].done = True
        return True

    @rule(pick=st.integers(0, len(PROPOSERS) - 1), add=st.booleans())
    def change_proposers(self, pick: int, add: bool) -> None:
        cred = PROPOSERS[pick]
        fingerprint = cred.fingerprint
        if add:
            valid = fingerprint not in self.registered
            params: dict[str, str | int] = {"proposer": fingerprint, "name": cred.public().name}
            if self._enact_deployment("add-proposer", params, valid):
                self.registered.add(fingerprint)
        else:
            valid = fingerprint in self.registered
            params = {"proposer": fingerprint, "name": cred.public().name}
            if self._enact_deployment("remove-proposer", params, valid):
                self.registered.discard(fingerprint)

    @rule(pick=st.integers(0, len(PROPOSERS)), tenant=st.sampled_from(TENANTS))
    def propose_as_someone(self, pick: int, tenant: str) -> None:
        """A proposal by a proposer (registered or not) or an outsider; no custodian."""
        cred = PROPOSERS[pick] if pick < len(PROPOSERS) else outsider()
        params: dict[str, str | int] = {"tenant": tenant, "duration_seconds": 60}
        payload = self.f.make_proposal("activate-tenant", ttl=300, by=cred, **params)  # type: ignore[arg-type]
        valid = cred.fingerprint in self.registered and self.possible("activate-tenant", params)
        if self.offer(self.f.build("proposal", payload), valid):
            self.proposals[payload.id] = ModelProposal(
                "activate-tenant", params, payload.expires_at
            )

    @rule(kind=st.sampled_from(["unsigned-shred", "forged-proposal", "old-key-execution"]))
    def unsigned_or_forged(self, kind: str) -> None:
        """What must never enter: always refused, changing nothing."""
        if kind == "unsigned-shred":
            tenant = next(iter(self.tenants), "t1")
            raw = self.f.build("shred", ShredPayload(tenant), signed=False)
        elif kind == "forged-proposal":
            one = self.f.make_proposal("create-tenant", tenant="t9")
            two = self.f.make_proposal("create-tenant", tenant="t8")
            raw = self.f.build("proposal", ProposalPayload(
                two.id, two.operation, two.parameters, two.expires_at, two.proposer,
                one.signature))  # fmt: skip
        else:
            if len(self.log_keys) == 1:
                return
            pids = self.open_proposals()
            if not pids:
                return
            pid = pids[0]
            raw = self.f.build("execution", ExecutionPayload(
                pid, self.proposals[pid].op, self.f.make_result(pid)), signed=False)  # fmt: skip
            raw = resigned(raw, self.log_keys[-2])
        self.offer(raw, valid=False)
        event(f"refused {kind}")

    @rule(pick=st.integers(0, len(WITNESSES) - 1), add=st.booleans(), m=st.integers(0, 3))
    def change_witnesses(self, pick: int, add: bool, m: int) -> None:
        witness = WITNESSES[pick]
        if add:
            after = [*self.witnesses, witness]
            valid = witness not in self.witnesses and m <= len(after)
            op = "add-witness"
        else:
            after = [w for w in self.witnesses if w != witness]
            valid = witness in self.witnesses and m <= len(after)
            op = "remove-witness"
        params: dict[str, str | int] = {"witness": witness, "witness_threshold": m}
        if self._enact_deployment(op, params, valid):
            self.witnesses, self.witness_threshold = after, m

    @precondition(lambda self: len(self.log_keys) <= len(NEXT_KEYS))
    @rule()
    def rotate_log_key(self) -> None:
        new = NEXT_KEYS[len(self.log_keys) - 1]
        if self._enact_deployment("rotate-log-key", {"log_key": new.verifier_key()}, True):
            self.log_keys.append(new)
        # Back to an earlier key: refused.
        params: dict[str, str | int] = {"log_key": self.log_keys[0].verifier_key()}
        assert not self._enact_deployment("rotate-log-key", params, False)

    # -- invariants -------------------------------------------------------

    @invariant()
    def trust_state_agrees(self) -> None:
        state = self.f.state
        assert set(state.proposers) == self.registered
        assert state.witness_policy.witnesses == tuple(self.witnesses)
        assert state.witness_policy.threshold == self.witness_threshold
        assert state.log_key == self.log_keys[-1].verifier_key()
        assert [k for _, k in state.log_keys] == [s.verifier_key() for s in self.log_keys]

    @invariant()
    def state_is_a_fresh_replay(self) -> None:
        assert replay(self.f.entries) == self.f.state

    @invariant()
    def model_agrees(self) -> None:
        state, now = self.f.state, self.f.time
        assert set(state.tenants) == set(self.tenants)
        for name, model in self.tenants.items():
            tenant = state.tenants[name]
            assert tenant.destroyed is model.destroyed
            active = model.active_until is not None and now < model.active_until
            assert state.tenant_active(name, now) is (active and model.destroy_at is None)
        assert set(state.grants) == self.grants

    @invariant()
    def destroyed_tenants_stay_destroyed(self) -> None:
        for name in self.ever_destroyed:
            tenant = self.f.state.tenants[name]
            assert tenant.destroyed
            assert not self.f.state.tenant_active(name, self.f.time)

    @invariant()
    def active_tenants_have_k_valid_approvals(self) -> None:
        state = self.f.state
        roster = {c.fingerprint: c for c in state.roster}
        for name, tenant in state.tenants.items():
            if not tenant.is_active(self.f.time):
                continue
            execution = next(e for e in state.executions if e.seq == tenant.activated_seq)
            assert execution.operation == "activate-tenant"
            proposal = state.proposals[execution.proposal]
            assert dict(proposal.parameters)["tenant"] == name
            approvals = []
            for raw in self.f.entries[proposal.log_position : execution.seq]:
                entry = Entry.from_bytes(raw)
                payload = entry.payload
                if isinstance(payload, ApprovalPayload) and payload.proposal == proposal.id:
                    signature = HybridSignature.from_bytes(payload.signature)
                    approvals.append(SignedStatement(payload.custodian, signature))
            request = request_for(proposal, state)
            result = verify_approvals(request, approvals, roster, K, execution.time)
            result.verify()
            assert len(set(result.signed_by)) >= K


GovernanceMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGovernance = GovernanceMachine.TestCase
