"""Building the gRPC server: services, health, reflection, limits, TLS.

`create_server()` returns `(server, port)` so tests bind port 0 and learn the
port. Servicers are registered by the caller through `register`, so this
module knows nothing of the daemon's logic.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.limits import Limits

Registration = Callable[[grpc.Server], None]

#: Seconds between two log lines about requests gRPC could not parse.
UNPARSEABLE_REPORT_INTERVAL = 60.0


class UnparseableRequestLog(logging.Filter):
    """Turns gRPC's traceback per unparseable request into a line a minute.

    gRPC logs "Exception deserializing message!" with a full traceback for
    every request its deserializer rejects (and answers INTERNAL). Anyone who
    reaches the custodian port, which needs no client certificate, could grow
    the daemon's log at will that way. This filter, on gRPC's `grpc._common`
    logger, lets through the first such record of each interval without its
    traceback, saying how many were dropped since the last one; every other
    record passes unchanged.
    """

    def __init__(
        self,
        interval: float = UNPARSEABLE_REPORT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._last: float | None = None
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Exception deserializing"):
            return True
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last < self._interval:
                self._dropped += 1
                return False
            dropped, self._dropped, self._last = self._dropped, 0, now
        error = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else "?"
        record.msg = "gRPC could not parse a request (%s); %d more not logged since the last line"
        record.args = (error, dropped)
        record.exc_info = None
        record.exc_text = None
        return True


_UNPARSEABLE = UnparseableRequestLog()
logging.getLogger("grpc._common").addFilter(_UNPARSEABLE)


def create_server(
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    limits: Limits,
    register: Sequence[Registration],
    service_names: Sequence[str],
    health_servicer: health.HealthServicer | None = None,
    max_workers: int = 16,
    interceptors: Sequence[grpc.ServerInterceptor[Any, Any]] = (),
) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server and the port it is bound to.

    `credentials=None` means plaintext; callers decide that only through
    `keyquorum.client.tls.check_plaintext_allowed` (explicit flag, loopback).
    An address that cannot be bound is an `InvalidInputError` naming the
    address and the reason (e.g. "Address already in use").
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    for add in register:
        add(server)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in service_names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise InvalidInputError(f"cannot listen on {address}: {_bind_failure(host, port)}")
    return server, bound


def _bind_failure(host: str, port: int) -> str:
    """Why gRPC could not bind (it only says that it failed): the OS's answer to a bind."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot resolve {host!r} ({e.strerror or e})"
    for family, kind, proto, _name, sockaddr in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(sockaddr)
        except OSError as e:
            return str(e.strerror or e)
    return "gRPC refused the address"


def settle_heap() -> int:
    """Take every object alive now out of the cyclic collector's walks; how many.

    Why: start-up leaves some 70,000 long-lived objects (modules, protobuf
    descriptors, gRPC, the replayed log state). Unfrozen, every full
    (generation 2) collection walks them all holding the interpreter lock:
    at 64 calls in flight about once a second, 12-23 ms each, a stall of
    every call in flight (docs/adr/0002). Frozen (`gc.freeze`), they are
    skipped and a full collection takes about 0.2 ms. Objects made later
    are collected as before, and a frozen object is still freed when its last
    reference goes; only a reference cycle alive at this moment is kept
    for good if it later becomes garbage.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
