"""Lanes: threads of their own for calls that block, with a bounded waiting room.

Servicer coroutines run on the serving loop, which must never block
(hsm/services/serving_loop.py). A call that takes the governance lock or
does store I/O runs on a lane's thread instead, and the coroutine awaits it
holding nothing. Each lane has `threads` threads and room for `waiting`
more calls; a call that finds the room full is refused at once with
RESOURCE_EXHAUSTED naming the lane, rather than queued without end.

The custodian plane has three (docs/adr/0009): Seal and GetStatus each
have their own, so no other call, however many, can take their threads;
every other governance call shares the third. A call's place is given back
when its function returns, or when it is dropped before it started (its
caller went away).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent import futures
from typing import TypeVar

from keyquorum.quorum.errors import InvalidInputError, LimitExceededError

T = TypeVar("T")


class Lane:
    """A thread pool for one kind of call, with a cap on the calls it holds."""

    def __init__(self, name: str, *, threads: int, waiting: int) -> None:
        if threads < 1 or waiting < 0:
            raise InvalidInputError("a lane needs at least one thread and a waiting room >= 0")
        self.name = name
        self._threads = threads
        self._waiting = waiting
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix=f"kq-{name}")
        #: Calls given to the pool and not finished (touched on the loop only).
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn()` on one of the lane's threads; LimitExceededError if the lane is full."""
        if self._held >= self._threads + self._waiting:
            raise LimitExceededError(
                f"the {self.name} lane is full ({self._threads} calls running, "
                f"{self._waiting} waiting): retry shortly"
            )
        loop = asyncio.get_running_loop()
        self._held += 1
        job = self._pool.submit(fn)
        job.add_done_callback(lambda _job: loop.call_soon_threadsafe(self._release))
        return await asyncio.wrap_future(job)

    def _release(self) -> None:
        self._held -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        return f"<Lane {self.name}: {self._held} held, {self._threads}+{self._waiting}>"
