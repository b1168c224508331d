"""Timing helpers shared by the benchmark modules."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One measured operation against its same-run baseline.

    `rate` and `baseline_rate` are in `unit` (e.g. "ops/s", "entries/s");
    ratio = rate / baseline_rate (1.0 means as fast as the baseline).
    """

    name: str
    rate: float
    baseline_name: str
    baseline_rate: float
    unit: str = "ops/s"

    @property
    def ratio(self) -> float:
        return self.rate / self.baseline_rate if self.baseline_rate else float("nan")


def ops_per_second(fn: Callable[[], object], *, min_time: float = 0.3, rounds: int = 5) -> float:
    """Median ops/s of `fn` over `rounds` rounds of at least `min_time` seconds each."""
    fn()  # warm up
    rates = []
    for _ in range(rounds):
        n = 0
        start = time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        rates.append(n / elapsed)
    return statistics.median(rates)


def items_per_second(fn: Callable[[], object], items: int, *, rounds: int = 3) -> float:
    """Median items/s of `fn`, which processes `items` items per call."""
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)
