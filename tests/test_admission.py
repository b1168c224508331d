"""Admission (hsm/services/admission.py) on real listeners: every bound, with small limits.

In-process listeners on real loopback ports with real TLS. A test service
whose calls stay open until the test lets them go makes calls "in flight"
without timing anything: the request timeout, the per-peer and per-listener
caps, reserved methods, and the identity cache keyed by the certificate's
SHA-256. Deadlines only turn a hang into a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from keyquorum.client import tls as client_tls
from keyquorum.hsm import tls
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services.admission import (
    AddressPeers,
    Admission,
    Call,
    CertificatePeers,
    ForwardedPeers,
    Peer,
    Unary,
    address_of,
    service,
)
from keyquorum.hsm.services.lanes import Lane
from keyquorum.hsm.services.server import Listener, Registration, create_server
from keyquorum.hsm.services.serving_loop import serving_loop
from keyquorum.quorum.errors import (
    AccessDeniedError,
    InvalidInputError,
    LimitExceededError,
    UnauthenticatedError,
)
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from tests.abuse import HeldCalls
from tests.certs import client_cert

SERVICE = "keyquorum.test.Gate"
HANG_GUARD_S = 30.0


class Gate:
    """A service whose `Hold` calls stay open until `release`; `Echo` answers at once."""

    def __init__(self) -> None:
        self.entered = 0
        self.peers: list[Peer] = []
        self._open: asyncio.Event | None = None

    async def hold(self, request: bytes, call: Call) -> bytes:
        if self._open is None:
            self._open = asyncio.Event()
        self.entered += 1
        self.peers.append(call.peer)
        await self._open.wait()
        return request

    async def echo(self, request: bytes, call: Call) -> bytes:
        self.peers.append(call.peer)
        return request

    def release(self) -> None:
        def go() -> None:
            if self._open is None:
                self._open = asyncio.Event()
            self._open.set()

        serving_loop().call_soon(go)

    def registration(self, *, reserved: bool = False) -> Registration:
        def build(admission: Admission) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
            raw = lambda b: b  # noqa: E731
            return service(
                admission,
                SERVICE,
                {"Hold": Unary(self.hold, raw, raw), "Echo": Unary(self.echo, raw, raw)},
            )

        return Registration(build, frozenset({f"/{SERVICE}/Hold"}) if reserved else frozenset())


@dataclass
class Served:
    listener: Listener
    port: int
    gate: Gate
    pki: DevPki

    def channel(self, who: str | tuple[Path, Path]) -> grpc.Channel:
        if isinstance(who, tuple):
            cert, key = who
        else:
            files = self.pki.client(who)
            cert, key = files.cert, files.key
        credentials = client_tls.channel_credentials(
            self.pki.ca_cert, client_cert=cert, client_key=key
        )
        return grpc.secure_channel(
            f"127.0.0.1:{self.port}", credentials, [("grpc.use_local_subchannel_pool", 1)]
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(
        tmp_path_factory.mktemp("admission-pki"),
        clients=["backend/booking", "backend/messaging", "auditor/alice"],
    )


@pytest.fixture
def serve(pki: DevPki) -> Iterator[object]:
    started: list[Served] = []

    def start(limits: Limits, *, reserved: bool = False) -> Served:
        gate = Gate()
        listener, port = create_server(
            host="127.0.0.1",
            port=0,
            credentials=tls.server_credentials(
                pki.server_cert, pki.server_key, client_ca=pki.ca_cert, require_client_auth=True
            ),
            limits=limits,
            register=[gate.registration(reserved=reserved)],
            service_names=[SERVICE],
            peers=CertificatePeers(),
        )
        listener.start()
        started.append(Served(listener, port, gate, pki))
        return started[-1]

    yield start
    for s in started:
        s.gate.release()
        s.listener.stop(grace=None).wait(HANG_GUARD_S)


def held(channel: grpc.Channel, method: str = "Hold") -> grpc.Future:  # type: ignore[type-arg]
    call = channel.unary_unary(f"/{SERVICE}/{method}")
    return call.future(b"req", timeout=HANG_GUARD_S)


def wait_entered(s: Served, count: int) -> None:
    deadline = threading.Event()
    for _ in range(int(HANG_GUARD_S / 0.01)):
        if s.gate.entered >= count:
            return
        deadline.wait(0.01)
    raise AssertionError(f"only {s.gate.entered} of {count} calls reached the service")


def refusal(future: grpc.Future) -> tuple[grpc.StatusCode, str]:  # type: ignore[type-arg]
    error = future.exception(timeout=HANG_GUARD_S)
    assert isinstance(error, grpc.RpcError)
    return error.code(), error.details() or ""


def test_a_request_that_does_not_arrive_in_time_ends_the_call(serve: object, pki: DevPki) -> None:
    s = serve(dataclasses.replace(DEFAULT_LIMITS, request_timeout_seconds=0.5))  # type: ignore[operator]
    files = pki.client("backend/booking")
    creds = client_tls.channel_credentials(
        pki.ca_cert, client_cert=files.cert, client_key=files.key
    )
    calls = HeldCalls()
    try:
        calls.open(f"127.0.0.1:{s.port}", creds, [f"/{SERVICE}/Echo"], 3)
        codes: list[grpc.StatusCode] = []
        for _ in range(int(HANG_GUARD_S / 0.05)):
            codes = calls.ended()
            if len(codes) == 3:
                break
            threading.Event().wait(0.05)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
    finally:
        calls.close()
    with s.channel("backend/booking") as channel:
        assert channel.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=HANG_GUARD_S) == b"x"


def test_calls_per_peer_are_capped_and_other_peers_still_served(serve: object) -> None:
    s = serve(dataclasses.replace(DEFAULT_LIMITS, max_calls_per_peer=2))  # type: ignore[operator]
    with s.channel("backend/booking") as booking, s.channel("backend/messaging") as messaging:
        first = [held(booking), held(booking)]
        wait_entered(s, 2)
        code, details = refusal(held(booking))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_calls_per_peer" in details
        # Another certificate is another peer: its calls are admitted.
        other = held(messaging)
        wait_entered(s, 3)
        assert messaging.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=HANG_GUARD_S) == b"x"
        s.gate.release()
        assert [f.result(timeout=HANG_GUARD_S) for f in [*first, other]] == [b"req"] * 3
        # Places come back when calls end.
        assert booking.unary_unary(f"/{SERVICE}/Echo")(b"y", timeout=HANG_GUARD_S) == b"y"


def test_the_listener_cap_holds_over_all_peers(serve: object) -> None:
    limits = dataclasses.replace(DEFAULT_LIMITS, max_calls_per_peer=2, max_calls=3)
    s = serve(limits)  # type: ignore[operator]
    with s.channel("backend/booking") as booking, s.channel("backend/messaging") as messaging:
        calls = [held(booking), held(booking), held(messaging)]
        wait_entered(s, 3)
        code, details = refusal(held(messaging))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_calls" in details
        assert "max_calls_per_peer" not in details
        s.gate.release()
        assert [f.result(timeout=HANG_GUARD_S) for f in calls] == [b"req"] * 3


def test_reserved_methods_are_not_counted(serve: object) -> None:
    limits = dataclasses.replace(DEFAULT_LIMITS, max_calls_per_peer=1, max_calls=1)
    s = serve(limits, reserved=True)  # type: ignore[operator]
    with s.channel("backend/booking") as booking:
        reserved = [held(booking) for _ in range(5)]  # Hold is reserved here
        wait_entered(s, 5)
        assert booking.unary_unary(f"/{SERVICE}/Echo")(b"z", timeout=HANG_GUARD_S) == b"z"
        s.gate.release()
        assert [f.result(timeout=HANG_GUARD_S) for f in reserved] == [b"req"] * 5


# -- who the peer is ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("common_name", "sans"),
    [
        ("keyquorum://backend/booking", []),
        ("forged", [x509.DNSName("keyquorum://backend/booking")]),
        ("keyquorum://backend/booking", [x509.DNSName("keyquorum://backend/booking")]),
    ],
    ids=["cn", "dns-san", "both"],
)
def test_a_name_that_is_not_a_uri_san_names_no_one(
    serve: object, pki: DevPki, tmp_path: Path, common_name: str, sans: list[x509.GeneralName]
) -> None:
    """Before and after the real booking certificate called: the forged one is nobody."""
    s = serve(DEFAULT_LIMITS)  # type: ignore[operator]
    forged = client_cert(pki, tmp_path / "forged", common_name, sans)
    with s.channel(forged) as channel:
        assert channel.unary_unary(f"/{SERVICE}/Echo")(b"1", timeout=HANG_GUARD_S) == b"1"
    with s.channel("backend/booking") as channel:
        assert channel.unary_unary(f"/{SERVICE}/Echo")(b"2", timeout=HANG_GUARD_S) == b"2"
    with s.channel(forged) as channel:
        assert channel.unary_unary(f"/{SERVICE}/Echo")(b"3", timeout=HANG_GUARD_S) == b"3"
    forged_before, booking, forged_after = s.gate.peers
    assert booking.uri == "keyquorum://backend/booking"
    for peer in (forged_before, forged_after):
        assert peer.identity is None
        assert peer.key != booking.key
        with pytest.raises(UnauthenticatedError):
            peer.require("backend")


def test_roles_stay_apart(serve: object) -> None:
    s = serve(DEFAULT_LIMITS)  # type: ignore[operator]
    for who in ("auditor/alice", "backend/booking"):
        with s.channel(who) as channel:
            channel.unary_unary(f"/{SERVICE}/Echo")(b"x", timeout=HANG_GUARD_S)
    auditor, backend = s.gate.peers
    assert auditor.require("auditor") == "keyquorum://auditor/alice"
    assert backend.require("backend") == "keyquorum://backend/booking"
    with pytest.raises(AccessDeniedError, match="not a backend identity"):
        auditor.require("backend")
    with pytest.raises(AccessDeniedError, match="not an auditor identity"):
        backend.require("auditor")


def test_the_identity_cache_is_keyed_by_the_certificates_sha256(
    pki: DevPki, tmp_path: Path
) -> None:
    """Two certificates with the same names are two entries; one certificate is one."""
    from cryptography.hazmat.primitives import serialization

    peers = CertificatePeers()
    uri = [x509.UniformResourceIdentifier("keyquorum://backend/booking")]
    a = client_cert(pki, tmp_path / "a", "booking", uri)[0]
    b = client_cert(pki, tmp_path / "b", "booking", uri)[0]

    def der(path: Path) -> bytes:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)

    first, again, other = (
        peers.peer_of_certificate(der(a)),
        peers.peer_of_certificate(der(a)),
        peers.peer_of_certificate(der(b)),
    )
    assert first is again
    assert other is not first
    assert first.key != other.key
    assert first.uri == other.uri == "keyquorum://backend/booking"
    two = client_cert(
        pki,
        tmp_path / "two",
        "x",
        [*uri, x509.UniformResourceIdentifier("keyquorum://backend/messaging")],
    )[0]
    refused = peers.peer_of_certificate(der(two))
    assert isinstance(refused.refusal, AccessDeniedError)
    with pytest.raises(AccessDeniedError, match="2 keyquorum identities"):
        refused.require("backend")


def test_forwarded_peers_need_the_workers_token() -> None:
    with pytest.raises(InvalidInputError):
        ForwardedPeers(b"short")

    class Context:
        def __init__(self, metadata: tuple[tuple[str, bytes], ...]) -> None:
            self._metadata = metadata

        def invocation_metadata(self) -> tuple[tuple[str, bytes], ...]:
            return self._metadata

    peers = ForwardedPeers(b"k" * 32)
    forged = peers.peer(Context(((ForwardedPeers.TOKEN, b"j" * 32),)))  # type: ignore[arg-type]
    assert isinstance(forged.refusal, UnauthenticatedError)
    missing = peers.peer(Context(()))  # type: ignore[arg-type]
    assert isinstance(missing.refusal, UnauthenticatedError)
    nobody = peers.peer(Context(((ForwardedPeers.TOKEN, b"k" * 32),)))  # type: ignore[arg-type]
    assert nobody.refusal is None
    assert nobody.identity is None


@pytest.mark.parametrize(
    ("reported", "key"),
    [
        ("ipv4:203.0.113.7:51234", "ipv4:203.0.113.7"),
        ("ipv6:[2001:db8::1]:443", "ipv6:[2001:db8::1]"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
    ],
)
def test_an_address_peer_drops_the_port(reported: str, key: str) -> None:
    assert address_of(reported) == key
    assert AddressPeers is not None


def test_a_full_lane_refuses_at_once() -> None:
    lane = Lane("test", threads=1, waiting=1)
    blocker = threading.Event()

    async def run() -> list[object]:
        first = asyncio.ensure_future(lane.run(blocker.wait))
        second = asyncio.ensure_future(lane.run(lambda: "queued"))
        await asyncio.sleep(0.05)
        with pytest.raises(LimitExceededError, match="test lane is full"):
            await lane.run(lambda: "refused")
        blocker.set()
        return [await first, await second, await lane.run(lambda: "again")]

    assert asyncio.run(run()) == [True, "queued", "again"]
    lane.close()
