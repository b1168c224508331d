"""`server run --workers N`: KeyService in worker processes that follow the daemon exactly.

An in-process daemon (real SQLite, real TLS) with the mTLS plane served by
two real worker processes (hsm/services/backend_plane.py): the keys are
handed over on private socketpairs, and every change that narrows access
(seal, deactivation, revoke, a disabled version, an activation's end)
reaches every worker before the call that made it returns. Each check
opens fresh connections, which SO_REUSEPORT spreads over both workers (the
pool's per-worker usage counts show both served). Also: a worker killed
with SIGKILL under load is replaced, no call was answered wrongly and no
nonce or counter value was used twice; workers are non-dumpable and die
with the daemon; AuditService answers through them; their usage reaches
the daemon's metrics and access log.

The daemon's clock here is the wall clock's (workers compare activation
ends with theirs). Deadlines only turn a hang into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from keyquorum.client import KeyClient, KeyServiceError
from keyquorum.hsm.dataplane import format as wire_format
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services.access_log import AccessLog
from keyquorum.hsm.services.backend_plane import BackendPlane, BackendSettings
from keyquorum.hsm.services.metrics import Metrics
from keyquorum.hsm.services.workers import StoreSpec, WorkerPool
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.v1 import audit_pb2 as apb
from keyquorum.v1 import audit_pb2_grpc as apb_grpc
from tests.custodian_steps import ceremony, run, unseal
from tests.harness import (
    Custodian,
    FakeClock,
    InProcessDaemon,
    in_process_daemon,
    make_custodians,
    start_daemon_process,
)
from tests.waiting import until

TENANT = "acme-health"
CONTEXT = {"patient": "p-4711"}
BACKEND, AUDITOR = "backend/booking", "auditor/alice"
HANG_GUARD_S = 30.0
#: Fresh connections per check: each lands on one of the two workers, so 16
#: miss one worker only with probability 2**-15 (and the usage counts show it).
FRESH = 16
K = 5


class WallClock(FakeClock):
    """The wall clock, which a test can still move forward."""

    def __init__(self) -> None:
        super().__init__(0)

    def __call__(self) -> int:
        return int(time.time()) + self.now


@dataclass
class World:
    d: InProcessDaemon
    plane: BackendPlane
    pki: DevPki
    custodians: list[Custodian]
    metrics: Metrics
    access_path: Path

    @property
    def pool(self) -> WorkerPool:
        assert self.plane.pool is not None
        return self.plane.pool

    def client(self, who: str = BACKEND) -> KeyClient:
        files = self.pki.client(who)
        return KeyClient(
            f"127.0.0.1:{self.plane.port}",
            ca=self.pki.ca_cert,
            cert=files.cert,
            key=files.key,
            attempts=1,
        )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("workers")
    dev_pki = make_dev_pki(base / "pki", clients=[BACKEND, "backend/messaging", AUDITOR])
    custodians = make_custodians(base / "custodians")
    metrics = Metrics()
    access_path = base / "access.jsonl"
    access = AccessLog.in_data_dir(access_path, base)
    with in_process_daemon(base / "data", dev_pki, clock=WallClock()) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        run(d, custodians, "create-tenant", tenant=TENANT)
        run(d, custodians, "grant", tenant=TENANT, backend="booking")
        run(d, custodians, "activate-tenant", tenant=TENANT, duration_seconds=24 * 3600)
        plane = BackendPlane(
            d.daemon,
            d.store,
            BackendSettings(
                host="127.0.0.1",
                port=0,
                cert=dev_pki.server_cert,
                key=dev_pki.server_key,
                client_ca=dev_pki.ca_cert,
                limits=DEFAULT_LIMITS,
                store=StoreSpec("sqlite", path=str(base / "data" / "keyquorum.sqlite")),
                workers=2,
                usage=(metrics, access),
            ),
        )
        try:
            yield World(d, plane, dev_pki, custodians, metrics, access_path)
        finally:
            d.daemon.seal_for_shutdown()
            plane.close()
            access.close()


def on_fresh_connections(w: World, fn: object) -> list[object]:
    """`fn(client)` on FRESH new connections; each result or KeyServiceError."""
    out: list[object] = []
    for _ in range(FRESH):
        with w.client() as c:
            try:
                out.append(fn(c))  # type: ignore[operator]
            except KeyServiceError as e:
                out.append(e)
    return out


def all_refused(results: list[object], code: grpc.StatusCode, match: str) -> None:
    for r in results:
        assert isinstance(r, KeyServiceError), r
        assert r.code == code, str(r)
        assert match in r.details, str(r)


def wrap_ok(c: KeyClient) -> bytes:
    wrapped = c.wrap(TENANT, b"payload", CONTEXT)
    with c.unwrap(wrapped.ciphertext, CONTEXT) as plain:
        assert plain.reveal() == b"payload"
    return wrapped.ciphertext


def test_workers_serve_with_the_keys_handed_over(world: World) -> None:
    before = world.pool.records()
    results = on_fresh_connections(world, wrap_ok)
    assert all(isinstance(r, bytes) for r in results), results
    # Both workers served (their usage records reached the daemon).
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        grown = [a - b for a, b in zip(world.pool.records(), before, strict=True)]
        if all(g > 0 for g in grown) and sum(grown) >= 2 * FRESH:
            break
        assert time.monotonic() < deadline, grown
        time.sleep(0.05)


def test_workers_are_hardened(world: World) -> None:
    assert world.pool.facts() == [{"non_dumpable": True, "parent_death_signal": signal.SIGKILL}] * 2


def test_a_seal_reaches_every_worker_before_its_answer(world: World) -> None:
    from keyquorum.cli import custodian_actions as actions

    c = world.custodians[6]
    actions.seal(
        world.d.stub, c.fingerprint, lambda _t: c.credential, reason="t", now=int(time.time())
    )
    # The answer came after every worker confirmed the sealed snapshot.
    assert min(world.pool.acknowledged()) == world.pool.sequence
    all_refused(on_fresh_connections(world, wrap_ok), grpc.StatusCode.FAILED_PRECONDITION, "sealed")
    unseal(world.d, world.custodians[:K])
    assert all(isinstance(r, bytes) for r in on_fresh_connections(world, wrap_ok))


@pytest.mark.parametrize(
    ("narrowing", "widening", "code", "match"),
    [
        (
            ("deactivate-tenant", {}),
            ("activate-tenant", {"duration_seconds": 86400}),
            grpc.StatusCode.FAILED_PRECONDITION,
            "not active",
        ),
        (
            ("revoke", {"backend": "booking"}),
            ("grant", {"backend": "booking"}),
            grpc.StatusCode.PERMISSION_DENIED,
            "not granted",
        ),
    ],
    ids=["deactivation", "revoke"],
)
def test_a_narrowing_reaches_every_worker_before_its_approval_returns(
    world: World,
    narrowing: tuple[str, dict[str, object]],
    widening: tuple[str, dict[str, object]],
    code: grpc.StatusCode,
    match: str,
) -> None:
    op, params = narrowing
    run(world.d, world.custodians, op, tenant=TENANT, **params)
    all_refused(on_fresh_connections(world, wrap_ok), code, match)
    op, params = widening
    run(world.d, world.custodians, op, tenant=TENANT, **params)
    assert all(isinstance(r, bytes) for r in on_fresh_connections(world, wrap_ok))


def test_a_disabled_version_reaches_every_worker(world: World) -> None:
    with world.client() as c:
        old = c.wrap(TENANT, b"v1", CONTEXT).ciphertext
    run(world.d, world.custodians, "rotate-tenant", tenant=TENANT)
    run(world.d, world.custodians, "disable-version", tenant=TENANT, version=1)

    def unwrap_old(c: KeyClient) -> object:
        return c.unwrap(old, CONTEXT)

    all_refused(
        on_fresh_connections(world, unwrap_old), grpc.StatusCode.FAILED_PRECONDITION, "disabled"
    )
    assert all(isinstance(r, bytes) for r in on_fresh_connections(world, wrap_ok))


def test_the_end_of_an_activation_reaches_every_worker(world: World) -> None:
    run(world.d, world.custodians, "create-tenant", tenant="short-lived")
    run(world.d, world.custodians, "grant", tenant="short-lived", backend="booking")
    run(world.d, world.custodians, "activate-tenant", tenant="short-lived", duration_seconds=3)
    until = world.d.daemon.data_plane_snapshot().tenants["short-lived"].active_until
    assert until is not None

    def wrap_short(c: KeyClient) -> object:
        return c.wrap("short-lived", b"x", CONTEXT)

    with world.client() as c:
        wrap_short(c)
    # Each worker compares the end with its own clock, before the daemon's sweep.
    time.sleep(max(0.0, until + 0.2 - time.time()))
    all_refused(
        on_fresh_connections(world, wrap_short), grpc.StatusCode.FAILED_PRECONDITION, "not active"
    )
    # And the sweep (this one, or the daemon's own a moment before) makes every
    # worker drop the key, confirmed before it returns.
    world.d.clock.advance(3)
    world.d.daemon.sweep()
    assert world.d.daemon.data_plane_snapshot().tenants["short-lived"].held == {}
    assert min(world.pool.acknowledged()) == world.pool.sequence


def test_audit_calls_are_answered_through_the_workers(world: World) -> None:
    files = world.pki.client(AUDITOR)
    from keyquorum.client import tls as client_tls

    creds = client_tls.channel_credentials(
        world.pki.ca_cert, client_cert=files.cert, client_key=files.key
    )
    size = world.d.store.size()
    for _ in range(4):
        with grpc.secure_channel(f"127.0.0.1:{world.plane.port}", creds) as channel:
            stub = apb_grpc.AuditServiceStub(channel)
            assert stub.GetCheckpoint(apb.GetCheckpointRequest(), timeout=HANG_GUARD_S).size >= 1
            entries = list(
                stub.GetEntries(apb.GetEntriesRequest(start=0, end=size), timeout=HANG_GUARD_S)
            )
            assert [e.data for e in entries] == world.d.store.read(0, size)
    backend = world.pki.client(BACKEND)
    creds = client_tls.channel_credentials(
        world.pki.ca_cert, client_cert=backend.cert, client_key=backend.key
    )
    with grpc.secure_channel(f"127.0.0.1:{world.plane.port}", creds) as channel:
        with pytest.raises(grpc.RpcError) as info:
            apb_grpc.AuditServiceStub(channel).GetCheckpoint(
                apb.GetCheckpointRequest(), timeout=HANG_GUARD_S
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_usage_of_every_worker_reaches_the_metrics_and_access_log(world: World) -> None:
    def counted() -> float:
        return sum(
            s.value
            for m in world.metrics.registry.collect()
            for s in m.samples
            if s.name.endswith("_total")
            and s.labels.get("operation") == "wrap"
            and s.labels.get("outcome") == "OK"
        )

    def lines() -> int:
        return sum(
            1 for line in world.access_path.read_text().splitlines() if '"operation":"wrap"' in line
        )

    before_count, before_lines = counted(), lines()
    on_fresh_connections(world, lambda c: c.wrap(TENANT, b"x", CONTEXT))
    deadline = time.monotonic() + HANG_GUARD_S
    while counted() - before_count < FRESH or lines() - before_lines < FRESH:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert counted() - before_count == FRESH
    assert lines() - before_lines == FRESH


def test_a_worker_killed_under_load_is_replaced_and_nothing_is_answered_wrongly(
    world: World,
) -> None:
    """SIGKILL one worker while clients wrap; every answer decrypts, no nonce twice."""
    answers: list[tuple[bytes, bytes]] = []
    failures: list[KeyServiceError] = []
    stop = threading.Event()

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            with world.client() as c:
                for _ in range(20):
                    plaintext = f"{n}-{i}".encode()
                    i += 1
                    try:
                        answers.append((plaintext, c.wrap(TENANT, plaintext, CONTEXT).ciphertext))
                    except KeyServiceError as e:
                        failures.append(e)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    until(lambda: len(answers) >= 20, "answers before the kill", within=HANG_GUARD_S)
    victim = world.pool.pids()[0]
    os.kill(victim, signal.SIGKILL)
    until(lambda: victim not in world.pool.pids(), "the pool to see the kill", within=HANG_GUARD_S)
    assert world.pool.wait_serving(2, HANG_GUARD_S), "the killed worker was not replaced"
    # The load goes on after the replacement.
    after = len(answers)
    until(lambda: len(answers) >= after + 20, "answers after the kill", within=HANG_GUARD_S)
    stop.set()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert answers
    # A call cut by the kill failed as unavailable, never with a wrong answer.
    assert {f.code for f in failures} <= {grpc.StatusCode.UNAVAILABLE}
    with world.client() as c:
        for plaintext, ciphertext in answers:
            with c.unwrap(ciphertext, CONTEXT) as plain:
                assert plain.reveal() == plaintext
    nonces = [wire_format.parse(ct).nonce for _p, ct in answers]
    assert len(set(nonces)) == len(nonces)
    # The count in the store covers every answered encryption: numbers the
    # dead worker reserved are skipped, never handed out again.
    store = sqlite3.connect(world.d.data_dir / "keyquorum.sqlite")
    try:
        (reserved,) = store.execute(
            "SELECT sum(next) FROM counters WHERE name LIKE 'enc/acme-health/%'"
        ).fetchone()
    finally:
        store.close()
    assert reserved >= len(answers)


def _children(pid: int) -> list[int]:
    """The worker processes among `pid`'s children."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            worker = b"keyquorum.hsm.services.worker" in command
            if worker and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def test_workers_die_with_the_daemon(tmp_path: Path) -> None:
    dev_pki = make_dev_pki(tmp_path / "pki", clients=[BACKEND])
    data = tmp_path / "data"
    proc = start_daemon_process(
        data,
        dev_pki,
        "--listen-mtls",
        "127.0.0.1:0",
        "--client-ca",
        str(dev_pki.ca_cert),
        "--workers",
        "2",
    )
    try:
        ready = json.loads((data.parent / f"{data.name}.ready").read_text())
        workers = _children(int(ready["pid"]))
        assert len(workers) == 2
    finally:
        proc.stop(signal.SIGKILL)
    deadline = time.monotonic() + HANG_GUARD_S
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the daemon"
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}") / "status").read_text().split("State:")[1].split("\n")[0]
    except (OSError, IndexError):
        return "zombie"


def test_a_worker_refuses_to_start_without_its_daemon(tmp_path: Path) -> None:
    """Given a parent pid that is not its parent, a worker exits before reading anything."""
    import socket
    import subprocess
    import sys

    ours, theirs = socket.socketpair()
    result = subprocess.run(
        [sys.executable, "-m", "keyquorum.hsm.services.worker", str(theirs.fileno()), "1"],
        pass_fds=(theirs.fileno(),),
        capture_output=True,
        timeout=HANG_GUARD_S,
        check=False,
    )
    theirs.close()
    ours.close()
    assert result.returncode == 2
    assert b"cannot arrange to die with the daemon" in result.stderr


def test_a_worker_that_does_not_confirm_in_time_is_killed_and_replaced(world: World) -> None:
    """A stopped worker cannot confirm a change: it is killed, then replaced; none serves stale."""
    victim = world.pool.pids()[1]
    os.kill(victim, signal.SIGSTOP)
    try:
        # A narrowing the stopped worker cannot confirm.
        run(world.d, world.custodians, "deactivate-tenant", tenant=TENANT)
        assert victim not in world.pool.pids()
        assert not Path(f"/proc/{victim}").exists() or "zombie" in _state(victim)
        all_refused(
            on_fresh_connections(world, wrap_ok), grpc.StatusCode.FAILED_PRECONDITION, "not active"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    run(world.d, world.custodians, "activate-tenant", tenant=TENANT, duration_seconds=86400)
    assert world.pool.wait_serving(2, HANG_GUARD_S)
    assert all(isinstance(r, bytes) for r in on_fresh_connections(world, wrap_ok))


def test_the_rate_limit_holds_over_all_workers(world: World, tmp_path: Path) -> None:
    """`--rate-limit 5` with two workers: over calls spread on both, at most
    5 + 5/s pass in all (per worker it would be twice that)."""
    rate = 5.0
    plane = BackendPlane(
        world.d.daemon,
        world.d.store,
        BackendSettings(
            host="127.0.0.1",
            port=0,
            cert=world.pki.server_cert,
            key=world.pki.server_key,
            client_ca=world.pki.ca_cert,
            limits=DEFAULT_LIMITS,
            store=StoreSpec("sqlite", path=str(world.d.data_dir / "keyquorum.sqlite")),
            workers=2,
            rate_limit=rate,
            usage=(world.metrics,),
        ),
    )
    try:
        assert plane.pool is not None
        files = world.pki.client(BACKEND)
        clients = [
            KeyClient(
                f"127.0.0.1:{plane.port}",
                ca=world.pki.ca_cert,
                cert=files.cert,
                key=files.key,
                attempts=1,
            )
            for _ in range(FRESH)
        ]
        for c in clients:  # connected before the clock starts
            grpc.channel_ready_future(c.channel).result(timeout=HANG_GUARD_S)
        before = plane.pool.records()
        outcomes: list[str] = []
        began = time.monotonic()
        for _ in range(3):
            for c in clients:
                try:
                    c.wrap(TENANT, b"x", CONTEXT)
                    outcomes.append("ok")
                except KeyServiceError as e:
                    outcomes.append(f"{e.code.name}: {e.details}")
        elapsed = time.monotonic() - began
        for c in clients:
            c.close()
        assert outcomes.count("ok") <= rate + rate * elapsed, (outcomes, elapsed)
        assert outcomes.count("ok") >= rate
        for outcome in outcomes:
            assert outcome == "ok" or (
                outcome.startswith("RESOURCE_EXHAUSTED") and "over its rate limit of 5" in outcome
            ), outcome
        # Both workers answered calls (refusals are usage records too).
        pool = plane.pool
        until(
            lambda: all(a > b for a, b in zip(pool.records(), before, strict=True)),
            "usage records from both workers",
            within=HANG_GUARD_S,
        )
    finally:
        plane.close()


def test_a_killed_workers_calls_stop_counting_when_it_is_replaced(world: World) -> None:
    """Calls a worker held when it was killed are taken off the shared counts
    before its replacement starts, so they cannot hold a client's cap for good."""
    from keyquorum.hsm.services.shared_counts import SharedCounts

    counts = world.pool.counts
    victim_index, victim = 1, world.pool.pids()[1]
    # What the victim's column holds mid-flight: three calls of one client.
    as_victim = SharedCounts(counts.fd, counts.columns, victim_index, counts.key)
    for _ in range(3):
        as_victim.enter("sha256:held-by-the-victim", 128, 2048)
    assert counts.calls_of("sha256:held-by-the-victim") == 3
    os.kill(victim, signal.SIGKILL)
    until(lambda: victim not in world.pool.pids(), "the pool to see the kill", within=HANG_GUARD_S)
    assert world.pool.wait_serving(2, HANG_GUARD_S), "the killed worker was not replaced"
    assert counts.calls_of("sha256:held-by-the-victim") == 0
    as_victim.close()
    assert all(isinstance(r, bytes) for r in on_fresh_connections(world, wrap_ok))


def test_entries_that_change_no_answer_send_the_workers_nothing(world: World) -> None:
    """A proposal and its approvals before the last change no call's answer: the
    workers get no snapshot for them; the execution that grants a backend does,
    and every worker confirms it before the approval returns."""
    from tests.custodian_steps import approve, propose

    before = world.pool.sequence
    p = propose(world.d, "grant", tenant=TENANT, backend="messaging")
    for c in world.custodians[: p.required - 1]:
        assert not approve(world.d, c, p.id).executed
    assert world.pool.sequence == before
    assert approve(world.d, world.custodians[p.required - 1], p.id).executed
    assert world.pool.sequence > before
    assert min(world.pool.acknowledged()) == world.pool.sequence
    results = []
    for _ in range(FRESH):
        with world.client("backend/messaging") as c:
            results.append(c.wrap(TENANT, b"granted", CONTEXT))
    assert len(results) == FRESH
    run(world.d, world.custodians, "revoke", tenant=TENANT, backend="messaging")
