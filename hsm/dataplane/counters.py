"""Encryptions counted per tenant key version against the SP 800-38D bound.

NIST SP 800-38D section 8.3 bounds one key to 2^32 invocations with random
IVs, so each tenant key version counts its encryptions (Wrap,
GenerateDataKey, Rewrap) and refuses the next one at the bound, telling the
operator to rotate. The count lives in the store (`Store.reserve_block`),
reserved in blocks: the running block is in memory, the next one is
reserved in the background when three quarters of it are used, so a call
waits on a disk write only when a block runs out before the next arrived
(and on the first use after a start). Numbers of a block not used before a
restart are lost, never reused: the count can only over-state.

A call never waits on the store on an event loop's thread (the serving
loop, hsm/services/serving_loop.py, serves every call of the process):
there, where it would wait, the reservation is started in the background
and `WouldWait` is raised before any number is given out; the caller
repeats the call on a thread (hsm/services/key_service.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading

from keyquorum.hsm.stores.base import Store
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError, LimitExceededError
from keyquorum.quorum.limits import DEFAULT_LIMITS, NONCE_BOUND, Limits

log = logging.getLogger(__name__)

__all__ = ["NONCE_BOUND", "EncryptionCounters", "WouldWait"]


class WouldWait(Exception):  # noqa: N818 (a signal to the caller, not a failure)
    """The call would wait for the store on an event loop: repeat it on a thread.

    Not a KeyquorumError, so no item catches it as its own failure: it
    leaves the whole call, which has given out no number for it.
    """


def _on_event_loop() -> bool:
    return asyncio.events._get_running_loop() is not None


class _Count:
    __slots__ = ("end", "exhausted", "failure", "next", "pending", "spare")

    def __init__(self) -> None:
        self.next = 0
        self.end = 0
        self.spare: tuple[int, int] | None = None
        self.pending = False
        self.exhausted = False
        self.failure: KeyquorumError | None = None


class EncryptionCounters:
    """Counts encryptions per tenant key version against the SP 800-38D bound.

    Thread-safe. `take` returns the number of this encryption (unique per
    key version across restarts and replicas) or raises LimitExceededError.
    """

    def __init__(self, store: Store, limits: Limits = DEFAULT_LIMITS) -> None:
        self._store = store
        self._block = limits.counter_block
        self._limit = limits.encryption_limit
        # Callers take the plain lock (cheaper to enter than the condition);
        # the condition over it is for waiting on a block being reserved.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._counts: dict[tuple[str, int], _Count] = {}

    @staticmethod
    def name(tenant: str, version: int) -> str:
        return f"enc/{tenant}/v{version}"

    def take(self, tenant: str, version: int) -> int:
        """The number of one encryption."""
        return self._take(tenant, version, 1)[0]

    def take_many(self, tenant: str, version: int, wanted: int) -> int:
        """Reserve 1 to `wanted` encryptions at once (fewer at a block's end); how many.

        For a batch: one lock round per block instead of one per item. The
        caller may leave some unused (an item that fails later); those
        numbers are skipped, so the count only over-states, as after a restart.
        """
        if wanted < 1:
            raise InvalidInputError("take_many needs at least one encryption")
        return self._take(tenant, version, wanted)[1]

    def _take(self, tenant: str, version: int, wanted: int) -> tuple[int, int]:
        """(first number, how many) of up to `wanted` consecutive numbers."""
        with self._lock:
            count = self._counts.get((tenant, version))
            if count is None:
                count = self._counts[(tenant, version)] = _Count()
            while True:
                if count.next < count.end:
                    number = count.next
                    taken = min(wanted, count.end - number)
                    count.next += taken
                    if count.end - count.next <= self._block // 4:
                        self._prefetch(tenant, version, count)
                    return number, taken
                if count.spare is not None:
                    count.next, count.end = count.spare
                    count.spare = None
                    continue
                if count.exhausted:
                    raise self._exhausted(tenant, version)
                if count.failure is not None:
                    failure, count.failure = count.failure, None
                    raise failure
                if _on_event_loop():
                    self._prefetch(tenant, version, count)
                    raise WouldWait(f"{self.name(tenant, version)}: a block is being reserved")
                if not count.pending:
                    count.pending = True
                    self._lock.release()
                    try:
                        self._reserve(self.name(tenant, version), count)
                    finally:
                        self._lock.acquire()
                else:
                    self._cond.wait()

    def _prefetch(self, tenant: str, version: int, count: _Count) -> None:
        """Reserve the next block in the background (the caller holds the lock)."""
        if count.pending or count.spare is not None or count.exhausted:
            return
        count.pending = True
        threading.Thread(
            target=self._reserve,
            args=(self.name(tenant, version), count),
            name="kq-counter",
            daemon=True,
        ).start()

    def _reserve(self, name: str, count: _Count) -> None:
        """One store write; wakes every caller waiting on this counter."""
        block: tuple[int, int] | None = None
        failure: KeyquorumError | None = None
        exhausted = False
        try:
            block = self._store.reserve_block(name, self._block, self._limit)
        except LimitExceededError:
            exhausted = True
        except KeyquorumError as e:
            failure = e
        with self._cond:
            count.pending = False
            if block is not None:
                count.spare = block
                if block[0] >= self._limit // 2:
                    log.warning(
                        "%s: %d of %d encryptions used; rotate this tenant key soon",
                        name,
                        block[0],
                        self._limit,
                    )
            count.exhausted = count.exhausted or exhausted
            if failure is not None:
                log.error("could not reserve encryptions for %s: %s", name, failure)
                count.failure = failure
            self._cond.notify_all()

    def _exhausted(self, tenant: str, version: int) -> LimitExceededError:
        return LimitExceededError(
            f"tenant {tenant!r} key version {version} reached its {self._limit} encryptions "
            "(the NIST SP 800-38D random-nonce bound): a quorum must rotate the tenant key "
            "(rotate-tenant); unwrapping still works"
        )
