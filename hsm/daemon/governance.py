"""Proposals and custodians' verdicts: the quorum rule, as replay states it.

Contract:
- A proposal is logged with a fresh random id; proposing changes nothing
  but the log. Parameters arrive as text and are typed here
  (`typed_parameters`); everything else about them is replay's rule.
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
import re
from collections.abc import Sequence
from typing import Final

from keyquorum.hsm.daemon.context import Replica
from keyquorum.hsm.daemon.executions import Executions, policy_of
from keyquorum.hsm.daemon.journal import redeciding
from keyquorum.hsm.daemon.keys import TenantKeys
from keyquorum.hsm.daemon.views import ProposalView, VerdictView, proposal_view
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    NotFoundError,
)
from keyquorum.quorum.log import ApprovalPayload, ExecutionPayload, ProposalPayload, RefusalPayload
from keyquorum.quorum.operations import INTEGER_PARAMETERS, Parameters, operation
from keyquorum.quorum.people import describe_fingerprint
from keyquorum.quorum.replay import LogState, Proposal
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.statements import PROPOSAL_ID_SIZE

log = logging.getLogger(__name__)

_DECIMAL: Final = re.compile(r"[0-9]{1,16}")


class Governance:
    """Proposals, approvals and refusals of one replica."""

    def __init__(self, replica: Replica, keys: TenantKeys, executions: Executions) -> None:
        self._r = replica
        self._keys = keys
        self._executions = executions

    def propose(
        self,
        operation_name: str,
        parameters: Sequence[tuple[str, str]],
        *,
        expires_in: int | None,
        proposer: str,
        public_credentials: Sequence[bytes] = (),
    ) -> ProposalView:
        """Log a proposal for a quorum operation; it gets a fresh random id.

        `duration_seconds`, `threshold` and `version` are decimal integers;
        a grant's `backend` may be given as its certificate identity
        `keyquorum://backend/<name>` (the log holds the name). For
        `change-roster`, `public_credentials` are the public files of the
        custodians the roster adds (the log names them by fingerprint).
        """
        r = self._r
        with r.lock:
            r.journal.catch_up()
            self._keys.sweep()
            st = r.initialized_state()
            try:
                name = operation(operation_name).name
            except DeserializationError as e:
                raise InvalidInputError(str(e)) from None
            params = typed_parameters(parameters)
            ttl = policy_of(st).proposal_ttl_seconds if expires_in is None else expires_in
            if not proposer:
                raise InvalidInputError("a proposal names its proposer")
            newcomers: tuple[PublicCredential, ...] = ()
            if name == "change-roster":
                roster = str(dict(params).get("roster", ""))
                self._executions.offer_credentials(public_credentials, roster)
                members = self._executions.roster_credentials(st, roster)
                newcomers = tuple(c for c in members if st.share_index(c.fingerprint) is None)
            elif public_credentials:
                raise InvalidInputError("public credentials belong to a change-roster proposal")
            now = r.now()
            payload = ProposalPayload(
                id=r.random(PROPOSAL_ID_SIZE),
                operation=name,
                parameters=params,
                expires_at=now + ttl,
                proposer=proposer,
                credentials=newcomers,
            )
            r.journal.append_retrying([payload], time=now)
            log.info("proposal %s: %s %s", payload.id.hex(), name, dict(params))
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
            log.info("proposal %s refused by %s", pid, describe_fingerprint(fingerprint))
            return self._view(proposal.id, now, executed=False)
        needed = operation(proposal.operation).required_approvals(st.threshold)
        if len(proposal.approvals) + 1 < needed:
            r.journal.append([entry], time=now)
            log.info(
                "proposal %s approved by %s (%d of %d)",
                pid,
                describe_fingerprint(fingerprint),
                len(proposal.approvals) + 1,
                needed,
            )
            return self._view(proposal.id, now, executed=False)
        if proposal.operation == "change-roster":
            roster = str(dict(proposal.parameters)["roster"])
            self._executions.offer_credentials(public_credentials, roster)
        plan = self._executions.plan(st, proposal, now)
        execution = ExecutionPayload(proposal.id, proposal.operation, plan.result)
        try:
            r.journal.append([entry, execution], time=now, shred_salts=plan.shred_salts)
        except BaseException:
            plan.on_abort()
            raise
        plan.on_commit()
        log.info("proposal %s executed: %s", pid, proposal.operation)
        return self._view(proposal.id, now, executed=True)

    def _view(self, proposal_id: bytes, now: int, *, executed: bool) -> VerdictView:
        st = self._r.journal.state
        return VerdictView(proposal_view(st, st.proposals[proposal_id], now), executed, st.size)


def find_proposal(st: LogState, proposal_id: bytes) -> Proposal:
    """The proposal with this id; InvalidInputError for a malformed id, NotFoundError."""
    if not isinstance(proposal_id, bytes) or len(proposal_id) != PROPOSAL_ID_SIZE:
        raise InvalidInputError(f"a proposal id is {PROPOSAL_ID_SIZE} bytes (32 hex digits)")
    proposal = st.proposals.get(proposal_id)
    if proposal is None:
        raise NotFoundError(f"unknown proposal {proposal_id.hex()}")
    return proposal


def typed_parameters(pairs: Sequence[tuple[str, str]]) -> Parameters:
    """Parameters as sent (text) to the types the log holds, sorted by key.

    The integer parameters must be plain decimal; a grant's backend may be
    its certificate identity `keyquorum://backend/<name>`, logged as <name>.
    Schema and policy checks are replay's (`operations.check_parameters`).
    """
    out: dict[str, str | int] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInputError(f"parameter {key!r} is given twice")
        if key in INTEGER_PARAMETERS:
            if not _DECIMAL.fullmatch(value):
                raise InvalidInputError(f"parameter {key!r} must be a decimal integer")
            out[key] = int(value)
        elif key == "backend" and value.startswith("keyquorum://"):
            identity = ClientIdentity.parse(value)
            if identity.role != "backend":
                raise InvalidInputError(f"{value} is not a backend identity")
            out[key] = identity.name
        else:
            out[key] = value
    return tuple(sorted(out.items()))
