"""`keyquorum server run`: the daemon process.

The custodian listener runs on `create_server`'s 16 threads. The mTLS
listener serves KeyService and AuditService from one pool of
`MTLS_WORKERS` threads (gRPC's sync server runs every handler on a worker
thread), the size KeyService is fastest on. An AuditService stream
(`GetEntries`, `ListCheckpoints`: an export) holds its thread for as long
as the auditor takes to read it, so at most `AUDIT_STREAMS` (1) runs at
once; a further one is refused with RESOURCE_EXHAUSTED at its start, and
KeyService always keeps the other threads. Why this model, its figures and
its known weakness (a call waiting for its request holds a thread):
docs/adr/0002.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import click
import grpc
from grpc_health.v1 import health

from keyquorum.client import tls as client_tls
from keyquorum.hsm import hardening, tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.dataplane import DataPlane, UsageSink
from keyquorum.hsm.dataplane.ratelimit import RateLimiter
from keyquorum.hsm.services import audit_service, custodian_service, key_service
from keyquorum.hsm.services.access_log import AccessLog
from keyquorum.hsm.services.metrics import Metrics, MetricsServer
from keyquorum.hsm.services.server import Registration, create_server, settle_heap
from keyquorum.hsm.stores.base import Store
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.checkpoint import parse_verifier_key
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.v1 import audit_pb2_grpc as apb_grpc

log = logging.getLogger("keyquorum.server")

STORE_FILE = "keyquorum.sqlite"
#: AuditService streams served at once on the mTLS listener; each holds one
#: worker thread for its whole length (module docstring).
AUDIT_STREAMS = 1
#: The mTLS listener's pool: KeyService's measured best. Exports are rare and
#: capped, so KeyService always has MTLS_WORKERS - AUDIT_STREAMS threads, which
#: serve Wraps as fast as MTLS_WORKERS do (docs/adr/0002).
MTLS_WORKERS = key_service.SERVER_WORKERS


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidInputError(f"--listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def _write_ready_file(
    path: Path, port: int, mtls_port: int | None = None, metrics_port: int | None = None
) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    info = {"port": port, "pid": os.getpid()}
    if mtls_port is not None:
        info["mtls_port"] = mtls_port
    if metrics_port is not None:
        info["metrics_port"] = metrics_port
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def _open_store(kind: str, dsn: str | None, data_dir: Path) -> Store:
    """The store `--store` names; each refuses unsafe durability settings at open."""
    if kind == "postgres":
        if not dsn:
            raise InvalidInputError("--store postgres needs --dsn (or the env KEYQUORUM_DSN)")
        return PostgresStore.open(dsn)
    if dsn:
        raise InvalidInputError("--dsn is for --store postgres")
    return SqliteStore.open(data_dir / STORE_FILE)


def mtls_server(
    daemon: Daemon,
    plane: DataPlane,
    audit_log: audit_service.AuditLog,
    *,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials,
) -> tuple[grpc.Server, int]:
    """The mTLS listener (not yet started): KeyService and capped AuditService on MTLS_WORKERS."""

    def register_audit(server: grpc.Server) -> None:
        apb_grpc.add_AuditServiceServicer_to_server(
            audit_service.AuditServicer(audit_log, max_streams=AUDIT_STREAMS), server
        )

    register: list[Registration] = [register_audit, key_service.register(plane)]
    mtls_health = health.HealthServicer()
    server, bound = create_server(
        host=host,
        port=port,
        credentials=credentials,
        limits=DEFAULT_LIMITS,
        register=register,
        service_names=[audit_service.SERVICE_NAME, key_service.SERVICE_NAME],
        health_servicer=mtls_health,
        max_workers=MTLS_WORKERS,
    )
    key_service.watch_health(daemon, mtls_health)
    return server, bound


@click.group()
def server() -> None:
    """Run the key-custody daemon."""


@server.command("run")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the SQLite store and the log signing key.",
)
@click.option("--listen", default="127.0.0.1:7443", show_default=True, help="HOST:PORT.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--client-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CA for backend and auditor client certificates (required on --listen-mtls).",
)
@click.option(
    "--listen-mtls",
    help="HOST:PORT of a second listener that requires client certificates "
    "(backends: KeyService; auditors: AuditService).",
)
@click.option(
    "--metrics-listen",
    help="HOST:PORT serving Prometheus metrics over plain HTTP (a port of its own).",
)
@click.option(
    "--access-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append one JSON line per KeyService item here (no context, no key material).",
)
@click.option(
    "--rate-limit",
    type=click.FloatRange(min=0, min_open=True),
    help="KeyService items per second per backend (bucket of one second); default: none.",
)
@click.option(
    "--auditor-key",
    multiple=True,
    help="A C2SP cosignature verifier key whose cosignatures AuditService accepts "
    "(operator-trusted list, not a quorum decision); repeatable.",
)
@click.option(
    "--insecure-dev-plaintext",
    is_flag=True,
    help="Serve plaintext gRPC; only on a loopback address, for development.",
)
@click.option("--replica", default=socket.gethostname(), show_default=True, help="Replica name.")
@click.option(
    "--store",
    "store_kind",
    type=click.Choice(["sqlite", "postgres"]),
    default="sqlite",
    show_default=True,
    help="sqlite: one file in --data-dir (one replica); postgres: a database several "
    "replicas share (--dsn). See docs/replicas.md.",
)
@click.option(
    "--dsn",
    envvar="KEYQUORUM_DSN",
    help="PostgreSQL connection string for --store postgres (libpq DSN or URI). Prefer the "
    "environment variable KEYQUORUM_DSN, so that a password is not on the command line.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write {port, pid} as JSON here once serving (for scripts and tests).",
)
@click.option("--log-level", default="INFO", show_default=True)
def run(
    data_dir: Path,
    listen: str,
    tls_cert: Path | None,
    tls_key: Path | None,
    client_ca: Path | None,
    listen_mtls: str | None,
    metrics_listen: str | None,
    access_log: Path | None,
    rate_limit: float | None,
    auditor_key: tuple[str, ...],
    insecure_dev_plaintext: bool,
    replica: str,
    store_kind: str,
    dsn: str | None,
    ready_file: Path | None,
    log_level: str,
) -> None:
    """Start the daemon: verify the log, start sealed, serve gRPC.

    \b
    Example:
      keyquorum server run --data-dir /var/lib/keyquorum \\
          --listen 0.0.0.0:7443 --tls-cert server.pem --tls-key server.key
    """
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    host, port = _split_listen(listen)
    if insecure_dev_plaintext:
        if tls_cert is not None or tls_key is not None:
            raise InvalidInputError(
                "--insecure-dev-plaintext serves without TLS: drop --tls-cert and --tls-key, "
                "or drop the flag"
            )
        client_tls.check_plaintext_allowed(host, allow_insecure_dev=True)
        credentials = None
        log.warning("serving PLAINTEXT gRPC on %s (development only)", listen)
    else:
        if tls_cert is None or tls_key is None:
            raise InvalidInputError(
                "TLS is on by default: give --tls-cert and --tls-key "
                "(or --insecure-dev-plaintext on loopback)"
            )
        credentials = tls.server_credentials(tls_cert, tls_key)
    # gRPC has no optional client certificate: mTLS clients get a port of their own.
    mtls_credentials = None
    if listen_mtls is not None:
        if tls_cert is None or tls_key is None or client_ca is None:
            raise InvalidInputError("--listen-mtls needs --tls-cert, --tls-key and --client-ca")
        mtls_credentials = tls.server_credentials(
            tls_cert, tls_key, client_ca=client_ca, require_client_auth=True
        )
    elif client_ca is not None:
        raise InvalidInputError("--client-ca is for the --listen-mtls listener: give both")
    if listen_mtls is None and (access_log is not None or rate_limit is not None):
        raise InvalidInputError(
            "--access-log and --rate-limit are for KeyService: give --listen-mtls too"
        )
    auditor_keys = [parse_verifier_key(k) for k in auditor_key]
    if not hardening.refuse_core_dumps():
        log.warning("could not make the process non-dumpable; core dumps may hold keys")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = _open_store(store_kind, dsn, data_dir)
    log.info("store: %r", store)
    daemon = Daemon(
        store,
        data_dir=data_dir,
        replica=replica,
        limits=DEFAULT_LIMITS,
        clock=lambda: int(time.time()),
    )
    grpc_server, bound = create_server(
        host=host,
        port=port,
        credentials=credentials,
        limits=DEFAULT_LIMITS,
        register=[custodian_service.register(daemon)],
        service_names=[custodian_service.SERVICE_NAME],
    )
    servers = [grpc_server]
    mtls_bound: int | None = None
    usage: list[UsageSink] = []
    closing: list[Callable[[], None]] = []
    metrics_server: MetricsServer | None = None
    if metrics_listen is not None:
        metrics = Metrics()
        daemon.add_seal_observer(metrics.set_sealed)
        usage.append(metrics)
        metrics_server = metrics.serve(*_split_listen(metrics_listen))
        closing.append(metrics_server.close)
    if listen_mtls is not None:
        mtls_host, mtls_port = _split_listen(listen_mtls)
        audit_log = audit_service.AuditLog(store, auditor_keys)
        if access_log is not None:
            access = AccessLog.in_data_dir(access_log, data_dir)
            usage.append(access)
            closing.append(access.close)
        plane = DataPlane(
            daemon,
            store,
            usage=usage,
            rate_limit=None if rate_limit is None else RateLimiter(rate_limit),
        )
        assert mtls_credentials is not None
        listener, mtls_bound = mtls_server(
            daemon, plane, audit_log, host=mtls_host, port=mtls_port, credentials=mtls_credentials
        )
        servers.append(listener)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: sealing and stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for s in servers:
        s.start()
    log.info("start-up objects frozen for the garbage collector: %d", settle_heap())
    if mtls_bound is not None:
        log.info(
            "mTLS listener (client certificates required) on port %d: KeyService, AuditService "
            "(%d threads, at most %d audit streams)",
            mtls_bound,
            MTLS_WORKERS,
            AUDIT_STREAMS,
        )
    if metrics_server is not None:
        log.info("Prometheus metrics on port %d (plain HTTP)", metrics_server.port)
    log.info(
        "listening on %s:%d (%s), replica %s, %s",
        host,
        bound,
        "plaintext" if credentials is None else "TLS",
        replica,
        "initialised, sealed" if daemon.state.initialized else "awaiting ceremony",
    )
    if ready_file is not None:
        _write_ready_file(
            ready_file,
            bound,
            mtls_bound,
            None if metrics_server is None else metrics_server.port,
        )
    stopping.wait()
    # Seal first, so no call served during the grace period gets a key.
    daemon.seal_for_shutdown()
    for s in servers:
        s.stop(grace=2).wait()
    for close in closing:
        close()
    store.close()
    log.info("stopped")
