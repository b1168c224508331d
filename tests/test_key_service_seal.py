"""KeyService and the seal: health, in-flight calls, and no key after a seal.

A daemon of its own (sealing it would spoil tests/test_key_service.py's).
Many backends call Unwrap and GenerateDataKey over real mTLS while a
custodian seals: every call either completes correctly or fails cleanly
with FAILED_PRECONDITION, every call started after the seal fails, and the
data plane released no key after the moment the daemon wiped its keys.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import KeyServiceError
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.tenant_keys import TenantKey
from keyquorum.hsm.dataplane import UnwrapItem, WrapItem
from keyquorum.hsm.dataplane.snapshot import DataPlaneSnapshot, HeldKey
from keyquorum.hsm.pki import DevPki
from keyquorum.hsm.services import key_service
from keyquorum.quorum.errors import KeyquorumError, SealedError, StateError
from tests.custodian_steps import K, ceremony, unseal
from tests.harness import Custodian, InProcessDaemon, in_process_daemon, make_custodians
from tests.key_plane import (
    BOOKING,
    CONTEXT,
    MARKER,
    TENANT,
    KeyPlane,
    key_plane,
    make_pki,
    ready_tenant,
)
from tests.waiting import until

C = grpc.StatusCode
THREADS = 8


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"))


@dataclass
class Served:
    kp: KeyPlane
    custodians: list[Custodian]

    @property
    def d(self) -> InProcessDaemon:
        return self.kp.d

    def seal(self) -> None:
        c = self.custodians[6]
        actions.seal(self.d.stub, c, lambda _t: c.credential, reason="test", now=self.d.clock.now)

    def health(self) -> int:
        with self.kp.client() as c:
            stub = health_pb2_grpc.HealthStub(c.channel)
            r = stub.Check(health_pb2.HealthCheckRequest(service=key_service.SERVICE_NAME))
        return int(r.status)


@pytest.fixture
def served(tmp_path: Path, dev_pki: DevPki, custodians: list[Custodian]) -> Iterator[Served]:
    with in_process_daemon(tmp_path / "data", dev_pki) as d:
        ceremony(d, custodians)
        with key_plane(d, dev_pki) as kp:
            yield Served(kp, custodians)


def test_health_follows_the_seal_state(served: Served) -> None:
    assert served.health() == health_pb2.HealthCheckResponse.NOT_SERVING
    unseal(served.d, served.custodians[:K])
    assert served.health() == health_pb2.HealthCheckResponse.SERVING
    served.seal()
    assert served.health() == health_pb2.HealthCheckResponse.NOT_SERVING


def test_sealed_is_failed_precondition_for_every_call(served: Served) -> None:
    unseal(served.d, served.custodians[:K])
    ready_tenant(served.d, served.custodians, TENANT)
    with served.kp.client() as c:
        ct = c.wrap(TENANT, MARKER, CONTEXT).ciphertext
        served.seal()
        for fn in (
            lambda: c.wrap(TENANT, MARKER, CONTEXT),
            lambda: c.unwrap(ct, CONTEXT),
            lambda: c.generate_data_key(TENANT, CONTEXT),
            lambda: c.rewrap(ct, CONTEXT),
            lambda: c.batch_wrap([(TENANT, MARKER, CONTEXT)]),
            lambda: c.batch_unwrap([(ct, CONTEXT)]),
        ):
            with pytest.raises(KeyServiceError) as info:
                fn()
            assert info.value.code == C.FAILED_PRECONDITION
            assert "sealed" in info.value.details


def seal_after_taking_the_key(monkeypatch: pytest.MonkeyPatch, daemon: Daemon, reason: str) -> None:
    """Every data-plane call seals the daemon right after its steps 1 and 2 took the key."""
    original = DataPlaneSnapshot.key_for

    def key_for_then_seal(
        self: DataPlaneSnapshot, backend: str, tenant: str, version: int | None, now: int
    ) -> tuple[int, HeldKey]:
        taken = original(self, backend, tenant, version, now)
        daemon.seal_for_shutdown(reason)
        return taken

    monkeypatch.setattr(DataPlaneSnapshot, "key_for", key_for_then_seal)


def test_a_seal_closes_the_prepared_keys_even_for_copies_taken_before(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyring's cached AES-GCM key goes with the seal: a copy taken earlier cannot use it.

    And a wrap whose key copy was taken before the seal fails cleanly as
    sealed, instead of encrypting under a key the daemon already wiped.
    """
    unseal(served.d, served.custodians[:K])
    ready_tenant(served.d, served.custodians, TENANT)
    daemon, plane = served.d.daemon, served.kp.plane
    _version, early = daemon.tenant_key(TENANT)
    assert isinstance(early, TenantKey)
    cipher = early.cipher()
    assert not cipher.closed
    seal_after_taking_the_key(monkeypatch, daemon, "a seal races the wrap")
    with pytest.raises(SealedError, match="sealed during the call"):
        plane.wrap("keyquorum://backend/booking", WrapItem(TENANT, MARKER, CONTEXT))
    assert cipher.closed
    with pytest.raises(StateError, match="wiped"):
        early.cipher()
    with pytest.raises(StateError, match="wiped"):
        cipher.encrypt(bytes(12), b"x", b"")
    early.wipe()


def test_a_seal_between_taking_the_key_and_answering_releases_nothing(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 4 of the data plane: the seal epoch is checked after the AEAD call."""
    unseal(served.d, served.custodians[:K])
    ready_tenant(served.d, served.custodians, TENANT)
    plane, daemon = served.kp.plane, served.d.daemon
    identity = "keyquorum://backend/booking"
    ct = plane.wrap(identity, WrapItem(TENANT, MARKER, CONTEXT)).ciphertext
    seal_after_taking_the_key(monkeypatch, daemon, "a seal races the call")
    with pytest.raises(SealedError, match="sealed during the call"):
        plane.unwrap(identity, UnwrapItem(ct, CONTEXT))


@dataclass
class Outcome:
    started: float
    ended: float
    code: grpc.StatusCode | None
    correct: bool


class ReleaseClock:
    """A usage sink and seal observer: when each key left the data plane, when the seal hit."""

    def __init__(self) -> None:
        self.released: list[float] = []
        self.sealed_at: float | None = None
        self._lock = threading.Lock()

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        if error is None and operation in {"unwrap", "generate_data_key"}:
            with self._lock:
                self.released.append(time.monotonic())

    def on_seal_state(self, sealed: bool) -> None:
        if sealed and self.sealed_at is None:
            self.sealed_at = time.monotonic()


def test_many_clients_and_a_seal_in_the_middle(
    tmp_path: Path, dev_pki: DevPki, custodians: list[Custodian]
) -> None:
    clock = ReleaseClock()
    with in_process_daemon(tmp_path / "data", dev_pki) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        ready_tenant(d, custodians, TENANT)
        d.daemon.add_seal_observer(clock.on_seal_state)
        with key_plane(d, dev_pki, usage=(clock,)) as kp:
            served = Served(kp, custodians)
            with kp.client() as c:
                ct = c.wrap(TENANT, MARKER, CONTEXT).ciphertext
            outcomes: list[Outcome] = []
            lock = threading.Lock()
            stop = threading.Event()

            def backend(i: int) -> None:
                with kp.client(BOOKING) as client:
                    n = 0
                    while not stop.is_set():
                        n += 1
                        started = time.monotonic()
                        code, correct = None, False
                        try:
                            if (n + i) % 2:
                                with client.unwrap(ct, CONTEXT) as plain:
                                    correct = plain.reveal() == MARKER
                            else:
                                with client.generate_data_key(TENANT, CONTEXT) as dk:
                                    correct = len(dk.plaintext) == 32
                        except KeyServiceError as e:
                            code = e.code
                        with lock:
                            outcomes.append(Outcome(started, time.monotonic(), code, correct))

            threads = [threading.Thread(target=backend, args=(i,)) for i in range(THREADS)]

            def counted(which: Callable[[Outcome], bool]) -> int:
                with lock:
                    return sum(1 for o in outcomes if which(o))

            for t in threads:
                t.start()
            # Progress decides, not the clock: seal once enough calls completed,
            # and stop once every client has started calls after the seal.
            until(lambda: counted(lambda o: o.code is None) > 20, "20 calls before the seal")
            served.seal()
            sealed_done = time.monotonic()
            until(
                lambda: counted(lambda o: o.started > sealed_done) >= 2 * THREADS,
                "calls started after the seal",
            )
            stop.set()
            for t in threads:
                t.join(timeout=10)
            buffers = d.daemon.tenant_key_buffers_for_test(TENANT)

    ok = [o for o in outcomes if o.code is None]
    failed = [o for o in outcomes if o.code is not None]
    assert len(ok) > 20, "too few calls completed before the seal to mean anything"
    assert failed, "no call met the seal"
    # In-flight calls complete correctly or fail cleanly; nothing else.
    assert all(o.correct for o in ok)
    assert {o.code for o in failed} == {C.FAILED_PRECONDITION}
    # Every call started after the seal returned failed.
    assert all(o.code is not None for o in outcomes if o.started > sealed_done)
    # Keys released after the daemon wiped its keys: only calls that had passed the
    # seal check already (at most one in flight per client), never a later one.
    assert clock.sealed_at is not None
    assert clock.released
    assert sum(1 for t in clock.released if t > clock.sealed_at) <= THREADS
    assert buffers == []
