"""Abuse of capacity against a real `keyquorum server run`: nothing a peer holds stops others.

One daemon process for the module (README's settings: TLS custodian port,
mTLS port with one worker process, the default `Limits` but a 3 s TLS
handshake deadline so the slow-handshake test can see connections dropped,
and 120 s for a request to arrive, so that the held calls stay held for
the whole of each test; tests/test_admission.py ends them at the deadline),
unsealed, a tenant created, granted to the booking backend and active.
Every abuse is real: gRPC calls that send their headers and never their
request (tests/abuse.py, `HeldCalls`), TCP connections that start a TLS
handshake and stop (`SlowTls`), thousands of streams from one client,
oversize batches. In each, a well-behaved client's calls succeed (asserted
by their results, never by their timing), and a custodian's seal gets
through while the abuse is still held; the daemon is unsealed again after.

The counts: the issue's 4, 16 and 1,000 header-only calls per port, 60 to
a connection (under its 64 streams); 1,000 on the mTLS port come from 8
client certificates, or from one. 200 slow TLS connections per port (under
`max_connections`, 256). The seal's 2 s is the
issue's functional bound, asserted as a correctness deadline; a seal takes
some tens of milliseconds here.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import KeyClient, KeyServiceError
from keyquorum.client import tls as client_tls
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from keyquorum.v1 import key_pb2 as kpb
from tests.abuse import HeldCalls, SlowTls
from tests.certs import client_cert
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    make_custodians,
    propose,
    start_daemon_process,
)

TENANT = "acme-health"
CONTEXT = {"patient": "p-4711"}
BACKEND, AUDITOR = "backend/booking", "auditor/alice"
THRESHOLD = 2
#: The issue's functional bound for a seal under the flood (a correctness deadline).
SEAL_DEADLINE_S = 2.0
#: Certificates the 1,000 held calls on the mTLS port come from.
HOLDER_CERTS = 8
CUSTODIAN_METHODS = tuple(
    f"/keyquorum.v1.CustodianService/{m}"
    for m in ("Seal", "GetStatus", "Propose", "SubmitShare", "ListProposals")
)
MTLS_METHODS = (
    "/keyquorum.v1.KeyService/Wrap",
    "/keyquorum.v1.KeyService/BatchWrap",
    "/keyquorum.v1.AuditService/GetEntries",
    "/grpc.health.v1.Health/Check",
)


@dataclass
class Daemon:
    proc: DaemonProcess
    pki: DevPki
    custodians: list[Custodian]
    mtls_port: int
    holders: list[tuple[Path, Path]]

    @property
    def custodian_target(self) -> str:
        return f"127.0.0.1:{self.proc.port}"

    @property
    def mtls_target(self) -> str:
        return f"127.0.0.1:{self.mtls_port}"

    def stub(self) -> pb_grpc.CustodianServiceStub:
        return pb_grpc.CustodianServiceStub(self.proc.channel())

    def mtls_credentials(self, who: str) -> grpc.ChannelCredentials:
        files = self.pki.client(who)
        return client_tls.channel_credentials(
            self.pki.ca_cert, client_cert=files.cert, client_key=files.key
        )

    def holder_credentials(self, i: int) -> grpc.ChannelCredentials:
        cert, key = self.holders[i]
        return client_tls.channel_credentials(self.pki.ca_cert, client_cert=cert, client_key=key)

    def backend(self, who: str = BACKEND) -> KeyClient:
        files = self.pki.client(who)
        return KeyClient(
            self.mtls_target, ca=self.pki.ca_cert, cert=files.cert, key=files.key, attempts=1
        )


def quorum(
    stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian], op: str, **params: str
) -> None:
    proposal = propose(stub, custodians[0].credential, op, dict(params))
    for c in custodians[:THRESHOLD]:
        response = actions.verdict(
            stub, proposal.id, c.fingerprint, lambda _t, c=c: c.credential, verdict="approve"
        )
    assert response.executed


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("abuse")
    dev_pki = make_dev_pki(base / "pki", clients=[BACKEND, "backend/messaging", AUDITOR])
    holders = [
        client_cert(
            dev_pki,
            base / f"holder-{i}",
            f"holder {i}",
            [x509.UniformResourceIdentifier(f"keyquorum://auditor/holder-{i}")],
        )
        for i in range(HOLDER_CERTS)
    ]
    custodians = make_custodians(base / "custodians", names=("alice", "bob", "carol"))
    data = base / "data"
    proc = start_daemon_process(
        data, dev_pki,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(dev_pki.ca_cert),
        "--workers", "1", "--handshake-timeout", "3", "--request-timeout", "120",
    )  # fmt: skip
    try:
        ready = json.loads((data.parent / f"{data.name}.ready").read_text())
        d = Daemon(proc, dev_pki, custodians, int(ready["mtls_port"]), holders)
        stub = d.stub()
        stub.InitCeremony(ceremony_request("abuse", THRESHOLD, custodians, proc.ceremony_code()))
        for c in custodians[:THRESHOLD]:
            actions.submit_share(stub, c.credential)
        quorum(stub, custodians, "create-tenant", tenant=TENANT)
        quorum(stub, custodians, "grant", tenant=TENANT, backend="booking")
        quorum(stub, custodians, "activate-tenant", tenant=TENANT, duration_seconds="3600")
        yield d
    finally:
        assert proc.stop() == 0


# -- what a well-behaved client checks ---------------------------------------------


def served(d: Daemon) -> None:
    """A custodian's status, a backend's Wrap and Unwrap, and health on both ports all work."""
    stub = d.stub()
    assert stub.GetStatus(pb.GetStatusRequest(), timeout=30).initialized
    with d.backend() as booking:
        wrapped = booking.wrap(TENANT, b"well-behaved", CONTEXT)
        with booking.unwrap(wrapped.ciphertext, CONTEXT) as plain:
            assert plain.reveal() == b"well-behaved"
    with grpc.secure_channel(d.mtls_target, d.mtls_credentials(AUDITOR)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="keyquorum.v1.KeyService"), timeout=30
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def seal(d: Daemon) -> float:
    """A custodian's emergency seal; the seconds it took until its answer.

    The answer comes once every worker process dropped its keys.
    """
    stub = d.stub()
    began = time.monotonic()
    actions.seal(
        stub,
        d.custodians[2].fingerprint,
        lambda _t: d.custodians[2].credential,
        reason="abuse test",
        now=int(time.time()),
    )
    return time.monotonic() - began


def sealed_everywhere(d: Daemon) -> None:
    """After the seal's answer: status says sealed, and the data plane gives no key."""
    assert d.stub().GetStatus(pb.GetStatusRequest(), timeout=30).sealed
    with d.backend() as booking, pytest.raises(KeyServiceError) as info:
        booking.wrap(TENANT, b"x", CONTEXT)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def unseal(d: Daemon) -> None:
    stub = d.stub()
    for c in d.custodians[:THRESHOLD]:
        actions.submit_share(stub, c.credential)
    served(d)


def seal_during(d: Daemon) -> None:
    """The seal gets through while the abuse is held; then the daemon is unsealed again."""
    seal(d)
    sealed_everywhere(d)
    unseal(d)


# -- the abuse ---------------------------------------------------------------------


@pytest.mark.parametrize("count", [4, 16, 1000])
def test_header_only_calls_on_the_custodian_port_hold_nothing(d: Daemon, count: int) -> None:
    held = HeldCalls()
    try:
        held.open(
            d.custodian_target,
            client_tls.channel_credentials(d.pki.ca_cert),
            CUSTODIAN_METHODS,
            count,
        )
        served(d)
        seal_during(d)
        assert held.ended() == []  # still held: they were never what blocked anyone
    finally:
        held.close()


@pytest.mark.parametrize("count", [4, 16, 1000])
def test_header_only_calls_on_the_mtls_port_hold_nothing(d: Daemon, count: int) -> None:
    held = HeldCalls()
    try:
        if count <= 16:  # the issue's: any certificate of the client CA, an auditor's
            held.open(d.mtls_target, d.mtls_credentials(AUDITOR), MTLS_METHODS, count)
        else:
            for i in range(HOLDER_CERTS):
                share = count // HOLDER_CERTS
                held.open(d.mtls_target, d.holder_credentials(i), MTLS_METHODS, share)
        served(d)
        seal_during(d)
        assert held.ended() == []
    finally:
        held.close()


def test_slow_tls_handshakes_hold_nothing_and_are_dropped(d: Daemon) -> None:
    slow = [
        SlowTls(d.proc.port, 200),
        SlowTls(d.mtls_port, 200),
        SlowTls(d.mtls_port, 20, start_handshake=False),
    ]
    try:
        served(d)
        seal_during(d)
        # --handshake-timeout 3: every one is closed by the daemon (20 s only turns
        # a hang into a failure).
        for group in slow:
            assert group.closed_by_server(wait=20) == len(group.sockets)
        served(d)
    finally:
        for group in slow:
            group.close()


def test_seal_gets_through_a_flood_on_both_ports(d: Daemon) -> None:
    """1,000 never-finishing calls and 200 slow TLS connections on each port; then a seal."""
    held = HeldCalls()
    slow: list[SlowTls] = []
    try:
        held.open(
            d.custodian_target,
            client_tls.channel_credentials(d.pki.ca_cert),
            CUSTODIAN_METHODS,
            1000,
        )
        for i in range(HOLDER_CERTS):
            held.open(d.mtls_target, d.holder_credentials(i), MTLS_METHODS, 1000 // HOLDER_CERTS)
        slow = [SlowTls(d.proc.port, 200), SlowTls(d.mtls_port, 200)]
        took = seal(d)
        assert took < SEAL_DEADLINE_S, f"the seal took {took:.2f} s under the flood"
        sealed_everywhere(d)
        assert held.ended() == []
    finally:
        held.close()
        for group in slow:
            group.close()
    unseal(d)


def test_one_client_opening_thousands_of_streams(d: Daemon) -> None:
    """3,000 Wraps at once from one backend: each served or refused by a named cap, none lost.

    Refused: a stream past the connection's 64 that the daemon had not yet
    freed (HTTP/2 REFUSED_STREAM: not processed, safe to retry, which the SDK
    does), or a call past the certificate's 128 (RESOURCE_EXHAUSTED naming
    the cap). Nothing else: no CANCELLED, no call answered and lost.
    """
    import asyncio

    from grpc import aio

    files = d.pki.client(BACKEND)
    request = kpb.WrapRequest(tenant=TENANT, plaintext=b"x", context=CONTEXT).SerializeToString()

    async def flood(connections: int) -> list[tuple[grpc.StatusCode, str]]:
        credentials = client_tls.channel_credentials(
            d.pki.ca_cert, client_cert=files.cert, client_key=files.key
        )
        channels = [
            aio.secure_channel(d.mtls_target, credentials, [("grpc.use_local_subchannel_pool", 1)])
            for _ in range(connections)
        ]
        for channel in channels:  # the daemon's SETTINGS (64 streams) are known
            await channel.channel_ready()
        calls = [
            channels[i % connections].unary_unary("/keyquorum.v1.KeyService/Wrap")(
                request, timeout=120
            )
            for i in range(3000)
        ]
        outcomes = []
        for call in calls:
            with contextlib.suppress(aio.AioRpcError):
                await call
            outcomes.append((await call.code(), await call.details() or ""))
        for channel in channels:
            await channel.close()
        return outcomes

    for connections in (1, 4):
        outcomes = asyncio.run(flood(connections))
        codes = {code for code, _ in outcomes}
        assert grpc.StatusCode.OK in codes
        for code, details in outcomes:
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert "max_calls_per_peer" in details
            elif code == grpc.StatusCode.UNAVAILABLE:
                assert "RST_STREAM with error code 7" in details  # REFUSED_STREAM
            else:
                assert code == grpc.StatusCode.OK, (code, details)
        served(d)


def test_oversize_batches_are_refused_and_others_served(d: Daemon) -> None:
    with d.backend() as booking:
        channel = booking.channel
        batch = channel.unary_unary("/keyquorum.v1.KeyService/BatchWrap")
        item = kpb.WrapRequest(tenant=TENANT, plaintext=b"x", context=CONTEXT)
        too_many = kpb.BatchWrapRequest(items=[item] * 1001).SerializeToString()
        with pytest.raises(grpc.RpcError) as info:
            batch(too_many, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 1000 items" in (info.value.details() or "")
        big = kpb.WrapRequest(tenant=TENANT, plaintext=b"x" * 4096, context=CONTEXT)
        too_large = kpb.BatchWrapRequest(items=[big] * 1100).SerializeToString()
        assert len(too_large) > 4 * 1024 * 1024
        with pytest.raises(grpc.RpcError) as info:
            batch(too_large, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    served(d)
    seal_during(d)
