"""`KeyClient`: KeyService calls with typed results and typed errors.

- The channel is mTLS, set up from file paths (the CA to trust, the
  backend's certificate and key) through `keyquorum.client.tls`, which
  checks that the key belongs to the certificate before any handshake.
- One address, or several replicas (`["10.0.0.5:7444", "10.0.0.6:7444"]`):
  gRPC balances over the replicas SERVING KeyService, skips sealed ones
  (NOT_SERVING), and retries a call that failed with UNAVAILABLE, on
  another replica where there is one; every call has a deadline. All of it
  is the channel's service config (`keyquorum.client.channel`), not a loop
  here. Every other code is an answer, raised at once as `KeyServiceError`
  with the code.
- Plaintexts and data keys come back as `SecretBytes` (wipe them with
  `with`); with `seal_to`, the daemon seals them with HPKE to the
  backend's own key and this client opens them, so a proxy between the
  two sees nothing usable.
- Batch calls return one result per item, in order: the value, or the
  item's `KeyServiceError`.
- `cache=CacheBounds(...)` turns on data-key caching for the envelope
  functions (`keyquorum.client.cache`, off by default), with a seal watch
  that wipes the cache when a replica reports a seal.

Arguments are checked before anything is sent (`keyquorum.client.inputs`):
a context value that is not a str is an InvalidInputError naming its key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

import grpc

from keyquorum.client import calls, channel, inputs, materials, tls
from keyquorum.client.cache import CacheBounds, CacheStats, ClientCaches, Lease
from keyquorum.client.calls import DataKey, KeyServiceError, Wrapped
from keyquorum.client.calls import error_from_rpc as _error
from keyquorum.client.seal_watch import SealWatch
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import key_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF",
    "DEFAULT_TIMEOUT",
    "DataKey",
    "KeyClient",
    "KeyServiceError",
    "Wrapped",
]

DEFAULT_ATTEMPTS: Final = 4
DEFAULT_TIMEOUT: Final = 10.0
DEFAULT_BACKOFF: Final = 0.05

Context = inputs.Context
T = TypeVar("T")


class KeyClient:
    """A backend's connection to KeyService (see the module docstring)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        ca: Path | str,
        cert: Path | str,
        key: Path | str,
        attempts: int = DEFAULT_ATTEMPTS,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: float = DEFAULT_BACKOFF,
        server_name: str | None = None,
        health_check: bool | None = None,
        cache: CacheBounds | None = None,
        watch_seal: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`target`: one address (any gRPC target) or several replicas' IP:PORT.

        `attempts` (1 to 5), `backoff` (first retry delay, seconds) and
        `timeout` (every call's deadline, seconds) go into the service
        config. `server_name`: the name the daemon's certificate must carry
        (default: the target's host). `health_check`: route only to replicas
        whose health is SERVING (default: on with several addresses).
        `cache`: data-key caching for the envelope functions (off by
        default); `watch_seal`: with a cache, keep a health Watch stream on
        each replica and wipe the cache when one reports a seal.
        """
        targets = channel.resolve_targets(
            target, server_name=server_name, health_check=health_check
        )
        options = channel.channel_options(
            targets, attempts=attempts, backoff=backoff, timeout=timeout
        )
        credentials = tls.channel_credentials(
            Path(ca), client_cert=Path(cert), client_key=Path(key)
        )
        main = grpc.secure_channel(targets.target, credentials, options)
        watch: list[grpc.Channel] = []
        if cache is not None and watch_seal:
            watch = [
                grpc.secure_channel(a.target(), credentials, channel.watch_options(targets))
                for a in targets.replicas
            ]
        self._init(main, timeout, cache, clock, watch_seal, watch)

    @classmethod
    def from_channel(
        cls,
        grpc_channel: grpc.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache: CacheBounds | None = None,
        watch_seal: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> KeyClient:
        """A client over a channel the caller made (tests, custom credentials).

        Retries and failover are the channel's own: build it with
        `keyquorum.client.channel.channel_options` to get the client's.
        """
        obj = cls.__new__(cls)
        obj._init(grpc_channel, timeout, cache, clock, watch_seal, [])
        return obj

    def _init(
        self,
        grpc_channel: grpc.Channel,
        timeout: float,
        cache: CacheBounds | None,
        clock: Callable[[], float],
        watch_seal: bool,
        watch_channels: list[grpc.Channel],
    ) -> None:
        if not 0 < timeout < 3600:
            raise InvalidInputError(f"timeout must be between 0 and 3600 seconds, got {timeout}")
        self._channel = grpc_channel
        self._stub = pb_grpc.KeyServiceStub(grpc_channel)
        self._timeout = timeout
        self._caches = None if cache is None else ClientCaches(cache, clock=clock)
        self._watch_channels = watch_channels
        self._watch: SealWatch | None = None
        self._closed = threading.Event()
        if self._caches is not None and watch_seal:
            self._watch = SealWatch(watch_channels or [grpc_channel], self._caches.wipe_all)
            self._watch.start()

    @property
    def channel(self) -> grpc.Channel:
        return self._channel

    @property
    def caching(self) -> bool:
        return self._caches is not None

    def cache_stats(self) -> tuple[CacheStats, CacheStats]:
        """(encryption, decryption) cache counters; InvalidInputError without a cache."""
        if self._caches is None:
            raise InvalidInputError("this client has no cache (KeyClient(cache=CacheBounds(...)))")
        return self._caches.encryption.stats(), self._caches.decryption.stats()

    def close(self) -> None:
        """Wipe the caches, stop the seal watch, close the channels."""
        self._closed.set()
        if self._caches is not None:
            self._caches.wipe_all()
        if self._watch is not None:
            self._watch.close()
        for extra in self._watch_channels:
            extra.close()
        self._channel.close()

    def __enter__(self) -> KeyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<KeyClient>"

    def _call(self, method: Callable[..., T], request: object, tenant: str | None = None) -> T:
        """One RPC with the client's deadline; a failure as KeyServiceError."""
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as e:
            error = _error(e)
        materials.observe(self._caches, error, tenant)
        raise error

    # -- single calls -----------------------------------------------------------

    def wrap(self, tenant: str, plaintext: inputs.Bytes, context: Context | None = None) -> Wrapped:
        """Encrypt up to 4 KiB under the tenant's current key, bound to `context`."""
        request = calls.wrap_request(tenant, plaintext, context)
        return calls.wrapped(self._call(self._stub.Wrap, request, request.tenant))

    def unwrap(
        self,
        ciphertext: bytes,
        context: Context | None = None,
        *,
        seal_to: SealingPrivateKey | None = None,
    ) -> SecretBytes:
        """The plaintext of `ciphertext` (SecretBytes); the same `context` as at wrap."""
        request = calls.unwrap_request(ciphertext, context, seal_to)
        r = self._call(self._stub.Unwrap, request, calls.tenant_of(request.ciphertext))
        return calls.unwrapped(r, request.ciphertext, seal_to)

    def generate_data_key(
        self,
        tenant: str,
        context: Context | None = None,
        *,
        size: int = 32,
        seal_to: SealingPrivateKey | None = None,
    ) -> DataKey:
        """A fresh random data key (never from the cache) and its wrapped form."""
        request = calls.generate_request(tenant, context, size, seal_to)
        r = self._call(self._stub.GenerateDataKey, request, request.tenant)
        return calls.data_key(r, seal_to)

    def rewrap(self, ciphertext: bytes, context: Context | None = None) -> Wrapped:
        """The same plaintext under the tenant's newest key version (never leaves the daemon)."""
        request = calls.rewrap_request(ciphertext, context)
        r = self._call(self._stub.Rewrap, request, calls.tenant_of(request.ciphertext))
        return calls.wrapped(r)

    # -- batches ------------------------------------------------------------------

    def batch_wrap(
        self, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[Wrapped | KeyServiceError]:
        """(tenant, plaintext, context) per item."""
        request = calls.batch_wrap_request(items)
        r = self._call(self._stub.BatchWrap, request)
        results = calls.batch_wrapped(r.results)
        materials.observe_items(self._caches, results, [x.tenant for x in request.items])
        return results

    def batch_unwrap(
        self, items: Sequence[tuple[bytes, Context]]
    ) -> list[SecretBytes | KeyServiceError]:
        """(ciphertext, context) per item."""
        request = calls.batch_unwrap_request(items)
        r = self._call(self._stub.BatchUnwrap, request)
        results = calls.batch_unwrapped(r.results)
        tenants = [calls.tenant_of(x.ciphertext) for x in request.items]
        materials.observe_items(self._caches, results, tenants)
        return results

    def batch_generate_data_key(
        self, items: Sequence[tuple[str, Context]], *, size: int = 32
    ) -> list[DataKey | KeyServiceError]:
        """(tenant, context) per item."""
        request = calls.batch_generate_request(items, size)
        r = self._call(self._stub.BatchGenerateDataKey, request)
        results = calls.batch_data_keys(r.results)
        materials.observe_items(self._caches, results, [x.tenant for x in request.items])
        return results

    def batch_rewrap(
        self, items: Sequence[tuple[bytes, Context]]
    ) -> list[Wrapped | KeyServiceError]:
        """(ciphertext, context) per item."""
        request = calls.batch_rewrap_request(items)
        r = self._call(self._stub.BatchRewrap, request)
        results = calls.batch_wrapped(r.results)
        tenants = [calls.tenant_of(x.ciphertext) for x in request.items]
        materials.observe_items(self._caches, results, tenants)
        return results

    # -- keys for the envelope formats (cached when the client caches) -------------

    def _encryption_key(
        self,
        tenant: str,
        context: dict[str, str],
        nbytes: int | None,
        seal_to: SealingPrivateKey | None,
    ) -> Lease:
        """A data key for one message of `nbytes` plaintext bytes (None: not known)."""
        plan = materials.encryption_plan(self._caches, tenant, context, nbytes)
        if plan.lease is not None:
            return plan.lease
        request = calls.generate_request(tenant, context, 32, seal_to)
        r = self._call(self._stub.GenerateDataKey, request, tenant)
        return plan.keep(calls.data_key(r, seal_to))

    def _decryption_key(
        self, wrapped: bytes, context: dict[str, str], seal_to: SealingPrivateKey | None
    ) -> Lease:
        """The data key of `wrapped` for one message (its bytes are charged once open)."""
        plan = materials.decryption_plan(self._caches, wrapped, context)
        if plan.lease is not None:
            return plan.lease
        request = calls.unwrap_request(wrapped, context, seal_to)
        r = self._call(self._stub.Unwrap, request, calls.tenant_of(wrapped))
        return plan.keep_unwrapped(r, seal_to)

    def _charge_decryption(self, wrapped: bytes, context: dict[str, str], nbytes: int) -> None:
        materials.charge_decryption(self._caches, wrapped, context, nbytes)
