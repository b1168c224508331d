"""The one asyncio event loop of a process on which its gRPC servers run.

Why one: grpc.aio's completion-queue poller hands every finished operation
to the loop of the first grpc.aio object made in the process; calls served
on any other loop get their events through that loop
(`call_soon_threadsafe`), so a second loop would stall whenever the first is
busy, and die with it. So every server of a process (the custodian
listener, the mTLS listener, a worker's KeyService) is made, started and
stopped on this loop, in its own daemon thread, and the rest of the
process (click's main thread, tests, governance threads) talks to it
through `run` and `call_soon`.

Contract: code on this loop never blocks (no store I/O, no governance
lock); it awaits a thread for that (hsm/services/lanes.py).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class ServingLoop:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name="kq-serving", daemon=True)
        self._thread.start()
        self._started.wait()

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def on_loop(self) -> bool:
        """Whether the caller runs on this loop's thread."""
        return threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coroutine` on the loop and wait for its result (never from the loop)."""
        if self.on_loop():
            coroutine.close()
            raise RuntimeError("ServingLoop.run called from the loop's own thread")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        """Schedule `fn(*args)` on the loop from any thread."""
        self._loop.call_soon_threadsafe(fn, *args)

    def __repr__(self) -> str:
        return f"<ServingLoop {'running' if self._loop.is_running() else 'stopped'}>"


_lock = threading.Lock()
_instance: ServingLoop | None = None


def serving_loop() -> ServingLoop:
    """The process's serving loop, started on first use."""
    global _instance  # noqa: PLW0603 (one loop per process, by design)
    with _lock:
        if _instance is None:
            _instance = ServingLoop()
        return _instance
