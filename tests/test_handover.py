"""SIGUSR2 on a real `keyquorum server run`: an upgrade that keeps the daemon unsealed.

A daemon (TLS custodian port, mTLS port served by itself) is unsealed, a
tenant created, granted and active. Backends wrap without pause through the
SDK (its retries on UNAVAILABLE are on, as in production); the test sends
SIGUSR2. The daemon starts its successor, which takes the unsealed state
over their private socketpair and the same ports; the old process wipes its
keys and exits (exit status 0: nothing of it is left to hold a key). Every
Wrap succeeded, and no two successive successes are more than the issue's
one second apart (a functional bound, asserted as such). The successor is
unsealed without any custodian, serves, and has logged a `handover` entry
signed by the log key, which `audit verify` checks offline and shows as a
sentence. A successor that cannot take over (another deployment's data
directory) leaves the old process serving, unsealed.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import KeyClient
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.custodian_steps import quorum
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    make_custodians,
    run_cli,
    start_daemon_process,
    tls_channel,
)
from tests.waiting import until

TENANT = "acme-health"
CONTEXT = {"patient": "p-4711"}
BACKEND = "backend/booking"
THRESHOLD = 2
HANG_GUARD_S = 60.0
#: The issue's bound on a gap in service during the handover.
MAX_GAP_S = 1.0


@dataclass
class World:
    proc: DaemonProcess
    pki: DevPki
    custodians: list[Custodian]
    data: Path
    mtls_port: int

    def ready(self) -> dict[str, int]:
        info: dict[str, int] = json.loads(
            (self.data.parent / f"{self.data.name}.ready").read_text()
        )
        return info

    def backend(self) -> KeyClient:
        files = self.pki.client(BACKEND)
        return KeyClient(
            f"127.0.0.1:{self.mtls_port}", ca=self.pki.ca_cert, cert=files.cert, key=files.key
        )


@pytest.fixture
def world(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[World]:
    """A daemon unsealed with one active tenant; `--workers` is the test's parameter (0:
    the daemon serves the mTLS port itself)."""
    workers = str(getattr(request, "param", 0))
    dev_pki = make_dev_pki(tmp_path / "pki", clients=[BACKEND])
    custodians = make_custodians(tmp_path / "custodians", names=("alice", "bob", "carol"))
    data = tmp_path / "data"
    proc = start_daemon_process(
        data, dev_pki,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(dev_pki.ca_cert), "--workers", workers,
    )  # fmt: skip
    ready = json.loads((data.parent / f"{data.name}.ready").read_text())
    w = World(proc, dev_pki, custodians, data, int(ready["mtls_port"]))
    successor: int | None = None
    try:
        with proc.channel() as channel:
            stub = pb_grpc.CustodianServiceStub(channel)
            stub.InitCeremony(
                ceremony_request("upgrade", THRESHOLD, custodians, proc.ceremony_code())
            )
            for c in custodians[:THRESHOLD]:
                actions.submit_share(stub, c.credential)
            quorum(stub, custodians, "create-tenant", {"tenant": TENANT})
            quorum(stub, custodians, "grant", {"tenant": TENANT, "backend": "booking"})
            quorum(
                stub, custodians, "activate-tenant", {"tenant": TENANT, "duration_seconds": 3600}
            )
        yield w
        successor = w.ready()["pid"]
    finally:
        proc.stop()
        if successor is not None and successor != proc.proc.pid:
            stop_pid(successor)


def stop_pid(pid: int) -> None:
    """SIGTERM a daemon that is not this test's child (the old daemon started it)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + HANG_GUARD_S
    while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"


@dataclass
class Load:
    """A backend wrapping until stopped: when each call succeeded, and every failure."""

    world: World
    successes: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        with self.world.backend() as client:
            while not self._stop.is_set():
                try:
                    client.wrap(TENANT, b"upgrade", CONTEXT)
                except Exception as e:  # every failure is the test's finding
                    self.failures.append(repr(e))
                else:
                    self.successes.append(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(HANG_GUARD_S)

    def longest_gap(self) -> float:
        pairs = zip(self.successes, self.successes[1:], strict=False)
        return max((b - a for a, b in pairs), default=0.0)


@pytest.mark.parametrize("world", [0, 1], indirect=True, ids=["no-workers", "one-worker"])
def test_sigusr2_hands_over_unsealed_with_wraps_served_throughout(world: World) -> None:
    old = world.proc.proc.pid
    load = Load(world)
    load.start()
    try:
        until(lambda: len(load.successes) >= 20, "wraps before the handover")
        world.proc.proc.send_signal(signal.SIGUSR2)
        assert world.proc.proc.wait(timeout=HANG_GUARD_S) == 0  # the old process is gone
        until(lambda: world.ready()["pid"] != old, "the successor's ready file")
        after = len(load.successes)
        until(lambda: len(load.successes) >= after + 50, "wraps after the handover")
    finally:
        load.stop()
    assert load.failures == []
    assert load.longest_gap() < MAX_GAP_S, load.longest_gap()
    output = world.proc.output()
    new = world.ready()["pid"]
    assert f"handed over to pid {new}: keys wiped, exiting" in output
    with tls_channel(world.pki, world.proc.target) as channel:
        status = pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)
    assert status.initialized
    assert not status.sealed  # no custodian unsealed the successor
    stop_pid(new)
    # The log says so, verified offline.
    export = world.data.parent / "export.kqlog"
    code, text = run_cli("audit", "export", "--data-dir", str(world.data), "--out", str(export))
    assert code == 0, text
    vkey = LogKey.load(world.data).vkey
    code, report = run_cli("audit", "verify", str(export), "--log-key", vkey)
    assert code == 0, report
    assert f"handed its unsealed state from process {old}" in report
    assert f"to process {new}" in report


def test_a_successor_that_cannot_take_over_leaves_the_daemon_serving(world: World) -> None:
    old = world.proc.proc.pid
    # The successor would read another log: the key file it checks is gone.
    key = world.data / "log-signing-key"
    saved = key.read_bytes()
    key.unlink()
    try:
        world.proc.proc.send_signal(signal.SIGUSR2)
        until(lambda: "handover (SIGUSR2) failed, still serving" in world.proc.output(),
                 "the failed handover")  # fmt: skip
    finally:
        key.write_bytes(saved)
        key.chmod(0o600)
    assert world.proc.proc.poll() is None
    assert world.ready()["pid"] == old
    with world.backend() as client:
        client.wrap(TENANT, b"still served", CONTEXT)
    with tls_channel(world.pki, world.proc.target) as channel:
        status = pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)
    assert not status.sealed


def test_a_sealed_daemon_hands_nothing_over_and_its_seal_is_logged(world: World) -> None:
    """A custodian sealed it: SIGUSR2 starts no successor, the daemon serves on sealed,
    and the seal's entry is in the log (a seal is never lost to a handover)."""
    old = world.proc.proc.pid
    alice = world.custodians[0]
    with world.proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        actions.seal(
            stub, alice.fingerprint, lambda _t: alice.credential, reason="before the upgrade",
            now=int(time.time()),
        )  # fmt: skip
    world.proc.proc.send_signal(signal.SIGUSR2)
    until(lambda: "handover (SIGUSR2) refused: the daemon is sealed" in world.proc.output(),
             "the refused handover")  # fmt: skip
    assert world.proc.proc.poll() is None
    assert world.ready()["pid"] == old
    assert "handed over to pid" not in world.proc.output()
    with world.proc.channel() as channel:
        status = pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=30)
    assert status.sealed
    assert world.proc.stop() == 0
    export = world.data.parent / "export.kqlog"
    code, text = run_cli("audit", "export", "--data-dir", str(world.data), "--out", str(export))
    assert code == 0, text
    code, report = run_cli(
        "audit", "verify", str(export), "--log-key", LogKey.load(world.data).vkey
    )
    assert code == 0, report
    assert "before the upgrade" in report
    assert "handed its unsealed state" not in report
