"""Crash safety with real daemon processes: what a client was told is what survives.

Two ways to crash a daemon in the middle of an append, both over real
files and a real PostgreSQL:

- `kill -9` at random moments while a client appends as fast as it can
  (20 times on SQLite, 20 on PostgreSQL). After each kill: the log
  verifies (`verify_log` against the stored checkpoint), every append the
  client saw succeed is in it, no entry is stored without the checkpoint
  that covers it (they commit in one transaction: an unacknowledged append
  is wholly there or wholly gone), and the daemon starts again on it (its
  own start-up replay, coverage and rollback checks).
- A syscall fault sweep, as transparency logs test theirs: the
  write/pwrite64/fsync/fdatasync/rename calls of ONE append on SQLite are
  found by tracing one append (strace attached to the running daemon,
  `-P` limited to the store's and the checkpoint's files); then, for each
  of those calls in turn, a fresh attach injects EIO at exactly that call
  (`--inject=SYSCALL:error=EIO:when=N`), and separately SIGKILL
  (`signal=KILL`). EIO: the append reports no success, and the daemon
  refuses later writes until restarted (an fsync failure may have dropped
  pages; a retry must not report them durable). Both: after a restart the
  log verifies and no acknowledged entry is missing.

Appends are signed proposals (`create-tenant`), the cheapest entry a client
can cause: one log entry and its checkpoint in one store transaction, one
checkpoint file.
"""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.daemon.rollback import CHECKPOINT_FILE
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.stores.base import Store
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.replay import LogState, verify_log
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    make_custodians,
    signed_proposal,
    start_daemon_process,
)
from tests.pg import PgServer

KILLS = 20
SEED = 20261125
STORE_FILE = "keyquorum.sqlite"
#: The calls of one append the sweep covers (strace names).
SWEPT = ("write", "pwrite64", "fsync", "fdatasync", "rename")
STRACE = shutil.which("strace")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"), names=("alice", "bob", "carol"))


@dataclass
class Backend:
    """Where the daemon under test keeps its store."""

    data: Path
    dsn: str | None = None
    acked: list[str] = field(default_factory=list)

    def start(self, pki: DevPki) -> DaemonProcess:
        if self.dsn is None:
            return start_daemon_process(self.data, pki)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("KEYQUORUM_DSN", self.dsn)
            return start_daemon_process(self.data, pki, "--store", "postgres")

    def open_store(self) -> Store:
        if self.dsn is None:
            return SqliteStore.open(self.data / STORE_FILE)
        return PostgresStore.open(self.dsn)

    def restart_in_process(self) -> None:
        """The daemon's own start over the store (replay, checkpoint, rollback check)."""
        store = self.open_store()
        try:
            daemon = Daemon(
                store,
                data_dir=self.data,
                replica="proc-1",
                limits=DEFAULT_LIMITS,
                clock=lambda: int(time.time()),
                sweep_seconds=None,
                follow_seconds=None,
            )
            daemon.seal_for_shutdown()
        finally:
            store.close()

    def verify(self) -> LogState:
        """The stopped daemon's log, checked as an auditor would, holds every acked append,
        and nothing half-kept: every stored entry is covered by the latest checkpoint."""
        store = self.open_store()
        try:
            size, latest = store.head()
            entries = list(store.read_all())
        finally:
            store.close()
        assert latest is not None
        assert latest[0] == size == len(entries), "an entry without its checkpoint"
        state = verify_log(entries, latest[1], LogKey.load(self.data).vkey)
        missing = [p for p in self.acked if bytes.fromhex(p) not in state.proposals]
        assert not missing, f"acknowledged but lost: {missing}"
        return state


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(tmp_path / "data")
        return
    server: PgServer = request.getfixturevalue("pg_server")
    schema, dsn = server.create_schema()
    yield Backend(tmp_path / "data", dsn)
    server.drop_schema(schema)


#: Who signs the crash tests' proposals (a custodian of the ceremony).
SIGNER: list[CustodianCredential] = []


def ceremony(proc: DaemonProcess, custodians: list[Custodian]) -> None:
    with proc.channel() as channel:
        pb_grpc.CustodianServiceStub(channel).InitCeremony(
            ceremony_request("crash", 2, custodians, proc.ceremony_code())
        )
    SIGNER[:] = [custodians[0].credential]


def propose(stub: pb_grpc.CustodianServiceStub, tenant: str) -> str:
    request = signed_proposal(stub, SIGNER[0], "create-tenant", {"tenant": tenant})
    return stub.Propose(request, timeout=30).id


def append_until_error(proc: DaemonProcess, prefix: str, acked: list[str]) -> None:
    """Append proposals until a call fails; record each one the daemon acknowledged."""
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        n = 0
        while True:
            try:
                acked.append(propose(stub, f"{prefix}-{n}"))
            except grpc.RpcError:
                return
            n += 1


def test_kill_9_during_appends_loses_nothing_acknowledged(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    rng = random.Random(SEED)
    proc = backend.start(pki)
    ceremony(proc, custodians)
    for kill in range(KILLS):
        acked: list[str] = []
        client = threading.Thread(target=append_until_error, args=(proc, f"k{kill}", acked))
        client.start()
        threading.Event().wait(rng.uniform(0.02, 0.2))
        proc.proc.send_signal(signal.SIGKILL)
        assert proc.proc.wait(timeout=10) == -signal.SIGKILL
        client.join(timeout=30)
        backend.acked += acked
        backend.verify()
        # The daemon's own start: replay, checkpoint, rollback check.
        proc = backend.start(pki)
        assert "log verified" in proc.output()
    assert proc.stop() == 0
    assert len(backend.acked) >= KILLS, "the kills did not land during appends"
    backend.verify()


# -- the syscall fault sweep -------------------------------------------------------


def _paths(data: Path) -> list[str]:
    """What one append touches: the store, its WAL, the checkpoint file, the directory."""
    names = [STORE_FILE, f"{STORE_FILE}-wal", f"{STORE_FILE}-journal", CHECKPOINT_FILE]
    names.append(f"{CHECKPOINT_FILE}.tmp")
    return [str((data / n).resolve()) for n in names] + [str(data.resolve())]


@dataclass
class Traced:
    """strace attached to a running daemon (every thread), until `detach`."""

    proc: subprocess.Popen[str]

    def detach(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def attach(daemon: DaemonProcess, data: Path, *options: str) -> Traced:
    assert STRACE is not None
    argv = [STRACE, "-f", "-p", str(daemon.proc.pid), "-e", "trace=" + ",".join(SWEPT)]
    for path in _paths(data):
        argv += ["-P", path]
    proc = subprocess.Popen([*argv, *options], stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "attached" in line, line
    return Traced(proc)


def trace_one_append(daemon: DaemonProcess, data: Path, out: Path) -> list[tuple[str, str]]:
    """The swept calls one append makes, in order: (strace name, file name)."""
    traced = attach(daemon, data, "-y", "-o", str(out))
    with daemon.channel() as channel:
        propose(pb_grpc.CustodianServiceStub(channel), "traced")
    traced.detach()
    calls = []
    for line in out.read_text().splitlines():
        match = re.match(r'\d+\s+(\w+)\((?:\d+<([^>]*)>|"([^"]*)")', line)
        if match and match.group(1) in SWEPT:
            calls.append((match.group(1), Path(match.group(2) or match.group(3)).name))
    return calls


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.parametrize("fault", ["error=EIO", "signal=KILL"], ids=["eio", "sigkill"])
def test_syscall_fault_sweep_of_one_append(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian], fault: str
) -> None:
    """Each iteration starts from the same stopped store, so every append makes
    the same calls as the traced one and the Nth call is always the same."""
    backend = Backend(tmp_path / "data")
    proc = backend.start(pki)
    ceremony(proc, custodians)
    with proc.channel() as channel:
        backend.acked.append(propose(pb_grpc.CustodianServiceStub(channel), "before"))
    assert proc.stop() == 0
    base, base_acked = tmp_path / "base", list(backend.acked)
    shutil.copytree(backend.data, base)
    proc = backend.start(pki)
    calls = trace_one_append(proc, backend.data, tmp_path / "trace.txt")
    proc.stop(signal.SIGKILL)
    # One append: WAL frames, their fdatasync, the checkpoint's, the file's rename.
    assert {"pwrite64", "fdatasync", "write", "fsync", "rename"} <= {n for n, _ in calls}, calls
    for index, (name, target) in enumerate(calls):
        nth = [n for n, _ in calls[: index + 1]].count(name)
        where = f"{fault} at {name}({target}) #{nth} (call {index + 1} of {len(calls)})"
        # SQLite syncs the directory after creating the WAL and ignores a
        # failure there (some file systems cannot); the checkpoint file's
        # own directory fsync, later in the same append, then covers the
        # WAL's directory entry, so that append may rightly succeed.
        ignored = fault == "error=EIO" and name == "fdatasync" and target == backend.data.name
        shutil.rmtree(backend.data)
        shutil.copytree(base, backend.data)
        backend.acked = list(base_acked)
        proc = backend.start(pki)
        out = tmp_path / f"inject-{index}.txt"
        traced = attach(proc, backend.data, "-o", str(out), f"--inject={name}:{fault}:when={nth}")
        with proc.channel() as channel:
            stub = pb_grpc.CustodianServiceStub(channel)
            try:
                backend.acked.append(propose(stub, "swept"))
                failure = None
            except grpc.RpcError as e:
                failure = e
            if fault == "signal=KILL":
                # Reaped first: strace sees the whole thread group exit.
                assert proc.proc.wait(timeout=10) == -signal.SIGKILL, where
            traced.detach()
            assert "(INJECTED)" in out.read_text() or proc.proc.poll() is not None, where
            if ignored:
                assert failure is None, f"{where}: {failure}"
            else:
                assert failure is not None, f"{where}: the append reported success"
            if fault == "error=EIO" and failure is not None:
                assert failure.code() == grpc.StatusCode.UNAVAILABLE, where
                # Writes stay stopped: nothing after a failed fsync is called durable.
                with pytest.raises(grpc.RpcError) as again:
                    propose(stub, "swept-again")
                assert again.value.code() == grpc.StatusCode.UNAVAILABLE, where
        if fault == "error=EIO":
            assert proc.proc.poll() is None, f"{where}: the daemon died"
            if not ignored:
                output = proc.output()
                assert "append failed" in output or "sealed itself" in output, where
            proc.proc.send_signal(signal.SIGKILL)
        assert proc.proc.wait(timeout=10) == -signal.SIGKILL, where
        backend.verify()
        backend.restart_in_process()
