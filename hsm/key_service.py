"""KeyService: the backends' gRPC API, a thin layer over `DataPlane`.

Every call first establishes who calls (`_backend`): the verified client
certificate of the mTLS listener must name `keyquorum://backend/<name>`.
No identity: UNAUTHENTICATED (in practice the handshake already failed);
another role (an auditor's certificate): PERMISSION_DENIED. Then the
request is converted, the data plane decides, and the answer is converted
back; every `KeyquorumError` becomes a status code through
`keyquorum.hsm.status`, for a batch item as `ItemError` with the same code.

Certificates are parsed once: a verified peer certificate's identity is
cached by its PEM bytes (the auth context gRPC fills only after the chain
verified against the client CA), so a busy backend's calls do not re-parse
X.509 each time.

`watch_health` ties the standard health service to the seal state: the
KeyService reports NOT_SERVING while sealed and SERVING when unsealed, so
load balancers stop sending backends to a sealed replica.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Final

import grpc
from grpc_health.v1 import health, health_pb2

from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.dataplane import (
    DataPlane,
    GenerateItem,
    Revealed,
    RewrapItem,
    UnwrapItem,
    WrapItem,
    Wrapped,
)
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.status import abort_with, code_for
from keyquorum.quorum.errors import AccessDeniedError, KeyquorumError, UnauthenticatedError
from keyquorum.v1 import key_pb2 as pb
from keyquorum.v1 import key_pb2_grpc as pb_grpc

SERVICE_NAME: Final = "keyquorum.v1.KeyService"
BACKEND_ROLE: Final = "backend"
#: Distinct client certificates remembered; the cache starts over past this.
IDENTITY_CACHE: Final = 1024


def _item_error(error: KeyquorumError) -> pb.ItemError:
    code = code_for(error)
    return pb.ItemError(code=code.value[0], message=str(error))


def _wrapped(result: Wrapped) -> pb.WrapResponse:
    return pb.WrapResponse(ciphertext=result.ciphertext, key_version=result.version)


def _unwrapped(result: Revealed) -> pb.UnwrapResponse:
    try:
        plaintext = result.plaintext.reveal() if result.plaintext is not None else b""
        return pb.UnwrapResponse(
            plaintext=plaintext,
            sealed_plaintext=result.sealed or b"",
            tenant=result.tenant,
            key_version=result.version,
        )
    finally:
        result.wipe()


def _generated(result: Revealed) -> pb.GenerateDataKeyResponse:
    try:
        plaintext = result.plaintext.reveal() if result.plaintext is not None else b""
        return pb.GenerateDataKeyResponse(
            ciphertext=result.ciphertext,
            plaintext=plaintext,
            sealed_plaintext=result.sealed or b"",
            key_version=result.version,
        )
    finally:
        result.wipe()


def _rewrapped(result: Wrapped) -> pb.RewrapResponse:
    return pb.RewrapResponse(ciphertext=result.ciphertext, key_version=result.version)


def _peer_pem(context: grpc.ServicerContext) -> bytes | None:
    """The verified peer certificate (PEM) of a TLS call, the identity cache's key.

    gRPC returns lists of bytes; the stubs say bytes, hence the runtime checks.
    """
    auth: Mapping[str, object] = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    pems = auth.get("x509_pem_cert")
    if isinstance(pems, list) and pems and isinstance(pems[0], bytes):
        return pems[0]
    return None


def _wrap_item(r: pb.WrapRequest) -> WrapItem:
    return WrapItem(r.tenant, r.plaintext, dict(r.context))


def _unwrap_item(r: pb.UnwrapRequest) -> UnwrapItem:
    return UnwrapItem(r.ciphertext, dict(r.context), r.recipient_public_key)


def _generate_item(r: pb.GenerateDataKeyRequest) -> GenerateItem:
    return GenerateItem(r.tenant, dict(r.context), r.size, r.recipient_public_key)


def _rewrap_item(r: pb.RewrapRequest) -> RewrapItem:
    return RewrapItem(r.ciphertext, dict(r.context))


class KeyServicer(pb_grpc.KeyServiceServicer):
    """Backend-facing RPCs; every call requires a backend's client certificate."""

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._identities: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def _backend(self, context: grpc.ServicerContext, operation: str) -> str:
        """The caller's identity URI; aborts unless it is a backend's."""
        pem = _peer_pem(context)
        if pem is not None:
            cached = self._identities.get(pem)
            if cached is not None:
                return cached
        try:
            uri = tls.identity_from_auth_context(context)
            if uri is None:
                raise UnauthenticatedError(
                    "a backend client certificate (keyquorum://backend/<name>) is required"
                )
            if ClientIdentity.parse(uri).role != BACKEND_ROLE:
                raise AccessDeniedError(f"{uri} is not a backend identity")
        except KeyquorumError as e:
            self._plane.refused(operation, e)
            abort_with(context, e)
        if pem is not None:
            with self._lock:
                if len(self._identities) >= IDENTITY_CACHE:
                    self._identities.clear()
                self._identities[pem] = uri
        return uri

    def Wrap(self, request: pb.WrapRequest, context: grpc.ServicerContext) -> pb.WrapResponse:
        who = self._backend(context, "wrap")
        try:
            return _wrapped(self._plane.wrap(who, _wrap_item(request)))
        except KeyquorumError as e:
            abort_with(context, e)

    def Unwrap(self, request: pb.UnwrapRequest, context: grpc.ServicerContext) -> pb.UnwrapResponse:
        who = self._backend(context, "unwrap")
        try:
            return _unwrapped(self._plane.unwrap(who, _unwrap_item(request)))
        except KeyquorumError as e:
            abort_with(context, e)

    def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateDataKeyResponse:
        who = self._backend(context, "generate_data_key")
        try:
            return _generated(self._plane.generate_data_key(who, _generate_item(request)))
        except KeyquorumError as e:
            abort_with(context, e)

    def Rewrap(self, request: pb.RewrapRequest, context: grpc.ServicerContext) -> pb.RewrapResponse:
        who = self._backend(context, "rewrap")
        try:
            return _rewrapped(self._plane.rewrap(who, _rewrap_item(request)))
        except KeyquorumError as e:
            abort_with(context, e)

    def BatchWrap(
        self, request: pb.BatchWrapRequest, context: grpc.ServicerContext
    ) -> pb.BatchWrapResponse:
        who = self._backend(context, "batch_wrap")
        try:
            results = self._plane.batch_wrap(who, [_wrap_item(r) for r in request.items])
        except KeyquorumError as e:
            abort_with(context, e)
        return pb.BatchWrapResponse(
            results=[
                pb.WrapResult(error=_item_error(r))
                if isinstance(r, KeyquorumError)
                else pb.WrapResult(ok=_wrapped(r))
                for r in results
            ]
        )

    def BatchUnwrap(
        self, request: pb.BatchUnwrapRequest, context: grpc.ServicerContext
    ) -> pb.BatchUnwrapResponse:
        who = self._backend(context, "batch_unwrap")
        try:
            results = self._plane.batch_unwrap(who, [_unwrap_item(r) for r in request.items])
        except KeyquorumError as e:
            abort_with(context, e)
        return pb.BatchUnwrapResponse(
            results=[
                pb.UnwrapResult(error=_item_error(r))
                if isinstance(r, KeyquorumError)
                else pb.UnwrapResult(ok=_unwrapped(r))
                for r in results
            ]
        )

    def BatchGenerateDataKey(
        self, request: pb.BatchGenerateDataKeyRequest, context: grpc.ServicerContext
    ) -> pb.BatchGenerateDataKeyResponse:
        who = self._backend(context, "batch_generate_data_key")
        try:
            results = self._plane.batch_generate_data_key(
                who, [_generate_item(r) for r in request.items]
            )
        except KeyquorumError as e:
            abort_with(context, e)
        return pb.BatchGenerateDataKeyResponse(
            results=[
                pb.GenerateDataKeyResult(error=_item_error(r))
                if isinstance(r, KeyquorumError)
                else pb.GenerateDataKeyResult(ok=_generated(r))
                for r in results
            ]
        )

    def BatchRewrap(
        self, request: pb.BatchRewrapRequest, context: grpc.ServicerContext
    ) -> pb.BatchRewrapResponse:
        who = self._backend(context, "batch_rewrap")
        try:
            results = self._plane.batch_rewrap(who, [_rewrap_item(r) for r in request.items])
        except KeyquorumError as e:
            abort_with(context, e)
        return pb.BatchRewrapResponse(
            results=[
                pb.RewrapResult(error=_item_error(r))
                if isinstance(r, KeyquorumError)
                else pb.RewrapResult(ok=_rewrapped(r))
                for r in results
            ]
        )


def register(plane: DataPlane) -> Callable[[grpc.Server], None]:
    """A `create_server` registration for the KeyService over `plane`."""

    def add(server: grpc.Server) -> None:
        pb_grpc.add_KeyServiceServicer_to_server(KeyServicer(plane), server)

    return add


def watch_health(daemon: Daemon, servicer: health.HealthServicer) -> None:
    """KeyService is NOT_SERVING while the daemon is sealed, SERVING when unsealed."""

    def on_seal_state(sealed: bool) -> None:
        servicer.set(
            SERVICE_NAME,
            health_pb2.HealthCheckResponse.NOT_SERVING
            if sealed
            else health_pb2.HealthCheckResponse.SERVING,
        )

    daemon.add_seal_observer(on_seal_state)
