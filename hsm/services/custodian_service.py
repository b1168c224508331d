"""CustodianService: a thin gRPC layer over `Daemon`.

Each method converts the request, calls the daemon, and converts the
answer; every `KeyquorumError` becomes a status code through
`keyquorum.hsm.services.status`, the one place that mapping lives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import grpc

from keyquorum.hsm.daemon import Daemon, ProposalView, StatusView, VerdictView
from keyquorum.hsm.services.refusals import RefusalLog
from keyquorum.hsm.services.status import abort_with
from keyquorum.quorum import canonical
from keyquorum.quorum.errors import DeserializationError, KeyquorumError
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

T = TypeVar("T")

SERVICE_NAME = "keyquorum.v1.CustodianService"


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
        proposal=_proposal(view.proposal), executed=view.executed, log_size=view.log_size
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


class CustodianServicer(pb_grpc.CustodianServiceServicer):
    """Custodian-facing RPCs; authentication is by the custodians' signatures."""

    def __init__(self, daemon: Daemon, refusals: RefusalLog | None = None) -> None:
        self._daemon = daemon
        self._refusals = refusals if refusals is not None else RefusalLog(self._on_roster)

    def _on_roster(self, fingerprint: str) -> bool:
        return any(c.fingerprint == fingerprint for c in self._daemon.state.roster)

    def _call(
        self,
        context: grpc.ServicerContext,
        method: str,
        fn: Callable[[], T],
        *,
        who: str = "",
    ) -> T:
        try:
            return fn()
        except KeyquorumError as e:
            self._refusals.record(method, who, e)
            abort_with(context, e)

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.Status:
        return _status(self._call(context, "GetStatus", self._daemon.status))

    def InitCeremony(
        self, request: pb.InitCeremonyRequest, context: grpc.ServicerContext
    ) -> pb.InitCeremonyResponse:
        view = self._call(
            context,
            "InitCeremony",
            lambda: self._daemon.init_ceremony(
                request.deployment, request.threshold, list(request.public_credentials)
            ),
        )
        status = _status(view)
        return pb.InitCeremonyResponse(
            log_size=view.log_size,
            checkpoint=view.checkpoint,
            master_key_commitment=self._daemon.state.split.secret_commitment.hex(),
            roster=status.roster,
        )

    def GetEncryptedShare(
        self, request: pb.GetEncryptedShareRequest, context: grpc.ServicerContext
    ) -> pb.EncryptedShare:
        share = self._call(
            context,
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

    def ConfirmShare(
        self, request: pb.ConfirmShareRequest, context: grpc.ServicerContext
    ) -> pb.ConfirmShareResponse:
        view = self._call(
            context,
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
        )

    def OpenUnsealSession(
        self, request: pb.OpenUnsealSessionRequest, context: grpc.ServicerContext
    ) -> pb.UnsealSession:
        s = self._call(context, "OpenUnsealSession", self._daemon.open_unseal_session)
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
        )

    def SubmitShare(
        self, request: pb.SubmitShareRequest, context: grpc.ServicerContext
    ) -> pb.UnsealProgress:
        p = self._call(
            context,
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
        return pb.UnsealProgress(have=p.have, need=p.need, sealed=p.sealed, log_size=p.log_size)

    def Seal(self, request: pb.SealRequest, context: grpc.ServicerContext) -> pb.SealResponse:
        size = self._call(
            context,
            "Seal",
            lambda: self._daemon.seal(
                request.custodian,
                request.requested_at,
                request.reason,
                request.signature,
                replica=request.replica or None,
            ),
            who=request.custodian,
        )
        return pb.SealResponse(log_size=size)

    def GetLogExtension(
        self, request: pb.GetLogExtensionRequest, context: grpc.ServicerContext
    ) -> pb.LogExtension:
        note, proof = self._call(
            context,
            "GetLogExtension",
            lambda: self._daemon.checkpoint_with_proof(request.first_size),
        )
        return pb.LogExtension(checkpoint=note, proof=proof)

    def Propose(self, request: pb.ProposeRequest, context: grpc.ServicerContext) -> pb.Proposal:
        view = self._call(
            context,
            "Propose",
            lambda: self._daemon.propose(
                request.operation,
                [(p.key, p.value) for p in request.parameters],
                expires_in=request.expires_in_seconds or None,
                proposer=request.proposer,
                public_credentials=list(request.public_credentials),
            ),
            who=request.proposer,
        )
        return _proposal(view)

    def ListProposals(
        self, request: pb.ListProposalsRequest, context: grpc.ServicerContext
    ) -> pb.ListProposalsResponse:
        views = self._call(
            context,
            "ListProposals",
            lambda: self._daemon.list_proposals(include_closed=request.include_closed),
        )
        return pb.ListProposalsResponse(proposals=[_proposal(v) for v in views])

    def GetProposal(
        self, request: pb.GetProposalRequest, context: grpc.ServicerContext
    ) -> pb.Proposal:
        view = self._call(
            context,
            "GetProposal",
            lambda: self._daemon.get_proposal(_hex(request.id, "proposal id")),
        )
        return _proposal(view)

    def Approve(
        self, request: pb.VerdictRequest, context: grpc.ServicerContext
    ) -> pb.VerdictResponse:
        view = self._call(
            context,
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

    def Refuse(
        self, request: pb.VerdictRequest, context: grpc.ServicerContext
    ) -> pb.VerdictResponse:
        view = self._call(
            context,
            "Refuse",
            lambda: self._daemon.refuse(
                _hex(request.proposal, "proposal id"), request.custodian, request.signature
            ),
            who=request.custodian,
        )
        return _verdict(view)

    def ListTenants(
        self, request: pb.ListTenantsRequest, context: grpc.ServicerContext
    ) -> pb.ListTenantsResponse:
        views = self._call(context, "ListTenants", self._daemon.tenants)
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


def register(daemon: Daemon) -> Callable[[grpc.Server], None]:
    """A registration callback for `create_server`."""

    def add(server: grpc.Server) -> None:
        pb_grpc.add_CustodianServiceServicer_to_server(CustodianServicer(daemon), server)

    return add
