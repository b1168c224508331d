"""A worker process of `server run --workers N`: KeyService on the shared mTLS port.

Started by the daemon (hsm/services/workers.py) as `python -m
keyquorum.hsm.services.worker FD PARENT_PID`, with one end of a socketpair
as FD (hsm/services/handover.py). Before anything else it asks to be killed
with its parent (PR_SET_PDEATHSIG) and makes itself non-dumpable with no
core files (hsm/hardening.py); it refuses to run if either fails. Then:

1. it reads its configuration from the channel: listen address, limits, the
   TLS certificate, key and client CA (PEM), where the store is, the usage
   and rate-limit settings, where the daemon's audit plane listens;
2. it opens its own store connection, for encryption counters only
   (`Store.reserve_block`, atomic across processes: the SP 800-38D bound
   holds over every worker);
3. it applies each snapshot frame: rebuilds the `DataPlaneSnapshot` with its
   own copy of each held key version and a prepared cipher per key, swaps it
   in, then closes and zeroes the keys the daemon no longer holds, and only
   then acknowledges (the daemon answers a seal after every worker did);
4. after the first snapshot it binds the mTLS port (SO_REUSEPORT) and serves
   KeyService with the same code as the daemon (hsm/services/key_service.py)
   over its own snapshot, health, reflection, and AuditService, whose every
   call it forwards to the daemon's audit plane over a Unix socket in a
   private directory, with the verified client certificate and a secret
   token the daemon gave it (the audit plane stays in the daemon);
5. its usage records (metrics, access log) go to the daemon in batches;
6. a `reload` frame (the daemon's SIGHUP) brings a new certificate chain,
   key and client CA, which new connections get (`tls.ServerCertificates`;
   open ones keep theirs), and the log level.

On a `stop` frame, or when the channel closes, it wipes every key and
exits. Stopped by SIGKILL at any time, it leaves nothing behind that a
replacement would reuse: counters skip what it reserved.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, Final

import grpc
from grpc import aio

from keyquorum.hsm import hardening, logs, tls
from keyquorum.hsm.dataplane import DataPlane
from keyquorum.hsm.dataplane.snapshot import EMPTY_SNAPSHOT, DataPlaneSnapshot
from keyquorum.hsm.services import audit_service, key_service
from keyquorum.hsm.services.admission import (
    Admission,
    Call,
    CertificatePeers,
    ForwardedPeers,
    Method,
    ServerStream,
    Unary,
    service,
)
from keyquorum.hsm.services.handover import Channel, ChannelClosed, SnapshotReader
from keyquorum.hsm.services.server import Registration, create_server
from keyquorum.hsm.services.shared_counts import SharedCounts, SharedRateLimiter
from keyquorum.hsm.services.status import code_for
from keyquorum.hsm.stores.base import Store
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.limits import Limits

log = logging.getLogger("keyquorum.worker")

#: How often a worker sends its usage records to the daemon.
USAGE_FLUSH_SECONDS: Final = 0.1
#: AuditService's methods, and whether each streams its answers.
AUDIT_METHODS: Final = {
    "GetCheckpoint": False,
    "ListCheckpoints": True,
    "GetEntries": True,
    "GetInclusionProof": False,
    "GetConsistencyProof": False,
    "AddCosignature": False,
}


class UsageForwarder:
    """Batches usage records and calls' RPC metrics for the daemon (its sinks have them)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._records: list[list[Any]] = []
        self._calls: list[list[Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="kq-usage", daemon=True)
        self._thread.start()

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        outcome = "OK" if error is None else code_for(error).name
        text = None if context is None else context.decode("utf-8", "surrogateescape")
        with self._lock:
            self._records.append([backend, tenant, operation, outcome, text])

    def observe(self, method: str, code: str, seconds: float) -> None:
        """The listener's observer: one call's method, code and seconds."""
        with self._lock:
            self._calls.append([method, code, seconds])

    def _flush_loop(self) -> None:
        while not self._stop.wait(USAGE_FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        with self._lock:
            records, self._records = self._records, []
            calls, self._calls = self._calls, []
        if records or calls:
            try:
                self._channel.send({"kind": "usage", "records": records, "calls": calls})
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self.flush()


class Worker:
    """One worker: its snapshot, its data plane, its listener (see the module docstring)."""

    def __init__(self, channel: Channel, config: Mapping[str, Any], files: list[bytearray]) -> None:
        self._channel = channel
        self._limits = Limits(**config["limits"])
        self._snapshot: DataPlaneSnapshot = EMPTY_SNAPSHOT
        #: The daemon's time when it sent the last snapshot (its clock never runs back
        #: before the log's last entry; ours follows it).
        self._floor = 0
        self._reader = SnapshotReader(self._limits)
        chain, key, ca, token, dsn = (bytes(f) for f in files)
        for buffer in files:
            buffer[:] = bytes(len(buffer))
        self._store = _open_store(config["store"], dsn.decode())
        self._usage = UsageForwarder(channel) if config["usage"] or config.get("observe") else None
        shared = config["counts"]
        self._counts = SharedCounts(
            int(shared["fd"]),
            int(shared["columns"]),
            int(shared["column"]),
            bytes.fromhex(shared["key"]),
        )
        rate = config["rate_limit"]
        self.plane = DataPlane(
            self,
            self._store,
            limits=self._limits,
            usage=() if self._usage is None or not config["usage"] else (self._usage,),
            rate_limit=None if rate is None else SharedRateLimiter(self._counts, rate),
        )
        #: A handover drained this worker: its listener stops with a grace (`_shutdown`).
        self._drained = False
        self._certificates = tls.ServerCertificates(chain, key, ca, require_client_auth=True)
        credentials = self._certificates.credentials()
        register = [key_service.register(self.plane)]
        if config["audit_socket"] is not None:
            register.append(_audit_forwarder(config["audit_socket"], token))
        self._listener, self.port = create_server(
            host=config["host"],
            port=config["port"],
            credentials=credentials,
            limits=self._limits,
            register=register,
            service_names=[audit_service.SERVICE_NAME, key_service.SERVICE_NAME],
            peers=CertificatePeers(),
            reuse_port=True,
            shared=self._counts,
            observe=None
            if self._usage is None or not config.get("observe")
            else self._usage.observe,
        )
        self._listener.set_health(key_service.SERVICE_NAME, False)

    # -- SnapshotSource -------------------------------------------------------

    def data_plane_snapshot(self) -> DataPlaneSnapshot:
        return self._snapshot

    def now(self) -> int:
        """The wall clock, never before the daemon's time at its last snapshot."""
        return max(int(time.time()), self._floor)

    # -- the channel -------------------------------------------------------------

    def run(self) -> int:
        """Apply frames until `stop` or the channel closes; then wipe and stop."""
        serving = False
        try:
            self._channel.send(
                {
                    "kind": "hello",
                    "pid": os.getpid(),
                    "non_dumpable": hardening.is_non_dumpable(),
                    "parent_death_signal": hardening.parent_death_signal(),
                }
            )
            while True:
                header, attachments = self._channel.receive()
                kind = header.get("kind")
                if kind == "stop":
                    return 0
                if kind == "reload":
                    self._reload(header, attachments)
                    continue
                if kind == "drain":
                    self._drain(float(header.get("seconds", 2.0)))
                    continue
                if kind != "snapshot":
                    log.error("unknown frame %r from the daemon; stopping", kind)
                    return 1
                applied = self._reader.apply(header, attachments)
                self._floor = max(self._floor, int(header.get("now", 0)))
                self._snapshot = applied.snapshot
                self._reader.wipe_dropped(header["drop"])
                self._listener.set_health(key_service.SERVICE_NAME, not applied.snapshot.sealed)
                self._channel.send({"kind": "ack", "seq": applied.seq})
                if not serving:
                    self._listener.start()
                    serving = True
                    self._channel.send({"kind": "serving", "port": self.port})
        except ChannelClosed:
            return 0
        finally:
            self._shutdown()

    def _drain(self, seconds: float) -> None:
        """No new call (UNAVAILABLE: clients retry elsewhere); the open ones get `seconds`."""
        admission = self._listener.admission
        admission.drain()
        self._drained = True
        deadline = time.monotonic() + max(0.0, min(seconds, 30.0))
        while admission.open_calls and time.monotonic() < deadline:
            time.sleep(0.005)
        self._channel.send({"kind": "drained", "open": admission.open_calls})

    def _reload(self, header: Mapping[str, Any], files: list[bytearray]) -> None:
        """New TLS files for new connections, and the log level; a bad one changes nothing."""
        if len(files) != 3:
            log.error("a reload frame without its three TLS files; ignored")
            return
        chain, key, ca = (bytes(f) for f in files)
        for buffer in files:
            buffer[:] = bytes(len(buffer))
        try:
            self._certificates.replace(chain, key, ca)
            level = header.get("log_level")
            if isinstance(level, str):
                logging.getLogger().setLevel(level)
        except (KeyquorumError, ValueError) as e:
            log.error("reload refused, serving the previous certificate: %s", e)
            return
        log.info("reloaded: serving certificate %s", self._certificates.leaf_sha256[:16])

    def _shutdown(self) -> None:
        self._snapshot = EMPTY_SNAPSHOT
        self._reader.wipe_all()
        if self._usage is not None:
            self._usage.close()
        # Drained (a handover): calls still reading their request get a second to be
        # answered UNAVAILABLE, which clients retry on the successor; never CANCELLED.
        self._listener.stop(grace=1.0 if self._drained else None).wait(5)
        self._store.close()

    def __repr__(self) -> str:
        return f"<Worker pid {os.getpid()}: {self._reader!r}>"


def _open_store(spec: Mapping[str, Any], dsn: str) -> Store:
    if spec["kind"] == "postgres":
        from keyquorum.hsm.stores.postgres import PostgresStore

        return PostgresStore.open(dsn, min_connections=1, max_connections=2)
    from keyquorum.hsm.stores.sqlite import SqliteStore

    return SqliteStore.open(spec["path"])


def _audit_forwarder(path: str, token: bytes) -> Registration:
    """AuditService, each call forwarded to the daemon's audit plane (module docstring)."""

    def build(admission: Admission) -> grpc.GenericRpcHandler[Any, Any]:
        channel = aio.insecure_channel(f"unix:{path}")
        methods: dict[str, Method] = {}
        for name, streaming in AUDIT_METHODS.items():
            route = f"/{audit_service.SERVICE_NAME}/{name}"
            if streaming:
                methods[name] = ServerStream(_streamed(channel, route, token), _raw, _raw)
            else:
                methods[name] = Unary(_unary(channel, route, token), _raw, _raw)
        return service(admission, audit_service.SERVICE_NAME, methods)

    return Registration(build)


def _raw(data: bytes) -> bytes:
    return data


def _metadata(call: Call, token: bytes) -> tuple[tuple[str, bytes], ...]:
    der = tls.peer_certificate(call.context.auth_context())
    forwarded = [(ForwardedPeers.TOKEN, token)]
    if der is not None:
        forwarded.append((ForwardedPeers.CERTIFICATE, der))
    return tuple(forwarded)


def _unary(channel: aio.Channel, route: str, token: bytes) -> Any:
    method = channel.unary_unary(route, request_serializer=None, response_deserializer=None)

    async def forward(request: bytes, call: Call) -> bytes:
        try:
            answer: bytes = await method(
                request, metadata=_metadata(call, token), timeout=call.context.time_remaining()
            )
        except aio.AioRpcError as e:
            await call.context.abort(e.code(), e.details() or "")
        return answer

    return forward


def _streamed(channel: aio.Channel, route: str, token: bytes) -> Any:
    method = channel.unary_stream(route, request_serializer=None, response_deserializer=None)

    async def forward(request: bytes, call: Call) -> Any:
        stream = method(
            request, metadata=_metadata(call, token), timeout=call.context.time_remaining()
        )
        try:
            async for answer in stream:
                yield answer
        except aio.AioRpcError as e:
            await call.context.abort(e.code(), e.details() or "")

    return forward


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    if len(argv) != 3:
        log.error("usage: python -m keyquorum.hsm.services.worker FD PARENT_PID")
        return 2
    fd, parent = int(argv[1]), int(argv[2])
    if not hardening.die_with_parent(parent):
        log.error("cannot arrange to die with the daemon (pid %d), or it is gone", parent)
        return 2
    if not hardening.refuse_core_dumps():
        log.error("cannot make this process non-dumpable: a worker never runs dumpable")
        return 2
    channel = Channel(socket.socket(fileno=fd))
    try:
        header, files = channel.receive()
        if header.get("kind") != "config" or len(files) != 5:
            log.error("the daemon's first frame is not a configuration")
            return 2
        logs.configure(
            header.get("log_level", "INFO"), header.get("log_format", "text"), sys.stderr
        )
        worker = Worker(channel, header, files)
    except (ChannelClosed, KeyquorumError, OSError) as e:
        log.error("worker could not start: %s", e)
        return 2
    return worker.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
