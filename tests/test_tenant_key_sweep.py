"""`Daemon.tenant_key` sweeps only when something is due, and never skips a due sweep.

A data-plane call used to walk every tenant (`_sweep_locked`) on every
call. It now sweeps only when the keyring's earliest activation end or the
log's earliest destroy deadline has come. The background sweeper and the
follower thread are off in every daemon here, so an ended activation is
wiped, or an ended destroy wait shredded, only if the call itself swept:
each test below fails if the shortcut skipped a due sweep, whatever
changed the deadlines (an activation, a deactivation, a destroy
scheduled, a seal and unseal, an entry followed from another replica).
No timing is measured: sweeps are counted with a wrapper.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyquorum.cli import custodian_actions as actions
from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.logkey import KEY_FILE
from keyquorum.hsm.daemon.tenant_keys import TenantKeyring
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.server import create_server
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import StateError
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.log import Entry, ShredPayload
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import custodian_pb2 as pb
from tests.harness import (
    Custodian,
    FakeClock,
    InProcessDaemon,
    make_custodians,
    tls_channel,
)
from tests.test_approvals import key_bytes, run, unseal, zeroed

THRESHOLD = 2
SHORT, LONG, OTHER = "t-short", "t-long", "t-other"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), server_names=["localhost"])


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"), names=("alice", "bob", "carol"))


@contextmanager
def serving(
    data_dir: Path, db: Path, pki: DevPki, clock: FakeClock, replica: str = "test-1"
) -> Iterator[InProcessDaemon]:
    """A daemon over `db` behind a real TLS gRPC server, with no sweeper or follower thread."""
    data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore.open(db)
    daemon = Daemon(
        store,
        data_dir=data_dir,
        replica=replica,
        limits=DEFAULT_LIMITS,
        clock=clock,
        sweep_seconds=None,
        follow_seconds=None,
    )
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=tls.server_credentials(pki.server_cert, pki.server_key),
        limits=DEFAULT_LIMITS,
        register=[custodian_service.register(daemon)],
        service_names=[custodian_service.SERVICE_NAME],
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
        )
    )


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
    """Record every `_sweep_locked` run of `daemon` (one item per sweep)."""
    calls: list[None] = []
    real = daemon._sweep_locked

    def counting() -> None:
        calls.append(None)
        real()

    monkeypatch.setattr(daemon, "_sweep_locked", counting)
    return calls


def entries(d: InProcessDaemon) -> list[Entry]:
    return [Entry.from_bytes(raw) for raw in d.store.read_all()]


def test_nothing_due_means_no_sweep_and_the_first_due_call_sweeps(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    activate(daemon, custodians, SHORT, 600, create=True)
    activate(daemon, custodians, LONG, 3600, create=True)
    short_buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    daemon.clock.advance(599)
    for _ in range(50):
        assert len(key_bytes(daemon, SHORT)) == 32
        assert len(key_bytes(daemon, LONG)) == 32
    assert sweeps == []
    assert not zeroed(short_buffers)
    # At the end of SHORT's activation a call for ANOTHER tenant sweeps and
    # wipes SHORT's key, exactly when it ends.
    daemon.clock.advance(1)
    assert len(key_bytes(daemon, LONG)) == 32
    assert len(sweeps) == 1
    assert zeroed(short_buffers)
    assert daemon.daemon.tenant_key_buffers_for_test(SHORT) == []
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(SHORT)
    # The next deadline is LONG's end: nothing is due until then.
    for _ in range(20):
        key_bytes(daemon, LONG)
    assert len(sweeps) == 1


def test_the_data_planes_key_call_sweeps_as_tenant_key_does(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Daemon.data_key` (what the data plane calls) wipes an ended activation too."""
    activate(daemon, custodians, SHORT, 600, create=True)
    activate(daemon, custodians, LONG, 3600, create=True)
    run(daemon, custodians, "grant", tenant=LONG, backend="booking")
    short_buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    daemon.clock.advance(599)
    daemon.daemon.data_key("booking", LONG)
    assert sweeps == []
    assert not zeroed(short_buffers)
    daemon.clock.advance(1)
    daemon.daemon.data_key("booking", LONG)
    assert len(sweeps) == 1
    assert zeroed(short_buffers)


def test_an_expired_activation_is_refused_at_its_end_even_if_no_sweep_ran(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal does not depend on the sweep: the log and the keyring each check `now`."""
    activate(daemon, custodians, SHORT, 600, create=True)
    buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    monkeypatch.setattr(daemon.daemon, "_sweep_due", lambda _now: False)
    daemon.clock.advance(600)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(SHORT)
    assert not zeroed(buffers)  # nothing swept: only the checks refused it
    monkeypatch.undo()
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(SHORT)
    assert zeroed(buffers)


def test_a_later_shorter_activation_moves_the_deadline_forward(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    activate(daemon, custodians, LONG, 3600, create=True)
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    key_bytes(daemon, LONG)
    activate(daemon, custodians, SHORT, 600, create=True)
    buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    calls_before = len(sweeps)  # approvals sweep on their own path
    daemon.clock.advance(600)
    key_bytes(daemon, LONG)
    assert len(sweeps) == calls_before + 1
    assert zeroed(buffers)


def test_re_activating_a_tenant_for_less_time_moves_the_deadline_forward(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    activate(daemon, custodians, LONG, 3600, create=True)
    activate(daemon, custodians, SHORT, 7200, create=True)
    key_bytes(daemon, SHORT)
    activate(daemon, custodians, SHORT, 600, create=False)
    buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    daemon.clock.advance(600)
    key_bytes(daemon, LONG)
    assert zeroed(buffers)


def test_a_deactivation_costs_at_most_one_early_sweep(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    activate(daemon, custodians, SHORT, 600, create=True)
    activate(daemon, custodians, LONG, 3600, create=True)
    run(daemon, custodians, "deactivate-tenant", tenant=SHORT)
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    daemon.clock.advance(600)
    for _ in range(10):
        key_bytes(daemon, LONG)
    assert len(sweeps) == 1
    long_buffers = daemon.daemon.tenant_key_buffers_for_test(LONG)
    daemon.clock.advance(3000)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(LONG)
    assert len(sweeps) == 2
    assert zeroed(long_buffers)


def test_a_seal_and_unseal_restore_the_deadlines(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    activate(daemon, custodians, SHORT, 600, create=True)
    activate(daemon, custodians, LONG, 3600, create=True)
    c = custodians[-1]
    actions.seal(
        daemon.stub, c.fingerprint, lambda _t: c.credential, reason="test", now=daemon.clock.now
    )
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    unseal(daemon, custodians[:THRESHOLD])
    buffers = daemon.daemon.tenant_key_buffers_for_test(SHORT)
    assert buffers
    assert not zeroed(buffers)
    calls_before = len(sweeps)
    daemon.clock.advance(599)
    key_bytes(daemon, LONG)
    assert len(sweeps) == calls_before
    daemon.clock.advance(1)
    key_bytes(daemon, LONG)
    assert len(sweeps) == calls_before + 1
    assert zeroed(buffers)


def test_a_destroy_wait_ends_in_a_shred_at_the_next_call(
    daemon: InProcessDaemon, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any tenant's call sweeps; here the tenant being destroyed, refused after the sweep."""
    run(daemon, custodians, "create-tenant", tenant=OTHER)
    run(daemon, custodians, "destroy-tenant", tenant=OTHER)
    sweeps = count_sweeps(monkeypatch, daemon.daemon)
    wait = DEFAULT_LIMITS.destroy_wait_seconds
    daemon.clock.advance(wait - 1)
    with pytest.raises(StateError, match="not active"):
        daemon.daemon.tenant_key(OTHER)
    assert sweeps == []
    assert daemon.store.get_shred_salt(OTHER, 1) is not None
    daemon.clock.advance(1)
    with pytest.raises(StateError, match="was destroyed"):
        daemon.daemon.tenant_key(OTHER)
    assert len(sweeps) == 1
    last = entries(daemon)[-1]
    assert isinstance(last.payload, ShredPayload)
    assert last.payload.tenant == OTHER
    assert daemon.store.get_shred_salt(OTHER, 1) is None
    # Shredded: nothing is due any more.
    with pytest.raises(StateError, match="was destroyed"):
        daemon.daemon.tenant_key(OTHER)
    assert len(sweeps) == 1


def test_deadlines_followed_from_another_replica_are_swept_on_time(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An activation and a destroy logged through A reach B only by replay (`catch_up`)."""
    clock = FakeClock()
    db = tmp_path / "shared.sqlite"
    wait = DEFAULT_LIMITS.destroy_wait_seconds
    longest = DEFAULT_LIMITS.activation_max_seconds
    with serving(tmp_path / "a", db, pki, clock, replica="kq-a") as a:
        ceremony(a, custodians)
        (tmp_path / "b").mkdir()
        shutil.copy(tmp_path / "a" / KEY_FILE, tmp_path / "b" / KEY_FILE)
        with serving(tmp_path / "b", db, pki, clock, replica="kq-b") as b:
            unseal(a, custodians[:THRESHOLD])
            unseal(b, custodians[:THRESHOLD])
            run(a, custodians, "create-tenant", tenant=OTHER)
            run(a, custodians, "destroy-tenant", tenant=OTHER)
            destroy_at = clock.now + wait
            clock.advance(10)
            # LONG ends after OTHER's destroy deadline, so at that deadline
            # only the destroy is due.
            activate(a, custodians, LONG, longest, create=True)
            assert clock.now + longest > destroy_at
            activate(a, custodians, SHORT, 600, create=True)
            b.daemon.catch_up()
            buffers = b.daemon.tenant_key_buffers_for_test(SHORT)
            assert buffers
            sweeps = count_sweeps(monkeypatch, b.daemon)
            key_bytes(b, LONG)
            assert sweeps == []
            clock.advance(600)
            key_bytes(b, LONG)
            assert len(sweeps) == 1
            assert zeroed(buffers)
            clock.advance(destroy_at - clock.now)
            key_bytes(b, LONG)
            assert len(sweeps) == 2
            last = entries(b)[-1]
            assert isinstance(last.payload, ShredPayload)
            assert last.payload.tenant == OTHER


def test_the_keyrings_next_end_is_never_later_than_a_held_end() -> None:
    ring = TenantKeyring()
    assert ring.next_end is None
    ring.activate("a", 1_000, {1: SecretBytes(bytes(32))})
    ring.activate("b", 500, {1: SecretBytes(bytes(32))})
    assert ring.next_end == 500
    ring.activate("a", 200, {1: SecretBytes(bytes(32))})  # re-activated for less time
    assert ring.next_end == 200
    ring.deactivate("a")
    assert ring.next_end == 200  # early is allowed, late never
    assert ring.expire(200) == []
    assert ring.next_end == 500
    assert ring.expire(500) == ["b"]
    assert ring.next_end is None
    ring.activate("c", 900, {1: SecretBytes(bytes(32))})
    ring.wipe_all()
    assert ring.next_end is None
