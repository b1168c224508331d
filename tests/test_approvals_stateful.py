"""Random governance sessions against the real daemon over TLS gRPC (hypothesis).

Each example starts a fresh in-process daemon (3-of-5, unsealed) and runs
a few rules: propose, approve (valid, forged, replayed from another
proposal), refuse, move the FakeClock, seal, unseal, restart. Every call
the daemon refuses must leave its log and state exactly as they were.

After every step, checked from the outside (the store and the log, with
the pure verifiers, not the daemon's own bookkeeping):
- the daemon's state equals a fresh replay of its store;
- no tenant key is usable unless the log holds an activation executed
  with at least k distinct custodian approvals that verify over its
  statement (re-checked with `statements.verify_approvals`), still open;
- unsealed, the daemon serves exactly the tenants the log says are
  active; sealed, none;
- a tenant once destroyed stays destroyed: no key, no salt in the store.

Roster changes are in tests/test_approvals.py (one roster keeps steps cheap).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from contextlib import AbstractContextManager
from functools import cache
from pathlib import Path

import grpc
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from keyquorum.cli import custodian_actions as actions
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import SealedError, StateError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.log import ApprovalPayload, Entry
from keyquorum.quorum.operations import request_for
from keyquorum.quorum.replay import replay
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.statements import SignedStatement, verify_approvals
from keyquorum.v1 import custodian_pb2 as pb
from tests.harness import (
    CEREMONY_CODE,
    FakeClock,
    InProcessDaemon,
    in_process_daemon,
    signed_proposal,
)

N, K = 5, 3
TENANTS = ("t1", "t2")
LIMITS = Limits(
    activation_max_seconds=900, destroy_wait_seconds=7 * 86400, proposal_ttl_seconds=1200
)
OPERATIONS = (
    ("activate-tenant", {"duration_seconds": 600}),
    ("grant", {"backend": "booking"}),
    ("rotate-tenant", {}),
    ("deactivate-tenant", {}),
    ("destroy-tenant", {}),
    ("cancel-destroy", {}),
    ("disable-version", {"version": 1}),
    ("revoke", {"backend": "booking"}),
    ("create-tenant", {}),
)
#: How many distinct custodians approve a new proposal at once: k first.
APPROVERS = st.tuples(st.sampled_from([K, K - 1, 1, N]), st.permutations(range(N)))


@cache
def pki() -> DevPki:
    return make_dev_pki(Path(tempfile.mkdtemp(prefix="kq-stateful-pki-")) / "pki")


@cache
def credentials() -> tuple[CustodianCredential, ...]:
    return tuple(CustodianCredential.generate(f"c{i}") for i in range(N + 1))


def roster() -> tuple[CustodianCredential, ...]:
    return credentials()[:N]


def signature(c: CustodianCredential, p: pb.Proposal) -> bytes:
    statement = actions.proposal_statement(p, "approve")
    return c.sign("approve", statement.message()).to_bytes()


class DaemonGovernance(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pids: list[str] = []
        self.work = Path(tempfile.mkdtemp(prefix="kq-stateful-"))
        self.ctx: AbstractContextManager[InProcessDaemon] | None = None
        self.d: InProcessDaemon | None = None
        self.destroyed: set[str] = set()

    # -- plumbing --------------------------------------------------------

    def start(self, clock: FakeClock | None = None) -> None:
        self.ctx = in_process_daemon(self.work / "data", pki(), limits=LIMITS, clock=clock)
        self.d = self.ctx.__enter__()

    def stop(self) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(None, None, None)
            self.ctx = None

    @property
    def daemon(self) -> InProcessDaemon:
        assert self.d is not None
        return self.d

    def teardown(self) -> None:
        self.stop()
        shutil.rmtree(self.work, ignore_errors=True)

    def call(self, fn: object) -> object | None:
        """Run one request; a refusal must change nothing. The answer, or None."""
        d = self.daemon
        before_state, before_log = d.daemon.log_snapshot()
        try:
            return fn()  # type: ignore[operator]
        except grpc.RpcError as e:
            code, details = e.code(), e.details()  # type: ignore[attr-defined]
        assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
        after_state, after_log = d.daemon.log_snapshot()
        assert after_log == before_log
        assert after_state == before_state
        event(f"refused: {code.name}")
        return None

    def everything(self) -> list[tuple[str, str, dict[str, object]]]:
        return [(op, tenant, extra) for op, extra in OPERATIONS for tenant in TENANTS]

    def possible(self) -> list[tuple[str, str, dict[str, object]]]:
        """The proposals the log allows now (an input filter, not an oracle)."""
        state = self.daemon.daemon.state
        out: list[tuple[str, str, dict[str, object]]] = []
        for tenant in TENANTS:
            record = state.tenants.get(tenant)
            if record is None:
                out.append(("create-tenant", tenant, {}))
                continue
            if record.destroyed:
                continue
            if record.destroy_at is not None:
                out.append(("cancel-destroy", tenant, {}))
                continue
            out += [
                ("activate-tenant", tenant, {"duration_seconds": 600}),
                ("rotate-tenant", tenant, {}),
                ("deactivate-tenant", tenant, {}),
                ("destroy-tenant", tenant, {}),
            ]
            granted = state.granted("booking", tenant)
            out.append(("revoke" if granted else "grant", tenant, {"backend": "booking"}))
            for v in record.versions[:-1]:
                if v.disabled_seq is None:
                    out.append(("disable-version", tenant, {"version": v.version}))
        return out

    def proposal(self, pid: str) -> pb.Proposal:
        return self.daemon.stub.GetProposal(pb.GetProposalRequest(id=pid))

    # -- rules -----------------------------------------------------------
    # Hypothesis favours rules with fewer arguments (then by name) and the
    # first choice of each strategy, so `govern` takes one argument and
    # `power` tries the harmless `unseal` first.

    @initialize()
    def ceremony(self) -> None:
        self.start()
        self.daemon.stub.InitCeremony(
            pb.InitCeremonyRequest(
                deployment="stateful",
                threshold=K,
                public_credentials=[c.public().to_bytes() for c in roster()],
                code=CEREMONY_CODE,
            )
        )
        self.unseal()
        # One tenant exists from the start (by a real quorum), so that most
        # steps act on something; `t2` is created only if a step does it.
        self.propose_and_approve("create-tenant", "t1", {}, (K, list(range(N))))
        assert self.daemon.daemon.state.tenants["t1"].versions

    @rule(step=st.tuples(st.integers(0, 2**32 - 1), APPROVERS))
    def govern(self, step: tuple[int, tuple[int, list[int]]]) -> None:
        """Propose an operation, then approve it by `count` distinct custodians in turn.

        The operation is drawn (from `seed`) among those the log allows now,
        one time in five among all of them, so that refused proposals are
        exercised too; the choice is only an input, every check is below.
        """
        seed, approvers = step
        rng = random.Random(seed)
        choices = self.possible() if rng.random() < 0.8 else []
        op, tenant, extra = rng.choice(choices or self.everything())
        self.propose_and_approve(op, tenant, extra, approvers)

    def propose_and_approve(
        self, op: str, tenant: str, extra: dict[str, object], approvers: tuple[int, list[int]]
    ) -> None:
        count, order = approvers
        params = {"tenant": tenant, **extra}
        answer = self.call(
            lambda: self.daemon.stub.Propose(
                signed_proposal(
                    self.daemon.stub,
                    roster()[0],
                    op,
                    {k: str(v) for k, v in params.items()},
                    now=self.daemon.clock(),
                )
            )
        )
        if not isinstance(answer, pb.Proposal):
            return
        event(f"proposed {op}")
        self.pids.append(answer.id)
        for who in order[:count]:
            self.approve_one(answer.id, who)

    @rule(pick=st.integers(0, 7), who=st.integers(0, N - 1))
    def approve(self, pick: int, who: int) -> None:
        """A later approval of an earlier proposal (maybe expired, executed, cancelled)."""
        if self.pids:
            self.approve_one(self.pids[pick % len(self.pids)], who)

    @rule(pick=st.integers(0, 7), who=st.integers(0, N - 1))
    def refuse(self, pick: int, who: int) -> None:
        if not self.pids:
            return
        pid = self.pids[pick % len(self.pids)]
        c = roster()[who]
        p = self.call(lambda: self.proposal(pid))
        assert isinstance(p, pb.Proposal)
        text = actions.proposal_statement(p, "refuse")
        request = pb.VerdictRequest(
            proposal=pid,
            custodian=c.fingerprint,
            signature=c.sign("refuse", text.message()).to_bytes(),
        )
        if self.call(lambda: self.daemon.stub.Refuse(request)) is not None:
            event("refusal logged")

    @rule(
        picks=st.tuples(st.integers(0, 7), st.integers(0, 7)),
        signer=st.integers(0, N),
        claimed=st.integers(0, N - 1),
    )
    def bad_approval(self, picks: tuple[int, int], signer: int, claimed: int) -> None:
        """Forged (another custodian's key), an outsider's, or signed for another proposal."""
        if not self.pids:
            return
        pid, other = (self.pids[i % len(self.pids)] for i in picks)
        if signer == claimed and pid == other:
            return  # that would be a valid approval
        source = self.call(lambda: self.proposal(other))
        assert isinstance(source, pb.Proposal)
        request = pb.VerdictRequest(
            proposal=pid,
            custodian=roster()[claimed].fingerprint,
            signature=signature(credentials()[signer], source),
        )
        answer = self.call(lambda: self.daemon.stub.Approve(request))
        assert answer is None, "a bad approval was accepted"

    @rule(seconds=st.sampled_from([30, 650, 1300, 7 * 86400]))
    def wait(self, seconds: int) -> None:
        self.daemon.clock.advance(seconds)
        # Do now what the background sweeper would do soon, so steps stay deterministic.
        size = self.daemon.store.size()
        self.daemon.daemon.sweep()
        if self.daemon.store.size() > size:
            event("shredded")

    @rule(action=st.sampled_from(["unseal", "seal", "restart"]))
    def power(self, action: str) -> None:
        if action == "seal" and not self.daemon.daemon.sealed:
            c = roster()[0]
            actions.seal(
                self.daemon.stub,
                c,
                lambda _t: c,
                reason="test",
                now=self.daemon.clock.now,
            )
            assert self.daemon.daemon.sealed
        elif action == "unseal":
            self.unseal()
        elif action == "restart":
            clock = self.daemon.clock
            self.stop()
            self.start(clock)
            assert self.daemon.daemon.sealed
        event(f"power {action}")

    def unseal(self) -> None:
        if not self.daemon.daemon.sealed:
            return
        for c in roster()[N - K :]:
            actions.submit_share(self.daemon.stub, c)
        assert not self.daemon.daemon.sealed

    def approve_one(self, pid: str, who: int) -> None:
        c = roster()[who]
        p = self.call(lambda: self.proposal(pid))
        assert isinstance(p, pb.Proposal)
        request = pb.VerdictRequest(
            proposal=pid, custodian=c.fingerprint, signature=signature(c, p)
        )
        size = self.daemon.store.size()
        answer = self.call(lambda: self.daemon.stub.Approve(request))
        if isinstance(answer, pb.VerdictResponse):
            grew = self.daemon.store.size() - size
            assert grew == (2 if answer.executed else 1)
            if answer.executed:
                assert len(answer.proposal.approved_by) == answer.proposal.required
                event(f"executed {answer.proposal.operation}")

    # -- invariants ------------------------------------------------------

    @invariant()
    def state_is_the_replay_of_the_store(self) -> None:
        if self.d is None:
            return
        state, raws = self.daemon.daemon.log_snapshot()
        assert replay(raws) == state

    @invariant()
    def usable_keys_are_exactly_the_quorum_activated_ones(self) -> None:
        if self.d is None:
            return
        d: Daemon = self.daemon.daemon
        state, raws = d.log_snapshot()
        now = self.daemon.clock.now
        entries = [Entry.from_bytes(raw) for raw in raws]
        members = {c.fingerprint: c.public() for c in roster()}
        for tenant in TENANTS:
            usable = _usable(d, tenant)
            record = state.tenants.get(tenant)
            active = record is not None and record.is_active(now)
            assert usable == (active and not d.sealed), (tenant, usable, active, d.sealed)
            if not active:
                continue
            assert record is not None
            execution = next(
                e
                for e in reversed(state.executions)
                if e.operation == "activate-tenant" and dict(e.parameters)["tenant"] == tenant
            )
            assert record.active_until == execution.time + int(
                dict(execution.parameters)["duration_seconds"]
            )
            p = state.proposals[execution.proposal]
            approvals = [
                SignedStatement(
                    e.payload.custodian, HybridSignature.from_bytes(e.payload.signature)
                )
                for e in entries
                if isinstance(e.payload, ApprovalPayload) and e.payload.proposal == p.id
            ]
            request = request_for(p, state)
            verify_approvals(request, approvals, members, K, execution.time).verify()
            assert len({a.signer for a in approvals}) >= K

    @invariant()
    def destroyed_tenants_stay_destroyed(self) -> None:
        if self.d is None:
            return
        state, _ = self.daemon.daemon.log_snapshot()
        for name, tenant in state.tenants.items():
            if tenant.destroyed:
                self.destroyed.add(name)
        for name in self.destroyed:
            tenant = state.tenants[name]
            assert tenant.destroyed
            assert not _usable(self.daemon.daemon, name)
            for v in tenant.versions:
                assert self.daemon.store.get_shred_salt(name, v.version) is None


def _usable(d: Daemon, tenant: str) -> bool:
    try:
        _version, key = d.tenant_key(tenant)
    except (SealedError, StateError):
        return False
    key.wipe()
    return True


DaemonGovernance.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDaemonGovernance = DaemonGovernance.TestCase
