"""Building a gRPC listener: the server model, its bounds, health, reflection, TLS.

The model (docs/adr/0009): grpc.aio servers on the process's serving loop
(hsm/services/serving_loop.py), every method admitted by
hsm/services/admission.py, and every bound a peer can reach set from the
one `Limits` (`grpc_options`): connections per listener, streams per
connection, the TLS handshake's time, idle and maximum connection age,
keepalive enforcement, message and header sizes.

`create_server()` returns `(listener, port)` so tests bind port 0 and learn
the port. Services are registered by the caller (`Registration`), so this
module knows nothing of the daemon's logic. A `Listener` is driven from any
thread (`start`, `stop`); its server lives on the serving loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from keyquorum.hsm.services.admission import Admission, GuardedRegistry, Observer, PeerSource
from keyquorum.hsm.services.serving_loop import ServingLoop, serving_loop
from keyquorum.hsm.services.shared_counts import SharedCounts
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.limits import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """One service for `create_server`: its handler, built over the listener's admission.

    `reserved`: full method names (`/package.Service/Method`) that skip the
    listener's call caps (docs/adr/0009: the custodian plane's Seal and
    GetStatus).
    """

    build: Callable[[Admission], grpc.GenericRpcHandler[Any, Any]]
    reserved: frozenset[str] = field(default_factory=frozenset)


#: The fewest calls gRPC holds before the server takes them (a burst of new calls
#: waits there a moment); past this the random refusals start, even when `max_calls`
#: is set lower.
PENDING_FLOOR = 1024


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def grpc_options(limits: Limits, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """gRPC core's settings for one listener, every bound from `limits`.

    `grpc.max_allowed_incoming_connections` is gRPC core's per-listener
    connection quota: a connection past it is closed at accept, and one
    still in its TLS handshake counts. `reuse_port` lets worker processes
    share the mTLS port (SO_REUSEPORT, `server run --workers`).
    """
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        # Streams count as HTTP/2 counts them, as the client sees them: a client
        # at the cap waits for one of its calls to end. (gRPC's default also
        # counts streams the server has not freed yet, which no client can know,
        # and refuses the rest: a client keeping 64 calls in flight saw some
        # refused.) What a client that opens and resets streams at once (rapid
        # reset, CVE-2023-44487) can make the server hold is bounded instead by
        # the calls gRPC keeps before the application takes them: past
        # max_pending_requests they are refused at random, past the hard limit
        # always; the serving loop takes them as they come and drops each one
        # its client cancelled.
        ("grpc.http.overload_protection", 0),
        ("grpc.server.max_pending_requests", max(PENDING_FLOOR, limits.max_calls)),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max(PENDING_FLOOR, limits.max_calls)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout_seconds)),
        ("grpc.max_connection_idle_ms", _ms(limits.connection_idle_seconds)),
        ("grpc.max_connection_age_ms", _ms(limits.connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.connection_age_grace_seconds)),
        ("grpc.keepalive_time_ms", _ms(limits.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(limits.keepalive_timeout_seconds)),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(limits.min_client_ping_seconds)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


class Listener:
    """A grpc.aio server on the serving loop, started and stopped from any thread."""

    def __init__(
        self,
        server: aio.Server,
        admission: Admission,
        health_servicer: HealthServicer,
        loop: ServingLoop,
    ) -> None:
        self._server = server
        self.admission = admission
        self.health = health_servicer
        self._loop = loop

    def start(self) -> None:
        self._loop.run(self._server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (calls in flight get `grace` seconds); the event is set when done."""
        done = threading.Event()

        async def stop() -> None:
            try:
                await self._server.stop(grace)
            finally:
                done.set()

        self._loop.call_soon(lambda: asyncio.ensure_future(stop()))
        return done

    def set_health(self, service: str, serving: bool) -> None:
        """Report `service` SERVING or NOT_SERVING on this listener (from any thread)."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._loop.call_soon(lambda: asyncio.ensure_future(self.health.set(service, status)))

    def __repr__(self) -> str:
        return f"<Listener {self.admission!r}>"


def create_server(
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    limits: Limits,
    register: Sequence[Registration],
    service_names: Sequence[str],
    peers: PeerSource,
    reuse_port: bool = False,
    observe: Observer | None = None,
    shared: SharedCounts | None = None,
) -> tuple[Listener, int]:
    """A listener (not yet started) and the port it is bound to.

    `observe` is told every call's method, status code name and seconds (the
    RPC metrics, `Metrics.rpc.observe`). `shared` makes the call caps count
    over every process serving the port (hsm/services/shared_counts.py).

    An address that cannot be bound is an `InvalidInputError` naming the
    address and the reason (e.g. "Address already in use").
    `credentials=None` means plaintext; callers decide that only through
    `keyquorum.client.tls.check_plaintext_allowed` (explicit flag, loopback),
    or for a Unix socket (`host="unix:/path"`, port 0: the daemon's internal
    audit listener). `peers` says who a call comes from (`CertificatePeers`
    on an mTLS port, `AddressPeers` on a TLS one, `ForwardedPeers` inside).
    """
    loop = serving_loop()
    return loop.run(
        _create(
            host=host,
            port=port,
            credentials=credentials,
            limits=limits,
            register=register,
            service_names=service_names,
            peers=peers,
            reuse_port=reuse_port,
            observe=observe,
            shared=shared,
            loop=loop,
        )
    )


async def _create(
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
    limits: Limits,
    register: Sequence[Registration],
    service_names: Sequence[str],
    peers: PeerSource,
    reuse_port: bool,
    observe: Observer | None,
    shared: SharedCounts | None,
    loop: ServingLoop,
) -> tuple[Listener, int]:
    reserved: set[str] = set()
    for registration in register:
        reserved |= registration.reserved
    admission = Admission(limits, peers, reserved=reserved, observe=observe, shared=shared)
    server = aio.server(options=grpc_options(limits, reuse_port=reuse_port))
    for registration in register:
        server.add_generic_rpc_handlers((registration.build(admission),))
    guarded: Any = GuardedRegistry(server, admission)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, guarded)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
            (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        guarded,
    )
    if host.startswith("unix:"):
        address = host
    else:
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
    return Listener(server, admission, health_servicer, loop), bound


def _bind_failure(host: str, port: int) -> str:
    """Why gRPC could not bind (it only says that it failed): the OS's answer to a bind."""
    if host.startswith("unix:"):
        return "gRPC refused the Unix socket's path"
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
