"""The mTLS listener: audit exports cannot starve KeyService or each other.

`keyquorum server run --workers 0` builds the mTLS listener with
`backend_plane.mtls_server`: KeyService and AuditService on one serving
loop, at most `AUDIT_STREAMS` exports at once, each reading the store on
the audit lane's threads. Here the listener is that same function over an
in-process daemon, and the store "reads slowly": the store under its
`AuditLog` holds every read until the test lets it go, so each export keeps
one audit-lane thread. With the cap full, further streams are refused
(RESOURCE_EXHAUSTED), KeyService calls still complete, and unary audit calls
still find a thread. The call deadlines below only turn a hang into a
failure; nothing is timed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyquorum.client import tls as client_tls
from keyquorum.hsm import tls
from keyquorum.hsm.dataplane import DataPlane
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import audit_service, backend_plane
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.v1 import audit_pb2 as apb
from keyquorum.v1 import audit_pb2_grpc as apb_grpc
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import key_pb2 as kpb
from keyquorum.v1 import key_pb2_grpc as kpb_grpc
from tests.custodian_steps import run, unseal
from tests.harness import CEREMONY_CODE, InProcessDaemon, in_process_daemon, make_custodians

TENANT = "acme-health"
BACKEND, AUDITOR = "backend/booking", "auditor/alice"
#: Only a hang reaches this; every call here normally ends at once.
HANG_GUARD_S = 30.0


class HeldStore:
    """The store an `AuditLog` reads, whose every `read` waits until `release_all`."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._gates: list[threading.Event] = []
        #: One release per read that is waiting at its gate.
        self.entered = threading.Semaphore(0)

    def read(self, start: int, end: int) -> list[bytes]:
        gate = threading.Event()
        with self._lock:
            self._gates.append(gate)
        self.entered.release()
        gate.wait(timeout=2 * HANG_GUARD_S)
        return self.inner.read(start, end)

    def release_all(self) -> None:
        with self._lock:
            gates, self._gates = self._gates, []
        for gate in gates:
            gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Listener:
    d: InProcessDaemon
    held: HeldStore
    port: int
    pki: DevPki

    def channel(self, who: str) -> grpc.Channel:
        files = self.pki.client(who)
        creds = client_tls.channel_credentials(
            self.pki.ca_cert, client_cert=files.cert, client_key=files.key
        )
        return grpc.secure_channel(f"127.0.0.1:{self.port}", creds)


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    base = tmp_path_factory.mktemp("mtls-pool")
    dev_pki = make_dev_pki(base / "pki", clients=[BACKEND, AUDITOR])
    custodians = make_custodians(base / "custodians", names=("alice", "bob", "carol"))
    with in_process_daemon(base / "data", dev_pki) as d:
        d.stub.InitCeremony(
            pb.InitCeremonyRequest(
                deployment="mtls-pool",
                threshold=2,
                public_credentials=[c.public_path.read_bytes() for c in custodians],
                code=CEREMONY_CODE,
            )
        )
        d.proposer = custodians[0].credential
        unseal(d, custodians[:2])
        run(d, custodians, "create-tenant", tenant=TENANT)
        run(d, custodians, "grant", tenant=TENANT, backend="booking")
        run(d, custodians, "activate-tenant", tenant=TENANT, duration_seconds=3600)
        held = HeldStore(d.store)
        server, port = backend_plane.mtls_server(
            d.daemon,
            DataPlane(d.daemon, d.store, usage=()),
            audit_service.AuditLog(held),  # type: ignore[arg-type]
            host="127.0.0.1",
            port=0,
            credentials=tls.server_credentials(
                dev_pki.server_cert,
                dev_pki.server_key,
                client_ca=dev_pki.ca_cert,
                require_client_auth=True,
            ),
            limits=DEFAULT_LIMITS,
        )
        server.start()
        try:
            yield Listener(d, held, port, dev_pki)
        finally:
            held.release_all()
            server.stop(grace=None).wait()


def export(stub: apb_grpc.AuditServiceStub, size: int) -> Any:
    """Start a GetEntries stream of the whole log (the call starts without reading)."""
    return stub.GetEntries(apb.GetEntriesRequest(start=0, end=size), timeout=HANG_GUARD_S)


def hold_streams(listener: Listener, stub: apb_grpc.AuditServiceStub, size: int) -> list[Any]:
    """AUDIT_STREAMS export streams, each holding its worker thread at the store."""
    streams = [export(stub, size) for _ in range(backend_plane.AUDIT_STREAMS)]
    for _ in streams:
        assert listener.held.entered.acquire(timeout=HANG_GUARD_S), "a stream never started"
    return streams


def started(listener: Listener, call: Any) -> bool:
    """True once `call` holds its thread at the store, False if it ended first (refused)."""
    ended = threading.Event()
    call.add_callback(ended.set)
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        if listener.held.entered.acquire(timeout=0.05):
            return True
        if ended.is_set():
            return False
    raise AssertionError("a stream neither started nor ended")


def refused_code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        next(iter(call))
    code: grpc.StatusCode = info.value.code()
    return code


def wrap(stub: kpb_grpc.KeyServiceStub, i: int) -> kpb.WrapResponse:
    response: kpb.WrapResponse = stub.Wrap(
        kpb.WrapRequest(tenant=TENANT, plaintext=b"x" * i, context={"n": str(i)}),
        timeout=HANG_GUARD_S,
    )
    return response


def test_full_audit_streams_refuse_more_and_keyservice_still_serves(listener: Listener) -> None:
    audit = apb_grpc.AuditServiceStub(listener.channel(AUDITOR))
    keys = kpb_grpc.KeyServiceStub(listener.channel(BACKEND))
    size = listener.d.store.size()
    streams = hold_streams(listener, audit, size)
    try:
        # Every further stream, of either streaming method, is refused at its start.
        for _ in range(4):
            assert refused_code(export(audit, size)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        listing = audit.ListCheckpoints(apb.ListCheckpointsRequest(), timeout=HANG_GUARD_S)
        assert refused_code(listing) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # KeyService: many calls at once, all served.
        with futures.ThreadPoolExecutor(16) as pool:
            wrapped = list(pool.map(lambda i: wrap(keys, i), range(1, 65)))
        assert all(w.ciphertext and w.key_version == 1 for w in wrapped)
        # Unary audit calls are not streams and are not counted; exports never
        # take every audit-lane thread.
        checkpoint = audit.GetCheckpoint(apb.GetCheckpointRequest(), timeout=HANG_GUARD_S)
        assert checkpoint.size == size
    finally:
        listener.held.release_all()
    expected = list(listener.d.store.read(0, size))
    for stream in streams:
        assert [e.data for e in stream] == expected


def test_a_cancelled_stream_gives_its_slot_back(listener: Listener) -> None:
    audit = apb_grpc.AuditServiceStub(listener.channel(AUDITOR))
    size = listener.d.store.size()
    for stream in hold_streams(listener, audit, size):
        stream.cancel()
    listener.held.release_all()
    # The threads return once released; then the slots are free again.
    reopened: list[Any] = []
    deadline = time.monotonic() + HANG_GUARD_S
    while len(reopened) < backend_plane.AUDIT_STREAMS:
        assert time.monotonic() < deadline, "the cancelled streams' slots never came back"
        call = export(audit, size)
        if started(listener, call):
            reopened.append(call)
        else:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.05)
    try:
        # Exactly AUDIT_STREAMS again: nothing leaked, nothing given back twice.
        assert refused_code(export(audit, size)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        listener.held.release_all()
    for call in reopened:
        assert len(list(call)) == size


@pytest.mark.parametrize("streams", [0, -1])
def test_audit_stream_cap_must_admit_one_stream(tmp_path: Path, streams: int) -> None:
    store = SqliteStore.open(tmp_path / "store.sqlite")
    try:
        with pytest.raises(InvalidInputError, match="max_streams"):
            audit_service.AuditServicer(audit_service.AuditLog(store), max_streams=streams)
    finally:
        store.close()
