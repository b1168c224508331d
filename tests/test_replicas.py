"""Several replicas over one store: following, racing, sealing, failing.

Two daemon PROCESSES over one PostgreSQL database (the deployment
docs/replicas.md describes): each unsealed on its own session, one
`custodian unseal` command for both; an activation approved through A in
force on B within the follower's bound; a seal through A sealing B;
racing the k-th approval on both, one execution. PostgreSQL stopped under
a running daemon; unsafe durability refused at start.

In-process, two `Daemon`s over one SQLite file make the race
deterministic: replica B's append is held until A has appended, so B's
first decision always loses (`AppendConflictError`), re-reads and answers
as the log now stands.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from click.testing import CliRunner

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.connect import RemoteError
from keyquorum.cli.main import main as cli_main
from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon, follower
from keyquorum.hsm.daemon.ceremony import CeremonyGate
from keyquorum.hsm.daemon.logkey import KEY_FILE, LogKey
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.admission import AddressPeers
from keyquorum.hsm.services.server import create_server
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum import canonical
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import AppendConflictError, KeyquorumError
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.log import Entry, ExecutionPayload, SealPayload, ShredPayload
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    GrantChanged,
    NewVersion,
    TenantNamed,
    VersionDisabled,
)
from keyquorum.quorum.replay import verify_log
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    DaemonProcess,
    FakeClock,
    ceremony_request,
    make_custodians,
    server_command,
    start_daemon_process,
    tls_channel,
)
from tests.harness import propose as signed_propose
from tests.pg import PgServer, Restartable

THRESHOLD = 3
NAMES = ("alice", "bob", "carol", "dave", "erin")
DEPLOYMENT = "replicas"
#: The follower's documented bound (hsm/daemon/follower.py) plus slack for a busy
#: 2-core test machine: PostgreSQL's NOTIFY usually wakes it in milliseconds.
BOUND_S = follower.POLL_SECONDS + 2.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"), names=NAMES)


def stub_of(channel: grpc.Channel) -> pb_grpc.CustodianServiceStub:
    return pb_grpc.CustodianServiceStub(channel)


def ceremony(
    stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian], code: str = CEREMONY_CODE
) -> None:
    stub.InitCeremony(ceremony_request(DEPLOYMENT, THRESHOLD, custodians, code))
    PROPOSER.append(custodians[0].credential)


def unlocker(c: Custodian) -> Callable[[str], Any]:
    return lambda _statement: c.credential


#: Who signs the proposals of these tests (a custodian of the ceremony).
PROPOSER: list[CustodianCredential] = []


def propose(stub: pb_grpc.CustodianServiceStub, operation: str, **params: str) -> str:
    with actions.rpc_errors():
        proposal = signed_propose(stub, PROPOSER[-1], operation, dict(params))
    return proposal.id


def approve(stub: pb_grpc.CustodianServiceStub, pid: str, c: Custodian) -> pb.VerdictResponse:
    return actions.verdict(stub, pid, c.fingerprint, unlocker(c), verdict="approve")


def quorum(
    stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian], operation: str, **params: str
) -> str:
    pid = propose(stub, operation, **params)
    for c in custodians[:THRESHOLD]:
        response = approve(stub, pid, c)
    assert response.executed
    return pid


def until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until `check()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - start


def unwrapped(stub: pb_grpc.CustodianServiceStub, tenant: str) -> bool:
    tenants = stub.ListTenants(pb.ListTenantsRequest()).tenants
    return any(t.name == tenant and t.unwrapped for t in tenants)


def sealed(stub: pb_grpc.CustodianServiceStub) -> bool:
    return stub.GetStatus(pb.GetStatusRequest()).sealed


# -- what an entry means for a follower (pure) ----------------------------------------


def _entry(payload: Any, seq: int = 7) -> Entry:
    return Entry(seq=seq, prev=bytes(32), type=payload.TYPE, time=1, payload=payload)


def _execution(operation: str, result: Any) -> Entry:
    return _entry(ExecutionPayload(bytes(16), operation, result))


def _seal(replica: str) -> Entry:
    return _entry(SealPayload(replica, None, "test", 1, None))


EFFECTS = [
    ("seal-of-this-replica", _seal("kq-b"), (follower.WipeAll,)),
    ("seal-of-every-replica", _seal("*"), (follower.WipeAll,)),
    ("seal-of-another-replica", _seal("kq-a"), ()),
    (
        "activation",
        _execution("activate-tenant", Activated("acme", 99)),
        (follower.Activate("acme", 99),),
    ),
    (
        "rotation",
        _execution("rotate-tenant", NewVersion("acme", 2, bytes(61), bytes(32))),
        (follower.AddVersion("acme", 2),),
    ),
    (
        "deactivation",
        _execution("deactivate-tenant", TenantNamed("acme")),
        (follower.WipeTenant("acme"),),
    ),
    (
        "destroy",
        _execution("destroy-tenant", DestroyScheduled("acme", 99)),
        (follower.WipeTenant("acme"),),
    ),
    (
        "disable-version",
        _execution("disable-version", VersionDisabled("acme", 1)),
        (follower.DropVersion("acme", 1),),
    ),
    ("shred", _entry(ShredPayload("acme")), (follower.WipeTenant("acme"),)),
    ("grant-changes-no-key", _execution("grant", GrantChanged("booking", "acme")), ()),
    (
        "new-tenant-changes-no-key",
        _execution("create-tenant", NewVersion("acme", 1, bytes(61), bytes(32))),
        (),
    ),
]


@pytest.mark.parametrize(
    ("entry", "expected"), [e[1:] for e in EFFECTS], ids=[e[0] for e in EFFECTS]
)
def test_what_an_entry_from_another_replica_means_here(entry: Entry, expected: tuple[Any]) -> None:
    got = follower.effects(entry, "kq-b")
    if expected and isinstance(expected[0], type):
        assert [type(e) for e in got] == list(expected)
    else:
        assert got == expected


# -- two daemons over one SQLite file, in process (deterministic race) ----------------


class HeldStore:
    """A store whose next append first runs `before` (another replica's write)."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.before: Callable[[], None] | None = None
        self.conflicts = 0

    def append(self, *args: Any, **kwargs: Any) -> None:
        before, self.before = self.before, None
        if before is not None:
            before()
        try:
            self.inner.append(*args, **kwargs)
        except AppendConflictError:
            self.conflicts += 1
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Replica:
    daemon: Daemon
    stub: pb_grpc.CustodianServiceStub


@contextmanager
def serving(daemon: Daemon, pki: DevPki) -> Iterator[pb_grpc.CustodianServiceStub]:
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
    try:
        yield stub_of(channel)
    finally:
        channel.close()
        server.stop(grace=None).wait()
        daemon.seal_for_shutdown()


@pytest.fixture
def sqlite_pair(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> Iterator[tuple[Replica, Replica, HeldStore]]:
    """Replicas A and B over one SQLite file, both unsealed, no follower threads."""
    clock = FakeClock(int(time.time()))  # proposals are signed by the wall clock
    db = tmp_path / "shared.sqlite3"
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    kwargs: dict[str, Any] = {
        "clock": clock,
        "sweep_seconds": None,
        "follow_seconds": None,
        "ceremony": CeremonyGate(code=CEREMONY_CODE),
    }
    store_a = SqliteStore.open(db)
    a = Daemon(store_a, data_dir=dirs[0], replica="kq-a", limits=DEFAULT_LIMITS, **kwargs)
    with serving(a, pki) as stub_a:
        ceremony(stub_a, custodians)
        shutil.copy(dirs[0] / KEY_FILE, dirs[1] / KEY_FILE)
        held = HeldStore(SqliteStore.open(db))
        b = Daemon(held, data_dir=dirs[1], replica="kq-b", limits=DEFAULT_LIMITS, **kwargs)  # type: ignore[arg-type]
        with serving(b, pki) as stub_b:
            for stub in (stub_a, stub_b):
                for c in custodians[:THRESHOLD]:
                    actions.submit_share(stub, c.credential)
            yield Replica(a, stub_a), Replica(b, stub_b), held
        held.inner.close()
    store_a.close()


def test_racing_the_kth_approval_gives_one_execution_and_the_loser_rereads(
    sqlite_pair: tuple[Replica, Replica, HeldStore], custodians: list[Custodian]
) -> None:
    a, b, held = sqlite_pair
    pid = propose(a.stub, "create-tenant", tenant="acme")
    for c in custodians[: THRESHOLD - 1]:
        approve(a.stub, pid, c)
    winner, loser = custodians[THRESHOLD - 1], custodians[THRESHOLD]
    # B decides on the state with k-1 approvals; A appends the k-th first.
    held.before = lambda: approve(a.stub, pid, winner)
    with pytest.raises(RemoteError, match="already executed") as refused:
        approve(b.stub, pid, loser)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert held.conflicts == 1
    state, entries = b.daemon.log_snapshot()
    executions = [
        e for e in map(Entry.from_bytes, entries) if isinstance(e.payload, ExecutionPayload)
    ]
    assert [e.payload.proposal.hex() for e in executions] == [pid]
    assert state.proposals[bytes.fromhex(pid)].approvals.keys() == {
        c.fingerprint for c in custodians[:THRESHOLD]
    }
    # Both replicas hold the same state: the one replay of one log.
    assert a.daemon.log_snapshot()[1] == entries


def test_a_loser_whose_approval_still_counts_executes_after_rereading(
    sqlite_pair: tuple[Replica, Replica, HeldStore], custodians: list[Custodian]
) -> None:
    """B decided on k-2 approvals; A added the (k-1)-th: B's approval is now the k-th."""
    a, b, held = sqlite_pair
    pid = propose(a.stub, "create-tenant", tenant="acme")
    for c in custodians[: THRESHOLD - 2]:
        approve(a.stub, pid, c)
    held.before = lambda: approve(a.stub, pid, custodians[THRESHOLD - 2])
    response = approve(b.stub, pid, custodians[THRESHOLD - 1])
    assert response.executed
    assert held.conflicts == 1
    # A learns of the execution from the log (what its follower thread does).
    assert a.daemon.catch_up() == 2
    assert a.stub.GetProposal(pb.GetProposalRequest(id=pid)).status == "executed"


def test_an_activation_through_a_is_unwrapped_on_b_and_a_seal_of_every_replica_seals_b(
    sqlite_pair: tuple[Replica, Replica, HeldStore], custodians: list[Custodian]
) -> None:
    a, b, _held = sqlite_pair
    quorum(a.stub, custodians, "create-tenant", tenant="acme")
    quorum(a.stub, custodians, "activate-tenant", tenant="acme", duration_seconds="3600")
    assert unwrapped(a.stub, "acme")
    b.daemon.catch_up()
    assert unwrapped(b.stub, "acme")
    c = custodians[0]
    # A seal naming replica A: B follows the entry and keeps its keys.
    actions.seal(a.stub, c, unlocker(c), reason="a", now=a.daemon.clock())
    assert sealed(a.stub)
    assert b.daemon.catch_up() == 1
    assert not b.daemon.sealed
    assert unwrapped(b.stub, "acme")
    # A seal of every replica, sent to B this time, seals A too when it follows.
    for x in custodians[:THRESHOLD]:
        actions.submit_share(a.stub, x.credential)
    actions.seal(b.stub, c, unlocker(c), reason="all", now=a.daemon.clock(), replica="*")
    assert b.daemon.sealed
    assert not a.daemon.sealed
    a.daemon.catch_up()
    assert a.daemon.sealed
    assert a.daemon.tenant_key_buffers_for_test("acme") == []
    assert b.daemon.tenant_key_buffers_for_test("acme") == []


# -- two daemon processes over one PostgreSQL database -------------------------------


@dataclass
class Pair:
    a: DaemonProcess
    b: DaemonProcess
    dsn: str
    channels: list[grpc.Channel]

    @property
    def stubs(self) -> tuple[pb_grpc.CustodianServiceStub, pb_grpc.CustodianServiceStub]:
        return stub_of(self.channels[0]), stub_of(self.channels[1])


def start_replica(data: Path, pki: DevPki, name: str, dsn: str) -> DaemonProcess:
    """`server run --store postgres`, the DSN from the environment (not the command line)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KEYQUORUM_DSN", dsn)
        return start_daemon_process(data, pki, "--store", "postgres", "--replica", name)


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory,
    pki: DevPki,
    custodians: list[Custodian],
    pg_server: PgServer,
) -> Iterator[Pair]:
    """Replicas kq-a and kq-b over one database; the ceremony ran through A."""
    schema, dsn = pg_server.create_schema()
    root = tmp_path_factory.mktemp("pair")
    a = start_replica(root / "a", pki, "kq-a", dsn)
    channel_a = a.channel()
    ceremony(stub_of(channel_a), custodians, a.ceremony_code())
    # The operator gives B the log signing key (docs/replicas.md).
    (root / "b").mkdir()
    shutil.copy(root / "a" / KEY_FILE, root / "b" / KEY_FILE)
    b = start_replica(root / "b", pki, "kq-b", dsn)
    pair = Pair(a, b, dsn, [channel_a, b.channel()])
    yield pair
    for channel in pair.channels:
        channel.close()
    assert a.stop() == 0
    assert b.stop() == 0
    store = PostgresStore.open(dsn)
    try:
        latest = store.latest_checkpoint()
        assert latest is not None
        verify_log(list(store.read_all()), latest[1], LogKey.load(root / "a").vkey)
    finally:
        store.close()
    pg_server.drop_schema(schema)


def unseal_both(pair: Pair, custodians: list[Custodian]) -> None:
    for stub in pair.stubs:
        if sealed(stub):
            for c in custodians[:THRESHOLD]:
                actions.submit_share(stub, c.credential)
            assert not sealed(stub)


def log_entries(dsn: str) -> list[dict[str, Any]]:
    store = PostgresStore.open(dsn)
    try:
        return [canonical.decode(raw) for raw in store.read_all()]  # type: ignore[misc]
    finally:
        store.close()


@pytest.mark.postgres
def test_each_replica_unseals_on_its_own_session_with_one_command(
    pair: Pair,
    custodians: list[Custodian],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    stub_a, stub_b = pair.stubs
    for stub in pair.stubs:
        for c in custodians[: THRESHOLD - 1]:
            actions.submit_share(stub, c.credential)
    last = custodians[THRESHOLD - 1]
    conn = ["--ca", str(pair.a.pki.ca_cert)]
    result = CliRunner().invoke(
        cli_main,
        ["custodian", "unseal", "--server", pair.a.target, "--server", pair.b.target, *conn,
         "--credential", str(last.private_path)],
        input=last.passphrase.decode() + "\n",
        catch_exceptions=False,
    )  # fmt: skip
    output = result.output
    assert result.exit_code == 0, output
    # One passphrase prompt, two sessions, two acceptances.
    assert output.count("Passphrase for") == 1
    assert "replica kq-a, session" in output
    assert "replica kq-b, session" in output
    assert f"{pair.a.target}: share accepted: 3 of 3; UNSEALED" in output
    assert f"{pair.b.target}: share accepted: 3 of 3; UNSEALED" in output
    assert not sealed(stub_a)
    assert not sealed(stub_b)
    unseals = [e["payload"] for e in log_entries(pair.dsn) if e["type"] == "unseal"][-2:]
    assert sorted(u["replica"] for u in unseals) == ["kq-a", "kq-b"]
    assert unseals[0]["session"] != unseals[1]["session"]


@pytest.mark.postgres
def test_activation_through_a_is_in_force_on_b_within_the_bound(
    pair: Pair, custodians: list[Custodian]
) -> None:
    unseal_both(pair, custodians)
    stub_a, stub_b = pair.stubs
    quorum(stub_a, custodians, "create-tenant", tenant="acme")
    quorum(stub_a, custodians, "activate-tenant", tenant="acme", duration_seconds="3600")
    assert until(lambda: unwrapped(stub_b, "acme"), BOUND_S) <= BOUND_S
    assert "tenant acme activated through another replica" in pair.b.output()
    # And back: a deactivation through B wipes the key on A.
    pid = propose(stub_b, "deactivate-tenant", tenant="acme")
    assert approve(stub_b, pid, custodians[4]).executed
    until(lambda: not unwrapped(stub_a, "acme"), BOUND_S)


def approvals_on(stub: pb_grpc.CustodianServiceStub, pid: str) -> int:
    return len(stub.GetProposal(pb.GetProposalRequest(id=pid)).approved_by)


def race_approvals(
    pid: str, *contenders: tuple[pb_grpc.CustodianServiceStub, Custodian]
) -> dict[int, object]:
    """Send approvals of `pid` at once; each result is `executed` or the error."""
    start = threading.Barrier(len(contenders))
    results: dict[int, object] = {}

    def race(n: int, stub: pb_grpc.CustodianServiceStub, c: Custodian) -> None:
        start.wait()
        try:
            results[n] = approve(stub, pid, c).executed
        except KeyquorumError as e:
            results[n] = e

    threads = [
        threading.Thread(target=race, args=(n, stub, c)) for n, (stub, c) in enumerate(contenders)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


@pytest.mark.postgres
def test_racing_the_kth_approval_on_two_processes_gives_one_execution(
    pair: Pair, custodians: list[Custodian]
) -> None:
    unseal_both(pair, custodians)
    stub_a, stub_b = pair.stubs
    for n in range(3):
        pid = propose(stub_a, "create-tenant", tenant=f"race-{n}")
        for c in custodians[: THRESHOLD - 1]:
            approve(stub_a, pid, c)
        until(lambda pid=pid: approvals_on(stub_b, pid) == THRESHOLD - 1, BOUND_S)
        results = race_approvals(
            pid, (stub_a, custodians[THRESHOLD - 1]), (stub_b, custodians[THRESHOLD])
        )
        executed = [name for name, r in results.items() if r is True]
        refused = [r for r in results.values() if isinstance(r, KeyquorumError)]
        assert len(executed) == 1, results
        assert len(refused) == 1, results
        # The daemon's answer after re-reading (FAILED_PRECONDITION), or the
        # CLI's, when the loser fetched the proposal after the execution.
        if isinstance(refused[0], RemoteError):
            assert refused[0].code == grpc.StatusCode.FAILED_PRECONDITION
        assert "executed" in str(refused[0])
        executions = [
            e
            for e in log_entries(pair.dsn)
            if e["type"] == "execution" and e["payload"]["proposal"] == pid
        ]
        assert len(executions) == 1


@pytest.mark.postgres
def test_a_seal_through_a_seals_b(pair: Pair, custodians: list[Custodian]) -> None:
    unseal_both(pair, custodians)
    stub_a, stub_b = pair.stubs
    c = custodians[1]
    # A seal naming replica A leaves B unsealed.
    actions.seal(stub_a, c, unlocker(c), reason="a only", now=int(time.time()))
    assert sealed(stub_a)
    time.sleep(BOUND_S)
    assert not sealed(stub_b)
    unseal_both(pair, custodians)
    # A seal of every replica, sent to A, seals B within the bound.
    actions.seal(stub_a, c, unlocker(c), reason="all", now=int(time.time()), replica="*")
    assert sealed(stub_a)
    assert until(lambda: sealed(stub_b), BOUND_S) <= BOUND_S
    assert "sealed: sealed through another replica" in pair.b.output()


# -- PostgreSQL failing under a running daemon ---------------------------------------


@pytest.mark.postgres
def test_postgres_stopped_under_a_running_daemon_fails_clearly_and_recovers(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian], pg_restartable: Restartable
) -> None:
    cluster = pg_restartable.cluster
    proc = start_replica(tmp_path / "data", pki, "kq-a", pg_restartable.dsn)
    try:
        with proc.channel() as channel:
            stub = stub_of(channel)
            ceremony(stub, custodians, proc.ceremony_code())
            before = propose(stub, "create-tenant", tenant="acme")
            cluster.stop()
            with pytest.raises(RemoteError) as down:
                propose(stub, "create-tenant", tenant="other")
            assert down.value.code == grpc.StatusCode.UNAVAILABLE
            assert f"PostgreSQL at 127.0.0.1:{cluster.port}" in proc.output()
            assert "is unavailable" in proc.output()
            cluster.start()

            def back() -> bool:
                try:
                    propose(stub, "create-tenant", tenant="after")
                except KeyquorumError:
                    return False
                return True

            until(back, 30)
            assert "is available again" in proc.output()
    finally:
        assert proc.stop() == 0
    store = PostgresStore.open(pg_restartable.dsn)
    try:
        entries = list(store.read_all())
        latest = store.latest_checkpoint()
        assert latest is not None
        state = verify_log(entries, latest[1], LogKey.load(tmp_path / "data").vkey)
    finally:
        store.close()
    assert bytes.fromhex(before) in state.proposals
    assert sorted(p.parameters[0][1] for p in state.proposals.values()) == ["acme", "after"]


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("setting", "how"),
    [("fsync=off", "server"), ("synchronous_commit=off", "dsn")],
    ids=["fsync-off-on-the-server", "synchronous-commit-off-for-the-session"],
)
def test_unsafe_postgres_durability_is_refused_at_daemon_start(
    tmp_path: Path, pki: DevPki, pg_restartable: Restartable, setting: str, how: str
) -> None:
    dsn = pg_restartable.dsn
    if how == "server":
        pg_restartable.cluster.restart([setting])
    else:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        params["options"] = f"{params.get('options', '')} -c {setting}"
        dsn = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    argv = server_command(tmp_path / "data", pki, tmp_path / "ready", "--store", "postgres")
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**_environment(), "KEYQUORUM_DSN": dsn},
    )
    assert done.returncode != 0
    name = setting.split("=", maxsplit=1)[0]
    assert name in done.stdout + done.stderr
    assert not (tmp_path / "ready").exists()


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("KEYQUORUM_")}
