"""A TLS-terminating proxy's view of the custodian plane.

`RecordingTlsRelay` plays a CDN or load balancer in front of the daemon: it
holds the daemon's certificate and key, so the CLI's TLS ends there, and it
records every plaintext byte it forwards in both directions. A whole
ceremony, the confirmations, an unseal and a seal run through it with the
real CLI; the recording must not hold any passphrase, private seed, share
plaintext or the master key, in any of the encodings `find_secrets` tries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    Custodian,
    DaemonProcess,
    console,
    custodian_secrets,
    find_secrets,
    make_custodians,
    start_daemon_process,
)
from tests.tls_relay import RecordingTlsRelay

DEPLOYMENT = "relayed-deployment"
THRESHOLD = 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki) -> Iterator[DaemonProcess]:
    proc = start_daemon_process(tmp_path / "data", pki)
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def relay(daemon: DaemonProcess, pki: DevPki) -> Iterator[RecordingTlsRelay]:
    r = RecordingTlsRelay(
        cert=pki.server_cert,
        key=pki.server_key,
        ca=pki.ca_cert,
        upstream=("127.0.0.1", daemon.port),
    ).start()
    yield r
    r.close()


def test_the_relay_sees_no_secret(
    tmp_path: Path, daemon: DaemonProcess, relay: RecordingTlsRelay
) -> None:
    custodians: list[Custodian] = make_custodians(tmp_path / "custodians")
    via = ["--server", f"127.0.0.1:{relay.port}", "--ca", str(daemon.pki.ca_cert)]

    def run(*args: str) -> str:
        r = console(*args)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        return r.stdout

    run("ceremony", "init", *via, "--deployment", DEPLOYMENT, "--code", daemon.ceremony_code(),
        *(str(c.public_path) for c in custodians))  # fmt: skip
    for c in custodians[:3]:
        run("custodian", "confirm", *via, *c.cli_args())
    for c in custodians[2:]:
        out = run("custodian", "unseal", *via, *c.cli_args())
    assert out.strip() == f"share accepted: {THRESHOLD} of {THRESHOLD}; UNSEALED"
    assert "UNSEALED" in run("status", *via)
    run("custodian", "seal", *via, *custodians[0].cli_args())
    assert "SEALED" in run("status", *via)

    recording = relay.recording()
    # The relay really was in the path and saw the traffic in the clear.
    assert relay.connections >= 12  # one per command above
    assert DEPLOYMENT.encode() in recording
    for c in custodians:
        assert c.fingerprint.encode() in recording
        assert c.public_path.read_bytes() in recording

    with daemon.channel() as channel:
        secrets = custodian_secrets(pb_grpc.CustodianServiceStub(channel), custodians, THRESHOLD)
    assert len(secrets) == 7 * 5 + 1
    assert find_secrets(recording, secrets) == []


def test_find_secrets_would_see_a_leak() -> None:
    """The search itself: a secret hidden in each encoding, at each alignment, is found."""
    import base64

    secret = bytes(range(1, 33))
    for blob in (
        b"xx" + secret + b"yy",
        b"key=" + secret.hex().encode(),
        b"KEY=" + secret.hex().upper().encode(),
        *(base64.b64encode(b"p" * pad + secret + b"s") for pad in range(3)),
        *(base64.urlsafe_b64encode(b"p" * pad + secret) for pad in range(3)),
    ):
        assert find_secrets(blob, {"s": secret}) != [], blob
    assert find_secrets(b"nothing here", {"s": secret}) == []
