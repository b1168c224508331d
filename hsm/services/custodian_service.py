"""CustodianService: a thin gRPC layer over `Daemon`.

Each method converts the request, calls the daemon on a lane's thread
(hsm/services/lanes.py: the daemon takes the governance lock and does store
I/O, which the serving loop never waits on), and converts the answer; every
`KeyquorumError` becomes a status code through
`keyquorum.hsm.services.status`, the one place that mapping lives.

The emergency seal always gets through (docs/adr/0009): Seal and GetStatus
are reserved methods (`RESERVED`, not counted against the listener's call
caps) with lanes of their own, so no flood of other calls, nor of calls
that never send their request, can take their threads. A seal wipes the
keys before it waits for the governance lock (hsm/daemon/seal.py), and
status never waits for that lock (`Daemon.status`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import Message

from keyquorum.hsm.daemon import Daemon, ProposalView, StatusView, VerdictView
from keyquorum.hsm.daemon.views import (
    EndedSessionView,
    LogExtensionView,
    ProvenEntry,
    SubmittedShare,
    UnsealSessionView,
)
from keyquorum.hsm.services.admission import (
    Admission,
    Call,
    Method,
    Unary,
    parser,
    serialize,
    service,
)
from keyquorum.hsm.services.lanes import Lane
from keyquorum.hsm.services.refusals import RefusalLog
from keyquorum.hsm.services.server import Registration
from keyquorum.quorum import canonical
from keyquorum.quorum.errors import DeserializationError, KeyquorumError
from keyquorum.quorum.limits import Limits
from keyquorum.v1 import custodian_pb2 as pb

T = TypeVar("T")
M = TypeVar("M", bound=Message)

SERVICE_NAME: Final = "keyquorum.v1.CustodianService"
#: Methods with capacity of their own that no other call can take.
RESERVED: Final = frozenset({f"/{SERVICE_NAME}/Seal", f"/{SERVICE_NAME}/GetStatus"})


def _hex(value: str, field: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise DeserializationError(f"{field} must be hex") from None


def _proposal(view: ProposalView) -> pb.Proposal:
    return pb.Proposal(
        id=view.id.hex(),
        deployment=view.deployment,
        operation=view.operation,
        parameters=[pb.Parameter(key=k, value=str(v)) for k, v in view.parameters],
        log_position=view.log_position,
        proposed_at=view.proposed_at,
        expires_at=view.expires_at,
        proposer=view.proposer,
        proposer_name=view.proposer_name,
        status=view.status,
        required=view.required,
        approved_by=list(view.approved_by),
        refused_by=list(view.refused_by),
        approve_statement=view.approve_statement,
        refuse_statement=view.refuse_statement,
        executed_seq=view.executed_seq or 0,
        result=b"" if view.result is None else canonical.encode(view.result),
        context=canonical.encode(view.context),
    )


def _verdict(view: VerdictView) -> pb.VerdictResponse:
    return pb.VerdictResponse(
        proposal=_proposal(view.proposal),
        executed=view.executed,
        log_size=view.log_size,
        seq=view.seq,
    )


def _proven(entry: ProvenEntry) -> pb.ProvenEntry:
    return pb.ProvenEntry(seq=entry.seq, entry=entry.entry, proof=list(entry.proof))


def _extension(view: LogExtensionView) -> pb.LogExtension:
    return pb.LogExtension(
        checkpoint=view.checkpoint,
        proof=list(view.proof),
        witnessed_checkpoint=view.witnessed,
        witnessed_proof=list(view.witnessed_proof),
        included=None if view.included is None else _proven(view.included),
        rotations=[_proven(e) for e in view.rotations],
        witness_changes=[_proven(e) for e in view.witness_changes],
    )


def _submitted(shares: tuple[SubmittedShare, ...]) -> list[pb.SubmittedShare]:
    return [
        pb.SubmittedShare(
            fingerprint=s.fingerprint, name=s.name, share_index=s.share_index, submitted_at=s.at
        )
        for s in shares
    ]


def _session_state(view: UnsealSessionView | None) -> pb.UnsealSessionState | None:
    if view is None:
        return None
    return pb.UnsealSessionState(
        session_id=view.session_id.hex(),
        opened_at=view.opened_at,
        expires_at=view.expires_at,
        log_size=view.log_size,
        submitted=_submitted(view.submitted),
    )


def _ended(view: EndedSessionView | None) -> pb.EndedUnsealSession | None:
    if view is None:
        return None
    by, name = view.reset_by or ("", "")
    return pb.EndedUnsealSession(
        session_id=view.session_id.hex(),
        opened_at=view.opened_at,
        ended_at=view.ended_at,
        how=view.how,
        reset_by=by,
        reset_by_name=name,
        submitted=_submitted(view.submitted),
    )


def _status(view: StatusView) -> pb.Status:
    return pb.Status(
        initialized=view.initialized,
        sealed=view.sealed,
        deployment=view.deployment,
        threshold=view.threshold,
        custodian_count=len(view.roster),
        unseal_progress=view.unseal_progress,
        confirmed_count=view.confirmed_count,
        log_size=view.log_size,
        checkpoint=view.checkpoint,
        replica=view.replica,
        log_key=view.log_key,
        proposal_ttl_seconds=view.proposal_ttl_seconds,
        witnesses=list(view.witnesses),
        witness_threshold=view.witness_threshold,
        unseal_session=_session_state(view.unseal_session),
        previous_unseal_session=_ended(view.previous_unseal_session),
        roster=[
            pb.Custodian(
                fingerprint=c.fingerprint,
                name=c.name,
                share_index=c.share_index,
                confirmed=c.confirmed,
            )
            for c in view.roster
        ],
    )


class CustodianServicer:
    """Custodian-facing RPCs; authentication is by the custodians' signatures.

    Every method runs the daemon on a lane's thread: Seal on the seal lane,
    GetStatus on the status lane, the rest on the governance lane.
    """

    def __init__(self, daemon: Daemon, limits: Limits, refusals: RefusalLog | None = None) -> None:
        self._daemon = daemon
        self._refusals = refusals if refusals is not None else RefusalLog(self._roster_name)
        self._seal_lane = Lane("seal", threads=limits.seal_threads, waiting=limits.seal_waiting)
        self._status_lane = Lane(
            "status", threads=limits.status_threads, waiting=limits.status_waiting
        )
        self._lane = Lane(
            "governance", threads=limits.governance_threads, waiting=limits.governance_waiting
        )

    def _roster_name(self, fingerprint: str) -> str | None:
        return next(
            (c.name for c in self._daemon.state.roster if c.fingerprint == fingerprint), None
        )

    async def _call(
        self, method: str, fn: Callable[[], T], *, who: str = "", lane: Lane | None = None
    ) -> T:
        """`fn()` on a lane's thread (the governance lane by default); refusals logged."""
        try:
            return await (lane or self._lane).run(fn)
        except KeyquorumError as e:
            self._refusals.record(method, who, e)
            raise

    async def GetStatus(self, request: pb.GetStatusRequest, call: Call) -> pb.Status:
        return _status(await self._call("GetStatus", self._daemon.status, lane=self._status_lane))

    async def InitCeremony(
        self, request: pb.InitCeremonyRequest, call: Call
    ) -> pb.InitCeremonyResponse:
        view = await self._call(
            "InitCeremony",
            lambda: self._daemon.init_ceremony(
                request.deployment,
                request.threshold,
                list(request.public_credentials),
                code=request.code,
            ),
        )
        status = _status(view)
        return pb.InitCeremonyResponse(
            log_size=view.log_size,
            checkpoint=view.checkpoint,
            master_key_commitment=self._daemon.state.split.secret_commitment.hex(),
            roster=status.roster,
        )

    async def GetEncryptedShare(
        self, request: pb.GetEncryptedShareRequest, call: Call
    ) -> pb.EncryptedShare:
        share = await self._call(
            "GetEncryptedShare",
            lambda: self._daemon.encrypted_share(request.custodian),
            who=request.custodian,
        )
        return pb.EncryptedShare(
            deployment=share.deployment,
            split_id=share.split_id.hex(),
            index=share.index,
            ciphertext=share.ciphertext,
            commitment=share.commitments.share_commitments[share.index - 1].hex(),
            threshold=share.commitments.threshold,
            split_commitments=canonical.encode(share.commitments.to_json()),
        )

    async def ConfirmShare(
        self, request: pb.ConfirmShareRequest, call: Call
    ) -> pb.ConfirmShareResponse:
        view, seq = await self._call(
            "ConfirmShare",
            lambda: self._daemon.confirm_share(
                request.custodian,
                _hex(request.split_id, "split_id"),
                request.index,
                request.signature,
            ),
            who=request.custodian,
        )
        return pb.ConfirmShareResponse(
            confirmed_count=view.confirmed_count,
            custodian_count=len(view.roster),
            log_size=view.log_size,
            seq=seq,
        )

    async def OpenUnsealSession(
        self, request: pb.OpenUnsealSessionRequest, call: Call
    ) -> pb.UnsealSession:
        s = await self._call("OpenUnsealSession", self._daemon.open_unseal_session)
        return pb.UnsealSession(
            session_id=s.session_id.hex(),
            public_key=s.public_key,
            log_size=s.log_size,
            expires_at=s.expires_at,
            deployment=s.deployment,
            split_id=s.split_id.hex(),
            replica=s.replica,
            threshold=s.threshold,
            progress=s.progress,
            created=s.created,
            opened_at=s.opened_at,
            submitted=_submitted(s.submitted),
            previous=_ended(s.previous),
        )

    async def SubmitShare(self, request: pb.SubmitShareRequest, call: Call) -> pb.UnsealProgress:
        p = await self._call(
            "SubmitShare",
            lambda: self._daemon.submit_share(
                _hex(request.session_id, "session_id"),
                request.custodian,
                request.index,
                request.ciphertext,
                request.signature,
            ),
            who=request.custodian,
        )
        return pb.UnsealProgress(
            have=p.have, need=p.need, sealed=p.sealed, log_size=p.log_size, seq=p.seq
        )

    async def ResetUnsealSession(
        self, request: pb.ResetUnsealSessionRequest, call: Call
    ) -> pb.ResetUnsealSessionResponse:
        seq, ended = await self._call(
            "ResetUnsealSession",
            lambda: self._daemon.reset_unseal_session(
                _hex(request.session_id, "session_id"),
                request.custodian,
                request.requested_at,
                request.signature,
            ),
            who=request.custodian,
        )
        return pb.ResetUnsealSessionResponse(log_size=seq + 1, seq=seq, ended=_ended(ended))

    async def Seal(self, request: pb.SealRequest, call: Call) -> pb.SealResponse:
        seq = await self._call(
            "Seal",
            lambda: self._daemon.seal(
                request.custodian,
                request.requested_at,
                request.reason,
                request.signature,
                replica=request.replica or None,
            ),
            who=request.custodian,
            lane=self._seal_lane,
        )
        return pb.SealResponse(log_size=seq + 1, seq=seq)

    async def GetLogExtension(
        self, request: pb.GetLogExtensionRequest, call: Call
    ) -> pb.LogExtension:
        include = request.include_seq if request.HasField("include_seq") else None
        view = await self._call(
            "GetLogExtension", lambda: self._daemon.log_extension(request.first_size, include)
        )
        return _extension(view)

    async def Propose(self, request: pb.ProposeRequest, call: Call) -> pb.Proposal:
        view = await self._call(
            "Propose",
            lambda: self._daemon.propose(
                request.operation,
                [(p.key, p.value) for p in request.parameters],
                proposal_id=_hex(request.id, "proposal id"),
                expires_at=request.expires_at,
                proposer=request.proposer,
                signature=request.signature,
                public_credentials=list(request.public_credentials),
            ),
            who=request.proposer,
        )
        return _proposal(view)

    async def ListProposals(
        self, request: pb.ListProposalsRequest, call: Call
    ) -> pb.ListProposalsResponse:
        views = await self._call(
            "ListProposals",
            lambda: self._daemon.list_proposals(include_closed=request.include_closed),
        )
        return pb.ListProposalsResponse(proposals=[_proposal(v) for v in views])

    async def GetProposal(self, request: pb.GetProposalRequest, call: Call) -> pb.Proposal:
        view = await self._call(
            "GetProposal", lambda: self._daemon.get_proposal(_hex(request.id, "proposal id"))
        )
        return _proposal(view)

    async def Approve(self, request: pb.VerdictRequest, call: Call) -> pb.VerdictResponse:
        view = await self._call(
            "Approve",
            lambda: self._daemon.approve(
                _hex(request.proposal, "proposal id"),
                request.custodian,
                request.signature,
                public_credentials=list(request.public_credentials),
            ),
            who=request.custodian,
        )
        return _verdict(view)

    async def Refuse(self, request: pb.VerdictRequest, call: Call) -> pb.VerdictResponse:
        view = await self._call(
            "Refuse",
            lambda: self._daemon.refuse(
                _hex(request.proposal, "proposal id"), request.custodian, request.signature
            ),
            who=request.custodian,
        )
        return _verdict(view)

    async def ListTenants(
        self, request: pb.ListTenantsRequest, call: Call
    ) -> pb.ListTenantsResponse:
        views = await self._call("ListTenants", self._daemon.tenants)
        return pb.ListTenantsResponse(
            tenants=[
                pb.Tenant(
                    name=t.name,
                    versions=t.versions,
                    disabled_versions=list(t.disabled_versions),
                    active_until=t.active_until or 0,
                    unwrapped=t.unwrapped,
                    destroy_at=t.destroy_at or 0,
                    destroyed=t.destroyed,
                    backends=list(t.backends),
                )
                for t in views
            ]
        )


#: Each method's request message.
_REQUESTS: Final[dict[str, type[Message]]] = {
    "GetStatus": pb.GetStatusRequest,
    "InitCeremony": pb.InitCeremonyRequest,
    "GetEncryptedShare": pb.GetEncryptedShareRequest,
    "ConfirmShare": pb.ConfirmShareRequest,
    "OpenUnsealSession": pb.OpenUnsealSessionRequest,
    "SubmitShare": pb.SubmitShareRequest,
    "ResetUnsealSession": pb.ResetUnsealSessionRequest,
    "Seal": pb.SealRequest,
    "GetLogExtension": pb.GetLogExtensionRequest,
    "Propose": pb.ProposeRequest,
    "ListProposals": pb.ListProposalsRequest,
    "GetProposal": pb.GetProposalRequest,
    "Approve": pb.VerdictRequest,
    "Refuse": pb.VerdictRequest,
    "ListTenants": pb.ListTenantsRequest,
}


def register(daemon: Daemon, limits: Limits) -> Registration:
    """The CustodianService for `create_server`, Seal and GetStatus reserved."""

    def build(admission: Admission) -> grpc.GenericRpcHandler[Any, Any]:
        servicer = CustodianServicer(daemon, limits)
        methods: dict[str, Method] = {
            name: Unary(getattr(servicer, name), parser(request), serialize)
            for name, request in _REQUESTS.items()
        }
        return service(admission, SERVICE_NAME, methods)

    return Registration(build, RESERVED)
