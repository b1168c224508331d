"""Two planes: the data plane never waits for governance, and a seal still wins.

Governance holds its lock for a whole decision, store writes included;
KeyService reads the snapshot governance publishes (hsm/dataplane/
snapshot.py). Here governance is made busy for real: a PostgreSQL
transaction of the test holds the log's head row, so a proposal's append
blocks inside the store while it holds the governance lock. Wraps,
Unwraps and batches must still answer over real mTLS gRPC, and a
custodian's seal must still stop every data-plane call at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import KeyServiceError, Wrapped
from keyquorum.hsm.dataplane import DataPlane
from keyquorum.hsm.pki import DevPki
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.quorum.log import Entry
from keyquorum.quorum.replay import verify_log
from keyquorum.v1 import custodian_pb2 as pb
from tests.custodian_steps import ceremony, propose, unseal, zeroed
from tests.harness import Custodian, in_process_daemon, make_custodians
from tests.key_plane import CONTEXT, KeyPlane, key_plane, make_pki, ready_tenant

TENANT = "acme-health"
K = 5
T = TypeVar("T")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"))


def _until(what: str, check: Callable[[], bool], *, within: float = 20.0) -> None:
    """Poll `check` until true; fail naming `what` after `within` seconds (a hang, not a speed)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.02)


def _waiting_on_a_lock(dsn: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as watcher:
        row = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
    return bool(row and row[0] > 0)


def _fails_sealed(call: Callable[[], object]) -> bool:
    try:
        call()
    except KeyServiceError as e:
        return e.code.name == "FAILED_PRECONDITION" and "sealed" in str(e)
    return False


@pytest.fixture
def busy(
    pg_dsn: str, tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> Iterator[KeyPlane]:
    """A daemon on PostgreSQL, unsealed, a tenant granted and active, KeyService on mTLS."""
    store = PostgresStore.open(pg_dsn)
    with in_process_daemon(tmp_path / "data", pki, store=store) as d, key_plane(d, pki) as kp:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        ready_tenant(d, custodians, TENANT)
        yield kp


@pytest.mark.postgres
def test_data_plane_answers_while_governance_is_blocked_in_a_store_write(
    busy: KeyPlane, pg_dsn: str, custodians: list[Custodian]
) -> None:
    d, client = busy.d, busy.client()
    before = client.wrap(TENANT, b"before", CONTEXT)
    with psycopg.connect(pg_dsn) as blocker, ThreadPoolExecutor(2) as pool:
        blocker.execute("SELECT size FROM log_head FOR UPDATE")
        proposing = pool.submit(propose, d, "create-tenant", tenant="blocked-meanwhile")
        _until("the proposal's append waits on the head row", lambda: _waiting_on_a_lock(pg_dsn))
        assert not proposing.done()
        lock = d.daemon.governance_lock_for_test()
        acquired = lock.acquire(blocking=False)  # type: ignore[attr-defined]
        if acquired:
            lock.release()  # type: ignore[attr-defined]
        assert not acquired, "governance is not busy: the test would prove nothing"

        # Every data-plane call answers, single and batch, in the clear and sealed-to.
        assert client.unwrap(before.ciphertext, CONTEXT).reveal() == b"before"
        wrapped = client.wrap(TENANT, b"during", CONTEXT)
        assert client.unwrap(wrapped.ciphertext, CONTEXT).reveal() == b"during"
        items = [(TENANT, bytes([i]) * 8, CONTEXT) for i in range(20)]
        batch = client.batch_wrap(items)
        assert all(isinstance(w, Wrapped) for w in batch)
        opened = client.batch_unwrap([(w.ciphertext, CONTEXT) for w in batch])  # type: ignore[union-attr]
        assert [o.reveal() for o in opened] == [p for _t, p, _c in items]  # type: ignore[union-attr]
        key = client.generate_data_key(TENANT, CONTEXT)
        assert client.unwrap(key.ciphertext, CONTEXT).reveal() == key.plaintext.reveal()
        assert not proposing.done()

        blocker.rollback()
        assert proposing.result(timeout=30).operation == "create-tenant"


@pytest.mark.postgres
def test_a_seal_stops_every_data_plane_call_while_governance_is_blocked(
    busy: KeyPlane, pg_dsn: str, custodians: list[Custodian]
) -> None:
    d, client = busy.d, busy.client()
    wrapped = client.wrap(TENANT, b"secret", CONTEXT)
    buffers = d.daemon.tenant_key_buffers_for_test(TENANT)
    sealer = custodians[0]
    calls: list[Callable[[], object]] = [
        lambda: client.wrap(TENANT, b"x", CONTEXT),
        lambda: client.unwrap(wrapped.ciphertext, CONTEXT),
        lambda: client.generate_data_key(TENANT, CONTEXT),
        lambda: client.batch_wrap([(TENANT, b"y", CONTEXT)] * 3),
        lambda: client.batch_unwrap([(wrapped.ciphertext, CONTEXT)] * 3),
    ]
    with psycopg.connect(pg_dsn) as blocker, ThreadPoolExecutor(2) as pool:
        blocker.execute("SELECT size FROM log_head FOR UPDATE")
        proposing = pool.submit(propose, d, "create-tenant", tenant="blocked-meanwhile")
        _until("the proposal's append waits on the head row", lambda: _waiting_on_a_lock(pg_dsn))
        sealing: Future[pb.SealResponse] = pool.submit(
            actions.seal,
            d.stub,
            sealer,
            lambda _text: sealer.credential,
            reason="governance busy",
            now=d.clock(),
        )
        # The keys go at once, before the seal is logged (the log is still blocked).
        _until("a Wrap is refused as sealed", lambda: _fails_sealed(calls[0]))
        for call in calls:
            assert _fails_sealed(call), call
        assert zeroed(buffers)
        assert d.daemon.sealed
        assert not sealing.done()  # its entry waits behind the blocked write

        blocker.rollback()
        proposing.result(timeout=30)
        sealing.result(timeout=30)
    state, raws = d.daemon.log_snapshot()
    assert [Entry.from_bytes(raw).type for raw in raws[-2:]] == ["proposal", "seal"]
    latest = d.store.latest_checkpoint()
    assert latest is not None
    assert verify_log(raws, latest[1], state.log_key).size == len(raws)
    for call in calls:
        assert _fails_sealed(call)


def test_data_plane_calls_never_take_the_governance_lock(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    """Held by another thread for the whole test, the lock would stop any call that took it."""
    with in_process_daemon(tmp_path / "data", pki) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        ready_tenant(d, custodians, TENANT)
        plane = DataPlane(d.daemon, d.store)
        lock = d.daemon.governance_lock_for_test()
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with lock:  # type: ignore[attr-defined]
                held.set()
                release.wait(60)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        try:
            done = _in_thread(
                lambda: _roundtrip(plane), timeout=30, what="data-plane calls under a held lock"
            )
            assert done == b"round trip"
        finally:
            release.set()
            holder.join()


def _roundtrip(plane: DataPlane) -> bytes:
    from keyquorum.hsm.dataplane import UnwrapItem, WrapItem

    who = "keyquorum://backend/booking"
    wrapped = plane.wrap(who, WrapItem(TENANT, b"round trip", CONTEXT))
    batch = plane.batch_wrap(who, [WrapItem(TENANT, b"b", CONTEXT)] * 5)
    assert all(not isinstance(b, Exception) for b in batch)
    revealed = plane.unwrap(who, UnwrapItem(wrapped.ciphertext, CONTEXT))
    assert revealed.plaintext is not None
    try:
        return revealed.plaintext.reveal()
    finally:
        revealed.wipe()


def _in_thread(fn: Callable[[], T], *, timeout: float, what: str) -> T:
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            pytest.fail(f"{what}: no answer within {timeout} s (blocked on the lock?)")
