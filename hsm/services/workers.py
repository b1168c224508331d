"""The daemon's side of `server run --workers N`: worker processes serving KeyService.

N processes (hsm/services/worker.py) serve KeyService on the mTLS port,
which they share (SO_REUSEPORT: the kernel spreads connections over them),
so the data plane uses N cores; the custodian plane and the audit plane stay
in the daemon (docs/adr/0009). Contract:

- Keys reach a worker only over its private socketpair (handover.py), never
  a file or the environment. A worker asks to die with the daemon and is
  never dumpable (it refuses to start otherwise).
- `publish` is the daemon's publish listener (hsm/daemon/custody.py): after
  every new snapshot that changes some call's answer
  (`DataPlaneSnapshot.decides_as`: not for a proposal or an approval),
  every worker that has one gets the newest and must confirm it within
  `Limits.worker_sync_seconds` (100 ms); one that does
  not is killed (SIGKILL), so from then on it answers nothing, and it is
  replaced. A seal's listener call is made before the seal is answered, so
  when a custodian hears "sealed", every worker has dropped its keys or is
  dead. Deactivation, a disabled version, a revoke and an activation's end
  go the same way.
- A worker that dies is replaced; a new worker gets the newest snapshot
  before it serves. Respawns back off while workers keep dying young.
- The call caps and `--rate-limit` hold over all workers: they count in
  a mapping they share (hsm/services/shared_counts.py), one column per
  worker, zeroed when a dead worker is replaced.
- Usage records of the workers (metrics, access log) and their calls' RPC
  metrics arrive in batches and go to the daemon's sinks (`OutcomeSink`,
  `observe`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from keyquorum.hsm.dataplane.snapshot import DataPlaneSnapshot
from keyquorum.hsm.services.handover import Channel, ChannelClosed, KeysSent
from keyquorum.hsm.services.shared_counts import SharedCounts
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, StateError
from keyquorum.quorum.limits import Limits

log = logging.getLogger(__name__)

#: How long a new worker may take from spawn to serving.
START_SECONDS: Final = 60.0
#: A worker that dies younger than this is respawned after a growing delay.
YOUNG_SECONDS: Final = 10.0
FIRST_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 30.0
#: How long a stopping worker gets before it is killed.
STOP_SECONDS: Final = 5.0


class OutcomeSink(Protocol):
    """Where a worker's usage records go in the daemon (metrics, access log)."""

    def record_outcome(
        self, backend: str, tenant: str, operation: str, outcome: str, context: bytes | None
    ) -> None: ...


@dataclass(frozen=True)
class StoreSpec:
    """Where a worker opens its own store connection (for encryption counters)."""

    kind: str
    path: str | None = None
    dsn: str = field(default="", repr=False)


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a worker is configured with, sent over its channel at start."""

    host: str
    port: int
    tls_chain: bytes = field(repr=False)
    tls_key: bytes = field(repr=False)
    client_ca: bytes = field(repr=False)
    limits: Limits
    store: StoreSpec
    rate_limit: float | None = None
    usage: Sequence[OutcomeSink] = ()
    #: Told each call's method, code and seconds the workers served (RPC metrics).
    observe: Callable[[str, str, float], None] | None = None
    audit_socket: str | None = None
    audit_token: bytes = field(default=b"", repr=False)
    #: The daemon's log level and format (hsm/logs.py), for the workers' lines.
    log_level: str = "INFO"
    log_format: str = "text"


_STARTING, _SYNCED, _SERVING, _DEAD = "starting", "synced", "serving", "dead"


class _Worker:
    """One worker process as the pool sees it."""

    def __init__(self, index: int, proc: subprocess.Popen[bytes], channel: Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.keys = KeysSent()
        self.state = _STARTING
        self.acked = 0
        self.born = time.monotonic()
        self.cond = threading.Condition()
        #: What the worker said of itself at start (`hello`).
        self.facts: dict[str, Any] = {}
        #: Usage records received from it.
        self.records = 0
        #: It serves no new call and its open ones have ended (a handover's `drain`).
        self.drained = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for(self, predicate: Callable[[], bool], deadline: float) -> bool:
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0 or self.state == _DEAD:
                    return predicate()
                self.cond.wait(left)
            return True

    def __repr__(self) -> str:
        return f"<worker {self.index} pid {self.pid} {self.state}>"


class WorkerPool:
    """N worker processes serving KeyService, kept in step with the daemon's snapshot."""

    def __init__(
        self,
        latest: Callable[[], DataPlaneSnapshot],
        now: Callable[[], int],
        settings: WorkerSettings,
        count: int,
    ) -> None:
        if count < 1:
            raise InvalidInputError("a worker pool needs at least one worker")
        self._latest = latest
        self._now = now
        self._settings = settings
        self._count = count
        self._sync_seconds = settings.limits.worker_sync_seconds
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        #: Held while a worker is given its configuration and while a reload changes it,
        #: so a new worker's first frame is always its configuration.
        self._config_lock = threading.Lock()
        self._workers: list[_Worker | None] = [None] * count
        #: The last snapshot `publish` sent (None: none yet).
        self._last_published: DataPlaneSnapshot | None = None
        self._seq = 0
        self._closing = False
        self._reserved: socket.socket | None = None
        self.port = settings.port
        self._respawns = threading.Condition(self._lock)
        self._dead: list[int] = []
        self._backoff = [FIRST_BACKOFF] * count
        self._monitor = threading.Thread(target=self._respawn_loop, name="kq-workers", daemon=True)
        #: Calls in flight and rate debts over all workers, one column each.
        self.counts = SharedCounts.create(count)

    # -- life --------------------------------------------------------------------

    def start(self, timeout: float = START_SECONDS) -> None:
        """Spawn the workers and wait until every one serves."""
        if self.port == 0:
            self._reserved, self.port = _reserve_port(self._settings.host)
        for index in range(self._count):
            self._spawn(index)
        self._monitor.start()
        deadline = time.monotonic() + timeout
        for index in range(self._count):
            worker = self._workers[index]
            assert worker is not None
            if not worker.wait_for(functools.partial(_is_serving, worker), deadline):
                self.close()
                raise StateError(
                    f"worker {index} did not start serving within {timeout:g} s "
                    f"(exit status {worker.proc.poll()}); see its log lines above"
                )

    def drain(self, seconds: float) -> None:
        """A handover's end (hsm/upgrade.py): each worker answers new calls UNAVAILABLE
        (clients retry on a new connection, the successor's) and its open calls get up to
        `seconds` to finish; returns when all have, or after `seconds` and a little."""
        with self._lock:
            workers = [w for w in self._workers if w is not None and w.state != _DEAD]
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.channel.send({"kind": "drain", "seconds": seconds})
        deadline = time.monotonic() + seconds + 1.0
        for worker in workers:
            worker.wait_for(functools.partial(_is_drained, worker), deadline)

    def close(self) -> None:
        """Stop every worker (each wipes its keys) and stop replacing them."""
        with self._lock:
            self._closing = True
            self._respawns.notify_all()
            workers = [w for w in self._workers if w is not None]
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.channel.send({"kind": "stop"})
        deadline = time.monotonic() + STOP_SECONDS
        for worker in workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            worker.channel.close()
        if self._reserved is not None:
            self._reserved.close()
        self.counts.close()

    def pids(self) -> list[int]:
        """The pids of the workers alive now (for tests and logs)."""
        with self._lock:
            return [w.pid for w in self._workers if w is not None and w.state != _DEAD]

    def facts(self) -> list[dict[str, Any]]:
        """What each live worker said of itself: non-dumpable, signal on the daemon's death."""
        with self._lock:
            return [dict(w.facts) for w in self._workers if w is not None and w.state != _DEAD]

    def records(self) -> list[int]:
        """Usage records received from each worker slot's current process."""
        with self._lock:
            return [0 if w is None else w.records for w in self._workers]

    def acknowledged(self) -> list[int]:
        """The last snapshot each live worker confirmed (for tests)."""
        with self._lock:
            return [w.acked for w in self._workers if w is not None and w.state != _DEAD]

    @property
    def sequence(self) -> int:
        """The last snapshot sent."""
        return self._seq

    def serving(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if w is not None and w.state == _SERVING)

    def wait_serving(self, count: int, timeout: float) -> bool:
        """Wait until `count` workers serve (after a replacement, say)."""
        deadline = time.monotonic() + timeout
        while self.serving() < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def reload(self, chain: bytes, key: bytes, client_ca: bytes, log_level: str) -> None:
        """New TLS files and log level for every worker, and for those started later.

        Each worker serves the new certificate to new connections; its open
        connections keep theirs. A worker that cannot take the frame is
        killed and replaced (the replacement gets the new settings).
        """
        with self._config_lock:
            self._settings = dataclasses.replace(
                self._settings,
                tls_chain=chain,
                tls_key=key,
                client_ca=client_ca,
                log_level=log_level,
            )
            with self._lock:
                targets = [w for w in self._workers if w is not None and w.state != _DEAD]
            for worker in targets:
                try:
                    worker.channel.send(
                        {"kind": "reload", "log_level": log_level}, [chain, key, client_ca]
                    )
                except OSError as e:
                    self._kill(worker, f"could not take the reload: {e}")

    # -- the snapshot ------------------------------------------------------------------

    def publish(self) -> None:
        """Bring every synced worker to the newest snapshot; kill one that does not confirm."""
        with self._publish_lock:
            if self._closing:  # the workers were told to stop and wipe their keys
                return
            snapshot = self._latest()
            last = self._last_published
            if last is not None and snapshot.decides_as(last):
                return  # e.g. a proposal or an approval: no call's answer changes
            self._last_published = snapshot
            self._seq += 1
            seq = self._seq
            with self._lock:
                targets = [w for w in self._workers if w is not None and w.state in _IN_STEP]
            for worker in targets:
                self._send_snapshot(worker, snapshot, seq)
            deadline = time.monotonic() + self._sync_seconds
            for worker in targets:
                if worker.state == _DEAD:
                    continue
                if not worker.wait_for(functools.partial(_has_acked, worker, seq), deadline):
                    self._kill(
                        worker,
                        f"did not confirm snapshot {seq} within {self._sync_seconds:g} s",
                    )

    def _send_snapshot(self, worker: _Worker, snapshot: DataPlaneSnapshot, seq: int) -> None:
        try:
            header, keys = worker.keys.frame(snapshot, seq)
            header["now"] = self._now()
            worker.channel.send(header, keys)
        except OSError as e:
            self._kill(worker, f"could not take snapshot {seq}: {e}")

    def _sync(self, worker: _Worker) -> None:
        """A new worker's first snapshot; from now on it is in every publication."""
        with self._publish_lock:
            if worker.state != _STARTING:
                return
            self._seq += 1
            with worker.cond:
                worker.state = _SYNCED
            self._send_snapshot(worker, self._latest(), self._seq)

    def _kill(self, worker: _Worker, why: str) -> None:
        log.error("worker %d (pid %d) %s: killed", worker.index, worker.pid, why)
        with worker.cond:
            worker.state = _DEAD
            worker.cond.notify_all()
        with contextlib.suppress(ProcessLookupError):
            worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()

    # -- processes ---------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        if self._workers[index] is not None:
            # Its predecessor has exited (reaped in `_read`): its calls are gone.
            self.counts.clear_column(index)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        timeout = max(1.0, 10 * self._sync_seconds)
        ours.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", int(timeout), int((timeout % 1) * 1e6)),
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keyquorum.hsm.services.worker",
                str(theirs.fileno()),
                str(os.getpid()),
            ],
            pass_fds=(theirs.fileno(), self.counts.fd),
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        worker = _Worker(index, proc, Channel(ours))
        with self._config_lock:
            with self._lock:
                self._workers[index] = worker
            try:
                worker.channel.send(*self._config(index))
            except OSError as e:
                self._kill(worker, f"could not be configured: {e}")
        threading.Thread(
            target=self._read, args=(worker,), name=f"kq-worker-{index}", daemon=True
        ).start()
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _config(self, index: int) -> tuple[dict[str, Any], list[bytes]]:
        s = self._settings
        header = {
            "kind": "config",
            "index": index,
            "host": s.host,
            "port": self.port,
            "limits": dataclasses.asdict(s.limits),
            "store": {"kind": s.store.kind, "path": s.store.path},
            "usage": bool(s.usage),
            "observe": s.observe is not None,
            "rate_limit": s.rate_limit,
            "counts": {
                "fd": self.counts.fd,
                "columns": self.counts.columns,
                "column": index,
                "key": self.counts.key.hex(),
            },
            "audit_socket": s.audit_socket,
            "log_level": s.log_level,
            "log_format": s.log_format,
        }
        return header, [
            s.tls_chain,
            s.tls_key,
            s.client_ca,
            s.audit_token,
            s.store.dsn.encode(),
        ]

    def _read(self, worker: _Worker) -> None:
        """The worker's frames to the daemon, until its channel closes."""
        try:
            while True:
                header, _attachments = worker.channel.receive()
                kind = header.get("kind")
                if kind == "ack":
                    with worker.cond:
                        worker.acked = max(worker.acked, int(header["seq"]))
                        worker.cond.notify_all()
                elif kind == "usage":
                    worker.records += len(header["records"])
                    self._usage(header["records"])
                    self._calls(header.get("calls", []))
                elif kind == "hello":
                    worker.facts = {
                        k: header.get(k) for k in ("non_dumpable", "parent_death_signal")
                    }
                    if worker.facts != {
                        "non_dumpable": True,
                        "parent_death_signal": signal.SIGKILL,
                    }:
                        self._kill(worker, f"is not hardened ({worker.facts})")
                        continue
                    self._sync(worker)
                elif kind == "drained":
                    with worker.cond:
                        worker.drained = True
                        worker.cond.notify_all()
                elif kind == "serving":
                    with worker.cond:
                        if worker.state == _SYNCED:
                            worker.state = _SERVING
                        worker.cond.notify_all()
                    log.info("worker %d (pid %d) serves", worker.index, worker.pid)
        except (ChannelClosed, OSError, DeserializationError, KeyError, ValueError) as e:
            if not isinstance(e, ChannelClosed):
                log.error("worker %d: bad frame or channel error: %s", worker.index, e)
        with worker.cond:
            worker.state = _DEAD
            worker.cond.notify_all()
        worker.proc.wait()
        with self._lock:
            if self._closing:
                return
            log.error(
                "worker %d (pid %d) ended (status %s); replacing it",
                worker.index,
                worker.pid,
                worker.proc.returncode,
            )
            lived = time.monotonic() - worker.born
            if lived >= YOUNG_SECONDS:
                self._backoff[worker.index] = FIRST_BACKOFF
            self._dead.append(worker.index)
            self._respawns.notify_all()

    def _usage(self, records: list[list[Any]]) -> None:
        for backend, tenant, operation, outcome, context in records:
            raw = None if context is None else str(context).encode("utf-8", "surrogateescape")
            for sink in self._settings.usage:
                sink.record_outcome(str(backend), str(tenant), str(operation), str(outcome), raw)

    def _calls(self, calls: list[list[Any]]) -> None:
        observe = self._settings.observe
        if observe is not None:
            for method, code, seconds in calls:
                observe(str(method), str(code), float(seconds))

    def _respawn_loop(self) -> None:
        while (index := self._next_dead()) is not None:
            delay = self._backoff[index]
            self._backoff[index] = min(MAX_BACKOFF, delay * 2)
            worker = self._workers[index]
            if worker is not None and time.monotonic() - worker.born < YOUNG_SECONDS:
                time.sleep(delay)
            with self._lock:
                if self._closing:
                    return
            self._spawn(index)

    def _next_dead(self) -> int | None:
        """The next worker to replace; None once the pool closes."""
        with self._lock:
            while not self._dead and not self._closing:
                self._respawns.wait()
            return None if self._closing else self._dead.pop(0)

    def __repr__(self) -> str:
        return f"<WorkerPool port {self.port}: {self.serving()} of {self._count} serving>"


_IN_STEP: Final = (_SYNCED, _SERVING)


def _is_drained(worker: _Worker) -> bool:
    return worker.drained


def _is_serving(worker: _Worker) -> bool:
    return worker.state == _SERVING


def _has_acked(worker: _Worker, seq: int) -> bool:
    return worker.acked >= seq


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """Bind (not listen) a SO_REUSEPORT socket to pick a free port the workers then share.

    A bound socket that does not listen receives no connections; it keeps the
    port this process's while workers come and go.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host.strip("[]"), 0))
    return sock, int(sock.getsockname()[1])
