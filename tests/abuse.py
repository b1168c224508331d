"""Hostile clients for the abuse tests: real sockets, real TLS, real gRPC.

- `HeldCalls`: calls that send their headers and never their request
  message (grpc.aio client-streaming calls with nothing written), spread
  over connections of their own (a local subchannel pool per channel), on
  an event loop of their own in a thread. They stay open until `close`.
- `SlowTls`: TCP connections that start a TLS handshake and never finish
  it (the first bytes of a ClientHello, then nothing), or send nothing.
- `well_behaved_*`: what an honest client checks meanwhile.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Sequence
from typing import Any

import grpc
from grpc import aio

#: The first bytes of a TLS record carrying a ClientHello: the handshake started.
CLIENT_HELLO_START = bytes.fromhex("160301020001") + b"\x00" * 3


class HeldCalls:
    """Header-only calls kept open against one target."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._channels: list[aio.Channel] = []
        self._calls: list[Any] = []

    def open(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        methods: Sequence[str],
        count: int,
        *,
        per_connection: int = 60,
        timeout: float = 120,
    ) -> None:
        """Open `count` header-only calls to `methods` (in turn), `per_connection` a connection."""
        asyncio.run_coroutine_threadsafe(
            self._open(target, credentials, methods, count, per_connection, timeout), self._loop
        ).result(120)

    async def _open(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        methods: Sequence[str],
        count: int,
        per_connection: int,
        timeout: float,
    ) -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channel: aio.Channel | None = None
        for i in range(count):
            if i % per_connection == 0:
                channel = (
                    aio.secure_channel(target, credentials, options)
                    if credentials is not None
                    else aio.insecure_channel(target, options)
                )
                await channel.channel_ready()
                self._channels.append(channel)
            assert channel is not None
            method = channel.stream_unary(methods[i % len(methods)])
            # No request iterator: the headers go out, no message ever follows.
            self._calls.append(method(timeout=timeout))
        await asyncio.sleep(0.2)

    def ended(self) -> list[grpc.StatusCode]:
        """Status codes of the held calls that ended (the daemon ended them)."""
        return asyncio.run_coroutine_threadsafe(self._ended(), self._loop).result(60)

    async def _ended(self) -> list[grpc.StatusCode]:
        return [await c.code() for c in self._calls if c.done()]

    def close(self) -> None:
        async def close() -> None:
            for call in self._calls:
                call.cancel()
            for channel in self._channels:
                await channel.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __len__(self) -> int:
        return len(self._calls)


class SlowTls:
    """Connections that never finish their TLS handshake."""

    def __init__(self, port: int, count: int, *, start_handshake: bool = True) -> None:
        self.sockets: list[socket.socket] = []
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if start_handshake:
                sock.sendall(CLIENT_HELLO_START)
            self.sockets.append(sock)

    def closed_by_server(self, wait: float) -> int:
        """How many the server closed (EOF or reset), waiting up to `wait` s for each."""
        closed = 0
        for sock in self.sockets:
            sock.settimeout(wait)
            try:
                while sock.recv(4096):
                    pass
                closed += 1
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except TimeoutError:
                pass
        return closed

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
