"""keyquorum.client's transport on its own: gRPC's retry policy, deadlines, targets, checks.

A scripted KeyService on a loopback port answers each call with the next
status of its script, so what gRPC's retry policy (set in the channel's
service config by `keyquorum.client.channel`) repeats is observable call
by call. The real daemon over mTLS, failover across replicas and the seal
are in tests/test_sdk_client.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from keyquorum.client import KeyClient, KeyServiceError
from keyquorum.client import channel as client_channel
from keyquorum.hsm.pki import make_dev_pki
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.v1 import key_pb2 as pb
from keyquorum.v1 import key_pb2_grpc as pb_grpc

C = grpc.StatusCode


class Scripted(pb_grpc.KeyServiceServicer):
    def __init__(self) -> None:
        self.script: list[C | None] = []
        self.calls = 0
        self.stall = threading.Event()

    def Wrap(self, request: pb.WrapRequest, context: grpc.ServicerContext) -> pb.WrapResponse:
        self.calls += 1
        code = self.script.pop(0) if self.script else None
        if code is None and request.tenant == "slow":
            self.stall.wait(5)
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        return pb.WrapResponse(ciphertext=b"ct:" + request.plaintext, key_version=1)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Scripted, int]]:
    servicer = Scripted()
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_KeyServiceServicer_to_server(servicer, s)
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    yield servicer, port
    servicer.stall.set()
    s.stop(grace=None).wait()


def client(port: int, attempts: int = 4, timeout: float = 5.0) -> KeyClient:
    """A client whose channel has exactly the service config KeyClient gives its own."""
    targets = client_channel.resolve_targets(
        f"127.0.0.1:{port}", server_name=None, health_check=None
    )
    options = client_channel.channel_options(
        targets, attempts=attempts, backoff=0.01, timeout=timeout
    )
    return KeyClient.from_channel(grpc.insecure_channel(targets.target, options), timeout=timeout)


@pytest.mark.parametrize(
    ("script", "calls", "outcome"),
    [
        ([], 1, None),
        ([C.UNAVAILABLE], 2, None),
        ([C.UNAVAILABLE, C.UNAVAILABLE, C.UNAVAILABLE], 4, None),
        ([C.UNAVAILABLE] * 4, 4, C.UNAVAILABLE),
        ([C.FAILED_PRECONDITION], 1, C.FAILED_PRECONDITION),
        ([C.INTERNAL], 1, C.INTERNAL),
        ([C.RESOURCE_EXHAUSTED], 1, C.RESOURCE_EXHAUSTED),
        ([C.DEADLINE_EXCEEDED], 1, C.DEADLINE_EXCEEDED),
        ([C.INVALID_ARGUMENT], 1, C.INVALID_ARGUMENT),
        ([C.UNAVAILABLE, C.PERMISSION_DENIED], 2, C.PERMISSION_DENIED),
    ],
    ids=[
        "ok", "one-unavailable", "three-unavailable", "unavailable-every-time",
        "failed-precondition", "internal", "resource-exhausted", "deadline",
        "invalid-argument", "then-denied",
    ],
)  # fmt: skip
def test_grpc_retries_unavailable_only(
    server: tuple[Scripted, int], script: list[C], calls: int, outcome: C | None
) -> None:
    servicer, port = server
    servicer.script, servicer.calls = list(script), 0
    with client(port) as c:
        if outcome is None:
            assert c.wrap("t", b"x").ciphertext == b"ct:x"
        else:
            with pytest.raises(KeyServiceError) as info:
                c.wrap("t", b"x")
            assert info.value.code == outcome
            assert f"scripted {outcome.name}" in str(info.value)
    assert servicer.calls == calls


def test_one_attempt_means_no_retry(server: tuple[Scripted, int]) -> None:
    servicer, port = server
    servicer.script, servicer.calls = [C.UNAVAILABLE], 0
    with client(port, attempts=1) as c, pytest.raises(KeyServiceError) as info:
        c.wrap("t", b"x")
    assert info.value.code == C.UNAVAILABLE
    assert servicer.calls == 1


def test_every_call_has_a_deadline(server: tuple[Scripted, int]) -> None:
    """A daemon that does not answer: DEADLINE_EXCEEDED after the timeout, not retried."""
    servicer, port = server
    servicer.script, servicer.calls = [], 0
    with client(port, timeout=0.3) as c, pytest.raises(KeyServiceError) as info:
        c.wrap("slow", b"x")
    assert info.value.code == C.DEADLINE_EXCEEDED
    assert servicer.calls == 1


def test_no_server_is_unavailable() -> None:
    with client(1, attempts=3, timeout=2) as c, pytest.raises(KeyServiceError) as info:
        c.wrap("t", b"x")
    assert info.value.code == C.UNAVAILABLE


def test_service_config_retries_only_unavailable_on_keyservice() -> None:
    config = json.loads(
        client_channel.service_config(
            attempts=4, backoff=0.05, timeout=10, health_check=True, balance=True
        )
    )
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "keyquorum.v1.KeyService"}]
    assert "timeout" not in method  # passed with each call: grpc/grpc#34547
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert config["healthCheckConfig"] == {"serviceName": "keyquorum.v1.KeyService"}
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "retryThrottling" in config
    single = json.loads(
        client_channel.service_config(
            attempts=1, backoff=0.05, timeout=10, health_check=False, balance=False
        )
    )
    assert "retryPolicy" not in single["methodConfig"][0]
    assert "healthCheckConfig" not in single
    assert "loadBalancingConfig" not in single


@pytest.mark.parametrize(
    ("target", "server_name", "expected"),
    [
        ("kq.example:7444", None, ("kq.example:7444", (), None, False)),
        (["127.0.0.1:7444"], None, ("127.0.0.1:7444", (), None, False)),
        (
            ["127.0.0.1:7444", "127.0.0.1:7445"],
            None,
            ("ipv4:127.0.0.1:7444,127.0.0.1:7445", 2, "127.0.0.1", True),
        ),
        (
            ["10.0.0.5:7444", "10.0.0.6:7444"],
            "kq.example",
            ("ipv4:10.0.0.5:7444,10.0.0.6:7444", 2, "kq.example", True),
        ),
        (["[::1]:7444", "[::1]:7445"], None, ("ipv6:[::1]:7444,[::1]:7445", 2, "::1", True)),
    ],
    ids=["one-name", "one-in-a-list", "two-ports-one-host", "two-hosts-named", "ipv6"],
)
def test_targets(target: object, server_name: str | None, expected: tuple[object, ...]) -> None:
    t = client_channel.resolve_targets(target, server_name=server_name, health_check=None)  # type: ignore[arg-type]
    replicas = len(t.replicas) if t.replicas else ()
    assert (t.target, replicas, t.server_name, t.health_check) == expected


@pytest.mark.parametrize(
    ("target", "server_name", "match"),
    [
        (["kq-a.example:7444", "kq-b.example:7444"], None, "must be IP literals"),
        (["10.0.0.5:7444", "10.0.0.6:7444"], None, "give server_name"),
        (["10.0.0.5:7444", "[fd00::6]:7444"], "kq", "all be IPv4 or all IPv6"),
        (["10.0.0.5:7444", "10.0.0.5:7444"], None, "given twice"),
        (["10.0.0.5"], None, "HOST:PORT"),
        (["10.0.0.5:0"], None, "port"),
        (["fd00::5:7444"], None, "brackets"),
        ([], None, "at least one"),
        ([7444], None, "must be a str"),
    ],
    ids=[
        "host-names", "hosts-without-name", "mixed-families", "twice", "no-port", "port-0",
        "v6-without-brackets", "empty", "not-a-str",
    ],
)  # fmt: skip
def test_bad_targets_are_named(target: object, server_name: str | None, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        client_channel.resolve_targets(target, server_name=server_name, health_check=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"attempts": 0}, "attempts must be 1 to 5"),
        ({"attempts": 6}, "attempts must be 1 to 5"),
        ({"timeout": 0}, "timeout"),
        ({"backoff": 0}, "backoff"),
    ],
    ids=["attempts-0", "attempts-6", "timeout-0", "backoff-0"],
)
def test_client_settings_are_checked(tmp_path: Path, kw: dict[str, float], match: str) -> None:
    pki = make_dev_pki(tmp_path / "pki", clients=["backend/booking"])
    files = pki.client("backend/booking")
    with pytest.raises(InvalidInputError, match=match):
        KeyClient("127.0.0.1:1", ca=pki.ca_cert, cert=files.cert, key=files.key, **kw)  # type: ignore[arg-type]


def test_client_files_are_checked_before_connecting(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki", clients=["backend/booking", "backend/other"])
    booking, other = pki.client("backend/booking"), pki.client("backend/other")
    with pytest.raises(InvalidInputError, match="is not the key of the certificate"):
        KeyClient("127.0.0.1:1", ca=pki.ca_cert, cert=booking.cert, key=other.key)
    with pytest.raises(InvalidInputError, match="does not exist"):
        KeyClient("127.0.0.1:1", ca=tmp_path / "nope.crt", cert=booking.cert, key=booking.key)
