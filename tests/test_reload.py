"""SIGHUP on a real `keyquorum server run`: new certificates under load, never a seal.

A daemon started from a configuration file (TLS custodian port, mTLS port
served by the daemon itself or by a worker process, an access log),
unsealed, a tenant granted to a backend and active. Backends wrap without
pause, over connections opened before the reload and over a fresh
connection per call; the test writes a new server certificate (same CA,
new key) at new paths, points the file at them, sends SIGHUP, and waits
until a fresh TLS handshake on each port shows the new certificate. Every
call made meanwhile succeeded (the calls use one attempt: no retry hides
a failure), the daemon is still unsealed, and the reload is logged. A
reload the daemon cannot apply (a missing file) changes nothing and is
logged as refused; the access log is reopened at its new path.

Deadlines only turn a hang into a failure.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import KeyClient
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.certs import server_cert
from tests.custodian_steps import quorum
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    make_custodians,
    start_daemon_process,
)
from tests.waiting import until

TENANT = "acme-health"
CONTEXT = {"patient": "p-4711"}
BACKEND = "backend/booking"
THRESHOLD = 2
HANG_GUARD_S = 30.0
#: Backends calling during the reload: over open connections, and one fresh connection a call.
OPEN_CALLERS, FRESH_CALLERS = 3, 2


@dataclass
class World:
    proc: DaemonProcess
    pki: DevPki
    custodians: list[Custodian]
    mtls_port: int
    config: Path
    settings: dict[str, object]
    base: Path

    def stub(self) -> pb_grpc.CustodianServiceStub:
        return pb_grpc.CustodianServiceStub(self.proc.channel())

    def backend(self) -> KeyClient:
        files = self.pki.client(BACKEND)
        return KeyClient(
            f"127.0.0.1:{self.mtls_port}",
            ca=self.pki.ca_cert,
            cert=files.cert,
            key=files.key,
            attempts=1,
        )

    def write_config(self, **changes: object) -> None:
        self.settings.update(changes)
        lines = [f"{key} = {json.dumps(value)}" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def hangup(self) -> None:
        self.proc.proc.send_signal(signal.SIGHUP)


def served_certificate(world: World, port: int, *, client: bool) -> bytes:
    """The DER of the certificate a fresh TLS handshake on `port` gets."""
    context = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if client:
        files = world.pki.client(BACKEND)
        context.load_cert_chain(str(files.cert), str(files.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls_socket,
    ):
        der = tls_socket.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


@dataclass
class Load:
    """Backends wrapping until stopped: calls made and every failure."""

    world: World
    calls: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(OPEN_CALLERS):
            self._threads.append(threading.Thread(target=self._open, daemon=True))
        for _ in range(FRESH_CALLERS):
            self._threads.append(threading.Thread(target=self._fresh, daemon=True))
        for t in self._threads:
            t.start()

    def _one(self, client: KeyClient) -> None:
        try:
            wrapped = client.wrap(TENANT, b"reload", CONTEXT)
            with client.unwrap(wrapped.ciphertext, CONTEXT) as plain:
                assert plain.reveal() == b"reload"
        except Exception as e:  # every failure is the test's finding
            with self._lock:
                self.failures.append(repr(e))
        with self._lock:
            self.calls += 1

    def _open(self) -> None:
        with self.world.backend() as client:
            while not self._stop.is_set():
                self._one(client)

    def _fresh(self) -> None:
        while not self._stop.is_set():
            with self.world.backend() as client:
                self._one(client)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(HANG_GUARD_S)


@pytest.fixture(params=[0, 1], ids=["daemon-serves-mtls", "one-worker"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    dev_pki = make_dev_pki(tmp_path / "pki", clients=[BACKEND])
    custodians = make_custodians(tmp_path / "custodians", names=("alice", "bob", "carol"))
    config = tmp_path / "server.toml"
    settings: dict[str, object] = {
        "tls-cert": str(dev_pki.server_cert),
        "tls-key": str(dev_pki.server_key),
        "client-ca": str(dev_pki.ca_cert),
        "listen-mtls": "127.0.0.1:0",
        "workers": request.param,
        "access-log": str(tmp_path / "access.log"),
    }
    data = tmp_path / "data"
    w = World(None, dev_pki, custodians, 0, config, settings, tmp_path)  # type: ignore[arg-type]
    w.write_config()
    proc = start_daemon_process(data, dev_pki, "--config", str(config), tls=False)
    try:
        ready = json.loads((data.parent / f"{data.name}.ready").read_text())
        w.proc, w.mtls_port = proc, int(ready["mtls_port"])
        stub = w.stub()
        stub.InitCeremony(ceremony_request("reload", THRESHOLD, custodians, proc.ceremony_code()))
        for c in custodians[:THRESHOLD]:
            actions.submit_share(stub, c.credential)
        quorum(stub, custodians, "create-tenant", {"tenant": TENANT})
        quorum(stub, custodians, "grant", {"tenant": TENANT, "backend": "booking"})
        quorum(stub, custodians, "activate-tenant", {"tenant": TENANT, "duration_seconds": 3600})
        yield w
    finally:
        assert proc.stop() == 0


def test_sighup_rotates_the_certificate_under_load_with_no_failed_call(world: World) -> None:
    old = der_of(world.pki.server_cert)
    assert served_certificate(world, world.proc.port, client=False) == old
    assert served_certificate(world, world.mtls_port, client=True) == old
    cert, key = server_cert(world.pki, world.base / "renewed")
    new = der_of(cert)
    load = Load(world)
    load.start()
    try:
        until(lambda: load.calls >= 20, "calls before the reload")
        world.write_config(**{"tls-cert": str(cert), "tls-key": str(key)})
        world.hangup()
        until(
            lambda: served_certificate(world, world.proc.port, client=False) == new,
            "the custodian port to serve the new certificate",
        )
        until(
            lambda: served_certificate(world, world.mtls_port, client=True) == new,
            "the mTLS port to serve the new certificate",
        )
        before = load.calls
        until(lambda: load.calls >= before + 20, "calls after the reload")
    finally:
        load.stop()
    assert load.failures == []
    status = world.stub().GetStatus(pb.GetStatusRequest(), timeout=30)
    assert status.initialized
    assert not status.sealed
    assert "reloaded (SIGHUP), seal state unchanged" in world.proc.output()
    assert world.proc.proc.poll() is None


def test_a_reload_that_cannot_be_applied_changes_nothing(world: World) -> None:
    old = der_of(world.pki.server_cert)
    world.write_config(**{"tls-cert": str(world.base / "missing.crt"), "max-calls": 500})
    world.hangup()
    until(lambda: "reload (SIGHUP) refused" in world.proc.output(), "the refusal")
    assert "missing.crt" in world.proc.output()
    assert served_certificate(world, world.proc.port, client=False) == old
    assert served_certificate(world, world.mtls_port, client=True) == old
    with world.backend() as client:
        client.wrap(TENANT, b"still served", CONTEXT)
    assert not world.stub().GetStatus(pb.GetStatusRequest(), timeout=30).sealed
    # A setting that needs a restart is named and not applied; the others are.
    world.write_config(**{"tls-cert": str(world.pki.server_cert)})
    world.hangup()
    until(
        lambda: "applied only at a restart: max-calls" in world.proc.output(),
        "the warning naming max-calls",
    )


def test_sighup_reopens_the_access_log(world: World) -> None:
    access = world.base / "access.log"
    with world.backend() as client:
        client.wrap(TENANT, b"before", CONTEXT)
    until(lambda: access.exists() and access.read_text().count("\n") >= 1, "a first line")
    rotated = world.base / "access.log.1"
    access.rename(rotated)
    world.hangup()
    until(access.exists, "the access log reopened")
    lines_before = rotated.read_text().count("\n")
    with world.backend() as client:
        client.wrap(TENANT, b"after", CONTEXT)
    until(lambda: access.read_text().count("\n") >= 1, "a line in the new file")
    assert rotated.read_text().count("\n") == lines_before
