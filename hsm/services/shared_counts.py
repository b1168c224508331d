"""Counts the processes serving one port share: calls in flight and rate debts.

With `server run --workers N`, N processes serve the mTLS port
(hsm/services/workers.py). A client's caps (`max_calls_per_peer`,
`max_calls`) and `--rate-limit` bound what it holds over all of them, not
per process (docs/adr/0013). The processes share one memory mapping: a
memfd the daemon creates and hands each worker at spawn as an inherited
file descriptor (no path: nothing another process can open).

- Calls in flight per peer: a count-min sketch. A peer key (the SHA-256 of
  a certificate) picks two of `BUCKETS` buckets by BLAKE2b keyed with a
  random key of this daemon's start, so no client can choose whom it
  collides with. Each bucket has one counter per process (its column),
  written only by that process. A peer's calls are estimated by the
  smaller of its two buckets' sums: never less than the truth, so no peer
  passes its cap; more only while other peers with calls open share both
  of its buckets, which makes a refusal the client retries, never an
  admission.
- Calls in flight on the port: one counter per process.
- Rate debts (`--rate-limit`): per bucket, the tokens taken, decaying at
  the rate; a backend's debt is the smaller of its two buckets', so again
  never less than its own.

A call is admitted under an exclusive lock (a thread lock in the process,
a POSIX record lock on the memfd across processes), so the check and the
count are one step everywhere: no cap is exceeded, not even by one. A call
that ends takes its count off its own process's column under the thread
lock only (no other process writes there; one that reads the old value
refuses more, never less). A worker that dies leaves its column behind;
the daemon zeroes it before the replacement starts (`clear_column`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

from keyquorum.hsm.dataplane.ratelimit import check_take, over_limit, rate_and_burst
from keyquorum.quorum.errors import InvalidInputError, LimitExceededError

#: Buckets of the sketch (calls per peer and rate debts).
BUCKETS: Final = 1 << 14
#: Bytes of the key that picks a peer's buckets.
KEY_BYTES: Final = 16
#: Peer keys whose buckets a process remembers; the memo starts over past this.
MEMO: Final = 4096

_U32 = struct.Struct("<I")
_DEBT = struct.Struct("<dd")


def _size(columns: int) -> int:
    return 4 * columns + 4 * columns * BUCKETS + _DEBT.size * BUCKETS


class SharedCounts:
    """One process's view of the shared mapping: its column, and the lock.

    The daemon makes the mapping (`create`, column None: it counts no calls,
    it only zeroes a dead worker's column); each worker opens the inherited
    descriptor with its own column (the constructor).
    """

    def __init__(self, fd: int, columns: int, column: int | None, key: bytes) -> None:
        if columns < 1:
            raise InvalidInputError("shared counts need at least one column")
        if column is not None and not 0 <= column < columns:
            raise InvalidInputError(f"column {column} is not one of 0..{columns - 1}")
        if len(key) != KEY_BYTES:
            raise InvalidInputError(f"the bucket key must be {KEY_BYTES} bytes")
        if os.fstat(fd).st_size != _size(columns):
            raise InvalidInputError("the shared counts mapping has the wrong size")
        self.fd = fd
        self.columns = columns
        self.column = column
        self.key = key
        self._map = mmap.mmap(fd, _size(columns))
        self._row = struct.Struct(f"<{columns}I")
        self._calls_at = 4 * columns
        self._debts_at = self._calls_at + 4 * columns * BUCKETS
        self._thread_lock = threading.Lock()
        self._memo: dict[str, tuple[int, int]] = {}
        #: Whether `close` closes the descriptor (the view `create` made owns it).
        self._owns_fd = False

    @classmethod
    def create(cls, columns: int) -> SharedCounts:
        """A new zeroed mapping for `columns` processes (the daemon's view)."""
        fd = os.memfd_create("keyquorum-counts", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, _size(columns))
            view = cls(fd, columns, None, os.urandom(KEY_BYTES))
            view._owns_fd = True
            return view
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        """Unmap; close the descriptor too if this view made it."""
        self._map.close()
        if self._owns_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive over every thread and process sharing the mapping."""
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def buckets(self, key: str) -> tuple[int, int]:
        """The two distinct buckets of a peer key."""
        known = self._memo.get(key)
        if known is None:
            digest = hashlib.blake2b(key.encode(), digest_size=8, key=self.key).digest()
            first = int.from_bytes(digest[:4], "little") % BUCKETS
            second = int.from_bytes(digest[4:], "little") % (BUCKETS - 1)
            known = (first, second + (second >= first))
            if len(self._memo) >= MEMO:
                self._memo.clear()
            self._memo[key] = known
        return known

    # -- calls in flight --------------------------------------------------------------

    def enter(self, key: str, per_peer: int, total: int) -> None:
        """Count one call of peer `key`, or raise LimitExceededError naming the cap."""
        column = self._own_column()
        first, second = self.buckets(key)
        with self.locked():
            held = min(self._bucket_calls(first), self._bucket_calls(second))
            if held >= per_peer:
                raise LimitExceededError(
                    f"this client already has {held} calls open on this port, the most one "
                    f"client may (max_calls_per_peer); retry when some have finished"
                )
            everyone = sum(self._row.unpack_from(self._map, 0))
            if everyone >= total:
                raise LimitExceededError(
                    f"this port has {everyone} calls open, its limit (max_calls); retry shortly"
                )
            for offset in self._offsets(column, first, second):
                self._add(offset, 1)

    def leave(self, key: str) -> None:
        """Take one call of peer `key` off this process's column."""
        column = self._own_column()
        first, second = self.buckets(key)
        with self._thread_lock:
            for offset in self._offsets(column, first, second):
                self._add(offset, -1)

    def calls_of(self, key: str) -> int:
        """The sketch's count of peer `key`'s calls over all processes (tests, logs)."""
        first, second = self.buckets(key)
        return min(self._bucket_calls(first), self._bucket_calls(second))

    def calls(self) -> int:
        """Calls open on the port over all processes."""
        return sum(self._row.unpack_from(self._map, 0))

    def clear_column(self, column: int) -> None:
        """Zero a dead process's column before another takes it."""
        if not 0 <= column < self.columns:
            raise InvalidInputError(f"column {column} is not one of 0..{self.columns - 1}")
        with self.locked():
            _U32.pack_into(self._map, 4 * column, 0)
            for bucket in range(BUCKETS):
                _U32.pack_into(self._map, self._calls_at + 4 * (bucket * self.columns + column), 0)

    def _own_column(self) -> int:
        if self.column is None:
            raise InvalidInputError("the daemon's view of the shared counts counts no calls")
        return self.column

    def _bucket_calls(self, bucket: int) -> int:
        return sum(self._row.unpack_from(self._map, self._calls_at + 4 * self.columns * bucket))

    def _offsets(self, column: int, first: int, second: int) -> tuple[int, int, int]:
        at = self._calls_at + 4 * column
        step = 4 * self.columns
        return (4 * column, at + step * first, at + step * second)

    def _add(self, offset: int, delta: int) -> None:
        (value,) = _U32.unpack_from(self._map, offset)
        if value + delta < 0:  # pragma: no cover (a leave without its enter)
            raise InvalidInputError("a shared count would go below zero")
        _U32.pack_into(self._map, offset, value + delta)

    # -- rate debts ------------------------------------------------------------------

    def take_tokens(self, key: str, count: int, rate: float, burst: float, now: float) -> bool:
        """Take `count` tokens of backend `key` if its debt allows; whether it did."""
        first, second = self.buckets(key)
        with self.locked():
            debts = [self._debt(bucket, rate, now) for bucket in (first, second)]
            if burst - min(debt for debt, _ in debts) < count:
                return False
            for bucket, (debt, stamp) in zip((first, second), debts, strict=True):
                _DEBT.pack_into(
                    self._map, self._debts_at + _DEBT.size * bucket, debt + count, stamp
                )
            return True

    def give_back_tokens(self, key: str, count: int, rate: float, now: float) -> None:
        """Return `count` tokens to backend `key` (its debts never go below zero)."""
        first, second = self.buckets(key)
        with self.locked():
            for bucket in (first, second):
                debt, stamp = self._debt(bucket, rate, now)
                self._store_debt(bucket, max(0.0, debt - count), stamp)

    def _debt(self, bucket: int, rate: float, now: float) -> tuple[float, float]:
        """A bucket's debt decayed to `now`, and the time it is decayed to.

        A process may read its clock just before another that takes the lock
        first: the stamp never moves back, or the time between would be
        repaid twice.
        """
        debt, then = _DEBT.unpack_from(self._map, self._debts_at + _DEBT.size * bucket)
        stamp = max(now, then)
        return float(max(0.0, debt - (stamp - then) * rate)), float(stamp)

    def _store_debt(self, bucket: int, debt: float, stamp: float) -> None:
        _DEBT.pack_into(self._map, self._debts_at + _DEBT.size * bucket, debt, stamp)

    def __repr__(self) -> str:
        return f"<SharedCounts: column {self.column} of {self.columns}>"


class SharedRateLimiter:
    """`--rate-limit` over every process sharing `counts`: RateLimiter's contract.

    Each backend gets `rate` tokens per second and a bucket of `burst`
    (default: one second's worth), counted over all processes.
    """

    def __init__(
        self,
        counts: SharedCounts,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counts = counts
        self._rate, self._burst = rate_and_burst(rate, burst)
        self._clock = clock

    @property
    def rate(self) -> float:
        return self._rate

    def take(self, backend: str, count: int = 1) -> None:
        """Take `count` tokens from `backend`'s bucket, or raise LimitExceededError."""
        check_take(count, self._rate, self._burst)
        if not self._counts.take_tokens(backend, count, self._rate, self._burst, self._clock()):
            raise over_limit(backend, self._rate)

    def give_back(self, backend: str, count: int) -> None:
        """Return `count` tokens a call took but did not use (never above the burst)."""
        if count < 1:
            raise InvalidInputError("give back at least one token")
        self._counts.give_back_tokens(backend, count, self._rate, self._clock())

    def __repr__(self) -> str:
        return f"<SharedRateLimiter: {self._rate:g}/s over {self._counts.columns} processes>"
