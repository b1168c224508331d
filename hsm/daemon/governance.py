"""Proposals and custodians' verdicts: the quorum rule, as replay states it.

Contract:
- A proposal is signed by its proposer, a custodian on the roster in force
  or a proposer the quorum registered (`add-proposer`), over the `propose`
  statement of the id and expiry they chose, the operation and every
  parameter; an unsigned one is refused (UNAUTHENTICATED), an unknown
  proposer too (PERMISSION_DENIED), before anything else. Replay's own
  checks (the signature first) run on a dry run; only a proposal they
  accept is charged to its proposer's rate and counted against the open
  bounds (hsm/daemon/proposal_limits.py), then logged. Proposing changes
  nothing but the log. Parameters arrive as text and are typed by
  `operations.typed_parameters`, as the proposer's CLI typed them to
  sign them.
- A verdict is checked by replay itself, dry-running the approval or
  refusal entry on the current state (`Journal.check`): the proposal
  pending and unexpired, the signer on the roster in force, one verdict
  per custodian, the signature over exactly that proposal's statement.
  The refusal is replay's typed error, unchanged.
- The approval that reaches the number an operation needs is appended in
  ONE transaction with the execution it makes due (planned by
  hsm/daemon/executions.py); four of five approvals change nothing but
  the log. If another replica appended first, the whole decision runs
  again on the log as it now is, so racing the k-th approval gives one
  execution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from keyquorum.hsm.daemon.context import Replica
from keyquorum.hsm.daemon.executions import Executions
from keyquorum.hsm.daemon.journal import redeciding
from keyquorum.hsm.daemon.keys import TenantKeys
from keyquorum.hsm.daemon.proposal_limits import ProposalLimits
from keyquorum.hsm.daemon.views import ProposalView, VerdictView, proposal_view
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    InvalidInputError,
    NotFoundError,
    UnauthenticatedError,
)
from keyquorum.quorum.log import ApprovalPayload, ExecutionPayload, ProposalPayload, RefusalPayload
from keyquorum.quorum.operations import operation, typed_parameters
from keyquorum.quorum.people import describe_fingerprint, label
from keyquorum.quorum.replay import LogState, Proposal
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.statements import PROPOSAL_ID_SIZE

log = logging.getLogger(__name__)


class Governance:
    """Proposals, approvals and refusals of one replica."""

    def __init__(self, replica: Replica, keys: TenantKeys, executions: Executions) -> None:
        self._r = replica
        self._keys = keys
        self._executions = executions
        self._limits = ProposalLimits(replica.limits)

    def propose(
        self,
        operation_name: str,
        parameters: Sequence[tuple[str, str]],
        *,
        proposal_id: bytes,
        expires_at: int,
        proposer: str,
        signature: bytes,
        public_credentials: Sequence[bytes] = (),
    ) -> ProposalView:
        """Log a proposal its proposer signed (see the module docstring).

        `duration_seconds`, `threshold`, `version` and `witness_threshold`
        are decimal integers; a grant's `backend` may be given as its
        certificate identity `keyquorum://backend/<name>` (the log holds
        the name). For `change-roster` and `add-proposer`,
        `public_credentials` are the public files of the custodians the
        roster adds or of the proposer (the log names them by fingerprint).
        """
        r = self._r
        with r.lock:
            r.journal.catch_up()
            self._keys.sweep()
            st = r.initialized_state()
            # 0. Signed, by someone who may propose.
            if not signature:
                raise UnauthenticatedError(
                    "a proposal must be signed by a custodian or a registered proposer "
                    "(keyquorum proposal new --credential ...)"
                )
            if st.custodian(proposer) is None and proposer not in st.proposers:
                raise AccessDeniedError(
                    f"proposer {describe_fingerprint(proposer)} is neither a custodian on the "
                    "roster nor a proposer the quorum registered (add-proposer)"
                )
            if not isinstance(proposal_id, bytes) or len(proposal_id) != PROPOSAL_ID_SIZE:
                raise InvalidInputError(
                    f"a proposal id is {PROPOSAL_ID_SIZE} bytes (32 hex digits)"
                )
            try:
                name = operation(operation_name).name
            except DeserializationError as e:
                raise InvalidInputError(str(e)) from None
            params = typed_parameters(parameters)
            self._executions.offer(st, name, dict(params), public_credentials)
            newcomers: tuple[PublicCredential, ...] = ()
            if name == "change-roster":
                members = self._executions.roster_credentials(st, str(dict(params)["roster"]))
                newcomers = tuple(c for c in members if st.share_index(c.fingerprint) is None)
            payload = ProposalPayload(
                id=proposal_id,
                operation=name,
                parameters=params,
                expires_at=expires_at,
                proposer=proposer,
                signature=HybridSignature.from_bytes(signature).to_bytes(),
                credentials=newcomers,
            )
            now = r.now()
            # 1. Replay's checks, the signature first; nothing is logged if they refuse.
            r.journal.check([payload], time=now)
            # 2. Only a proposal replay accepts is charged to its proposer.
            self._limits.admit(st, proposer, now)
            try:
                r.journal.append_retrying([payload], time=now)
            except BaseException:
                self._limits.refund(proposer)
                raise
            log.info(
                "proposal %s by %s: %s %s", payload.id.hex(), _who(st, proposer), name, dict(params)
            )
            return proposal_view(r.journal.state, r.journal.state.proposals[payload.id], now)

    def proposals(self, *, include_closed: bool = False) -> list[ProposalView]:
        """Proposals open for verdicts (or every proposal), oldest first."""
        r = self._r
        with r.lock:
            r.journal.catch_up()
            self._keys.sweep()
            st = r.initialized_state()
            now = r.now()
            return [
                proposal_view(st, p, now)
                for p in st.proposals.values()
                if include_closed or p.is_pending(now)
            ]

    def proposal(self, proposal_id: bytes) -> ProposalView:
        """One proposal, with the exact approve and refuse statements."""
        r = self._r
        with r.lock:
            r.journal.catch_up()
            self._keys.sweep()
            st = r.initialized_state()
            return proposal_view(st, find_proposal(st, proposal_id), r.now())

    def verdict(
        self,
        verdict: str,
        proposal_id: bytes,
        fingerprint: str,
        signature: bytes,
        public_credentials: Sequence[bytes] = (),
    ) -> VerdictView:
        """Count one custodian's signed approval (executing at the number needed) or refusal."""
        r = self._r
        with r.lock:
            return redeciding(
                lambda: self._decide(
                    verdict, proposal_id, fingerprint, signature, public_credentials
                ),
                catch_up=r.journal.catch_up,
            )

    def _decide(
        self,
        verdict: str,
        proposal_id: bytes,
        fingerprint: str,
        signature: bytes,
        public_credentials: Sequence[bytes],
    ) -> VerdictView:
        r = self._r
        r.journal.catch_up()
        self._keys.sweep()
        st = r.initialized_state()
        now = r.now()
        proposal = find_proposal(st, proposal_id)
        sig = HybridSignature.from_bytes(signature).to_bytes()
        entry = (
            ApprovalPayload(proposal.id, fingerprint, sig)
            if verdict == "approve"
            else RefusalPayload(proposal.id, fingerprint, sig)
        )
        # Replay's own checks, on the state as it is: nothing is logged if they refuse.
        r.journal.check([entry], time=now)
        pid = proposal.id.hex()
        if isinstance(entry, RefusalPayload):
            r.journal.append([entry], time=now)
            log.info("proposal %s refused by %s", pid, _who(st, fingerprint))
            return self._view(proposal.id, now, executed=False, seq=r.journal.size - 1)
        needed = operation(proposal.operation).required_approvals(st.threshold)
        if len(proposal.approvals) + 1 < needed:
            r.journal.append([entry], time=now)
            log.info(
                "proposal %s approved by %s (%d of %d)",
                pid,
                _who(st, fingerprint),
                len(proposal.approvals) + 1,
                needed,
            )
            return self._view(proposal.id, now, executed=False, seq=r.journal.size - 1)
        self._executions.offer(
            st, proposal.operation, dict(proposal.parameters), public_credentials
        )
        plan = self._executions.plan(st, proposal, now)
        execution = ExecutionPayload(proposal.id, proposal.operation, plan.result)
        try:
            r.journal.append(
                [entry, execution],
                time=now,
                shred_salts=plan.shred_salts,
                replace_salts=plan.replace_salts,
            )
        except BaseException:
            plan.on_abort()
            raise
        plan.on_commit()
        log.info("proposal %s executed: %s", pid, proposal.operation)
        return self._view(proposal.id, now, executed=True, seq=r.journal.size - 2)

    def _view(self, proposal_id: bytes, now: int, *, executed: bool, seq: int) -> VerdictView:
        """The proposal after a verdict; `seq` is the verdict's own entry."""
        st = self._r.journal.state
        view = proposal_view(st, st.proposals[proposal_id], now)
        return VerdictView(view, executed, st.size, seq)


def find_proposal(st: LogState, proposal_id: bytes) -> Proposal:
    """The proposal with this id; InvalidInputError for a malformed id, NotFoundError."""
    if not isinstance(proposal_id, bytes) or len(proposal_id) != PROPOSAL_ID_SIZE:
        raise InvalidInputError(f"a proposal id is {PROPOSAL_ID_SIZE} bytes (32 hex digits)")
    proposal = st.proposals.get(proposal_id)
    if proposal is None:
        raise NotFoundError(f"unknown proposal {proposal_id.hex()}")
    return proposal


def _who(st: LogState, fingerprint: str) -> str:
    """A custodian or registered proposer in log lines: `alice (FKAO-JAYM-D5SP-FPYZ)`."""
    name = st.proposer_name(fingerprint)
    return describe_fingerprint(fingerprint) if name is None else label(name, fingerprint)
