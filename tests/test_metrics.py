"""The metrics port of a real daemon: every metric README names, /health, 404.

A `keyquorum server run` process with its mTLS and metrics listeners goes
through the ceremony, an unseal, a tenant created, granted and activated,
Wraps and refused calls; its metrics port must then export every metric the
operator guide in README.md lists, with values that match what happened,
answer /health with 503 until it is unsealed and 200 after (no client
certificate: plain HTTP), and 404 on any other path. The port's bounds
(connections at once) are checked on the server object itself.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from keyquorum.client import KeyClient, KeyServiceError
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import metrics_http
from keyquorum.hsm.services.metrics_http import MetricsServer
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.custodian_steps import K, ceremony, run, unseal
from tests.harness import Custodian, DaemonProcess, make_custodians, start_daemon_process
from tests.waiting import until

ROOT = Path(__file__).resolve().parent.parent
TENANT = "acme-health"
BOOKING = "backend/booking"


@dataclass
class Running:
    proc: DaemonProcess
    pki: DevPki
    mtls_port: int
    metrics_port: int
    custodians: list[Custodian]

    def __post_init__(self) -> None:
        self.channel = self.proc.channel()

    @property
    def stub(self) -> pb_grpc.CustodianServiceStub:
        return pb_grpc.CustodianServiceStub(self.channel)

    def get(self, path: str, method: str = "GET") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def client(self) -> KeyClient:
        files = self.pki.client(BOOKING)
        return KeyClient(
            f"127.0.0.1:{self.mtls_port}",
            ca=self.pki.ca_cert,
            cert=files.cert,
            key=files.key,
            attempts=1,
        )


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("metrics")
    pki = make_dev_pki(base / "pki", clients=[BOOKING])
    custodians = make_custodians(base / "custodians")
    data_dir = base / "data"
    proc = start_daemon_process(
        data_dir, pki,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(pki.ca_cert),
        "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    try:
        ready = json.loads((data_dir.parent / f"{data_dir.name}.ready").read_text())
        r = Running(proc, pki, ready["mtls_port"], ready["metrics_port"], custodians)
        yield r
        r.channel.close()
    finally:
        proc.stop()


def readme_metric_names() -> list[str]:
    """The metric names README.md's operator guide lists (its "Metrics" section)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Metrics", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    names = re.findall(r"`((?:keyquorum|process|python)_[a-z0-9_]+)(?:\{[^`]*\})?`", section)
    assert len(names) >= 15, names
    return sorted(set(names))


def test_health_says_not_initialised_then_sealed_then_unsealed(running: Running) -> None:
    assert running.get("/health") == (503, "not initialised\n")
    ceremony(running, running.custodians)  # type: ignore[arg-type]
    assert running.get("/health") == (503, "sealed\n")
    unseal(running, running.custodians[:K])  # type: ignore[arg-type]
    assert running.get("/health") == (200, "unsealed\n")
    status, _ = running.get("/health", method="HEAD")
    assert status == 200


def test_other_paths_are_not_found_and_other_methods_not_allowed(running: Running) -> None:
    for path in ("/", "/metricsx", "/health/", "/../etc/passwd", "/favicon.ico"):
        assert running.get(path)[0] == 404, path
    assert running.get("/metrics", method="POST")[0] == 405
    assert running.get("/health", method="DELETE")[0] == 405


def test_every_metric_in_the_readme_is_exported(running: Running) -> None:
    run(running, running.custodians, "create-tenant", tenant=TENANT)  # type: ignore[arg-type]
    run(running, running.custodians, "grant", tenant=TENANT, backend="booking")  # type: ignore[arg-type]
    run(
        running, running.custodians, "activate-tenant",  # type: ignore[arg-type]
        tenant=TENANT, duration_seconds=3600,
    )  # fmt: skip
    with running.client() as kq:
        for n in range(5):
            wrapped = kq.wrap(TENANT, b"plaintext %d" % n, {"patient": "p-1"})
            with kq.unwrap(wrapped.ciphertext, {"patient": "p-1"}) as plain:
                assert plain.reveal() == b"plaintext %d" % n
        with pytest.raises(KeyServiceError):
            kq.wrap("not-granted", b"x")
    # Worker processes send their usage and call metrics to the daemon in
    # batches (every 0.1 s, docs/adr/0009); 10 s only turns a hang into a failure.
    deadline = time.monotonic() + 10
    while True:
        _, text = running.get("/metrics")
        exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        exported |= {f.name for f in text_string_to_metric_families(text)}
        missing = [name for name in readme_metric_names() if name not in exported]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert missing == []


def test_values_match_what_happened(running: Running) -> None:
    wrap = {"service": "keyquorum.v1.KeyService", "method": "Wrap"}
    items = {"backend": "booking", "tenant": TENANT, "operation": "wrap", "outcome": "OK"}

    def forwarded() -> bool:
        """The worker processes served the Wraps; their counts reach this process
        within `worker_sync_seconds` of each call, not at once."""
        s = running.samples()
        try:
            return (
                value(s, "keyquorum_rpc_requests_total", **wrap, code="OK") >= 5
                and value(s, "keyquorum_keyservice_requests_total", **items) >= 5
            )
        except KeyError:  # no series yet
            return False

    until(forwarded, "the workers' counts of the five Wraps")
    s = running.samples()
    assert value(s, "keyquorum_rpc_requests_total", **wrap, code="OK") >= 5
    assert value(s, "keyquorum_rpc_requests_total", **wrap, code="PERMISSION_DENIED") >= 1
    assert value(s, "keyquorum_rpc_duration_seconds_count", **wrap, code="OK") >= 5
    assert value(s, "keyquorum_rpc_duration_seconds_sum", **wrap, code="OK") > 0
    submit = {"service": "keyquorum.v1.CustodianService", "method": "SubmitShare", "code": "OK"}
    assert value(s, "keyquorum_rpc_requests_total", **submit) == K
    assert value(s, "keyquorum_sealed") == 0
    assert value(s, "keyquorum_initialized") == 1
    assert value(s, "keyquorum_unseal_threshold") == K
    assert value(s, "keyquorum_store_up") == 1
    log_size = running.stub.GetStatus(pb.GetStatusRequest()).log_size
    assert value(s, "keyquorum_log_entries") == log_size
    # An append may carry several entries (an approval and its execution).
    assert 5 <= value(s, "keyquorum_log_append_duration_seconds_count") <= log_size
    assert value(s, "keyquorum_replica_lag_entries") == 0
    assert 0 <= value(s, "keyquorum_checkpoint_age_seconds") < 300
    remaining = value(s, "keyquorum_tenant_activation_remaining_seconds", tenant=TENANT)
    assert 3000 < remaining <= 3600
    assert value(s, "keyquorum_encryptions_reserved", tenant=TENANT, version="1") >= 5
    assert value(s, "keyquorum_encryption_limit") == 2**32
    assert value(s, "keyquorum_keyservice_requests_total", **items) == 5
    assert value(s, "process_resident_memory_bytes") > 0


def test_a_refused_custodian_action_is_logged_with_its_reason(running: Running) -> None:
    alice = running.custodians[0]
    for who in (alice.fingerprint, "PLAINTEXT-MARKER-not-a-custodian"):
        with pytest.raises(grpc.RpcError) as info:
            running.stub.Seal(
                pb.SealRequest(
                    custodian=who,
                    requested_at=int(time.time()),
                    reason="REASON-MARKER",
                    signature=b"\x01" * 64,
                )
            )
        assert info.value.code() != grpc.StatusCode.OK  # type: ignore[attr-defined]
    deadline = time.monotonic() + 5
    while "refused Seal" not in running.proc.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [ln for ln in running.proc.output().splitlines() if "refused Seal" in ln]
    assert len(lines) == 2, lines
    assert re.search(
        rf"WARNING keyquorum.custodian: refused Seal from custodian "
        rf"{re.escape(alice.credential.public().label)} "
        r"\((PERMISSION_DENIED|INVALID_ARGUMENT)\): \w+Error: ",
        lines[0],
    ), lines[0]
    assert "from custodian unknown" in lines[1]
    assert alice.fingerprint[:16] not in running.proc.output()
    output = running.proc.output()
    assert "MARKER" not in output  # nothing the client sent
    assert running.get("/health") == (200, "unsealed\n")  # a forged seal seals nothing


# -- the port's bounds, on the server object ----------------------------------------------


def test_connections_beyond_the_bound_are_closed_not_queued() -> None:
    registry = CollectorRegistry()
    Counter("probe", "a probe", registry=registry).inc()
    server = MetricsServer.start("127.0.0.1", 0, registry, health=lambda: (200, "unsealed"))
    idle = []
    try:
        for _ in range(metrics_http.MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            idle.append(s)
        time.sleep(0.3)  # let the server take them all
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        extra.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert extra.recv(100) == b""  # closed without an answer
        extra.close()
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 5
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request("GET", "/health")
            assert conn.getresponse().status == 200
            break
        except (ConnectionError, http.client.HTTPException):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        finally:
            conn.close()
    server.close()


def test_a_slow_client_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http._Handler, "timeout", 0.5)
    server = MetricsServer.start("127.0.0.1", 0, CollectorRegistry())
    try:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        s.sendall(b"GET /metr")  # and nothing more
        start = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - start < 4
        s.close()
    finally:
        server.close()
