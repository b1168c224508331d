"""What the RPC metrics add to each call, in process.

`server run --metrics-listen` counts and times every gRPC call: each
listener's admission tells `RpcMetrics.observe` (hsm/services/metrics.py)
a call's method, status code name and seconds when it ends. Here that call
is made directly against a call of a function that does nothing, so the
row is the metrics' own CPU per call (label lookup, a counter increment, a
histogram observation), with no network or gRPC in between. bench_dataplane
measures the same on a real KeyService at 64 calls in flight.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from bench.harness import Row, ops_per_second
from keyquorum.hsm.services.metrics import RpcMetrics

METHOD = "/keyquorum.v1.KeyService/Wrap"


def run(quick: bool) -> list[Row]:
    min_time = 0.1 if quick else 0.3
    observe = RpcMetrics(CollectorRegistry()).observe

    def nothing(_method: str, _code: str, _seconds: float) -> None:
        return None

    def observed() -> None:
        start = time.perf_counter()
        observe(METHOD, "OK", time.perf_counter() - start)

    def bare() -> None:
        start = time.perf_counter()
        nothing(METHOD, "OK", time.perf_counter() - start)

    timed_rate = ops_per_second(observed, min_time=min_time)
    bare_rate = ops_per_second(bare, min_time=min_time)
    overhead_us = (1 / timed_rate - 1 / bare_rate) * 1e6
    return [
        Row(
            f"a call's RPC metrics (RpcMetrics.observe: {overhead_us:.1f} us added per call)",
            timed_rate,
            "the same timing told to a function that does nothing",
            bare_rate,
        )
    ]
