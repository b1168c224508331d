"""keyquorum.client on its own: retries on UNAVAILABLE only, typed errors, file checks.

A scripted KeyService on a loopback port answers each call with the next
status of its script, so retrying is observable call by call; sleeping is
replaced by a recorder so the backoff is checked without waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from keyquorum.client import KeyClient, KeyServiceError
from keyquorum.hsm.pki import make_dev_pki
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.v1 import key_pb2 as pb
from keyquorum.v1 import key_pb2_grpc as pb_grpc

C = grpc.StatusCode


class Scripted(pb_grpc.KeyServiceServicer):
    def __init__(self) -> None:
        self.script: list[C | None] = []
        self.calls = 0

    def Wrap(self, request: pb.WrapRequest, context: grpc.ServicerContext) -> pb.WrapResponse:
        self.calls += 1
        code = self.script.pop(0) if self.script else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")
        return pb.WrapResponse(ciphertext=b"ct:" + request.plaintext, key_version=1)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[Scripted, int]]:
    servicer = Scripted()
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_KeyServiceServicer_to_server(servicer, s)
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    yield servicer, port
    s.stop(grace=None).wait()


def client(port: int, slept: list[float], attempts: int = 4) -> KeyClient:
    c = KeyClient.from_channel(
        grpc.insecure_channel(f"127.0.0.1:{port}"), attempts=attempts, backoff=0.1
    )
    c._sleep = slept.append
    return c


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
        ([C.UNAVAILABLE, C.PERMISSION_DENIED], 2, C.PERMISSION_DENIED),
    ],
    ids=[
        "ok", "one-unavailable", "three-unavailable", "unavailable-every-time",
        "failed-precondition", "internal", "resource-exhausted", "deadline", "then-denied",
    ],
)  # fmt: skip
def test_retries_on_unavailable_only(
    server: tuple[Scripted, int], script: list[C], calls: int, outcome: C | None
) -> None:
    servicer, port = server
    servicer.script, servicer.calls = list(script), 0
    slept: list[float] = []
    with client(port, slept) as c:
        if outcome is None:
            assert c.wrap("t", b"x").ciphertext == b"ct:x"
        else:
            with pytest.raises(KeyServiceError) as info:
                c.wrap("t", b"x")
            assert info.value.code == outcome
            assert f"scripted {outcome.name}" in str(info.value)
    assert servicer.calls == calls
    assert len(slept) == calls - 1
    # Exponential backoff with jitter in [0.5, 1.5) of 0.1 * 2**attempt.
    for attempt, delay in enumerate(slept):
        assert 0.05 * 2**attempt <= delay < 0.15 * 2**attempt


def test_no_server_is_unavailable_after_every_attempt() -> None:
    slept: list[float] = []
    c = KeyClient.from_channel(grpc.insecure_channel("127.0.0.1:1"), attempts=3, timeout=2)
    c._sleep = slept.append
    with c, pytest.raises(KeyServiceError) as info:
        c.wrap("t", b"x")
    assert info.value.code == C.UNAVAILABLE
    assert len(slept) == 2


def test_client_files_are_checked_before_connecting(tmp_path: Path) -> None:
    pki = make_dev_pki(tmp_path / "pki", clients=["backend/booking", "backend/other"])
    booking, other = pki.client("backend/booking"), pki.client("backend/other")
    with pytest.raises(InvalidInputError, match="is not the key of the certificate"):
        KeyClient("127.0.0.1:1", ca=pki.ca_cert, cert=booking.cert, key=other.key)
    with pytest.raises(InvalidInputError, match="does not exist"):
        KeyClient("127.0.0.1:1", ca=tmp_path / "nope.crt", cert=booking.cert, key=booking.key)
    with pytest.raises(InvalidInputError, match="attempts"):
        KeyClient.from_channel(grpc.insecure_channel("127.0.0.1:1"), attempts=0)
