"""`admin snapshot` and `admin restore` on both stores, and the quorum's approve-restore.

A daemon (real TLS, a real SQLite file or a real PostgreSQL schema) runs a
ceremony, is unsealed, and a tenant is created; `admin snapshot` copies its
store while it runs. Then:

- round trip: the store is lost, the snapshot restored, the daemon starts
  on it, is unsealed and serves the tenant's key;
- behind: a second tenant is created after the snapshot (the data
  directory remembers that checkpoint); restoring the snapshot is refused,
  naming both sizes, and the store is left as it was;
- the approved override: `--abandon-checkpoint` restores it, but the
  daemon refuses to unseal and every proposal except the approve-restore
  that names this restore; k custodians approve it, the daemon unseals,
  the second tenant is gone, and the offline audit of the exported log
  shows the approval with its statement.

Also: a running daemon's lock stops a restore, and a snapshot whose copy
was altered is refused before anything changes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli import seen_checkpoints
from keyquorum.cli.connect import RemoteError
from keyquorum.hsm.daemon import restoring, rollback
from keyquorum.hsm.daemon.logkey import KEY_FILE, LogKey
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.stores.base import Store
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import FILE_NAME, SqliteStore
from keyquorum.quorum.checkpoint import unverified_size
from keyquorum.quorum.export import produce
from tests.custodian_steps import quorum
from tests.harness import (
    Custodian,
    FakeClock,
    InProcessDaemon,
    ceremony_request,
    in_process_daemon,
    make_custodians,
    run_cli,
    signed_proposal,
    status,
)

DEPLOYMENT = "acme-backup"
THRESHOLD = 2


@dataclass
class World:
    base: Path
    data: Path
    pki: DevPki
    custodians: list[Custodian]
    clock: FakeClock
    kind: str
    dsn: str

    def open_store(self) -> Store:
        if self.kind == "postgres":
            return PostgresStore.open(self.dsn)
        return SqliteStore.open(self.data / FILE_NAME)

    @contextmanager
    def daemon(self) -> Iterator[InProcessDaemon]:
        with in_process_daemon(self.data, self.pki, clock=self.clock, store=self.open_store()) as d:
            yield d

    def store_args(self) -> list[str]:
        args = ["--data-dir", str(self.data)]
        if self.kind == "postgres":
            args += ["--store", "postgres", "--dsn", self.dsn]
        return args

    def snapshot(self, name: str) -> Path:
        out = self.base / name
        code, text = run_cli("admin", "snapshot", *self.store_args(), "--out", str(out))
        assert code == 0, text
        return out

    def restore(self, snapshot: Path, *extra: str) -> tuple[int, str]:
        return run_cli("admin", "restore", *self.store_args(), "--from", str(snapshot), *extra)

    def lose_store(self) -> None:
        """The disk is gone: the store and the data directory, but for the log key
        (restored from its own offline copy)."""
        for path in self.data.iterdir():
            if path.name != KEY_FILE:
                path.unlink()
        if self.kind == "postgres":
            store = PostgresStore.open(self.dsn)
            store.close()
            import psycopg

            with psycopg.connect(self.dsn, autocommit=True) as conn:
                for table in ("log_entries", "log_head", "checkpoints", "shred_salts"):
                    conn.execute(f"DROP TABLE {table} CASCADE")


def unseal(d: InProcessDaemon, w: World) -> None:
    for c in w.custodians[:THRESHOLD]:
        progress = actions.submit_share(d.stub, c.credential)
    assert not progress.sealed


def listing(folder: Path) -> dict[str, bytes]:
    """Every file of `folder` and its bytes, but the lock file (a restore takes the lock)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "daemon.lock"}


def tenants(d: InProcessDaemon) -> set[str]:
    return {t.name for t in d.daemon.tenants()}


@pytest.fixture(params=["sqlite", "postgres"])
def world(request: pytest.FixtureRequest, tmp_path: Path) -> World:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else ""
    w = World(
        base=tmp_path,
        data=tmp_path / "data",
        pki=make_dev_pki(tmp_path / "pki"),
        custodians=make_custodians(tmp_path / "custodians", names=("alice", "bob", "carol")),
        # The wall clock's time: the custodians' CLIs read statements' expiries.
        clock=FakeClock(int(time.time())),
        kind=request.param,
        dsn=dsn,
    )
    w.data.mkdir(mode=0o700)
    with w.daemon() as d:
        d.stub.InitCeremony(ceremony_request(DEPLOYMENT, THRESHOLD, w.custodians))
        unseal(d, w)
        quorum(d.stub, w.custodians, "create-tenant", {"tenant": "kept"}, now=d.clock())
        quorum(
            d.stub,
            w.custodians,
            "activate-tenant",
            {"tenant": "kept", "duration_seconds": 3600},
            now=d.clock(),
        )
    return w


def test_snapshot_of_a_running_daemon_and_restore_round_trip(world: World) -> None:
    with world.daemon() as d:
        snap = world.snapshot("snap")  # the daemon runs meanwhile
        size = d.daemon.log_size
    manifest = (snap / "manifest.json").read_text()
    assert f'"size": {size}' in manifest
    assert oct((snap / "manifest.json").stat().st_mode & 0o777) == "0o600"
    world.lose_store()
    code, text = world.restore(snap)
    assert code == 0, text
    assert f"restored {DEPLOYMENT}: {size} entries" in text
    with world.daemon() as d:
        assert d.daemon.log_size == size
        unseal(d, world)
        assert tenants(d) == {"kept"}
        assert d.daemon.tenant_key("kept")[0] == 1


def test_restore_behind_a_remembered_checkpoint_is_refused(world: World) -> None:
    snap = world.snapshot("snap")
    with world.daemon() as d:
        unseal(d, world)
        quorum(d.stub, world.custodians, "create-tenant", {"tenant": "later"}, now=d.clock())
    remembered = rollback.load(world.data)
    assert remembered is not None
    size = unverified_size(remembered)  # the daemon's own seal at shutdown included
    code, text = world.restore(snap)
    assert code == 1
    assert f"remembers a published checkpoint of {size}" in text
    assert "--abandon-checkpoint" in text
    # Nothing changed: the same remembered checkpoint, the same store.
    assert rollback.load(world.data) == remembered
    assert restoring.load(world.data) is None
    with world.daemon() as d:
        assert d.daemon.log_size == size
        unseal(d, world)
        assert tenants(d) == {"kept", "later"}


def test_the_quorum_approves_going_back_and_the_log_says_so(world: World) -> None:
    snap = world.snapshot("snap")
    with world.daemon() as d:
        unseal(d, world)
        quorum(d.stub, world.custodians, "create-tenant", {"tenant": "later"}, now=d.clock())
    abandoned = unverified_size(rollback.load(world.data) or "")
    code, text = world.restore(snap, "--abandon-checkpoint")
    assert code == 0, text
    pending = restoring.load(world.data)
    assert pending is not None
    assert pending.abandoned_size == abandoned
    assert "keyquorum proposal new approve-restore --param restored_size=" in text
    with world.daemon() as d:
        # No key, and no other proposal, before the quorum approves.
        with pytest.raises(RemoteError) as refused:
            actions.submit_share(d.stub, world.custodians[0].credential)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "approve-restore" in refused.value.details
        with pytest.raises(grpc.RpcError) as other:
            d.stub.Propose(
                signed_proposal(
                    d.stub, world.custodians[0].credential, "create-tenant",
                    {"tenant": "sneaky"}, now=d.clock(),
                )
            )  # fmt: skip
        assert other.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        wrong = dict(pending.parameters(), abandoned_size=abandoned + 1)
        with pytest.raises(grpc.RpcError) as mismatched:
            d.stub.Propose(
                signed_proposal(
                    d.stub, world.custodians[0].credential, "approve-restore", wrong,
                    now=d.clock(),
                )
            )  # fmt: skip
        assert mismatched.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        quorum(d.stub, world.custodians, "approve-restore", pending.parameters(), now=d.clock())
        assert restoring.load(world.data) is None
        unseal(d, world)
        assert tenants(d) == {"kept"}
        executed = [x for x in d.daemon.state.executions if x.operation == "approve-restore"]
        assert len(executed) == 1
    export = world.base / "export.kqlog"
    store = world.open_store()
    try:
        entries = list(store.read_all())
        notes = [note for _size, note in store.checkpoints()]
    finally:
        store.close()
    export.write_bytes(b"".join(produce(entries, notes)))
    vkey = LogKey.load(world.data).vkey
    code, report = run_cli("audit", "verify", str(export), "--log-key", vkey)
    assert code == 0, report
    assert f"abandon the published checkpoint of {abandoned} entries" in report


def test_a_running_daemon_stops_a_restore(world: World, tmp_path: Path) -> None:
    snap = world.snapshot("snap")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from keyquorum.hsm.datadir import DataDirectory
                d = DataDirectory.lock({str(world.data)!r})
                print("locked", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        code, text = world.restore(snap)
        assert code == 1
        assert f"pid {holder.pid}" in text
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


def test_an_altered_snapshot_is_refused_before_anything_changes(world: World) -> None:
    snap = world.snapshot("snap")
    copy = next(p for p in snap.iterdir() if p.name.startswith("store."))
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 1
    copy.write_bytes(bytes(data))
    before = listing(world.data)
    code, text = world.restore(snap)
    assert code == 1
    assert "SHA-256" in text
    assert listing(world.data) == before
    shutil.rmtree(snap)
    # A snapshot directory must be new: an existing non-empty one is refused.
    (world.base / "full").mkdir()
    (world.base / "full" / "x").write_text("x")
    code, text = run_cli(
        "admin", "snapshot", *world.store_args(), "--out", str(world.base / "full")
    )
    assert code == 1
    assert "not an empty directory" in text


def test_status_of_a_restored_daemon_names_nothing_secret(world: World) -> None:
    snap = world.snapshot("snap")
    world.lose_store()
    assert world.restore(snap)[0] == 0
    with world.daemon() as d:
        assert status(d.stub).initialized


def cli(w: World, d: InProcessDaemon, who: Custodian, *args: str) -> tuple[int, str]:
    """`who`'s CLI, on their own machine: what it remembers is theirs alone."""
    conn = ["--server", d.target, "--ca", str(w.pki.ca_cert), "--witness-wait", "0"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(w.base / "homes" / who.name))
        return run_cli(*args, *conn, *who.cli_args())


def remembered_by(w: World, who: Custodian) -> int:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(w.base / "homes" / who.name))
        seen = seen_checkpoints.load(DEPLOYMENT)
    assert seen is not None
    return unverified_size(seen.checkpoint)


@pytest.mark.parametrize("world", ["sqlite"], indirect=True)
def test_custodians_clis_follow_a_shorter_log_only_once_the_quorum_approved(
    world: World,
) -> None:
    alice, bob, carol = world.custodians
    snap = world.snapshot("snap")
    with world.daemon() as d:
        unseal(d, world)
        later = d.stub.Propose(
            signed_proposal(d.stub, carol.credential, "create-tenant", {"tenant": "later"},
                            now=d.clock())
        )  # fmt: skip
        for who in (alice, bob):  # their CLIs remember the checkpoint with their approval
            code, out = cli(world, d, who, "custodian", "approve", later.id)
            assert code == 0, out
    # An operator restores the snapshot and deletes restore-pending by hand.
    assert world.restore(snap, "--abandon-checkpoint")[0] == 0
    pending = restoring.load(world.data)
    assert pending is not None
    restoring.clear(world.data)
    with world.daemon() as d:
        code, out = cli(world, d, alice, "custodian", "unseal")
        assert code == 1
        assert "no approve-restore of the custodians abandons the checkpoint you saw" in out, out
    # Done properly: the pending restore is back, and the quorum decides.
    restoring.save(world.data, pending)
    with world.daemon() as d:
        proposal = d.stub.Propose(
            signed_proposal(d.stub, carol.credential, "approve-restore", pending.parameters(),
                            now=d.clock())
        )  # fmt: skip
        code, out = cli(world, d, alice, "custodian", "approve", proposal.id)
        assert code == 0, out
        assert "asks to approve abandoning the checkpoint" in out
        # Alice's CLI follows the shorter log for this decision only: not yet for others.
        code, out = cli(world, d, alice, "custodian", "unseal")
        assert code == 1, out
        assert "no approve-restore of the custodians abandons the checkpoint you saw" in out, out
        code, out = cli(world, d, bob, "custodian", "approve", proposal.id)
        assert code == 0, out
        assert "EXECUTED approve-restore" in out
        assert restoring.load(world.data) is None
        # The log grows past the size the CLIs remember: still another history for them.
        while d.daemon.log_size <= remembered_by(world, alice) + 1:
            d.stub.Propose(
                signed_proposal(d.stub, carol.credential, "create-tenant",
                                {"tenant": f"t{d.daemon.log_size}"})
            )  # fmt: skip
        # Now every CLI follows: the approval is in the log, proven.
        for who in (alice, bob):
            code, out = cli(world, d, who, "custodian", "unseal")
            assert code == 0, out
        assert not d.daemon.sealed
