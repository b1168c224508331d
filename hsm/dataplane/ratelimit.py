"""Per-backend rate limits: one token bucket per client certificate name.

`server run --rate-limit N` gives every backend N tokens per second and a
bucket of N (one second of burst); each Wrap, Unwrap, GenerateDataKey or
Rewrap item takes one token, a batch takes one per item at once. A call
that finds too few tokens is refused whole with RESOURCE_EXHAUSTED and
takes none; a batch larger than the bucket can never pass and says so.
The clock is monotonic and injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from keyquorum.quorum.errors import InvalidInputError, LimitExceededError


def rate_and_burst(rate: float, burst: float | None) -> tuple[float, float]:
    """A limiter's rate and burst (default: one second's worth), or InvalidInputError."""
    if not rate > 0:
        raise InvalidInputError(f"the rate limit must be positive, got {rate!r}")
    full = float(burst if burst is not None else rate)
    if not full >= 1:
        raise InvalidInputError(f"the burst must be at least 1, got {full!r}")
    return float(rate), full


def check_take(count: int, rate: float, burst: float) -> None:
    """Refuse a take that no bucket could ever allow (LimitExceededError) or a nonsense one."""
    if count < 1:
        raise InvalidInputError("take at least one token")
    if count > burst:
        raise LimitExceededError(
            f"{count} items at once exceed the per-backend burst of {burst:g} "
            f"(rate limit {rate:g}/s): send smaller batches"
        )


def over_limit(backend: str, rate: float) -> LimitExceededError:
    """The refusal of a take its bucket cannot cover now."""
    return LimitExceededError(
        f"backend {backend} is over its rate limit of {rate:g} calls/s; retry later"
    )


class RateLimiter:
    """Token buckets by backend name; thread-safe."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate, self._burst = rate_and_burst(rate, burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def rate(self) -> float:
        return self._rate

    def take(self, backend: str, count: int = 1) -> None:
        """Take `count` tokens from `backend`'s bucket, or raise LimitExceededError."""
        check_take(count, self._rate, self._burst)
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(backend, (self._burst, now))
            tokens = min(self._burst, tokens + (now - then) * self._rate)
            if tokens < count:
                self._buckets[backend] = (tokens, now)
                raise over_limit(backend, self._rate)
            self._buckets[backend] = (tokens - count, now)

    def give_back(self, backend: str, count: int) -> None:
        """Return `count` tokens a call took but did not use (never above the burst).

        For a call that took its tokens and then started over on another
        path, which takes them again: the backend is charged once.
        """
        if count < 1:
            raise InvalidInputError("give back at least one token")
        now = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(backend, (self._burst, now))
            tokens = min(self._burst, tokens + (now - then) * self._rate + count)
            self._buckets[backend] = (tokens, now)
