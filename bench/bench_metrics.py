"""What the RPC metrics interceptor adds to each call, in process.

`server run --metrics-listen` counts and times every gRPC call with
`RpcMetrics` (hsm/services/metrics.py). Here a handler that does nothing is
called through the interceptor's timed copy and bare, with a servicer
context stand-in, so the row is the interceptor's own CPU per call (label
lookup, a counter increment, a histogram observation), with no network or
gRPC in between. bench_dataplane measures the same interceptor on a real
KeyService at 64 calls in flight.
"""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from bench.harness import Row, ops_per_second
from keyquorum.hsm.services.metrics import RpcMetrics


class _Context:
    def code(self) -> grpc.StatusCode | None:
        return None

    def is_active(self) -> bool:
        return True


class _Details:
    method = "/keyquorum.v1.KeyService/Wrap"


def run(quick: bool) -> list[Row]:
    min_time = 0.1 if quick else 0.3

    def handler(_request: Any, _context: Any) -> bytes:
        return b""

    bare = grpc.unary_unary_rpc_method_handler(handler)
    timed = RpcMetrics(CollectorRegistry()).intercept_service(lambda _d: bare, _Details())
    assert timed is not None
    assert timed.unary_unary is not None
    timed_call = timed.unary_unary
    context = _Context()

    def through_interceptor() -> None:
        timed_call(b"", context)

    def direct() -> None:
        handler(b"", context)

    timed_rate = ops_per_second(through_interceptor, min_time=min_time)
    bare_rate = ops_per_second(direct, min_time=min_time)
    overhead_us = (1 / timed_rate - 1 / bare_rate) * 1e6
    return [
        Row(
            f"unary handler through the RPC metrics interceptor ({overhead_us:.1f} us added per "
            "call)",
            timed_rate,
            "the same handler called directly",
            bare_rate,
        )
    ]
