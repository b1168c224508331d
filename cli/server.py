"""`keyquorum server run` and `server check-config`: the daemon process.

Start-up, in order: settings (flags over the `--config` file, cli/server_config.py,
checked as a whole); the log format and the stderr relay (hsm/logs.py,
hsm/stderr_relay.py); TLS files; no core dumps; the data directory's lock
(hsm/datadir.py); the store; the daemon (replays and verifies the log);
the listeners; then READY to systemd (hsm/sdnotify.py) and the ready
file. Any failure up to there is one line on stderr, `error: ...`, and
exit 1 (a bad flag: exit 2). SIGTERM or SIGINT: STOPPING to systemd, seal
(the keys are wiped before anything else), stop the listeners, close.
SIGHUP: new TLS files, the access log reopened, the reloadable settings
re-read (cli/server_reload.py); never a seal.

The listeners (docs/adr/0009): the custodian port (TLS, peers known by
address; Seal and GetStatus with lanes of their own) and the mTLS port
(peers known by their client certificate's SHA-256): KeyService, in this
process or in `--workers` processes, and AuditService
(hsm/services/backend_plane.py). Every bound a client can reach is in the
`Limits` the settings make (cli/server_config.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click

from keyquorum.cli import server_config
from keyquorum.cli.server_config import ServerConfig, split_address
from keyquorum.cli.server_reload import Reloadable, Reloader
from keyquorum.hsm import hardening, logs, tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.ceremony import CeremonyGate
from keyquorum.hsm.datadir import DataDirectory
from keyquorum.hsm.sdnotify import Notifier
from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.access_log import AccessLog
from keyquorum.hsm.services.admission import AddressPeers
from keyquorum.hsm.services.backend_plane import BackendPlane, BackendSettings, Sink
from keyquorum.hsm.services.handover import ChannelClosed
from keyquorum.hsm.services.metrics import Metrics
from keyquorum.hsm.services.metrics_http import MetricsServer
from keyquorum.hsm.services.server import Listener, create_server, settle_heap
from keyquorum.hsm.services.workers import StoreSpec
from keyquorum.hsm.stderr_relay import StderrRelay
from keyquorum.hsm.stores import sqlite
from keyquorum.hsm.stores.base import Store
from keyquorum.hsm.stores.observed import ObservedStore
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.hsm.upgrade import Handing, Taking, lock_when_free
from keyquorum.quorum.errors import KeyquorumError, StorageError

log = logging.getLogger("keyquorum.server")

#: How often the main thread wakes to run a signal handler another thread received.
SIGNAL_POLL_SECONDS = 0.25


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


def _open_store(config: ServerConfig, data_dir: DataDirectory | None) -> Store:
    """The store `--store` names; each refuses unsafe durability settings at open.

    `data_dir` None: a successor taking over (hsm/upgrade.py), whose
    predecessor holds the lock; the store exists then.
    """
    if config.store == "postgres":
        assert config.dsn is not None  # ServerConfig.check
        return PostgresStore.open(config.dsn)
    if data_dir is None:
        return SqliteStore.in_directory(config.data_dir, create=False)
    data_dir.require_store(sqlite.FILE_NAME)
    return SqliteStore.in_directory(data_dir.path)


def _store_spec(config: ServerConfig) -> StoreSpec:
    """Where worker processes open their own store connection (counters only)."""
    if config.store == "postgres":
        return StoreSpec("postgres", dsn=config.dsn or "")
    return StoreSpec("sqlite", path=str(config.data_dir / sqlite.FILE_NAME))


def _ignore(_value: object) -> None:
    """Drop a result nobody needs."""


def _stop(listener: Listener) -> None:
    """Stop a listener, its calls in flight given 2 s."""
    listener.stop(grace=2).wait()


def _health(daemon: Daemon) -> Callable[[], tuple[int, str]]:
    """The metrics port's /health: 200 only while this replica can serve keys."""

    def check() -> tuple[int, str]:
        if not daemon.initialized:
            return 503, "not initialised"
        return (503, "sealed") if daemon.sealed else (200, "unsealed")

    return check


def _certificates(config: ServerConfig) -> tls.ServerCertificates | None:
    """The custodian port's certificates (None: plaintext); a bad file is named now.

    The mTLS port's are read by its listeners (this process's, or the
    workers': hsm/services/backend_plane.py); they are checked here too.
    """
    if config.listen_mtls is not None:
        assert config.tls_cert is not None  # check()
        assert config.tls_key is not None
        tls.read_files(config.tls_cert, config.tls_key, config.client_ca)
    if config.insecure_dev_plaintext:
        return None
    assert config.tls_cert is not None  # check()
    assert config.tls_key is not None
    return tls.ServerCertificates.from_files(config.tls_cert, config.tls_key)


def serve(
    config: ServerConfig,
    notifier: Notifier,
    settings: Callable[[], ServerConfig] | None = None,
    stderr_fd: int = 2,
) -> None:
    """Run the daemon until SIGTERM or SIGINT; start-up failures raise KeyquorumError.

    `settings` reads the settings again (the flags as given, the file anew)
    for a SIGHUP (cli/server_reload.py); without it, SIGHUP re-reads `config`'s
    files only.
    """
    certificates = _certificates(config)
    if certificates is None:
        log.warning("serving PLAINTEXT gRPC on %s (development only)", config.listen)
    if not hardening.refuse_core_dumps():
        log.warning("could not make the process non-dumpable; core dumps may hold keys")
    closing: list[Callable[[], None]] = []
    try:
        taking = Taking.from_environment()
        if taking is None:
            data_dir = DataDirectory.lock(config.data_dir)
            closing.append(data_dir.release)
            log.info("data directory %s locked (pid %d)", data_dir.path, os.getpid())
            store = _open_store(config, data_dir)
        else:
            log.warning("started to take over a running daemon (SIGUSR2): ports %s", taking.ports)
            store = _open_store(config, None)
        closing.append(store.close)
        log.info("store: %r", store)
        metrics: Metrics | None = None
        served_store: Store = store
        if config.metrics_listen is not None:
            metrics = Metrics()
            served_store = ObservedStore(store, metrics)
        limits = config.limits()
        gate = (
            CeremonyGate(roster=config.ceremony_roster)
            if config.ceremony_roster
            else CeremonyGate.with_new_code(os.urandom)
        )
        daemon = Daemon(
            served_store,
            data_dir=config.data_dir,
            replica=config.replica,
            limits=limits,
            clock=lambda: int(time.time()),
            ceremony=gate,
        )
        if not daemon.initialized and gate.code is not None:
            # For whoever runs the ceremony: read it from the daemon's log.
            log.warning("one-time ceremony code: %s", gate.code)
        # A successor appends nothing until it holds the data directory's lock: it
        # holds its governance lock till then, and if it fails it only wipes keys.
        shutdown: list[Callable[[], None]] = [daemon.seal_for_shutdown]
        closing.append(lambda: shutdown[0]())  # noqa: PLW0108 (read at close)
        if taking is not None:
            governance = daemon.governance_lock()
            governance.acquire()  # type: ignore[attr-defined]
            shutdown[0] = lambda: _ignore(daemon.custody_for_handover().seal())
            taking.take(daemon)  # before any listener: no call finds it sealed
        host, port = split_address(config.listen)
        if taking is not None:
            port = taking.ports["listen"]

        def custodian_listener(at: int) -> tuple[Listener, int]:
            return create_server(
                host=host,
                port=at,
                credentials=None if certificates is None else certificates.credentials(),
                limits=limits,
                register=[custodian_service.register(daemon, limits)],
                service_names=[custodian_service.SERVICE_NAME],
                peers=AddressPeers(),
                observe=None if metrics is None else metrics.rpc.observe,
                # A successor binds the same port during a handover (hsm/upgrade.py).
                reuse_port=True,
            )

        grpc_server, bound = custodian_listener(port)
        listeners = [grpc_server]
        closing.append(lambda: _stop(listeners[0]))
        usage: list[Sink] = []
        metrics_server: MetricsServer | None = None
        if metrics is not None and config.metrics_listen is not None:
            metrics.watch(daemon, store)
            usage.append(metrics)
            metrics_host, metrics_port = split_address(config.metrics_listen)
            if taking is not None:
                metrics_port = taking.ports.get("metrics", metrics_port)
            metrics_server = metrics.serve(metrics_host, metrics_port, health=_health(daemon))
            closing.append(metrics_server.close)
        backend: BackendPlane | None = None
        access: AccessLog | None = None
        if config.listen_mtls is not None:
            assert config.tls_cert is not None  # check()
            assert config.tls_key is not None
            assert config.client_ca is not None
            if config.access_log is not None:
                access = AccessLog.in_data_dir(config.access_log, config.data_dir)
                usage.append(access)
                closing.append(access.close)
            mtls_host, mtls_port = split_address(config.listen_mtls)
            if taking is not None:
                mtls_port = taking.ports.get("mtls", mtls_port)
            backend = BackendPlane(
                daemon,
                store,
                BackendSettings(
                    host=mtls_host,
                    port=mtls_port,
                    cert=config.tls_cert,
                    key=config.tls_key,
                    client_ca=config.client_ca,
                    limits=limits,
                    store=_store_spec(config),
                    workers=config.worker_count(),
                    rate_limit=config.rate_limit,
                    usage=usage,
                    observe=None if metrics is None else metrics.rpc.observe,
                    log_level=config.log_level,
                    log_format=config.log_format,
                ),
            )
            closing.append(backend.close)
        reloader = Reloader(
            settings or (lambda: config), config, Reloadable(certificates, backend, access)
        )

        def took_over() -> None:
            """A successor serving: wait for the predecessor to go, lock, log the handover."""
            assert taking is not None
            taking.serving()
            taking.wait_done()
            locked = lock_when_free(lambda: DataDirectory.lock(config.data_dir))
            closing.append(locked.release)
            log.info("data directory %s locked (pid %d)", locked.path, os.getpid())
            shutdown[0] = daemon.seal_for_shutdown
            try:
                if taking.handed_keys and taking.predecessor is not None:
                    seq = daemon.record_handover(*taking.predecessor)
                    log.warning("handover logged at entry %d", seq)
            finally:
                daemon.governance_lock().release()  # type: ignore[attr-defined]

        def hand_over() -> bool:
            """SIGUSR2: start the successor and hand it the unsealed state (hsm/upgrade.py)."""
            if daemon.sealed:
                log.error("handover (SIGUSR2) refused: the daemon is sealed (restart it instead)")
                return False
            # The custodian listener first: a seal in flight finishes and logs its entry
            # (under the governance lock, not held yet); none reaches this process after.
            listeners[0].stop(grace=2).wait(10)
            governance = daemon.governance_lock()
            governance.acquire()  # type: ignore[attr-defined]
            if daemon.custody_for_handover().sealed:
                # A seal raced the signal: nothing is handed over, and the lock goes back
                # so that the seal's entry is written if it is not yet.
                log.error("handover (SIGUSR2) refused: a custodian sealed the daemon meanwhile")
                listeners[0], _ = custodian_listener(bound)
                listeners[0].start()
                governance.release()  # type: ignore[attr-defined]
                return False
            ports = {"listen": bound}
            if backend is not None:
                ports["mtls"] = backend.port
            if metrics_server is not None:
                ports["metrics"] = metrics_server.port
            handing = Handing(daemon, ports, stderr_fd)
            try:
                pid = handing.run()
            except (KeyquorumError, OSError, ChannelClosed) as e:
                log.error("handover (SIGUSR2) failed, still serving: %s", e)
                listeners[0], _ = custodian_listener(bound)
                listeners[0].start()
                governance.release()  # type: ignore[attr-defined]
                return False
            if backend is not None:
                backend.hand_over()  # open calls finish; new ones go to the successor
            if metrics_server is not None:
                metrics_server.close()
            handing.finish()
            notifier.notify(f"MAINPID={pid}", "STATUS=handed over to the new process")
            log.warning("handed over to pid %d: keys wiped, exiting", pid)
            return True

        _run(
            config,
            notifier,
            daemon,
            grpc_server,
            bound,
            backend,
            metrics_server,
            reloader,
            on_serving=None if taking is None else took_over,
            hand_over=hand_over,
        )
    finally:
        for close in reversed(closing):
            close()
    log.info("stopped")


def _run(
    config: ServerConfig,
    notifier: Notifier,
    daemon: Daemon,
    custodian_listener: Listener,
    bound: int,
    backend: BackendPlane | None,
    metrics_server: MetricsServer | None,
    reloader: Reloader,
    *,
    on_serving: Callable[[], None] | None = None,
    hand_over: Callable[[], bool] | None = None,
) -> None:
    """Serve until a stop signal; seal first, then stop the listeners. SIGHUP reloads;
    SIGUSR2 hands over to a successor (the process then exits without a seal entry)."""
    wake = threading.Event()
    asked = {"stop": False, "reload": False, "handover": False}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: sealing and stopping", signum)
        asked["stop"] = True
        wake.set()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        asked["reload"] = True
        wake.set()

    def on_usr2(_signum: int, _frame: FrameType | None) -> None:
        asked["handover"] = True
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    signal.signal(signal.SIGUSR2, on_usr2)

    custodian_listener.start()
    if on_serving is not None:
        on_serving()
    log.info("start-up objects frozen for the garbage collector: %d", settle_heap())
    if backend is not None:
        log.info(
            "mTLS listener (client certificates required) on port %d: KeyService (%s), "
            "AuditService",
            backend.port,
            f"{backend.workers} worker processes" if backend.workers else "this process",
        )
    if metrics_server is not None:
        log.info("Prometheus metrics and /health on port %d (plain HTTP)", metrics_server.port)
    state = (
        ("initialised, sealed" if daemon.sealed else "initialised, unsealed")
        if daemon.state.initialized
        else "awaiting ceremony"
    )
    log.info(
        "listening on %s (port %d, %s), replica %s, %s",
        config.listen,
        bound,
        "plaintext" if config.insecure_dev_plaintext else "TLS",
        config.replica,
        state,
    )
    notifier.notify("READY=1", f"STATUS={state}, serving on port {bound}")

    def report_seal_state(sealed: bool) -> None:
        notifier.notify(f"STATUS={'sealed' if sealed else 'unsealed'}, serving on port {bound}")

    daemon.add_seal_observer(report_seal_state)
    if config.ready_file is not None:
        _write_ready_file(
            config.ready_file,
            bound,
            None if backend is None else backend.port,
            None if metrics_server is None else metrics_server.port,
        )
    # A timed wait, not a plain one: the kernel may deliver SIGTERM to any of
    # the process's threads (gRPC's among them); Python then runs the handler
    # only when the main thread next runs bytecode, which a lock wait without
    # a timeout never gives it.
    # Handlers run on this thread only, between its bytecodes: the flags need no lock.
    while not asked["stop"]:
        wake.wait(timeout=SIGNAL_POLL_SECONDS)
        wake.clear()
        if asked["reload"] and not asked["stop"]:
            asked["reload"] = False
            notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
            reloader.reload()
            notifier.notify("READY=1")
        if asked["handover"] and not asked["stop"]:
            asked["handover"] = False
            if hand_over is not None and hand_over():
                # Keys wiped, listeners and workers stopped: no seal entry (the
                # successor is unsealed); the lock goes with the process.
                logging.shutdown()
                os._exit(0)
    notifier.notify("STOPPING=1", "STATUS=sealing and stopping")
    # Seal first (the workers too, before it returns), so no call served during
    # the grace period gets a key; the listeners and workers stop as `serve` closes.
    daemon.seal_for_shutdown()


@click.group()
def server() -> None:
    """Run the key-custody daemon."""


@server.command("run", cls=server_config.OneLineCommand)
@server_config.options
def run(**_flags: Any) -> None:
    """Start the daemon: verify the log, start sealed, serve gRPC.

    Settings come from flags and from a TOML file (--config); a flag wins
    over the file. Each flag is also a key of the file, named as the flag
    without its dashes (--data-dir: data-dir = "/var/lib/keyquorum").
    Check a file with `keyquorum server check-config`.

    \b
    Example:
      keyquorum server run --data-dir /var/lib/keyquorum \\
          --listen 0.0.0.0:7443 --tls-cert server.pem --tls-key server.key
      keyquorum server run --config /etc/keyquorum/server.toml
    """
    settings = server_config.rereader(click.get_current_context())
    config = settings()
    config.check()
    notifier = Notifier.from_environment()
    relay: StderrRelay | None = None
    try:
        relay = StderrRelay.start(config.log_format)
    except OSError as e:
        logs.configure(config.log_level, config.log_format, sys.stderr)
        log.warning("gRPC's own lines stay unformatted: no stderr relay (%s)", e)
    else:
        logs.configure(config.log_level, config.log_format, relay.original)
    try:
        serve(
            config,
            notifier,
            settings,
            stderr_fd=(relay.original if relay is not None else sys.stderr).fileno(),
        )
    except OSError as e:
        # A file or directory the settings name, refused by the system at start-up;
        # a KeyquorumError goes up as it is. Either is one line once the relay is off.
        name = f" {e.filename}" if e.filename else ""
        raise StorageError(f"cannot start:{name} {e.strerror or e}") from None
    finally:
        logging.shutdown()
        if relay is not None:
            relay.stop()


@server.command("check-config", cls=server_config.OneLineCommand)
@server_config.options
def check_config(**_flags: Any) -> None:
    """Check the settings `server run` would start with, and print them.

    Reads the same flags and --config file as `server run` and refuses what
    it would refuse at start-up before serving: unknown keys, wrong types,
    unreadable files, TLS files that do not load or do not match, settings
    that do not go together. Nothing is bound, locked or written. The
    database connection string is never printed.

    \b
    Example:
      keyquorum server check-config --config /etc/keyquorum/server.toml
    """
    config = server_config.from_click(click.get_current_context())
    config.check()
    _certificates(config)
    if config.data_dir.exists() and not config.data_dir.is_dir():
        raise StorageError(f"the data directory {config.data_dir} is not a directory")
    for line in config.describe():
        click.echo(line)
    click.echo("configuration OK")
