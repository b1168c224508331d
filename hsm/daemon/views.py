"""What callers are shown of the daemon: status, proposals, verdicts, tenants.

Views are frozen, hold nothing secret, and are built from one log state
(and, where it matters, what this replica holds in memory), so a view is
one consistent point of the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyquorum.quorum.operations import Parameters, operation, request_for
from keyquorum.quorum.replay import LogState, Proposal


@dataclass(frozen=True)
class CustodianView:
    fingerprint: str
    name: str
    share_index: int
    confirmed: bool


@dataclass(frozen=True)
class SubmittedShare:
    """A custodian whose share an unseal session accepted, and when."""

    fingerprint: str
    name: str
    share_index: int
    at: int


@dataclass(frozen=True)
class UnsealSessionView:
    """The open unseal session as status shows it: who has submitted so far."""

    session_id: bytes
    opened_at: int
    expires_at: int
    log_size: int
    submitted: tuple[SubmittedShare, ...]


@dataclass(frozen=True)
class EndedSessionView:
    """A session that ended without unsealing: `how` is expired, reset or sealed.

    `ended_at` is the expiry for an expired one; `reset_by` (fingerprint,
    name) says who reset it; `submitted` are the shares it discarded.
    """

    session_id: bytes
    opened_at: int
    ended_at: int
    how: str
    submitted: tuple[SubmittedShare, ...]
    reset_by: tuple[str, str] | None = None


@dataclass(frozen=True)
class StatusView:
    initialized: bool
    sealed: bool
    deployment: str
    threshold: int
    roster: tuple[CustodianView, ...]
    unseal_progress: int
    log_size: int
    checkpoint: str
    replica: str
    log_key: str
    #: The policy's proposal lifetime (a proposer picks an expiry within it).
    proposal_ttl_seconds: int = 0
    #: The witness policy in force: the witnesses' verifier keys, and m.
    witnesses: tuple[str, ...] = ()
    witness_threshold: int = 0
    #: The open unseal session, and the last one that ended without unsealing.
    unseal_session: UnsealSessionView | None = None
    previous_unseal_session: EndedSessionView | None = None

    @property
    def confirmed_count(self) -> int:
        return sum(1 for c in self.roster if c.confirmed)


@dataclass(frozen=True)
class ProposalView:
    """A proposal as custodians see it, with the exact texts they would sign.

    `status` is `pending`, `executed`, `cancelled` (by a roster change) or
    `expired` (pending in the log, but past its expiry now).
    """

    id: bytes
    deployment: str
    operation: str
    parameters: Parameters
    log_position: int
    proposed_at: int
    expires_at: int
    #: The proposer's fingerprint, and their name (custodian or registered proposer).
    proposer: str
    proposer_name: str
    status: str
    required: int
    approved_by: tuple[str, ...]
    refused_by: tuple[str, ...]
    approve_statement: str
    refuse_statement: str
    executed_seq: int | None
    result: dict[str, Any] | None
    context: dict[str, Any]


@dataclass(frozen=True)
class VerdictView:
    proposal: ProposalView
    executed: bool
    log_size: int
    #: The seq of the approval or refusal entry itself.
    seq: int


@dataclass(frozen=True)
class ProvenEntry:
    """One entry and its RFC 9162 inclusion proof in a checkpoint's tree."""

    seq: int
    entry: bytes
    proof: tuple[bytes, ...]


@dataclass(frozen=True)
class LogExtensionView:
    """The log as a custodian's CLI checks it (Daemon.log_extension); proofs are
    against `checkpoint`."""

    checkpoint: str
    proof: tuple[bytes, ...]
    witnessed: str
    witnessed_proof: tuple[bytes, ...]
    included: ProvenEntry | None
    rotations: tuple[ProvenEntry, ...]
    witness_changes: tuple[ProvenEntry, ...]


@dataclass(frozen=True)
class TenantView:
    """A tenant as the log says, plus whether its key is unwrapped in this replica."""

    name: str
    versions: int
    disabled_versions: tuple[int, ...]
    active_until: int | None
    unwrapped: bool
    destroy_at: int | None
    destroyed: bool
    backends: tuple[str, ...]


def status_view(
    st: LogState,
    *,
    sealed: bool,
    unseal_progress: int,
    checkpoint: str,
    replica: str,
    unseal_session: UnsealSessionView | None = None,
    previous_unseal_session: EndedSessionView | None = None,
) -> StatusView:
    roster: tuple[CustodianView, ...] = ()
    if st.initialized:
        roster = tuple(
            CustodianView(
                fingerprint=c.fingerprint,
                name=c.name,
                share_index=i + 1,
                confirmed=c.fingerprint in st.confirmations,
            )
            for i, c in enumerate(st.roster)
        )
    return StatusView(
        initialized=st.initialized,
        sealed=sealed,
        deployment=st.deployment,
        threshold=st.threshold if st.initialized else 0,
        roster=roster,
        unseal_progress=unseal_progress,
        log_size=st.size,
        checkpoint=checkpoint,
        replica=replica,
        log_key=st.log_key,
        proposal_ttl_seconds=0 if st.policy is None else st.policy.proposal_ttl_seconds,
        witnesses=st.witness_policy.witnesses,
        witness_threshold=st.witness_policy.threshold,
        unseal_session=unseal_session,
        previous_unseal_session=previous_unseal_session,
    )


def proposal_view(st: LogState, p: Proposal, now: int) -> ProposalView:
    request = request_for(p, st)
    status: str = p.status
    if status == "pending" and now >= p.expires_at:
        status = "expired"
    execution = next((e for e in st.executions if e.proposal == p.id), None)
    return ProposalView(
        id=p.id,
        deployment=st.deployment,
        operation=p.operation,
        parameters=p.parameters,
        log_position=p.log_position,
        proposed_at=p.time,
        expires_at=p.expires_at,
        proposer=p.proposer,
        proposer_name=st.proposer_name(p.proposer) or "?",
        status=status,
        required=operation(p.operation).required_approvals(st.threshold),
        approved_by=tuple(p.approvals),
        refused_by=tuple(p.refusals),
        approve_statement=request.statement("approve").render(),
        refuse_statement=request.statement("refuse").render(),
        executed_seq=None if execution is None else execution.seq,
        result=None if execution is None else execution.result.to_json(),
        context=request.context.to_json(),
    )


def tenant_views(st: LogState, unwrapped: dict[str, int], now: int) -> list[TenantView]:
    """Every tenant the log knows, with whether its key is unwrapped here."""
    return [
        TenantView(
            name=t.name,
            versions=len(t.versions),
            disabled_versions=tuple(v.version for v in t.versions if v.disabled_seq is not None),
            active_until=t.active_until if t.is_active(now) else None,
            unwrapped=t.name in unwrapped,
            destroy_at=t.destroy_at,
            destroyed=t.destroyed,
            backends=tuple(sorted(b for b, name in st.grants if name == t.name)),
        )
        for t in sorted(st.tenants.values(), key=lambda t: t.name)
    ]
