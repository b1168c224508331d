"""The mTLS port: KeyService and AuditService, served by the daemon or by workers.

`server run --listen-mtls` (docs/adr/0009):
- `workers=0`: the daemon's own serving loop serves both services on the
  port (`mtls_server`), KeyService over the daemon's snapshot;
- `workers=N`: N worker processes share the port (hsm/services/workers.py)
  and serve KeyService over the snapshots the daemon hands them; each
  forwards AuditService calls to the daemon's audit plane, which listens on
  a Unix socket in a private directory (0700, removed at close) and knows
  the workers by a token they got over their private channels. The audit
  plane and the custodian plane stay in the daemon.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from keyquorum.client.tls import load_ca, load_pair
from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.dataplane import DataPlane, UsageSink
from keyquorum.hsm.dataplane.ratelimit import RateLimiter
from keyquorum.hsm.services import audit_service, key_service
from keyquorum.hsm.services.admission import CertificatePeers, ForwardedPeers, Observer
from keyquorum.hsm.services.server import Listener, create_server
from keyquorum.hsm.services.workers import OutcomeSink, StoreSpec, WorkerPool, WorkerSettings
from keyquorum.hsm.stores.base import Store
from keyquorum.quorum.limits import Limits

#: AuditService streams (exports) served at once: each reads the store batch
#: after batch on the audit lane.
AUDIT_STREAMS = 2
#: Bytes of the token that tells the daemon's audit plane a call came from a worker.
TOKEN_BYTES = 32


class Sink(UsageSink, OutcomeSink, Protocol):
    """A usage sink the daemon has (metrics, access log): records of both kinds."""


@dataclass(frozen=True)
class BackendSettings:
    """What the mTLS port is made of."""

    host: str
    port: int
    cert: Path
    key: Path
    client_ca: Path
    limits: Limits
    store: StoreSpec
    workers: int = 0
    rate_limit: float | None = None
    usage: Sequence[Sink] = ()
    #: Told every call's method, code and seconds (RPC metrics), the workers' too.
    observe: Observer | None = None
    #: The daemon's log level and format, which the workers' lines follow.
    log_level: str = "INFO"
    log_format: str = "text"


def mtls_server(
    daemon: Daemon,
    plane: DataPlane,
    audit_log: audit_service.AuditLog,
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials,
    limits: Limits,
    observe: Observer | None = None,
) -> tuple[Listener, int]:
    """The in-process mTLS listener (not started): KeyService, and AuditService."""
    listener, bound = create_server(
        host=host,
        port=port,
        credentials=credentials,
        limits=limits,
        register=[
            audit_service.register(audit_log, max_streams=AUDIT_STREAMS),
            key_service.register(plane),
        ],
        service_names=[audit_service.SERVICE_NAME, key_service.SERVICE_NAME],
        peers=CertificatePeers(),
        observe=observe,
        # A successor process binds the same port during a handover (hsm/upgrade.py).
        reuse_port=True,
    )
    key_service.watch_health(daemon, listener)
    return listener, bound


class BackendPlane:
    """The running mTLS port, whichever way it is served."""

    def __init__(self, daemon: Daemon, store: Store, settings: BackendSettings) -> None:
        self._listeners: list[Listener] = []
        self._pool: WorkerPool | None = None
        self._runtime: str | None = None
        self._certificates: tls.ServerCertificates | None = None
        self.workers = settings.workers
        # Cosignatures count only from the witnesses the log names (the daemon's policy).
        audit_log = audit_service.AuditLog(store, daemon)
        if settings.workers == 0:
            plane = DataPlane(
                daemon,
                store,
                limits=settings.limits,
                usage=settings.usage,
                rate_limit=None
                if settings.rate_limit is None
                else RateLimiter(settings.rate_limit),
            )
            self._certificates = tls.ServerCertificates.from_files(
                settings.cert, settings.key, settings.client_ca
            )
            listener, self.port = mtls_server(
                daemon,
                plane,
                audit_log,
                host=settings.host,
                port=settings.port,
                credentials=self._certificates.credentials(),
                limits=settings.limits,
                observe=settings.observe,
            )
            self._listeners.append(listener)
            listener.start()
            return
        token = os.urandom(TOKEN_BYTES)
        self._runtime = tempfile.mkdtemp(prefix="keyquorum-")
        socket_path = str(Path(self._runtime) / "audit.sock")
        audit_listener, _ = create_server(
            host=f"unix:{socket_path}",
            port=0,
            credentials=None,
            limits=settings.limits,
            register=[audit_service.register(audit_log, max_streams=AUDIT_STREAMS)],
            service_names=[audit_service.SERVICE_NAME],
            peers=ForwardedPeers(token),
        )
        self._listeners.append(audit_listener)
        audit_listener.start()
        chain, key = load_pair(settings.cert, settings.key, "server")
        pool = WorkerPool(
            daemon.data_plane_snapshot,
            daemon.now,
            WorkerSettings(
                host=settings.host,
                port=settings.port,
                tls_chain=chain,
                tls_key=key,
                client_ca=load_ca(settings.client_ca),
                limits=settings.limits,
                store=settings.store,
                rate_limit=settings.rate_limit,
                usage=settings.usage,
                observe=settings.observe,
                audit_socket=socket_path,
                audit_token=token,
                log_level=settings.log_level,
                log_format=settings.log_format,
            ),
            settings.workers,
        )
        self._pool = pool
        daemon.add_publish_listener(pool.publish)
        try:
            pool.start()
        except BaseException:
            self.close()
            raise
        self.port = pool.port

    @property
    def pool(self) -> WorkerPool | None:
        return self._pool

    def reload(self, chain: bytes, key: bytes, client_ca: bytes, log_level: str) -> None:
        """Serve this certificate chain, key and client CA to new connections (SIGHUP).

        Open connections keep theirs; the workers' log level follows too.
        """
        if self._pool is not None:
            self._pool.reload(chain, key, client_ca, log_level)
        elif self._certificates is not None:
            self._certificates.replace(chain, key, client_ca)

    def hand_over(self, wait: float = 2.0) -> None:
        """A handover's end (hsm/upgrade.py): no new call, the open ones finished.

        In this process, and in each worker the same way: new calls are
        answered UNAVAILABLE, which clients retry on a new connection (the
        successor's), and open ones get up to `wait` seconds; the listeners
        are not stopped, so no call is cancelled. Then the workers are
        stopped (each wipes its keys) and this process exits.
        """
        if self._pool is not None:
            self._pool.drain(wait)
            self._pool.close()
            return
        for listener in self._listeners:
            listener.admission.drain()
        deadline = time.monotonic() + wait
        while any(listener.admission.open_calls for listener in self._listeners):
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)

    def close(self) -> None:
        """Stop the workers (each wipes its keys) and the listeners."""
        if self._pool is not None:
            self._pool.close()
        for listener in self._listeners:
            listener.stop(grace=2).wait(10)
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)

    def __repr__(self) -> str:
        return f"<BackendPlane port {self.port}, {self.workers} workers>"
