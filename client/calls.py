"""KeyService requests and answers: one definition for the sync and async clients.

Everything here is about messages, not transport: arguments are checked
(`keyquorum.client.inputs`) and turned into requests; answers become typed
results (`Wrapped`, `DataKey`, `SecretBytes`) and failures a
`KeyServiceError` carrying the gRPC code. Plaintexts and data keys come
back as `SecretBytes`: use them in a `with` block (the buffer is zeroed at
its end), read them with `.reveal()` (bytes) or `.view()` (a read-only
buffer, no copy), compare them with `.equals()`; they never print.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, cast

import grpc

from keyquorum.client import inputs
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError
from keyquorum.quorum.sealing import SEALED_DATA_KEY_INFO, SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import key_pb2 as pb

#: Data keys are 16 to 64 bytes (the daemon's limit; it checks too).
MAX_DATA_KEY: Final = 64

_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}


class KeyServiceError(KeyquorumError):
    """KeyService refused a call or a batch item; `code` says why (gRPC status code)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{message} ({code.name})")
        self.code = code
        self.details = message


class Wrapped:
    """A ciphertext and the tenant key version that made it."""

    __slots__ = ("ciphertext", "key_version")

    def __init__(self, ciphertext: bytes, key_version: int) -> None:
        self.ciphertext: bytes = ciphertext
        self.key_version: int = key_version

    def __repr__(self) -> str:
        return f"<Wrapped v{self.key_version}: {len(self.ciphertext)} bytes>"


class DataKey:
    """A fresh data key: `plaintext` (SecretBytes: wipe it) and `ciphertext` to store."""

    __slots__ = ("ciphertext", "key_version", "plaintext")

    def __init__(self, plaintext: SecretBytes, ciphertext: bytes, key_version: int) -> None:
        self.plaintext: SecretBytes = plaintext
        self.ciphertext: bytes = ciphertext
        self.key_version: int = key_version

    def wipe(self) -> None:
        self.plaintext.wipe()

    def __enter__(self) -> DataKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<DataKey v{self.key_version}: {len(self.plaintext)} bytes>"


# -- errors ---------------------------------------------------------------------------


def error_from_rpc(error: BaseException) -> KeyServiceError:
    """A failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) as KeyServiceError."""
    # Failed calls are both RpcError and Call at run time; the stubs cannot say so.
    call = cast(grpc.Call, error)
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = (call.details() if hasattr(call, "details") else "") or code.name
    if code == grpc.StatusCode.UNAVAILABLE and "backend unhealthy" in details:
        details = f"no replica serves KeyService (sealed or unreachable): {details}"
    return KeyServiceError(code, details)


def item_error(error: pb.ItemError) -> KeyServiceError:
    return KeyServiceError(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message)


def reports_seal(error: KeyServiceError) -> bool:
    """The daemon said it is sealed (or was sealed during the call).

    Read from the message, the only place a status carries it; a false
    positive only costs a cache refill, never a key kept.
    """
    return error.code == grpc.StatusCode.FAILED_PRECONDITION and "sealed" in error.details


def refuses_tenant(error: KeyServiceError) -> bool:
    """The daemon refused a tenant: not active, a version disabled or destroyed, not granted."""
    return error.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)


def tenant_of(wrapped: bytes) -> str | None:
    """The tenant a wrapped key names (docs/dataplane.md, format 1), to drop its cache entries."""
    if len(wrapped) < 2 or wrapped[0] != 1 or len(wrapped) < 2 + wrapped[1]:
        return None
    try:
        return wrapped[2 : 2 + wrapped[1]].decode("ascii")
    except UnicodeDecodeError:
        return None


# -- requests -------------------------------------------------------------------------


def recipient(seal_to: SealingPrivateKey | None) -> bytes:
    if seal_to is None:
        return b""
    if not isinstance(seal_to, SealingPrivateKey):
        raise InvalidInputError(
            f"seal_to must be a SealingPrivateKey, got {type(seal_to).__name__}"
        )
    return seal_to.public_key().to_bytes()


def wrap_request(tenant: object, plaintext: object, context: object) -> pb.WrapRequest:
    return pb.WrapRequest(
        tenant=inputs.check_tenant(tenant),
        plaintext=inputs.check_bytes("the plaintext", plaintext),
        context=inputs.check_context(context),
    )


def unwrap_request(
    ciphertext: object, context: object, seal_to: SealingPrivateKey | None = None
) -> pb.UnwrapRequest:
    return pb.UnwrapRequest(
        ciphertext=inputs.check_bytes("the ciphertext", ciphertext),
        context=inputs.check_context(context),
        recipient_public_key=recipient(seal_to),
    )


def generate_request(
    tenant: object, context: object, size: object, seal_to: SealingPrivateKey | None = None
) -> pb.GenerateDataKeyRequest:
    return pb.GenerateDataKeyRequest(
        tenant=inputs.check_tenant(tenant),
        context=inputs.check_context(context),
        # The daemon names the allowed range (16 to 64) itself; this only keeps
        # protobuf from failing on a type or a negative number.
        size=inputs.check_int("size", size, 0, 2**32 - 1),
        recipient_public_key=recipient(seal_to),
    )


def rewrap_request(ciphertext: object, context: object) -> pb.RewrapRequest:
    return pb.RewrapRequest(
        ciphertext=inputs.check_bytes("the ciphertext", ciphertext),
        context=inputs.check_context(context),
    )


def _each(name: str, items: object, width: int) -> list[tuple[object, ...]]:
    return inputs.check_items(name, items, width)


def _item(name: str, i: int, build: object, *args: object) -> object:
    try:
        return build(*args)  # type: ignore[operator]
    except InvalidInputError as e:
        raise InvalidInputError(f"{name} item {i}: {e}") from None


def batch_wrap_request(items: object) -> pb.BatchWrapRequest:
    return pb.BatchWrapRequest(
        items=[
            cast(pb.WrapRequest, _item("batch_wrap", i, wrap_request, *item))
            for i, item in enumerate(_each("batch_wrap", items, 3))
        ]
    )


def batch_unwrap_request(items: object) -> pb.BatchUnwrapRequest:
    return pb.BatchUnwrapRequest(
        items=[
            cast(pb.UnwrapRequest, _item("batch_unwrap", i, unwrap_request, *item))
            for i, item in enumerate(_each("batch_unwrap", items, 2))
        ]
    )


def batch_generate_request(items: object, size: object) -> pb.BatchGenerateDataKeyRequest:
    return pb.BatchGenerateDataKeyRequest(
        items=[
            cast(
                pb.GenerateDataKeyRequest,
                _item("batch_generate_data_key", i, generate_request, *item, size),
            )
            for i, item in enumerate(_each("batch_generate_data_key", items, 2))
        ]
    )


def batch_rewrap_request(items: object) -> pb.BatchRewrapRequest:
    return pb.BatchRewrapRequest(
        items=[
            cast(pb.RewrapRequest, _item("batch_rewrap", i, rewrap_request, *item))
            for i, item in enumerate(_each("batch_rewrap", items, 2))
        ]
    )


# -- answers --------------------------------------------------------------------------


def reveal(
    plaintext: bytes, sealed: bytes, ciphertext: bytes, seal_to: SealingPrivateKey | None
) -> SecretBytes:
    """The clear plaintext, opening the sealed form when we asked for one."""
    if seal_to is None:
        return SecretBytes(plaintext, label="data key")
    if plaintext or not sealed:
        raise KeyServiceError(
            grpc.StatusCode.INTERNAL, "asked for a sealed key, the daemon sent none"
        )
    return seal_to.open(sealed, SEALED_DATA_KEY_INFO + ciphertext)


def wrapped(r: pb.WrapResponse | pb.RewrapResponse) -> Wrapped:
    return Wrapped(r.ciphertext, r.key_version)


def unwrapped(
    r: pb.UnwrapResponse, ciphertext: bytes, seal_to: SealingPrivateKey | None
) -> SecretBytes:
    return reveal(r.plaintext, r.sealed_plaintext, ciphertext, seal_to)


def data_key(r: pb.GenerateDataKeyResponse, seal_to: SealingPrivateKey | None) -> DataKey:
    plain = reveal(r.plaintext, r.sealed_plaintext, r.ciphertext, seal_to)
    return DataKey(plain, r.ciphertext, r.key_version)


def batch_wrapped(
    results: Sequence[pb.WrapResult] | Sequence[pb.RewrapResult],
) -> list[Wrapped | KeyServiceError]:
    return [
        wrapped(x.ok) if x.WhichOneof("outcome") == "ok" else item_error(x.error) for x in results
    ]


def batch_unwrapped(results: Sequence[pb.UnwrapResult]) -> list[SecretBytes | KeyServiceError]:
    return [
        SecretBytes(x.ok.plaintext, label="data key")
        if x.WhichOneof("outcome") == "ok"
        else item_error(x.error)
        for x in results
    ]


def batch_data_keys(
    results: Sequence[pb.GenerateDataKeyResult],
) -> list[DataKey | KeyServiceError]:
    return [
        data_key(x.ok, None) if x.WhichOneof("outcome") == "ok" else item_error(x.error)
        for x in results
    ]
