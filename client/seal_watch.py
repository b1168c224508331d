"""Hearing of a seal as it happens: the health service's Watch on every replica.

The daemon's health service reports `keyquorum.v1.KeyService` NOT_SERVING
while it is sealed and pushes every change to open Watch streams. A client
that caches data keys keeps one such stream per replica (per address, or
on its one channel), and calls `on_sealed` each time a replica reports
NOT_SERVING, so cached keys are wiped when a custodian seals, not only at
the next call that misses the cache. A Watch stream holds no worker
thread on the daemon (its health servicer answers streams without one).

Each stream has a deadline (`deadline`, 5 minutes) and is opened again at
once when it passes, so no call of the client is without one and a
connection that died silently is noticed. A stream that fails otherwise is
opened again after `pause` seconds; a daemon without the health service
(UNIMPLEMENTED) is not watched further. A broken stream is not taken for a
seal: a daemon that restarts comes back sealed and says so when the
stream is open again.

The messages are keyquorum.v1.health's (proto/keyquorum/v1/health.proto:
the protocol's field numbers, in a package of our own, so the client needs
no grpcio-health-checking); the method path is the standard one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc

from keyquorum.client.channel import SERVICE
from keyquorum.v1 import health_pb2

WATCH_METHOD: Final = "/grpc.health.v1.Health/Watch"
CHECK_METHOD: Final = "/grpc.health.v1.Health/Check"
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE: Final = 300.0
PAUSE: Final = 1.0

_REQUEST: Final = health_pb2.HealthCheckRequest(service=SERVICE)


def _serialize(message: health_pb2.HealthCheckRequest) -> bytes:
    return message.SerializeToString()


def _parse(data: bytes) -> health_pb2.HealthCheckResponse:
    return health_pb2.HealthCheckResponse.FromString(data)


class SealWatch:
    """Watch streams on sync channels, one thread each; see the module docstring."""

    def __init__(
        self,
        channels: Sequence[grpc.Channel],
        on_sealed: Callable[[], None],
        *,
        deadline: float = DEADLINE,
        pause: float = PAUSE,
    ) -> None:
        self._channels = list(channels)
        self._on_sealed = on_sealed
        self._deadline = deadline
        self._pause = pause
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._calls: set[Any] = set()
        self._threads: list[threading.Thread] = []
        self.seals_seen = 0

    def start(self) -> None:
        for i, channel in enumerate(self._channels):
            thread = threading.Thread(
                target=self._run, args=(channel,), name=f"keyquorum-seal-watch-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _run(self, channel: grpc.Channel) -> None:
        watch = channel.unary_stream(
            WATCH_METHOD, request_serializer=_serialize, response_deserializer=_parse
        )
        while not self._stop.is_set():
            call = watch(_REQUEST, timeout=self._deadline)
            with self._lock:
                if self._stop.is_set():
                    call.cancel()  # type: ignore[no-untyped-call]
                    return
                self._calls.add(call)
            try:
                for response in call:
                    if response.status == NOT_SERVING:
                        self.seals_seen += 1
                        self._on_sealed()
                code = None
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
            finally:
                with self._lock:
                    self._calls.discard(call)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return
            if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                self._stop.wait(self._pause)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for call in self._calls:
                call.cancel()
        for thread in self._threads:
            thread.join(timeout=5)

    def __repr__(self) -> str:
        return f"<SealWatch: {len(self._channels)} replicas>"


class AsyncSealWatch:
    """The same on grpc.aio channels, one task each."""

    def __init__(
        self,
        channels: Sequence[grpc.aio.Channel],
        on_sealed: Callable[[], None],
        *,
        deadline: float = DEADLINE,
        pause: float = PAUSE,
    ) -> None:
        self._channels = list(channels)
        self._on_sealed = on_sealed
        self._deadline = deadline
        self._pause = pause
        self._tasks: list[asyncio.Task[None]] = []
        self.seals_seen = 0

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        """Start the streams on the running event loop."""
        if self._tasks:
            return
        for channel in self._channels:
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(channel)))

    async def _run(self, channel: grpc.aio.Channel) -> None:
        watch = channel.unary_stream(
            WATCH_METHOD, request_serializer=_serialize, response_deserializer=_parse
        )
        while True:
            call = watch(_REQUEST, timeout=self._deadline)
            try:
                async for response in call:
                    if response.status == NOT_SERVING:
                        self.seals_seen += 1
                        self._on_sealed()
                code = None
            except grpc.aio.AioRpcError as e:
                code = e.code()
            finally:
                call.cancel()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return
            if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                await asyncio.sleep(self._pause)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        self._tasks.clear()

    def __repr__(self) -> str:
        return f"<AsyncSealWatch: {len(self._channels)} replicas>"
