"""KeyService: the backends' gRPC API, a thin layer over `DataPlane`.

Every call first establishes who calls (`_backend`): the verified client
certificate of the mTLS listener must name `keyquorum://backend/<name>`.
No identity: UNAUTHENTICATED (in practice the handshake already failed);
another role (an auditor's certificate): PERMISSION_DENIED. Then the
request is converted, the data plane decides, and the answer is converted
back; every `KeyquorumError` becomes a status code through
`keyquorum.hsm.services.status`, for a batch item as `ItemError` with the same code.

Certificates are parsed once: the identity read from a verified peer
certificate (`tls.identity_from_auth_context`, X.509 parsed from the PEM
gRPC puts in the auth context only after the chain verified against the
client CA) is cached under the subject alternative names gRPC reports for
that peer (`peer_identities()`), and only when those names contain that
identity and no other keyquorum URI; so a busy backend's calls neither
re-parse X.509 nor copy the auth context each time.

Wrap, Unwrap and BatchWrap take their request as wire bytes and hand it to
the data plane's `*_serialized` methods, which answer through the C wire
codec what it accepts whole (docs/adr/0001); anything else is parsed here
with protobuf (malformed: INVALID_ARGUMENT) and goes the Python way, the
reference. Wrap's answer (`encode_wrap_response`) and the answers of
BatchWrap's Python path and BatchRewrap (`encode_wrap_results`) are written
in protobuf wire format, byte-identical to the protobuf library's. The
handlers are registered as the generated `add_KeyServiceServicer_to_server`
would (one generic handler), with those (de)serialisers replaced.

`watch_health` ties the standard health service to the seal state: the
KeyService reports NOT_SERVING while sealed and SERVING when unsealed, so
load balancers stop sending backends to a sealed replica.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2

from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.dataplane import (
    DataPlane,
    GenerateItem,
    Revealed,
    UnwrapItem,
    Wrapped,
)
from keyquorum.hsm.pki import URI_SCHEME, ClientIdentity
from keyquorum.hsm.services.status import abort_with, code_for
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    KeyquorumError,
    UnauthenticatedError,
)
from keyquorum.v1 import key_pb2 as pb

SERVICE_NAME: Final = "keyquorum.v1.KeyService"
BACKEND_ROLE: Final = "backend"
#: Distinct client certificates remembered; the cache starts over past this.
IDENTITY_CACHE: Final = 1024
#: Threads for a server whose calls are the KeyService's (`create_server(max_workers=)`).
#: The handlers run Python under one interpreter lock, so threads beyond a few add
#: no throughput, only lock hand-offs: measured on 2 cores at 64 calls in flight,
#: 16 threads serve about half the Wraps/s that 3 or 4 do (docs/adr/0002).
#: A handler that waits (a counter block from the store) holds one.
SERVER_WORKERS: Final = 4

Req = TypeVar("Req")
Resp = TypeVar("Resp")


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


def _identity_key(context: grpc.ServicerContext) -> tuple[bytes, ...] | None:
    """The identity cache's key: the subject alternative names gRPC verified, or None.

    `peer_identities()` is what gRPC's TLS layer reports as the peer's
    identity once the chain verified against the client CA (the certificate's
    SANs; None for an unauthenticated peer). It costs a fraction of building
    the whole auth context (`auth_context()`, which also copies the PEM).
    """
    names = context.peer_identities()
    return tuple(names) if names else None


def _names_only(key: tuple[bytes, ...], uri: str) -> bool:
    """True if the verified names include `uri` and no other keyquorum identity.

    Only such keys are cached: a later certificate with the same names then
    names this identity, and only it, among what gRPC verified.
    """
    if not all(isinstance(n, bytes) for n in key):
        return False
    ours = [n for n in key if n.startswith(URI_SCHEME.encode() + b"://")]
    return ours == [uri.encode()]


def _unwrap_item(r: pb.UnwrapRequest) -> UnwrapItem:
    context = r.context
    return UnwrapItem(r.ciphertext, {k: context[k] for k in context}, r.recipient_public_key)


def _generate_item(r: pb.GenerateDataKeyRequest) -> GenerateItem:
    context = r.context
    return GenerateItem(r.tenant, {k: context[k] for k in context}, r.size, r.recipient_public_key)


# -- the batch answers in wire format ------------------------------------------------

_TAG_1_LEN: Final = b"\x0a"  # field 1, length-delimited (results; ok; ciphertext)
_TAG_2_LEN: Final = b"\x12"  # field 2, length-delimited (error; message)
_TAG_1_VARINT: Final = b"\x08"  # field 1, varint (ItemError.code)
_TAG_2_VARINT: Final = b"\x10"  # field 2, varint (key_version)
_SMALL: Final = tuple(bytes([i]) for i in range(128))


def _varint(value: int) -> bytes:
    """A protobuf base-128 varint; a negative int32 is its 64-bit two's complement."""
    if 0 <= value < 128:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _error_bytes(error: KeyquorumError) -> bytes:
    """An `ItemError` message: code (omitted when 0, as proto3 does), message."""
    code = code_for(error).value[0]
    message = str(error).encode("utf-8")
    body = (_TAG_1_VARINT + _varint(code) if code else b"") + (
        _TAG_2_LEN + _varint(len(message)) + message if message else b""
    )
    return _TAG_2_LEN + _varint(len(body)) + body


def encode_wrap_results(results: Sequence[Wrapped | KeyquorumError]) -> bytes:
    """A serialised BatchWrapResponse (and BatchRewrapResponse: the same wire layout).

    `repeated WrapResult results = 1`, each a oneof of `WrapResponse ok = 1`
    (`bytes ciphertext = 1`, `uint32 key_version = 2`) or `ItemError error = 2`
    (`int32 code = 1`, `string message = 2`): fields in number order, zero
    values left out (proto3), lengths as minimal varints, as the protobuf
    library writes them (tests/test_dataplane_fast.py compares bytes).
    """
    parts: list[bytes] = []
    append = parts.append
    frames: dict[tuple[int, int], tuple[bytes, bytes]] = {}
    for result in results:
        if isinstance(result, Wrapped):
            ciphertext, version = result.ciphertext, result.version
            frame = frames.get((len(ciphertext), version))
            if frame is None:
                field_ct = _TAG_1_LEN + _varint(len(ciphertext)) if ciphertext else b""
                field_v = _TAG_2_VARINT + _varint(version) if version else b""
                ok = len(field_ct) + len(ciphertext) + len(field_v)
                head = _TAG_1_LEN + _varint(ok) + field_ct
                whole = len(head) + len(ciphertext) + len(field_v)
                frame = frames[(len(ciphertext), version)] = (
                    _TAG_1_LEN + _varint(whole) + head,
                    field_v,
                )
            append(frame[0])
            append(ciphertext)
            append(frame[1])
        else:
            error = _error_bytes(result)
            append(_TAG_1_LEN + _varint(len(error)))
            append(error)
    return b"".join(parts)


def encode_wrap_response(result: Wrapped) -> bytes:
    """A serialised WrapResponse (`bytes ciphertext = 1`, `uint32 key_version = 2`).

    As the protobuf library writes it (zero values left out), compared byte
    for byte in tests/test_dataplane_fast.py.
    """
    ciphertext, version = result.ciphertext, result.version
    return (_TAG_1_LEN + _varint(len(ciphertext)) + ciphertext if ciphertext else b"") + (
        _TAG_2_VARINT + _varint(version) if version else b""
    )


def _raw(data: bytes) -> bytes:
    """The (de)serialiser of a handler that reads or writes wire bytes itself."""
    return data


M = TypeVar("M", bound=Message)


def _parse(message: type[M], request: bytes) -> M:
    """The request message; a malformed one is INVALID_ARGUMENT (DeserializationError)."""
    try:
        return message.FromString(request)
    except DecodeError:
        name = message.DESCRIPTOR.name
        raise DeserializationError(f"the request is not a valid {name}") from None


class KeyServicer:
    """Backend-facing RPCs; every call requires a backend's client certificate.

    Unwrap, GenerateDataKey, Rewrap, BatchUnwrap and BatchGenerateDataKey
    return response messages; Wrap, BatchWrap and BatchRewrap return the
    serialised response (`encode_wrap_response`, `encode_wrap_results`),
    registered with a pass-through serialiser. Wrap, Unwrap and BatchWrap take
    the serialised request.
    """

    def __init__(self, plane: DataPlane) -> None:
        self._plane = plane
        self._identities: dict[tuple[bytes, ...], str] = {}
        self._lock = threading.Lock()

    def _backend(self, context: grpc.ServicerContext, operation: str) -> str:
        """The caller's identity URI; aborts unless it is a backend's."""
        key = _identity_key(context)
        if key is not None:
            cached = self._identities.get(key)
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
        if key is not None and _names_only(key, uri):
            with self._lock:
                if len(self._identities) >= IDENTITY_CACHE:
                    self._identities.clear()
                self._identities[key] = uri
        return uri

    def Wrap(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Takes the request serialised: the data plane's C parser reads the wire bytes."""
        who = self._backend(context, "wrap")
        try:
            result = self._plane.wrap_serialized(who, request)
            if result is None:
                result = self._plane.wrap(who, _parse(pb.WrapRequest, request))
        except KeyquorumError as e:
            abort_with(context, e)
        return encode_wrap_response(result)

    def Unwrap(self, request: bytes, context: grpc.ServicerContext) -> pb.UnwrapResponse:
        """Takes the request serialised, as Wrap does."""
        who = self._backend(context, "unwrap")
        try:
            result = self._plane.unwrap_serialized(who, request)
            if result is None:
                parsed = _parse(pb.UnwrapRequest, request)
                result = self._plane.unwrap(who, _unwrap_item(parsed))
            return _unwrapped(result)
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
            return _rewrapped(self._plane.rewrap(who, request))
        except KeyquorumError as e:
            abort_with(context, e)

    def BatchWrap(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Takes the request serialised: the data plane's C fast path reads the wire bytes."""
        who = self._backend(context, "batch_wrap")
        try:
            answer = self._plane.batch_wrap_serialized(who, request)
            if answer is not None:
                return answer
            results = self._plane.batch_wrap(who, _parse(pb.BatchWrapRequest, request).items)
        except KeyquorumError as e:
            abort_with(context, e)
        return encode_wrap_results(results)

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

    def BatchRewrap(self, request: pb.BatchRewrapRequest, context: grpc.ServicerContext) -> bytes:
        who = self._backend(context, "batch_rewrap")
        try:
            results = self._plane.batch_rewrap(who, request.items)
        except KeyquorumError as e:
            abort_with(context, e)
        return encode_wrap_results(results)


def _handler(
    behavior: Callable[[Req, grpc.ServicerContext], Resp],
    deserializer: Callable[[bytes], Req],
    serializer: Callable[[Resp], bytes],
) -> grpc.RpcMethodHandler[Req, Resp]:
    return grpc.unary_unary_rpc_method_handler(
        behavior, request_deserializer=deserializer, response_serializer=serializer
    )


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def method_handlers(servicer: KeyServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The eight methods' handlers, as the generated code makes them, but for what goes as
    wire bytes: the requests of Wrap, Unwrap and BatchWrap, and the wrap answers."""
    return {
        "Wrap": _handler(servicer.Wrap, _raw, _raw),
        "Unwrap": _handler(servicer.Unwrap, _raw, _serialize),
        "GenerateDataKey": _handler(
            servicer.GenerateDataKey, pb.GenerateDataKeyRequest.FromString, _serialize
        ),
        "Rewrap": _handler(servicer.Rewrap, pb.RewrapRequest.FromString, _serialize),
        "BatchWrap": _handler(servicer.BatchWrap, _raw, _raw),
        "BatchUnwrap": _handler(servicer.BatchUnwrap, pb.BatchUnwrapRequest.FromString, _serialize),
        "BatchGenerateDataKey": _handler(
            servicer.BatchGenerateDataKey, pb.BatchGenerateDataKeyRequest.FromString, _serialize
        ),
        "BatchRewrap": _handler(servicer.BatchRewrap, pb.BatchRewrapRequest.FromString, _raw),
    }


def register(plane: DataPlane) -> Callable[[grpc.Server], None]:
    """A `create_server` registration for the KeyService over `plane`.

    One generic handler for the service, the way the benchmark's echo is
    registered too, so both go through the same dispatch.
    """

    def add(server: grpc.Server) -> None:
        handlers = method_handlers(KeyServicer(plane))
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )

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
