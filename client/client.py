"""`KeyClient`: KeyService calls with typed results and typed errors.

- The channel is mTLS, set up from file paths (the CA to trust, the
  backend's certificate and key), through `keyquorum.client.tls`, which
  checks that the key belongs to the certificate before any handshake.
- A call that fails with UNAVAILABLE (daemon restarting, a replica gone)
  is retried with exponential backoff and jitter, up to `attempts` in all;
  every other code is an answer and is raised at once as
  `KeyServiceError` carrying the code. Wrap, GenerateDataKey and Rewrap are
  safe to repeat: a repeat yields another valid ciphertext.
- Plaintexts and data keys come back as `SecretBytes` (wipe them with
  `with`); with `seal_to`, the daemon seals them with HPKE to the
  backend's own key and this client opens them, so a proxy between the
  two sees nothing usable.
- Batch calls return one result per item, in order: the value, or the
  item's `KeyServiceError`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar, cast

import grpc

from keyquorum.client import tls
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError
from keyquorum.quorum.sealing import SEALED_DATA_KEY_INFO, SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import key_pb2 as pb
from keyquorum.v1 import key_pb2_grpc as pb_grpc

DEFAULT_ATTEMPTS: Final = 4
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_BACKOFF: Final = 0.05

_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}

Context = Mapping[str, str]
T = TypeVar("T")


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
        self.ciphertext = ciphertext
        self.key_version = key_version

    def __repr__(self) -> str:
        return f"<Wrapped v{self.key_version}: {len(self.ciphertext)} bytes>"


class DataKey:
    """A fresh data key: `plaintext` (wipe it) and `ciphertext`, its wrapped form to store."""

    __slots__ = ("ciphertext", "key_version", "plaintext")

    def __init__(self, plaintext: SecretBytes, ciphertext: bytes, key_version: int) -> None:
        self.plaintext = plaintext
        self.ciphertext = ciphertext
        self.key_version = key_version

    def wipe(self) -> None:
        self.plaintext.wipe()

    def __enter__(self) -> DataKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<DataKey v{self.key_version}: {len(self.plaintext)} bytes>"


def _error(error: grpc.RpcError) -> KeyServiceError:
    # Failed calls are both RpcError and Call at run time; the stubs cannot say so.
    call = cast(grpc.Call, error)
    code = call.code() if hasattr(call, "code") else grpc.StatusCode.UNKNOWN
    details = call.details() if hasattr(call, "details") else ""
    return KeyServiceError(code, details or code.name)


def _item_error(error: pb.ItemError) -> KeyServiceError:
    return KeyServiceError(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message)


def _recipient(seal_to: SealingPrivateKey | None) -> bytes:
    return b"" if seal_to is None else seal_to.public_key().to_bytes()


def _reveal(
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


class KeyClient:
    """A backend's connection to KeyService (see the module docstring)."""

    def __init__(
        self,
        target: str,
        *,
        ca: Path | str,
        cert: Path | str,
        key: Path | str,
        attempts: int = DEFAULT_ATTEMPTS,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
        server_name: str | None = None,
    ) -> None:
        credentials = tls.channel_credentials(
            Path(ca), client_cert=Path(cert), client_key=Path(key)
        )
        options: list[tuple[str, str | int]] = []
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._init(grpc.secure_channel(target, credentials, options), attempts, timeout, backoff)

    @classmethod
    def from_channel(
        cls,
        channel: grpc.Channel,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
    ) -> KeyClient:
        """A client over a channel the caller made (tests, custom credentials)."""
        obj = cls.__new__(cls)
        obj._init(channel, attempts, timeout, backoff)
        return obj

    def _init(self, channel: grpc.Channel, attempts: int, timeout: float, backoff: float) -> None:
        if attempts < 1:
            raise InvalidInputError("attempts must be at least 1")
        self._channel = channel
        self._stub = pb_grpc.KeyServiceStub(channel)
        self._attempts = attempts
        self._timeout = timeout
        self._backoff = backoff
        self._sleep: Callable[[float], None] = time.sleep

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<KeyClient>"

    def _call(self, method: Callable[..., T], request: object) -> T:
        """One RPC, retried on UNAVAILABLE only."""
        for attempt in range(self._attempts):
            try:
                return method(request, timeout=self._timeout)
            except grpc.RpcError as e:
                error = _error(e)
                if error.code != grpc.StatusCode.UNAVAILABLE or attempt + 1 == self._attempts:
                    raise error from None
            delay = self._backoff * (2**attempt)
            self._sleep(delay * (0.5 + random.random()))  # noqa: S311 (jitter, not a secret)
        raise AssertionError("unreachable: the last attempt raises")  # pragma: no cover

    # -- single calls -----------------------------------------------------------

    def wrap(self, tenant: str, plaintext: bytes, context: Context | None = None) -> Wrapped:
        """Encrypt up to 4 KiB under the tenant's current key, bound to `context`."""
        r = self._call(
            self._stub.Wrap,
            pb.WrapRequest(tenant=tenant, plaintext=plaintext, context=dict(context or {})),
        )
        return Wrapped(r.ciphertext, r.key_version)

    def unwrap(
        self,
        ciphertext: bytes,
        context: Context | None = None,
        *,
        seal_to: SealingPrivateKey | None = None,
    ) -> SecretBytes:
        """The plaintext of `ciphertext`; the same `context` as at wrap is required."""
        r = self._call(
            self._stub.Unwrap,
            pb.UnwrapRequest(
                ciphertext=ciphertext,
                context=dict(context or {}),
                recipient_public_key=_recipient(seal_to),
            ),
        )
        return _reveal(r.plaintext, r.sealed_plaintext, ciphertext, seal_to)

    def generate_data_key(
        self,
        tenant: str,
        context: Context | None = None,
        *,
        size: int = 32,
        seal_to: SealingPrivateKey | None = None,
    ) -> DataKey:
        """A fresh random data key and its wrapped form."""
        r = self._call(
            self._stub.GenerateDataKey,
            pb.GenerateDataKeyRequest(
                tenant=tenant,
                context=dict(context or {}),
                size=size,
                recipient_public_key=_recipient(seal_to),
            ),
        )
        plain = _reveal(r.plaintext, r.sealed_plaintext, r.ciphertext, seal_to)
        return DataKey(plain, r.ciphertext, r.key_version)

    def rewrap(self, ciphertext: bytes, context: Context | None = None) -> Wrapped:
        """The same plaintext under the tenant's newest key version (never leaves the daemon)."""
        r = self._call(
            self._stub.Rewrap,
            pb.RewrapRequest(ciphertext=ciphertext, context=dict(context or {})),
        )
        return Wrapped(r.ciphertext, r.key_version)

    # -- batches ------------------------------------------------------------------

    def batch_wrap(
        self, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[Wrapped | KeyServiceError]:
        """(tenant, plaintext, context) per item."""
        r = self._call(
            self._stub.BatchWrap,
            pb.BatchWrapRequest(
                items=[pb.WrapRequest(tenant=t, plaintext=p, context=dict(c)) for t, p, c in items]
            ),
        )
        return [
            Wrapped(x.ok.ciphertext, x.ok.key_version)
            if x.WhichOneof("outcome") == "ok"
            else _item_error(x.error)
            for x in r.results
        ]

    def batch_unwrap(
        self, items: Sequence[tuple[bytes, Context]]
    ) -> list[SecretBytes | KeyServiceError]:
        """(ciphertext, context) per item."""
        r = self._call(
            self._stub.BatchUnwrap,
            pb.BatchUnwrapRequest(
                items=[pb.UnwrapRequest(ciphertext=ct, context=dict(c)) for ct, c in items]
            ),
        )
        return [
            SecretBytes(x.ok.plaintext, label="data key")
            if x.WhichOneof("outcome") == "ok"
            else _item_error(x.error)
            for x in r.results
        ]

    def batch_generate_data_key(
        self, items: Sequence[tuple[str, Context]], *, size: int = 32
    ) -> list[DataKey | KeyServiceError]:
        """(tenant, context) per item."""
        r = self._call(
            self._stub.BatchGenerateDataKey,
            pb.BatchGenerateDataKeyRequest(
                items=[
                    pb.GenerateDataKeyRequest(tenant=t, context=dict(c), size=size)
                    for t, c in items
                ]
            ),
        )
        return [
            DataKey(
                SecretBytes(x.ok.plaintext, label="data key"), x.ok.ciphertext, x.ok.key_version
            )
            if x.WhichOneof("outcome") == "ok"
            else _item_error(x.error)
            for x in r.results
        ]

    def batch_rewrap(
        self, items: Sequence[tuple[bytes, Context]]
    ) -> list[Wrapped | KeyServiceError]:
        """(ciphertext, context) per item."""
        r = self._call(
            self._stub.BatchRewrap,
            pb.BatchRewrapRequest(
                items=[pb.RewrapRequest(ciphertext=ct, context=dict(c)) for ct, c in items]
            ),
        )
        return [
            Wrapped(x.ok.ciphertext, x.ok.key_version)
            if x.WhichOneof("outcome") == "ok"
            else _item_error(x.error)
            for x in r.results
        ]
