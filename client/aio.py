"""`AsyncKeyClient` and the envelope functions for asyncio services (grpc.aio).

The same API as `KeyClient` and `keyquorum.client.encrypt_record` & co.,
awaited: the same arguments and checks, the same typed results, the same
`KeyServiceError` with the gRPC code, the same service config (retries on
UNAVAILABLE only, round robin over healthy replicas, a deadline on every
call), the same cache and seal watch. Requests, answers, cache decisions
and the envelope format are the very code the sync client runs
(`calls`, `materials`, `framing`); only the waiting differs.

    async with AsyncKeyClient("kq.example:7444", ca=..., cert=..., key=...) as kq:
        box = await encrypt_record(kq, "acme-health", record, {"patient": "p-4711"})
        with await decrypt_record(kq, box, {"patient": "p-4711"}) as plain:
            ...

`encrypt_stream` / `decrypt_stream` take ordinary binary file objects;
the frames are sealed or opened in a worker thread (`asyncio.to_thread`),
so a large file does not stall the event loop (a `progress` callback runs
in that thread). Make the client inside a
running event loop (grpc.aio channels belong to one loop).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from keyquorum.client import calls, channel, envelope, framing, inputs, materials, streams, tls
from keyquorum.client.cache import CacheBounds, CacheStats, ClientCaches, Lease
from keyquorum.client.calls import DataKey, KeyServiceError, Wrapped
from keyquorum.client.client import DEFAULT_ATTEMPTS, DEFAULT_BACKOFF, DEFAULT_TIMEOUT
from keyquorum.client.framing import Progress, Sink, Source, Summary
from keyquorum.client.seal_watch import AsyncSealWatch
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import key_pb2_grpc as pb_grpc

__all__ = [
    "AsyncKeyClient",
    "decrypt_record",
    "decrypt_stream",
    "encrypt_record",
    "encrypt_stream",
]

Context = inputs.Context
T = TypeVar("T")


class AsyncKeyClient:
    """`KeyClient`'s API on grpc.aio: every call is a coroutine."""

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
        """The arguments of `KeyClient.__init__`, with the same meaning."""
        targets = channel.resolve_targets(
            target, server_name=server_name, health_check=health_check
        )
        options = channel.channel_options(
            targets, attempts=attempts, backoff=backoff, timeout=timeout
        )
        credentials = tls.channel_credentials(
            Path(ca), client_cert=Path(cert), client_key=Path(key)
        )
        main = grpc.aio.secure_channel(targets.target, credentials, options)
        watch: list[grpc.aio.Channel] = []
        if cache is not None and watch_seal:
            watch = [
                grpc.aio.secure_channel(a.target(), credentials, channel.watch_options(targets))
                for a in targets.replicas
            ]
        self._init(main, timeout, cache, clock, watch_seal, watch)

    @classmethod
    def from_channel(
        cls,
        grpc_channel: grpc.aio.Channel,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache: CacheBounds | None = None,
        watch_seal: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> AsyncKeyClient:
        """A client over a grpc.aio channel the caller made."""
        obj = cls.__new__(cls)
        obj._init(grpc_channel, timeout, cache, clock, watch_seal, [])
        return obj

    def _init(
        self,
        grpc_channel: grpc.aio.Channel,
        timeout: float,
        cache: CacheBounds | None,
        clock: Callable[[], float],
        watch_seal: bool,
        watch_channels: list[grpc.aio.Channel],
    ) -> None:
        if not 0 < timeout < 3600:
            raise InvalidInputError(f"timeout must be between 0 and 3600 seconds, got {timeout}")
        self._channel = grpc_channel
        self._stub = pb_grpc.KeyServiceStub(grpc_channel)
        self._timeout = timeout
        self._caches = None if cache is None else ClientCaches(cache, clock=clock)
        self._watch_channels = watch_channels
        self._watch: AsyncSealWatch | None = None
        if self._caches is not None and watch_seal:
            self._watch = AsyncSealWatch(watch_channels or [grpc_channel], self._caches.wipe_all)

    @property
    def channel(self) -> grpc.aio.Channel:
        return self._channel

    @property
    def caching(self) -> bool:
        return self._caches is not None

    def cache_stats(self) -> tuple[CacheStats, CacheStats]:
        """(encryption, decryption) cache counters; InvalidInputError without a cache."""
        if self._caches is None:
            raise InvalidInputError(
                "this client has no cache (AsyncKeyClient(cache=CacheBounds(...)))"
            )
        return self._caches.encryption.stats(), self._caches.decryption.stats()

    async def close(self) -> None:
        """Wipe the caches, stop the seal watch, close the channels."""
        if self._caches is not None:
            self._caches.wipe_all()
        if self._watch is not None:
            await self._watch.close()
        for extra in self._watch_channels:
            await extra.close(None)
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncKeyClient:
        self._start_watch()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return "<AsyncKeyClient>"

    def _start_watch(self) -> None:
        if self._watch is not None and not self._watch.started:
            self._watch.start()

    async def _call(self, method: Any, request: object, tenant: str | None = None) -> Any:
        """One RPC with the client's deadline; a failure as KeyServiceError."""
        self._start_watch()
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            error = calls.error_from_rpc(e)
        materials.observe(self._caches, error, tenant)
        raise error

    # -- single calls -----------------------------------------------------------

    async def wrap(
        self, tenant: str, plaintext: inputs.Bytes, context: Context | None = None
    ) -> Wrapped:
        """Encrypt up to 4 KiB under the tenant's current key, bound to `context`."""
        request = calls.wrap_request(tenant, plaintext, context)
        return calls.wrapped(await self._call(self._stub.Wrap, request, request.tenant))

    async def unwrap(
        self,
        ciphertext: bytes,
        context: Context | None = None,
        *,
        seal_to: SealingPrivateKey | None = None,
    ) -> SecretBytes:
        """The plaintext of `ciphertext` (SecretBytes); the same `context` as at wrap."""
        request = calls.unwrap_request(ciphertext, context, seal_to)
        r = await self._call(self._stub.Unwrap, request, calls.tenant_of(request.ciphertext))
        return calls.unwrapped(r, request.ciphertext, seal_to)

    async def generate_data_key(
        self,
        tenant: str,
        context: Context | None = None,
        *,
        size: int = 32,
        seal_to: SealingPrivateKey | None = None,
    ) -> DataKey:
        """A fresh random data key (never from the cache) and its wrapped form."""
        request = calls.generate_request(tenant, context, size, seal_to)
        r = await self._call(self._stub.GenerateDataKey, request, request.tenant)
        return calls.data_key(r, seal_to)

    async def rewrap(self, ciphertext: bytes, context: Context | None = None) -> Wrapped:
        """The same plaintext under the tenant's newest key version."""
        request = calls.rewrap_request(ciphertext, context)
        r = await self._call(self._stub.Rewrap, request, calls.tenant_of(request.ciphertext))
        return calls.wrapped(r)

    # -- batches ------------------------------------------------------------------

    async def batch_wrap(
        self, items: Sequence[tuple[str, bytes, Context]]
    ) -> list[Wrapped | KeyServiceError]:
        """(tenant, plaintext, context) per item."""
        request = calls.batch_wrap_request(items)
        r = await self._call(self._stub.BatchWrap, request)
        results = calls.batch_wrapped(r.results)
        materials.observe_items(self._caches, results, [x.tenant for x in request.items])
        return results

    async def batch_unwrap(
        self, items: Sequence[tuple[bytes, Context]]
    ) -> list[SecretBytes | KeyServiceError]:
        """(ciphertext, context) per item."""
        request = calls.batch_unwrap_request(items)
        r = await self._call(self._stub.BatchUnwrap, request)
        results = calls.batch_unwrapped(r.results)
        tenants = [calls.tenant_of(x.ciphertext) for x in request.items]
        materials.observe_items(self._caches, results, tenants)
        return results

    async def batch_generate_data_key(
        self, items: Sequence[tuple[str, Context]], *, size: int = 32
    ) -> list[DataKey | KeyServiceError]:
        """(tenant, context) per item."""
        request = calls.batch_generate_request(items, size)
        r = await self._call(self._stub.BatchGenerateDataKey, request)
        results = calls.batch_data_keys(r.results)
        materials.observe_items(self._caches, results, [x.tenant for x in request.items])
        return results

    async def batch_rewrap(
        self, items: Sequence[tuple[bytes, Context]]
    ) -> list[Wrapped | KeyServiceError]:
        """(ciphertext, context) per item."""
        request = calls.batch_rewrap_request(items)
        r = await self._call(self._stub.BatchRewrap, request)
        results = calls.batch_wrapped(r.results)
        tenants = [calls.tenant_of(x.ciphertext) for x in request.items]
        materials.observe_items(self._caches, results, tenants)
        return results

    # -- keys for the envelope formats -------------------------------------------------

    async def _encryption_key(
        self,
        tenant: str,
        context: dict[str, str],
        nbytes: int | None,
        seal_to: SealingPrivateKey | None,
    ) -> Lease:
        plan = materials.encryption_plan(self._caches, tenant, context, nbytes)
        if plan.lease is not None:
            return plan.lease
        request = calls.generate_request(tenant, context, 32, seal_to)
        r = await self._call(self._stub.GenerateDataKey, request, tenant)
        return plan.keep(calls.data_key(r, seal_to))

    async def _decryption_key(
        self, wrapped: bytes, context: dict[str, str], seal_to: SealingPrivateKey | None
    ) -> Lease:
        plan = materials.decryption_plan(self._caches, wrapped, context)
        if plan.lease is not None:
            return plan.lease
        request = calls.unwrap_request(wrapped, context, seal_to)
        r = await self._call(self._stub.Unwrap, request, calls.tenant_of(wrapped))
        return plan.keep_unwrapped(r, seal_to)

    def _charge_decryption(self, wrapped: bytes, context: dict[str, str], nbytes: int) -> None:
        materials.charge_decryption(self._caches, wrapped, context, nbytes)


# -- the envelope functions, awaited ------------------------------------------------------


async def encrypt_record(
    client: AsyncKeyClient,
    tenant: str,
    record: bytes,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    frame_size: int = framing.DEFAULT_FRAME_SIZE,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """`keyquorum.client.encrypt_record`, awaited."""
    tenant = inputs.check_tenant(tenant)
    data = inputs.check_bytes("a record", record)
    ctx = inputs.check_context(context)
    framing.check_frame_size(frame_size)
    with await client._encryption_key(tenant, ctx, len(data), seal_to) as lease:
        return envelope.seal_record(lease, data, frame_size=frame_size, random_bytes=random_bytes)


async def decrypt_record(
    client: AsyncKeyClient,
    envelope_bytes: bytes,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
) -> SecretBytes:
    """`keyquorum.client.decrypt_record`, awaited."""
    data = inputs.check_bytes("an envelope", envelope_bytes)
    ctx = inputs.check_context(context)
    parsed = envelope.Parsed(data)
    with await client._decryption_key(parsed.wrapped, ctx, seal_to) as lease:
        plain = parsed.open(lease.key)
    client._charge_decryption(parsed.wrapped, ctx, len(plain))
    return plain


async def encrypt_stream(
    client: AsyncKeyClient,
    tenant: str,
    src: Source,
    dst: Sink,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    frame_size: int = framing.DEFAULT_FRAME_SIZE,
    length: int | None = None,
    progress: Progress | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> Summary:
    """`keyquorum.client.encrypt_stream`, awaited; the frames are sealed in a thread."""
    tenant, ctx, length = streams.check_stream_args(tenant, context, frame_size, length)
    if length is None:
        length = streams.remaining_length(src)
    with await client._encryption_key(tenant, ctx, length, seal_to) as lease:
        source = streams.Reserved(src, length) if lease.cached and length is not None else src
        salt = random_bytes(framing.SALT_SIZE)
        key = _own_copy(lease)
        wrapped = lease.wrapped

        def work() -> Summary:
            with key:
                return framing.seal(
                    key, wrapped, source, dst, salt=salt, frame_size=frame_size, progress=progress
                )

        return await _in_thread(work)


async def decrypt_stream(
    client: AsyncKeyClient,
    src: Source,
    dst: Sink,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    progress: Progress | None = None,
) -> Summary:
    """`keyquorum.client.decrypt_stream`, awaited; the frames are opened in a thread."""
    ctx = inputs.check_context(context)
    header = await _in_thread(lambda: streams.read_stream_header(src))
    with await client._decryption_key(header.wrapped, ctx, seal_to) as lease:
        key = _own_copy(lease)

        def work() -> Summary:
            with key:
                return framing.open_frames(header, key, src, dst, progress=progress)

        summary = await _in_thread(work)
    client._charge_decryption(header.wrapped, ctx, summary.plaintext_bytes)
    return summary


def _own_copy(lease: Lease) -> SecretBytes:
    """The worker thread's own copy of the key, which it wipes itself when done.

    If the awaiting task is cancelled, the thread runs on while the `with`
    around the await wipes the lease; the thread must never read a key
    another thread may zero under it.
    """
    return SecretBytes(lease.key.view(), label="data key")


def _in_thread(fn: Callable[[], T]) -> Awaitable[T]:
    return asyncio.to_thread(fn)
