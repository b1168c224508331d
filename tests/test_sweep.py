"""The sweeper, not the data plane, wipes ended activations and shreds destroyed tenants.

A data-plane call compares an activation's end with its own clock and
refuses at once; it never sweeps and never writes to the log (issue 15:
the data plane never waits for governance). The sweeper (a thread, every
`SWEEP_SECONDS`; here called by hand where the thread is off) wipes the
keys of ended activations and appends the `shred` entry, erasing the salts
in the same transaction, once a destroy wait is over, on this replica and
on one that only followed the entries.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.ceremony import CeremonyGate
from keyquorum.hsm.daemon.keys import TenantKeys
from keyquorum.hsm.daemon.logkey import KEY_FILE
from keyquorum.hsm.dataplane import DataPlane, WrapItem
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.admission import AddressPeers
from keyquorum.hsm.services.server import create_server
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import StateError
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.log import Entry, ShredPayload
from keyquorum.v1 import custodian_pb2 as pb
from tests.custodian_steps import key_bytes, run, unseal, zeroed
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    FakeClock,
    InProcessDaemon,
    make_custodians,
    tls_channel,
)

THRESHOLD = 2
SHORT, LONG, OTHER = "t-short", "t-long", "t-other"
BOOKING = "keyquorum://backend/booking"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), server_names=["localhost"])


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"), names=("alice", "bob", "carol"))


@contextmanager
def serving(
    data_dir: Path,
    db: Path,
    pki: DevPki,
    clock: FakeClock,
    replica: str = "test-1",
    sweep_seconds: float | None = None,
) -> Iterator[InProcessDaemon]:
    """A daemon over `db` behind a real TLS gRPC server, no follower, a sweeper if asked."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore.open(db)
    daemon = Daemon(
        store,
        data_dir=data_dir,
        replica=replica,
        limits=DEFAULT_LIMITS,
        clock=clock,
        sweep_seconds=sweep_seconds,
        follow_seconds=None,
        ceremony=CeremonyGate(code=CEREMONY_CODE),
    )
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=tls.server_credentials(pki.server_cert, pki.server_key),
        limits=DEFAULT_LIMITS,
        register=[custodian_service.register(daemon, DEFAULT_LIMITS)],
        service_names=[custodian_service.SERVICE_NAME],
        peers=AddressPeers(),
    )
    server.start()
    channel = tls_channel(pki, f"127.0.0.1:{port}")
    handle = InProcessDaemon(daemon, port, clock, server, channel, store, data_dir)
    try:
        yield handle
    finally:
        handle.close()


def ceremony(d: InProcessDaemon, custodians: list[Custodian]) -> None:
    d.stub.InitCeremony(
        pb.InitCeremonyRequest(
            deployment="sweep-tests",
            threshold=THRESHOLD,
            public_credentials=[c.public_path.read_bytes() for c in custodians],
            code=CEREMONY_CODE,
        )
    )
    d.proposer = custodians[0].credential


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki, custodians: list[Custodian]) -> Iterator[InProcessDaemon]:
    with serving(tmp_path / "data", tmp_path / "keyquorum.sqlite", pki, FakeClock()) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:THRESHOLD])
        yield d


def activate(
    d: InProcessDaemon, custodians: list[Custodian], tenant: str, duration: int, *, create: bool
) -> None:
    if create:
        run(d, custodians, "create-tenant", tenant=tenant)
    run(d, custodians, "activate-tenant", tenant=tenant, duration_seconds=duration)


def count_sweeps(monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> list[None]:
    """Record every sweep of `daemon`, whoever runs it (one item per sweep)."""
    calls: list[None] = []
    real = TenantKeys.sweep

    def counting(self: TenantKeys) -> None:
        calls.append(None)
        real(self)

    monkeypatch.setattr(TenantKeys, "sweep", counting)
    return calls


def entries(d: InProcessDaemon) -> list[Entry]:
    return [Entry.from_bytes(raw) for raw in d.store.read_all()]


def test_data_plane_calls_never_sweep_nor_write(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    activate(daemon, custodians, SHORT, 600, create=True)
    activate(daemon, custodians, LONG, 3600, create=True)
    run(daemon, custodians, "grant", tenant=LONG, backend="booking")
    run(daemon, custodians, "create-tenant", tenant=OTHER)
    run(daemon, custodians, "destroy-tenant", tenant=OTHER)
    short_buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    plane = DataPlane(daemon.daemon, daemon.store)
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    size = daemon.store.size()
    # Past SHORT's end and OTHER's destroy wait: both are due, and still no call sweeps.
    daemon.clock.advance(DEFAULT_LIMITS.destroy_wait_seconds)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(SHORT)
    for _ in range(20):
        with pytest.raises(StateError, match="not active"):
            daemon.daemon.data_key("booking", LONG)
        with pytest.raises(StateError, match="not active"):
            plane.wrap(BOOKING, WrapItem(LONG, b"x", {}))
    assert sweeps == []
    assert daemon.store.size() == size
    assert not zeroed(short_buffers)
    assert daemon.store.get_shred_salt(OTHER, 1) is not None
    daemon.daemon.sweep()
    assert len(sweeps) == 1
    assert zeroed(short_buffers)
    last = entries(daemon)[-1]
    assert isinstance(last.payload, ShredPayload)
    assert last.payload.tenant == OTHER
    assert daemon.store.get_shred_salt(OTHER, 1) is None


def test_an_expired_activation_is_refused_at_its_end_even_if_no_sweep_ran(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    """The refusal does not depend on the sweep: the data plane compares the end itself."""
    activate(daemon, custodians, SHORT, 600, create=True)
    buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    daemon.clock.advance(599)
    assert len(key_bytes(daemon, SHORT)) == 32
    daemon.clock.advance(1)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(SHORT)
    assert not zeroed(buffers)  # nothing swept: only the check refused it
    daemon.daemon.sweep()
    assert zeroed(buffers)
    assert daemon.daemon.tenant_key_buffers_for_test(SHORT) == []


def test_a_destroy_wait_ends_in_a_shred_at_the_next_sweep(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    run(daemon, custodians, "create-tenant", tenant=OTHER)
    run(daemon, custodians, "destroy-tenant", tenant=OTHER)
    wait = DEFAULT_LIMITS.destroy_wait_seconds
    daemon.clock.advance(wait - 1)
    daemon.daemon.sweep()
    assert daemon.store.get_shred_salt(OTHER, 1) is not None
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(OTHER)
    daemon.clock.advance(1)
    daemon.daemon.sweep()
    last = entries(daemon)[-1]
    assert isinstance(last.payload, ShredPayload)
    assert last.payload.tenant == OTHER
    assert daemon.store.get_shred_salt(OTHER, 1) is None
    with pytest.raises(StateError, match="was destroyed"):
        daemon.daemon.tenant_key(OTHER)
    size = daemon.store.size()
    daemon.daemon.sweep()  # shredded: nothing is due any more
    assert daemon.store.size() == size


def test_the_sweeper_thread_wipes_and_shreds_on_its_own(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    clock = FakeClock()
    with serving(tmp_path / "data", tmp_path / "kq.sqlite", pki, clock, sweep_seconds=0.02) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:THRESHOLD])
        activate(d, custodians, SHORT, 600, create=True)
        run(d, custodians, "create-tenant", tenant=OTHER)
        run(d, custodians, "destroy-tenant", tenant=OTHER)
        buffers = d.daemon.tenant_key_buffers_for_test(SHORT)
        clock.advance(DEFAULT_LIMITS.destroy_wait_seconds)
        deadline = time.monotonic() + 20
        while not (zeroed(buffers) and d.store.get_shred_salt(OTHER, 1) is None):
            assert time.monotonic() < deadline, "the sweeper did not run within 20 s"
            time.sleep(0.02)
        assert any(
            isinstance(e.payload, ShredPayload) and e.payload.tenant == OTHER for e in entries(d)
        )


def test_deadlines_followed_from_another_replica_are_swept_there(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    """An activation and a destroy logged through A reach B only by replay (`catch_up`)."""
    clock = FakeClock()
    db = tmp_path / "shared.sqlite"
    wait = DEFAULT_LIMITS.destroy_wait_seconds
    with serving(tmp_path / "a", db, pki, clock, replica="kq-a") as a:
        ceremony(a, custodians)
        (tmp_path / "b").mkdir()
        shutil.copy(tmp_path / "a" / KEY_FILE, tmp_path / "b" / KEY_FILE)
        with serving(tmp_path / "b", db, pki, clock, replica="kq-b") as b:
            unseal(a, custodians[:THRESHOLD])
            unseal(b, custodians[:THRESHOLD])
            run(a, custodians, "create-tenant", tenant=OTHER)
            run(a, custodians, "destroy-tenant", tenant=OTHER)
            activate(a, custodians, SHORT, 600, create=True)
            b.daemon.catch_up()
            buffers = b.daemon.tenant_key_buffers_for_test(SHORT)
            assert buffers
            assert len(key_bytes(b, SHORT)) == 32
            clock.advance(600)
            with pytest.raises(StateError, match="not active"):
                b.daemon.tenant_key(SHORT)
            b.daemon.sweep()
            assert zeroed(buffers)
            clock.advance(wait)
            b.daemon.sweep()
            last = entries(b)[-1]
            assert isinstance(last.payload, ShredPayload)
            assert last.payload.tenant == OTHER
            a.daemon.catch_up()
            with pytest.raises(StateError, match="was destroyed"):
                a.daemon.tenant_key(OTHER)
