"""What a custodian's machine does, as plain functions over a gRPC stub.

The CLI commands, the demo and the tests all call these. A share is
decrypted here, on the custodian's machine, checked against its public
commitment, re-encrypted to the daemon's unseal-session key and signed; it
never leaves this process in the clear, and its buffers are wiped after use.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keyquorum.cli.connect import rpc_errors
from keyquorum.quorum import canonical, operations, shamir, statements
from keyquorum.quorum import log as qlog
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, StateError
from keyquorum.quorum.operations import operation as operation_row
from keyquorum.quorum.sealing import SealingPublicKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.unseal import session_info
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

#: Called with the exact statement text before the credential is unlocked,
#: so a person reads what they are about to sign; returns the credential.
Unlock = Callable[[str], CustodianCredential]


@dataclass(frozen=True)
class ShareCheck:
    """A custodian's share, decrypted locally and checked against its commitment."""

    deployment: str
    split_id: bytes
    index: int


def fetch_and_check_share(
    stub: pb_grpc.CustodianServiceStub, credential: CustodianCredential
) -> tuple[shamir.Share, pb.EncryptedShare]:
    """Decrypt this custodian's share and check it against the logged commitment."""
    fingerprint = credential.public().fingerprint
    with rpc_errors():
        enc = stub.GetEncryptedShare(pb.GetEncryptedShareRequest(custodian=fingerprint))
    commitments = shamir.SplitCommitments.from_json(canonical.decode(enc.split_commitments))
    split_id = bytes.fromhex(enc.split_id)
    if split_id != commitments.split_id:
        raise InvalidInputError("the daemon's share record names two different splits")
    info = qlog.share_info(enc.deployment, split_id, fingerprint, enc.index)
    with credential.open_sealed(enc.ciphertext, info) as plain:
        share = shamir.Share.from_bytes(plain.view())
    try:
        shamir.verify_share(share, commitments)
    except BaseException:
        share.wipe()
        raise
    return share, enc


def _named(stub: pb_grpc.CustodianServiceStub, who: statements.Named | str) -> statements.Named:
    """The custodian as statements name them; a bare fingerprint is looked up on the roster.

    The CLI passes the custodian's own public credential (name and
    fingerprint from their file). A caller with only a fingerprint gets the
    name the daemon's roster shows; a wrong one would only make a statement
    that replay, rendering it from the log, does not verify.
    """
    if not isinstance(who, str):
        return who
    with rpc_errors():
        status = stub.GetStatus(pb.GetStatusRequest())
    for member in status.roster:
        if member.fingerprint == who:
            return statements.Person(member.fingerprint, member.name)
    raise InvalidInputError("that fingerprint is not on the daemon's roster")


def confirm(
    stub: pb_grpc.CustodianServiceStub,
    public: statements.Named | str,
    unlock: Unlock,
    *,
    before_sign: Callable[[], object] | None = None,
) -> pb.ConfirmShareResponse:
    """Check one's own share after the ceremony and log a signed acknowledgement.

    The statement is shown (through `unlock`) before the credential is
    unlocked; the share is then checked locally before anything is signed.
    `before_sign` runs first (the CLI's checks of the log it signs over).
    """
    if before_sign is not None:
        before_sign()
    public = _named(stub, public)
    fingerprint = public.fingerprint
    with rpc_errors():
        enc = stub.GetEncryptedShare(pb.GetEncryptedShareRequest(custodian=fingerprint))
    statement = statements.confirm_share_statement(
        deployment=enc.deployment,
        custodian=public,
        split_id=bytes.fromhex(enc.split_id),
        index=enc.index,
    )
    credential = unlock(statement.render())
    if credential.public().fingerprint != fingerprint:
        raise InvalidInputError("the credential does not match its public file")
    share, _enc = fetch_and_check_share(stub, credential)
    share.wipe()
    signed = statements.sign_statement(statement, credential)
    with rpc_errors():
        return stub.ConfirmShare(
            pb.ConfirmShareRequest(
                custodian=fingerprint,
                split_id=enc.split_id,
                index=enc.index,
                signature=signed.signature.to_bytes(),
            )
        )


def submit_share(
    stub: pb_grpc.CustodianServiceStub,
    credential: CustodianCredential,
    *,
    show: Callable[[str], None] | None = None,
    tamper: Callable[[bytearray], None] | None = None,
) -> pb.UnsealProgress:
    """Send this custodian's share to the daemon's open unseal session.

    The unseal-share statement names the hash of the re-encrypted share, so
    it exists only after the credential is unlocked; `show` is called with
    its exact text before it is signed.

    `tamper` exists for the demo and the tests only: it alters the share
    bytes after the local commitment check, to show the daemon refusing a
    wrong share and naming its custodian.
    """
    with rpc_errors():
        session = stub.OpenUnsealSession(pb.OpenUnsealSessionRequest())
    share, _enc = fetch_and_check_share(stub, credential)
    fingerprint = credential.public().fingerprint
    session_id = bytes.fromhex(session.session_id)
    index = share.index
    info = session_info(session.deployment, session.replica, session_id, fingerprint, index)
    try:
        with share.to_bytes() as plain:
            if tamper is not None:
                raw = bytearray(plain.view())
                tamper(raw)
                with SecretBytes.adopt(raw, label="tampered share") as altered:
                    ciphertext = SealingPublicKey.from_bytes(session.public_key).seal(altered, info)
            else:
                ciphertext = SealingPublicKey.from_bytes(session.public_key).seal(plain, info)
    finally:
        share.wipe()
    statement = statements.unseal_share_statement(
        deployment=session.deployment,
        custodian=credential.public(),
        replica=session.replica,
        session=session_id,
        session_log_size=session.log_size,
        split_id=bytes.fromhex(session.split_id),
        index=index,
        ciphertext_sha256=hashlib.sha256(ciphertext).digest(),
    )
    if show is not None:
        show(statement.render())
    signed = statements.sign_statement(statement, credential)
    with rpc_errors():
        return stub.SubmitShare(
            pb.SubmitShareRequest(
                session_id=session.session_id,
                custodian=fingerprint,
                index=index,
                ciphertext=ciphertext,
                signature=signed.signature.to_bytes(),
            )
        )


def reset_statement(
    status: pb.Status, public: statements.Named, *, now: int
) -> statements.Statement:
    """The `unseal-reset` statement for the open session `status` shows."""
    session = status.unseal_session
    try:
        session_id = bytes.fromhex(session.session_id)
    except ValueError:
        raise InvalidInputError("the daemon sent a session id that is not hex") from None
    return statements.unseal_reset_statement(
        deployment=status.deployment,
        custodian=public,
        replica=status.replica,
        session=session_id,
        session_log_size=session.log_size,
        requested_at=now,
    )


def reset_unseal_session(
    stub: pb_grpc.CustodianServiceStub,
    credential: CustodianCredential,
    statement: statements.Statement,
    *,
    now: int,
) -> pb.ResetUnsealSessionResponse:
    """Send a signed `unseal-reset` (`reset_statement` made at `now`) for its session."""
    signed = statements.sign_statement(statement, credential)
    with rpc_errors():
        return stub.ResetUnsealSession(
            pb.ResetUnsealSessionRequest(
                session_id=statement.field("session") or "",
                custodian=credential.public().fingerprint,
                requested_at=now,
                signature=signed.signature.to_bytes(),
            )
        )


def seal(
    stub: pb_grpc.CustodianServiceStub,
    public: statements.Named | str,
    unlock: Unlock,
    *,
    reason: str,
    now: int,
    replica: str | None = None,
) -> pb.SealResponse:
    """Seal the replica behind `stub` by one custodian's signed request.

    `replica` is `"*"` to seal every replica of the deployment (or another
    replica's name); by default the one behind `stub`.

    The exact statement is shown (through `unlock`) before the credential is
    unlocked: what you see is what you sign.
    """
    public = _named(stub, public)
    fingerprint = public.fingerprint
    with rpc_errors():
        status = stub.GetStatus(pb.GetStatusRequest())
    statement = statements.seal_statement(
        deployment=status.deployment,
        custodian=public,
        replica=replica or status.replica,
        reason=reason,
        requested_at=now,
    )
    credential = unlock(statement.render())
    if credential.public().fingerprint != fingerprint:
        raise InvalidInputError("the credential does not match its public file")
    signed = statements.sign_statement(statement, credential)
    with rpc_errors():
        return stub.Seal(
            pb.SealRequest(
                custodian=fingerprint,
                requested_at=now,
                reason=reason,
                signature=signed.signature.to_bytes(),
                replica=replica or "",
            )
        )


def proposal_statement(proposal: pb.Proposal, verdict: str) -> statements.Statement:
    """The statement to sign on `proposal`, checked here before it is shown.

    The daemon sends the text; this rebuilds it from the proposal's own
    fields and its context (roster and threshold at the proposal, the
    custodians it adds; `ApprovalRequest`, the same code the daemon and
    replay use) and refuses to go on if the two differ, so what the
    custodian reads is exactly what the signature covers and what the
    daemon will verify. A daemon that lied about the fields or the context
    would only get a signature that verifies for no proposal in its log
    (replay renders the statement from the log itself).
    """
    if verdict not in statements.VERDICTS:
        raise InvalidInputError(f"verdict must be one of {statements.VERDICTS}")
    text = proposal.approve_statement if verdict == "approve" else proposal.refuse_statement
    shown = statements.Statement.parse(text)
    try:
        proposal_id = bytes.fromhex(proposal.id)
    except ValueError:
        raise InvalidInputError("the daemon sent a proposal id that is not hex") from None
    try:
        context = statements.ApprovalContext.from_json(canonical.decode(proposal.context))
        parameters = operations.parameters_from_text(
            proposal.operation, [(p.key, p.value) for p in proposal.parameters]
        )
    except DeserializationError as e:
        raise InvalidInputError(f"the daemon sent a proposal that does not parse: {e}") from None
    request = statements.ApprovalRequest.from_mapping(
        deployment=proposal.deployment,
        proposal_id=proposal_id,
        operation=proposal.operation,
        parameters=dict(parameters),
        log_position=proposal.log_position,
        proposed_at=proposal.proposed_at,
        expires_at=proposal.expires_at,
        context=context,
    )
    rebuilt = request.statement(verdict)
    if rebuilt.render() != shown.render() or shown.kind != verdict:
        raise InvalidInputError(
            "the daemon's statement text does not match its own proposal: refusing to sign"
        )
    return shown


def verdict(
    stub: pb_grpc.CustodianServiceStub,
    proposal_id: str,
    fingerprint: str,
    unlock: Unlock,
    *,
    verdict: str,
    public_credentials: Sequence[bytes] = (),
    before_sign: Callable[[pb.Proposal], object] | None = None,
) -> pb.VerdictResponse:
    """Approve or refuse one proposal as custodian `fingerprint`.

    Fetches the proposal, checks its statement (`proposal_statement`),
    runs `before_sign` on it (the CLI's checks of the log it signs over:
    witnessed up to the proposal), shows it through `unlock` BEFORE the
    credential is unlocked, signs exactly that text and sends the
    signature. Nothing is signed for a proposal that is no longer pending.
    """
    with rpc_errors():
        proposal = stub.GetProposal(pb.GetProposalRequest(id=proposal_id.lower()))
    if proposal.id != proposal_id.lower():
        raise InvalidInputError("the daemon answered with another proposal")
    if proposal.status != "pending":
        raise StateError(f"proposal {proposal.id} is {proposal.status}: nothing to sign")
    statement = proposal_statement(proposal, verdict)
    if before_sign is not None:
        before_sign(proposal)
    credential = unlock(statement.render())
    if credential.public().fingerprint != fingerprint:
        raise InvalidInputError("the credential does not match its public file")
    signed = statements.sign_statement(statement, credential)
    request = pb.VerdictRequest(
        proposal=proposal.id,
        custodian=fingerprint,
        signature=signed.signature.to_bytes(),
        public_credentials=list(public_credentials),
    )
    with rpc_errors():
        if verdict == "approve":
            return stub.Approve(request)
        return stub.Refuse(request)


#: Seconds a proposal's default expiry stays under the policy's TTL, so that a
#: proposer's clock a little ahead of the daemon's does not overshoot it.
EXPIRY_MARGIN_SECONDS = 300


def propose(
    stub: pb_grpc.CustodianServiceStub,
    proposer: statements.Named,
    unlock: Unlock,
    operation: str,
    parameters: Sequence[tuple[str, str]],
    *,
    now: int,
    expires_in: int | None = None,
    public_credentials: Sequence[bytes] = (),
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> pb.Proposal:
    """Propose `operation` as `proposer` (a custodian or a registered proposer).

    The proposal's id and expiry are chosen here; the `propose` statement of
    exactly these, the operation and every parameter (typed as the daemon
    types them) is shown through `unlock` BEFORE the credential is
    unlocked, then signed.
    """
    name = operation_row(operation).name
    params = operations.typed_parameters(parameters)
    with rpc_errors():
        status = stub.GetStatus(pb.GetStatusRequest())
    if not status.initialized:
        raise StateError("no ceremony yet: nothing to propose to")
    ttl = status.proposal_ttl_seconds
    if expires_in is None:
        expires_in = max(60, ttl - EXPIRY_MARGIN_SECONDS)
    proposal_id = random_bytes(statements.PROPOSAL_ID_SIZE)
    fingerprint = proposer.fingerprint
    statement = statements.proposal_statement(
        deployment=status.deployment,
        proposer=proposer,
        proposal_id=proposal_id,
        operation=name,
        parameters=dict(params),
        expires_at=now + expires_in,
    )
    credential = unlock(statement.render())
    if credential.public().fingerprint != fingerprint:
        raise InvalidInputError("the credential does not match its public file")
    signed = statements.sign_statement(statement, credential)
    request = pb.ProposeRequest(
        operation=name,
        parameters=[pb.Parameter(key=k, value=str(v)) for k, v in params],
        proposer=fingerprint,
        public_credentials=list(public_credentials),
        id=proposal_id.hex(),
        expires_at=now + expires_in,
        signature=signed.signature.to_bytes(),
    )
    with rpc_errors():
        return stub.Propose(request)
