"""KeyService: the backends' gRPC API, a thin layer over `DataPlane`.

Every call first establishes who calls: the listener's admission
(hsm/services/admission.py) knows the peer by its verified client
certificate (cached by the SHA-256 of its DER; its identity comes only from
a URI SAN), and the call needs `keyquorum://backend/<name>`. No identity:
UNAUTHENTICATED (in practice the handshake already failed); another role
(an auditor's certificate): PERMISSION_DENIED. Then the request is
converted, the data plane decides, and the answer is converted back; every
`KeyquorumError` becomes a status code through
`keyquorum.hsm.services.status`, for a batch item as `ItemError` with the
same code.

The data plane is synchronous and CPU-bound: it runs in the servicer's
coroutine on the serving loop, with no thread hand-off. The one thing in
it that can wait, a counter block from the store, raises `WouldWait` on the
loop instead (hsm/dataplane/counters.py); the call is then repeated on the
`waits` lane's threads.

BatchWrap takes its request as wire bytes and hands it to
`DataPlane.batch_wrap_serialized`, which answers through the C wire codec
when it accepts the batch whole (docs/adr/0001); anything else is parsed
here with protobuf (malformed: INVALID_ARGUMENT) and goes the Python way,
the reference. The answers of Wrap (`encode_wrap_response`), of BatchWrap's
Python path and BatchRewrap (`encode_wrap_results`) and of BatchUnwrap
(`encode_unwrap_results`) are written in protobuf wire format,
byte-identical to the protobuf library's.

`watch_health` ties the standard health service to the seal state: the
KeyService reports NOT_SERVING while sealed and SERVING when unsealed, so
load balancers stop sending backends to a sealed replica.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.dataplane import (
    DataPlane,
    GenerateItem,
    Revealed,
    UnwrapItem,
    WouldWait,
    Wrapped,
)
from keyquorum.hsm.services.admission import (
    Admission,
    Call,
    Method,
    Peer,
    Unary,
    parser,
    serialize,
    service,
)
from keyquorum.hsm.services.lanes import Lane
from keyquorum.hsm.services.server import Listener, Registration
from keyquorum.hsm.services.status import code_for
from keyquorum.quorum.errors import DeserializationError, KeyquorumError
from keyquorum.v1 import key_pb2 as pb

SERVICE_NAME: Final = "keyquorum.v1.KeyService"
BACKEND_ROLE: Final = "backend"
#: Threads that repeat a call which would have waited for the store on the loop.
WAIT_THREADS: Final = 2

T = TypeVar("T")


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


_TAG_3_LEN: Final = b"\x1a"  # field 3, length-delimited (UnwrapResponse.tenant)
_TAG_4_VARINT: Final = b"\x20"  # field 4, varint (UnwrapResponse.key_version)


def encode_unwrap_results(results: Sequence[Revealed | KeyquorumError]) -> bytes:
    """A serialised BatchUnwrapResponse; every plaintext is wiped once written.

    `repeated UnwrapResult results = 1`, each a oneof of `UnwrapResponse ok =
    1` (`bytes plaintext = 1`, `bytes sealed_plaintext = 2`, `string tenant =
    3`, `uint32 key_version = 4`) or `ItemError error = 2`, as the protobuf
    library writes them (tests/test_dataplane_fast.py compares bytes).
    """
    parts: list[bytes | memoryview] = []
    append = parts.append
    #: (plaintext length, tenant, version) -> (bytes before the plaintext, after it)
    frames: dict[tuple[int, str, int], tuple[bytes, bytes]] = {}
    try:
        for result in results:
            if isinstance(result, KeyquorumError):
                error = _error_bytes(result)
                append(_TAG_1_LEN + _varint(len(error)))
                append(error)
                continue
            plain = result.plaintext.view() if result.plaintext is not None else b""
            if result.sealed:
                append(_unwrap_result(plain, result))
                continue
            frame = frames.get((len(plain), result.tenant, result.version))
            if frame is None:
                frame = frames[(len(plain), result.tenant, result.version)] = _unwrap_frame(
                    len(plain), result
                )
            append(frame[0])
            append(plain)
            append(frame[1])
        return b"".join(parts)
    finally:
        for result in results:
            if not isinstance(result, KeyquorumError):
                result.wipe()


def _unwrap_frame(size: int, result: Revealed) -> tuple[bytes, bytes]:
    """An `UnwrapResult` around a plaintext of `size` bytes, without it: (before, after)."""
    name = result.tenant.encode()
    tail = (_TAG_3_LEN + _varint(len(name)) + name if name else b"") + (
        _TAG_4_VARINT + _varint(result.version) if result.version else b""
    )
    head = _TAG_1_LEN + _varint(size) if size else b""
    ok = len(head) + size + len(tail)
    ok_field = _TAG_1_LEN + _varint(ok)
    return _TAG_1_LEN + _varint(len(ok_field) + ok) + ok_field + head, tail


def _unwrap_result(plain: bytes | memoryview, result: Revealed) -> bytes:
    """An `UnwrapResult` with a sealed plaintext (and, by the API, no plaintext)."""
    sealed = result.sealed or b""
    before, after = _unwrap_frame(len(plain), result)
    seal = _TAG_2_LEN + _varint(len(sealed)) + sealed
    body = before[-len(_TAG_1_LEN + _varint(len(plain))) :] if plain else b""
    ok = len(body) + len(plain) + len(seal) + len(after)
    ok_field = _TAG_1_LEN + _varint(ok)
    return _TAG_1_LEN + _varint(len(ok_field) + ok) + ok_field + body + bytes(plain) + seal + after


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

    Unwrap, GenerateDataKey, Rewrap and BatchGenerateDataKey return response
    messages; Wrap, BatchWrap, BatchUnwrap and BatchRewrap return the
    serialised response (`encode_wrap_response`, `encode_wrap_results`,
    `encode_unwrap_results`), registered with a pass-through serialiser.
    BatchWrap and BatchUnwrap take the serialised request (the C fast paths
    read the wire bytes).
    """

    def __init__(self, plane: DataPlane, *, waiting: int = 1024) -> None:
        self._plane = plane
        self._waits = Lane("data-plane waits", threads=WAIT_THREADS, waiting=waiting)

    def _backend(self, peer: Peer, operation: str) -> str:
        """The caller's identity URI; refused unless it is a backend's."""
        try:
            return peer.require(BACKEND_ROLE)
        except KeyquorumError as e:
            self._plane.refused(operation, e)
            raise

    async def _run(self, fn: Callable[[], T]) -> T:
        """`fn()` here on the loop; on a thread if it would wait for the store."""
        try:
            return fn()
        except WouldWait:
            return await self._waits.run(fn)

    async def Wrap(self, request: pb.WrapRequest, call: Call) -> bytes:
        who = self._backend(call.peer, "wrap")
        return encode_wrap_response(await self._run(lambda: self._plane.wrap(who, request)))

    async def Unwrap(self, request: pb.UnwrapRequest, call: Call) -> pb.UnwrapResponse:
        """Unwrap never waits for the store: it runs here, on the loop."""
        who = self._backend(call.peer, "unwrap")
        return _unwrapped(self._plane.unwrap(who, _unwrap_item(request)))

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, call: Call
    ) -> pb.GenerateDataKeyResponse:
        who = self._backend(call.peer, "generate_data_key")
        item = _generate_item(request)
        return _generated(await self._run(lambda: self._plane.generate_data_key(who, item)))

    async def Rewrap(self, request: pb.RewrapRequest, call: Call) -> pb.RewrapResponse:
        who = self._backend(call.peer, "rewrap")
        return _rewrapped(await self._run(lambda: self._plane.rewrap(who, request)))

    def _batch_wrap(self, who: str, request: bytes) -> bytes:
        plane = self._plane
        answer = plane.batch_wrap_serialized(who, request)
        if answer is not None:
            return answer
        return encode_wrap_results(
            plane.batch_wrap(who, _parse(pb.BatchWrapRequest, request).items)
        )

    async def BatchWrap(self, request: bytes, call: Call) -> bytes:
        """Takes the request serialised: the data plane's C fast path reads the wire bytes."""
        who = self._backend(call.peer, "batch_wrap")
        return await self._run(lambda: self._batch_wrap(who, request))

    async def BatchUnwrap(self, request: bytes, call: Call) -> bytes:
        """Takes the request serialised, as BatchWrap; never waits for the store."""
        who = self._backend(call.peer, "batch_unwrap")
        plane = self._plane
        answer = plane.batch_unwrap_serialized(who, request)
        if answer is not None:
            return answer
        items = _parse(pb.BatchUnwrapRequest, request).items
        return encode_unwrap_results(plane.batch_unwrap_requests(who, items))

    async def BatchGenerateDataKey(
        self, request: pb.BatchGenerateDataKeyRequest, call: Call
    ) -> pb.BatchGenerateDataKeyResponse:
        who = self._backend(call.peer, "batch_generate_data_key")
        items = [_generate_item(r) for r in request.items]
        results = await self._run(lambda: self._plane.batch_generate_data_key(who, items))
        return pb.BatchGenerateDataKeyResponse(
            results=[
                pb.GenerateDataKeyResult(error=_item_error(r))
                if isinstance(r, KeyquorumError)
                else pb.GenerateDataKeyResult(ok=_generated(r))
                for r in results
            ]
        )

    async def BatchRewrap(self, request: pb.BatchRewrapRequest, call: Call) -> bytes:
        who = self._backend(call.peer, "batch_rewrap")
        results = await self._run(lambda: self._plane.batch_rewrap(who, request.items))
        return encode_wrap_results(results)


def methods(servicer: KeyServicer) -> dict[str, Method]:
    """The eight methods, with what goes as wire bytes: the requests of Wrap, Unwrap
    and BatchWrap (read by the data plane) and the wrap answers (written here)."""
    return {
        "Wrap": Unary(servicer.Wrap, parser(pb.WrapRequest), _raw),
        "Unwrap": Unary(servicer.Unwrap, parser(pb.UnwrapRequest), serialize),
        "GenerateDataKey": Unary(
            servicer.GenerateDataKey, parser(pb.GenerateDataKeyRequest), serialize
        ),
        "Rewrap": Unary(servicer.Rewrap, parser(pb.RewrapRequest), serialize),
        "BatchWrap": Unary(servicer.BatchWrap, _raw, _raw),
        "BatchUnwrap": Unary(servicer.BatchUnwrap, _raw, _raw),
        "BatchGenerateDataKey": Unary(
            servicer.BatchGenerateDataKey, parser(pb.BatchGenerateDataKeyRequest), serialize
        ),
        "BatchRewrap": Unary(servicer.BatchRewrap, parser(pb.BatchRewrapRequest), _raw),
    }


def register(plane: DataPlane) -> Registration:
    """The KeyService over `plane`, for `create_server`."""

    def build(admission: Admission) -> grpc.GenericRpcHandler[Any, Any]:
        return service(admission, SERVICE_NAME, methods(KeyServicer(plane)))

    return Registration(build)


def watch_health(daemon: Daemon, listener: Listener) -> None:
    """KeyService is NOT_SERVING while the daemon is sealed, SERVING when unsealed."""
    daemon.add_seal_observer(lambda sealed: listener.set_health(SERVICE_NAME, not sealed))
