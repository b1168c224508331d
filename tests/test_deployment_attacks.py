"""Attacks on a copy of a deployment, each on SQLite and on PostgreSQL, with real daemons.

Each test is one attack an operator, a database administrator or someone
who reaches the custodian port tried on a copy of a deployment, and what
now stops it:

- the unsigned tail: entries appended after the last checkpoint with a
  correct hash chain (and a checkpoint row holding another size's note):
  refused at start and by a running replica, naming the first one;
- the re-keyed rebuilt log: the custodian's CLI and the auditor refuse it,
  naming the pinned key and the new one;
- the restored snapshot that undoes a custodian's own approval, a
  deactivation and a seal: that custodian's next command refuses it;
- the old roster after a roster change: its rebuilt master key opens
  nothing the log or the store holds;
- the first comer at a fresh daemon: no ceremony without the one-time code
  (or the roster the daemon was started with);
- an unsigned proposal, a forged one, an unknown proposer: refused;
- a proposal flood: bounded per proposer and in number while open;
- a daemon showing two histories to two witnesses: each witness refuses the
  other history, and custodians sign over neither.

A PostgreSQL "snapshot" or "copy" is a clone of the store's schema
(tests/pg.py `clone_schema`), which a daemon then serves as its database.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg
import pytest
from click.testing import CliRunner

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.connect import RemoteError, rpc_errors
from keyquorum.cli.main import main as cli_main
from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon, tenant_keys
from keyquorum.hsm.daemon.ceremony import CeremonyGate
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.admission import AddressPeers
from keyquorum.hsm.services.server import create_server
from keyquorum.hsm.services.status import code_for
from keyquorum.hsm.stores.base import Store, leaf_hash
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum import canonical, shamir
from keyquorum.quorum import log as qlog
from keyquorum.quorum.errors import DecryptionError, KeyquorumError, LogIntegrityError
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from keyquorum.quorum.log import ProposalPayload, SealPayload
from keyquorum.quorum.replay import replay
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.custodian_steps import quorum
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    DaemonProcess,
    FakeClock,
    InProcessDaemon,
    ceremony_request,
    make_custodians,
    propose,
    run_cli,
    server_command,
    signed_proposal,
    start_daemon_process,
    status,
    tls_channel,
)
from tests.pg import PgServer

STORE = "keyquorum.sqlite"
K = 3
DEPLOYMENT = "trust"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(
        tmp_path_factory.mktemp("pki"), clients=["auditor/w1", "auditor/w2", "auditor/alice"]
    )


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(
        tmp_path_factory.mktemp("custodians"), names=("alice", "bob", "carol", "dave", "erin")
    )


@pytest.fixture(scope="module")
def outsiders(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("outsiders"), names=("mallory", "ops-bot"))


# -- where the store lives ------------------------------------------------------------


@dataclass
class Snapshot:
    data: Path
    schema: str | None


@dataclass
class Backend:
    """One deployment's store (SQLite in its data directory, or a PostgreSQL schema)."""

    kind: str
    root: Path
    pg: PgServer | None = None
    schema: str | None = None
    dsn: str | None = None
    schemas: list[str] = field(default_factory=list)

    def start(self, pki: DevPki, data: Path, *extra: str) -> DaemonProcess:
        if self.dsn is None:
            return start_daemon_process(data, pki, *extra)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("KEYQUORUM_DSN", self.dsn)
            return start_daemon_process(data, pki, "--store", "postgres", *extra)

    def open_store(self, data: Path) -> Store:
        if self.dsn is None:
            return SqliteStore.open(data / STORE)
        return PostgresStore.open(self.dsn)

    def fresh_store(self) -> None:
        """A new, empty database for a rebuilt log (PostgreSQL; SQLite: a new directory)."""
        if self.pg is not None:
            self.schema, self.dsn = self.pg.create_schema("kq_trust")
            self.schemas.append(self.schema)

    def snapshot(self, data: Path, name: str) -> Snapshot:
        """A copy of the whole data directory, and of the database, as they are now."""
        copy = self.root / name
        shutil.copytree(data, copy)
        schema = None
        if self.pg is not None and self.schema is not None:
            schema, _ = self.pg.clone_schema(self.schema)
            self.schemas.append(schema)
        return Snapshot(copy, schema)

    def restore(self, snapshot: Snapshot, data: Path) -> None:
        """Put the snapshot back: the data directory, and a database restored from it."""
        shutil.rmtree(data)
        shutil.copytree(snapshot.data, data)
        if self.pg is not None and snapshot.schema is not None:
            self.schema, self.dsn = self.pg.clone_schema(snapshot.schema)
            self.schemas.append(self.schema)

    def serve(self, snapshot: Snapshot) -> None:
        """Daemons started from now on use the snapshot's database itself."""
        if self.pg is not None and snapshot.schema is not None:
            self.schema, self.dsn = snapshot.schema, self.pg.schema_dsn(snapshot.schema)

    def dba(self, data: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
        """SQL as a database administrator runs it: the store's triggers out of the way."""
        if self.dsn is None:
            con = sqlite3.connect(data / STORE)
            try:
                for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'"):
                    con.execute(f"DROP TRIGGER {name}")
                for sql, args in statements:
                    con.execute(sql, args)
                con.commit()
            finally:
                con.close()
            return
        with psycopg.connect(self.dsn) as conn, conn.transaction():
            conn.execute("DROP TRIGGER IF EXISTS log_entries_covered ON log_entries")
            for sql, args in statements:
                conn.execute(sql.replace("?", "%s"), args)  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path)
        return
    server: PgServer = request.getfixturevalue("pg_server")
    b = Backend("postgres", tmp_path, server)
    b.fresh_store()
    yield b
    for schema in b.schemas:
        server.drop_schema(schema)


def stub_of(proc: DaemonProcess) -> pb_grpc.CustodianServiceStub:
    return pb_grpc.CustodianServiceStub(proc.channel())


def unseal(stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian]) -> None:
    for c in custodians[:K]:
        progress = actions.submit_share(stub, c.credential)
    assert not progress.sealed


def started_deployment(
    backend: Backend, pki: DevPki, custodians: list[Custodian], data: Path, *extra: str
) -> DaemonProcess:
    """A daemon process after its ceremony (through the CLI: this machine pins the key)."""
    proc = backend.start(pki, data, *extra)
    code, out = run_cli(
        "ceremony", "init", *proc.conn_args(), "--deployment", DEPLOYMENT,
        "--threshold", str(K), "--code", proc.ceremony_code(),
        *(str(c.public_path) for c in custodians),
    )  # fmt: skip
    assert code == 0, out
    return proc


def refused_to_start(backend: Backend, pki: DevPki, data: Path) -> str:
    """Start the daemon on `data`; it must refuse: its last line of stderr."""
    cmd = server_command(data, pki, data.parent / "never.ready")
    env = None
    if backend.dsn is not None:
        env = {**os.environ, "KEYQUORUM_DSN": backend.dsn}
        cmd += ["--store", "postgres"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


# -- 1. the unsigned tail ---------------------------------------------------------------


def _tail(store: Store, outsider: Custodian) -> list[tuple[int, bytes, bytes, bytes]]:
    """Two entries after the last checkpoint, hash-chained correctly: a proposal naming
    a proposer who never made it, and a seal "by the daemon itself". As (seq, leaf
    hash, prev leaf hash, bytes)."""
    entries = list(store.read_all())
    state = replay(entries)
    fake_signature = outsider.credential.sign("propose", b"something else").to_bytes()
    proposal = ProposalPayload(
        id=bytes(16),
        operation="create-tenant",
        parameters=(("tenant", "smuggled"),),
        expires_at=state.time + 3600,
        proposer=outsider.fingerprint,
        signature=fake_signature,
    )
    seal = SealPayload("proc-1", None, "by the daemon itself", state.time, None, bytes(64))
    out = []
    head = state
    prev = entries[-1]
    for payload in (proposal, seal):
        raw = qlog.next_entry(head, payload.TYPE, payload, state.time)
        out.append((head.size, leaf_hash(raw), leaf_hash(prev), raw))
        head = _Head(head.size + 1, leaf_hash(raw), state.time)
        prev = raw
    return out


@dataclass(frozen=True)
class _Head:
    size: int
    head: bytes
    time: int


def _append_as_dba(
    backend: Backend, data: Path, rows: list[tuple[int, bytes, bytes, bytes]]
) -> None:
    if backend.dsn is None:
        backend.dba(
            data,
            *(("INSERT INTO log_entries (seq, leaf_hash, entry) VALUES (?, ?, ?)",
               (seq, h, raw)) for seq, h, _prev, raw in rows),
        )  # fmt: skip
    else:
        backend.dba(
            data,
            *(("INSERT INTO log_entries (seq, leaf_hash, prev_leaf_hash, entry) "
               "VALUES (?, ?, ?, ?)", (seq, h, prev, raw)) for seq, h, prev, raw in rows),
        )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_an_unsigned_tail_is_refused_at_start_and_by_a_running_replica(
    backend: Backend, pki: DevPki, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    data = backend.root / "data"
    proc = started_deployment(backend, pki, custodians, data)
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        propose(stub, custodians[0].credential, "create-tenant", {"tenant": "acme"})
    assert proc.stop() == 0
    store = backend.open_store(data)
    size = store.size()
    rows = _tail(store, outsiders[0])
    # A replica running over the store while the administrator writes.
    daemon = Daemon(
        store, data_dir=data, replica="proc-1", limits=DEFAULT_LIMITS, clock=FakeClock(),
        sweep_seconds=None, follow_seconds=None,
    )  # fmt: skip
    try:
        _append_as_dba(backend, data, rows)
        with pytest.raises(LogIntegrityError) as running:
            daemon.log_extension(0)
        assert running.value.seq == size
        assert code_for(running.value) == grpc.StatusCode.DATA_LOSS
        assert f"entries {size}..{size + 1} are beyond the last signed checkpoint" in str(
            running.value
        )
    finally:
        daemon.seal_for_shutdown()
        store.close()
    # At start: refused, naming the first entry no checkpoint covers.
    line = refused_to_start(backend, pki, data)
    assert line.startswith(f"error: entry {size}: entries {size}..{size + 1} are beyond"), line
    assert "tampering" in line
    # In process, the error is the one the status mapping turns into DATA_LOSS.
    store = backend.open_store(data)
    try:
        with pytest.raises(LogIntegrityError) as info:
            Daemon(store, data_dir=data, replica="proc-1", limits=DEFAULT_LIMITS,
                   clock=FakeClock(), sweep_seconds=None, follow_seconds=None)  # fmt: skip
        assert code_for(info.value) == grpc.StatusCode.DATA_LOSS
    finally:
        store.close()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_checkpoint_row_holding_another_sizes_note_is_refused_at_start(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    data = backend.root / "data"
    proc = started_deployment(backend, pki, custodians, data)
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        for tenant in ("acme", "globex"):
            propose(stub, custodians[0].credential, "create-tenant", {"tenant": tenant})
    assert proc.stop() == 0
    store = backend.open_store(data)
    try:
        rows = store.checkpoints()
    finally:
        store.close()
    (_, size_2), (_, size_3) = [r for r in rows if r[0] in (2, 3)]
    backend.dba(data, ("UPDATE checkpoints SET note = ? WHERE size = 3", (size_2,)))
    line = refused_to_start(backend, pki, data)
    assert "the checkpoint stored for size 3 holds a note of size 2" in line
    # The right note back: it starts again.
    backend.dba(data, ("UPDATE checkpoints SET note = ? WHERE size = 3", (size_3,)))
    assert backend.start(pki, data).stop() == 0


# -- 2. the re-keyed rebuilt log --------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_log_rebuilt_under_a_new_key_is_refused_by_custodians_and_auditors(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    data = backend.root / "data"
    proc = started_deployment(backend, pki, custodians, data)  # the CLI pins the key here
    alice = custodians[0]
    code, out = run_cli("custodian", "confirm", *proc.conn_args(), *alice.cli_args())
    assert code == 0, out
    with proc.channel() as channel:
        pinned = status(pb_grpc.CustodianServiceStub(channel)).log_key
    export = backend.root / "real.kqexport"
    assert proc.stop() == 0
    _export(backend, data, export)
    # The auditor, given the key out of band, pins it on this machine.
    code, out = run_cli("audit", "verify", str(export), "--log-key", pinned)
    assert code == 0, out
    # The operator rebuilds the log under a new key: same deployment, same custodians.
    rebuilt = backend.root / "rebuilt"
    backend.fresh_store()
    proc = backend.start(pki, rebuilt)
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians, proc.ceremony_code()))
        new_key = status(stub).log_key
    assert new_key != pinned
    # A custodian's next command refuses it, naming both keys.
    code, out = run_cli("custodian", "unseal", *proc.conn_args(), *alice.cli_args())
    assert code == 1
    assert pinned in out
    assert new_key in out
    assert "refusing" in out
    # The auditor refuses its export too, naming both.
    assert proc.stop() == 0
    other = backend.root / "rebuilt.kqexport"
    _export(backend, rebuilt, other)
    code, out = run_cli("audit", "verify", str(other))
    assert code == 1
    assert "VERIFICATION FAILED" in out
    assert pinned in out
    assert new_key in out
    # Even when handed the new key explicitly.
    code, out = run_cli("audit", "verify", str(other), "--log-key", new_key)
    assert code == 1
    assert pinned in out


def _export(backend: Backend, data: Path, out: Path) -> None:
    if backend.dsn is None:
        assert run_cli("audit", "export", "--data-dir", str(data), "--out", str(out))[0] == 0
    else:
        _export_from_store(backend, data, out)


def _export_from_store(backend: Backend, data: Path, out: Path) -> None:
    """An export of the PostgreSQL store, as the audit service streams it."""
    from keyquorum.quorum import export

    store = backend.open_store(data)
    try:
        entries = list(store.read_all())
        notes = [n for _, n in store.checkpoints()]
    finally:
        store.close()
    out.write_bytes(b"".join(export.produce(iter(entries), notes)))


# -- 3. the snapshot that undoes a custodian's own actions --------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_restored_snapshot_undoing_an_approval_and_a_seal_is_refused(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    data = backend.root / "data"
    proc = started_deployment(backend, pki, custodians, data)
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        unseal(stub, custodians)
        quorum(stub, custodians, "create-tenant", {"tenant": "acme"})
        quorum(stub, custodians, "activate-tenant", {"tenant": "acme", "duration_seconds": 3600})
        pending = propose(
            stub, custodians[1].credential, "grant", {"tenant": "acme", "backend": "booking"}
        )
        deactivate = propose(
            stub, custodians[1].credential, "deactivate-tenant", {"tenant": "acme"}
        )
    assert proc.stop() == 0
    snapshot = backend.snapshot(data, "snapshot")
    proc = backend.start(pki, data)
    with proc.channel() as channel:
        unseal(pb_grpc.CustodianServiceStub(channel), custodians)
    alice = custodians[0]
    for args in (
        ("custodian", "approve", pending.id, "--witness-wait", "0"),  # 1 of 3: on record
        ("custodian", "approve", deactivate.id, "--witness-wait", "0"),  # narrowing: executes
        ("custodian", "seal", "--reason", "done for today"),
    ):
        code, out = run_cli(*args, *proc.conn_args(), *alice.cli_args())
        assert code == 0, out
    assert proc.stop() == 0
    # Someone restores the whole data directory and the database from the snapshot.
    backend.restore(snapshot, data)
    proc = backend.start(pki, data)  # the daemon's own outside checkpoint went back too
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        restored = stub.GetProposal(pb.GetProposalRequest(id=deactivate.id))
        assert restored.status == "pending"  # the deactivation is undone in this log
        assert not restored.approved_by
    # Alice's next command refuses the log, whatever it is.
    for args in (("custodian", "unseal"), ("custodian", "approve", pending.id)):
        code, out = run_cli(*args, *proc.conn_args(), *alice.cli_args(), "--witness-wait", "0")
        assert code == 1, out
        assert "rolled back" in out or "does not extend" in out, out
        assert "You are about to sign" not in out  # refused before anything was shown or signed
    assert proc.stop() == 0


# -- 4. the old roster after a roster change ------------------------------------------------


def _in_process(
    backend: Backend, data: Path, pki: DevPki, limits: Limits = DEFAULT_LIMITS
) -> InProcessDaemon:
    data.mkdir(parents=True, exist_ok=True)
    store = backend.open_store(data)
    clock = FakeClock()
    daemon = Daemon(
        store, data_dir=data, replica="test-1", limits=limits, clock=clock,
        sweep_seconds=None, follow_seconds=None, ceremony=CeremonyGate(code=CEREMONY_CODE),
    )  # fmt: skip
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=tls.server_credentials(pki.server_cert, pki.server_key),
        limits=limits,
        register=[custodian_service.register(daemon, limits)],
        service_names=[custodian_service.SERVICE_NAME],
        peers=AddressPeers(),
    )
    server.start()
    channel = tls_channel(pki, f"127.0.0.1:{port}")
    return InProcessDaemon(daemon, port, clock, server, channel, store, data)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_after_a_roster_change_the_old_roster_opens_nothing(
    backend: Backend, pki: DevPki, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    d = _in_process(backend, backend.root / "data", pki)
    try:
        d.stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians))
        unseal(d.stub, custodians)
        now = d.clock()
        quorum(d.stub, custodians, "create-tenant", {"tenant": "acme"}, now=now)
        quorum(d.stub, custodians, "rotate-tenant", {"tenant": "acme"}, now=now)
        quorum(d.stub, custodians, "activate-tenant", {"tenant": "acme", "duration_seconds": 600},
               now=now)  # fmt: skip
        tenant_key = d.daemon.tenant_key("acme")[1]
        with tenant_key:
            key_bytes = bytes(tenant_key.view())
        before = d.daemon.state.tenants["acme"].versions
        old_shares = {c.name: d.stub.GetEncryptedShare(pb.GetEncryptedShareRequest(
            custodian=c.fingerprint)) for c in custodians}  # fmt: skip
        old_salts = {v.version: d.store.get_shred_salt("acme", v.version) for v in before}
        # Three custodians leave; one joins.
        removed, kept = custodians[2:5], custodians[:2]
        joiner = outsiders[1]
        roster = ",".join(c.fingerprint for c in [*kept, joiner])
        p = d.stub.Propose(signed_proposal(
            d.stub, custodians[0].credential, "change-roster", {"roster": roster, "threshold": 2},
            now=now, public_credentials=(joiner.public_path.read_bytes(),)))  # fmt: skip
        for c in custodians[:K]:
            answer = actions.verdict(d.stub, p.id, c.fingerprint, lambda _t, c=c: c.credential,
                                     verdict="approve")  # fmt: skip
        assert answer.executed
        after = d.daemon.state.tenants["acme"].versions
        # Every version got a fresh salt; the store holds only those now.
        for old, new in zip(before, after, strict=True):
            assert new.shred_salt_sha256 != old.shred_salt_sha256
            salt = d.store.get_shred_salt("acme", new.version)
            assert salt is not None
            assert salt != old_salts[new.version]
            assert tenant_keys.shred_salt_digest(salt) == new.shred_salt_sha256
        # The three removed custodians rebuild the old master key from their old shares...
        old_master = _combine(old_shares, removed)
        # ...and open nothing: not the wrappings the log kept from before (their salts
        # are erased), not the new ones (another master key).
        with old_master:
            for old, new in zip(before, after, strict=True):
                salt = d.store.get_shred_salt("acme", new.version)
                assert salt is not None
                for wrapped in (old.wrapped_key, new.wrapped_key):
                    with pytest.raises(DecryptionError):
                        tenant_keys.unwrap(old_master, salt, "acme", new.version, wrapped)
            # What a backup taken before the change still allows (README, threat model):
            # the old salt with the old master key opens the old wrapping.
            v1 = before[0]
            old_salt = old_salts[1]
            assert old_salt is not None
            with tenant_keys.unwrap(old_master, old_salt, "acme", 1, v1.wrapped_key) as opened:
                assert len(opened) == 32
        # The key itself did not change: the new roster unseals and uses it.
        assert key_bytes
        if backend.dsn is None:
            files = b"".join(
                p.read_bytes() for p in (d.data_dir / STORE, d.data_dir / f"{STORE}-wal")
                if p.exists()
            )  # fmt: skip
            for salt in old_salts.values():
                assert salt is not None
                assert salt not in files  # the old bytes are gone from the files
        state, raws = d.daemon.log_snapshot()
        assert replay(raws) == state
    finally:
        d.close()


def _combine(shares: dict[str, pb.EncryptedShare], holders: list[Custodian]) -> SecretBytes:
    commitments = shamir.SplitCommitments.from_json(
        canonical.decode(shares[holders[0].name].split_commitments)
    )
    opened = []
    for c in holders:
        enc = shares[c.name]
        info = qlog.share_info(enc.deployment, bytes.fromhex(enc.split_id), c.fingerprint,
                               enc.index)  # fmt: skip
        with c.credential.open_sealed(enc.ciphertext, info) as plain:
            opened.append(shamir.Share.from_bytes(plain.view()))
    return shamir.combine(opened, commitments)


# -- 5. the first comer at a fresh daemon ----------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_first_comer_runs_no_ceremony_without_the_code(
    backend: Backend, pki: DevPki, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    data = backend.root / "data"
    proc = backend.start(pki, data)
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        mine = [*outsiders, *custodians[:1]]
        real = proc.ceremony_code()
        one_off = real[:-1] + ("A" if real[-1] != "A" else "B")  # never the code itself
        for code in ("", "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF", one_off):
            with pytest.raises(RemoteError) as info, rpc_errors():
                stub.InitCeremony(ceremony_request("hijacked", 2, mine, code))
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert not status(stub).initialized
        # The holder of the code the daemon printed runs it, once.
        stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians, proc.ceremony_code()))
        with pytest.raises(RemoteError) as again, rpc_errors():
            stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians, proc.ceremony_code()))
        assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert proc.stop() == 0
    # Once initialised, a restarted daemon prints no code: there is no ceremony to run.
    again_proc = backend.start(pki, data)
    assert "one-time ceremony code" not in again_proc.output()
    assert again_proc.stop() == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_daemon_started_with_a_roster_runs_the_ceremony_for_it_alone(
    backend: Backend, pki: DevPki, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    roster = [f"--ceremony-roster={c.fingerprint}" for c in custodians]
    proc = backend.start(pki, backend.root / "data", *roster)
    assert "one-time ceremony code" not in proc.output()
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        for wrong in ([*custodians[:4], outsiders[0]], list(reversed(custodians))):
            with pytest.raises(RemoteError) as info, rpc_errors():
                stub.InitCeremony(ceremony_request(DEPLOYMENT, K, wrong, ""))
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians, ""))
        assert status(stub).initialized
    assert proc.stop() == 0


# -- 6. unsigned, forged and unknown proposals ------------------------------------------------


def _refused(
    d: InProcessDaemon, request: pb.ProposeRequest, code: grpc.StatusCode, match: str
) -> None:
    size = d.daemon.log_size
    with pytest.raises(RemoteError, match=match) as info, rpc_errors():
        d.stub.Propose(request)
    assert info.value.code == code
    assert d.daemon.log_size == size  # nothing logged


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_unsigned_forged_and_unknown_proposals_are_refused(
    backend: Backend, pki: DevPki, custodians: list[Custodian], outsiders: list[Custodian]
) -> None:
    d = _in_process(backend, backend.root / "data", pki)
    try:
        d.stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians))
        now = d.clock()
        alice, bob = custodians[0].credential, custodians[1].credential
        good = signed_proposal(d.stub, alice, "create-tenant", {"tenant": "acme"}, now=now)
        unsigned = pb.ProposeRequest()
        unsigned.CopyFrom(good)
        unsigned.signature = b""
        _refused(d, unsigned, grpc.StatusCode.UNAUTHENTICATED, "must be signed")
        # Free text as the proposer, as before: not a proposer at all.
        anyone = pb.ProposeRequest()
        anyone.CopyFrom(good)
        anyone.proposer = "ops team"
        _refused(d, anyone, grpc.StatusCode.PERMISSION_DENIED, "neither a custodian")
        # Signed by someone the log does not know.
        mallory = outsiders[0].credential
        stranger = signed_proposal(d.stub, mallory, "create-tenant", {"tenant": "acme"}, now=now)
        _refused(d, stranger, grpc.StatusCode.PERMISSION_DENIED, "neither a custodian")
        # Alice's signature, with Bob named as the proposer.
        forged = pb.ProposeRequest()
        forged.CopyFrom(good)
        forged.proposer = custodians[1].fingerprint
        _refused(d, forged, grpc.StatusCode.PERMISSION_DENIED, "does not verify")
        # Alice's signature moved to other parameters, another id, another expiry.
        for field_name, value in (("id", "ab" * 16), ("expires_at", good.expires_at - 1)):
            moved = pb.ProposeRequest()
            moved.CopyFrom(good)
            setattr(moved, field_name, value)
            _refused(d, moved, grpc.StatusCode.PERMISSION_DENIED, "does not verify")
        moved = pb.ProposeRequest()
        moved.CopyFrom(good)
        moved.parameters[0].value = "globex"
        _refused(d, moved, grpc.StatusCode.PERMISSION_DENIED, "does not verify")
        # The real one goes in, once: replayed, its id is taken.
        assert d.stub.Propose(good).proposer == custodians[0].fingerprint
        _refused(d, good, grpc.StatusCode.FAILED_PRECONDITION, "already taken")
        # A proposer the quorum registers may propose, until the quorum removes it.
        ops = outsiders[1]
        request = signed_proposal(
            d.stub, bob, "add-proposer", {"proposer": ops.fingerprint, "name": "ops-bot"},
            now=now, public_credentials=(ops.public_path.read_bytes(),),
        )  # fmt: skip
        p = d.stub.Propose(request)
        assert "  proposer: ops-bot (" in p.approve_statement
        for c in custodians[:K]:
            actions.verdict(d.stub, p.id, c.fingerprint, lambda _t, c=c: c.credential,
                            verdict="approve")  # fmt: skip
        # `proposal show` names the proposer as people read it, never in hex.
        shown = CliRunner().invoke(
            cli_main, ["proposal", "show", p.id, "--server", d.target, "--ca", str(pki.ca_cert)]
        )
        assert shown.exit_code == 0, shown.output
        label = f"ops-bot ({ops.credential.public().short_fingerprint})"
        assert f"proposer={label}" in shown.output
        executed = d.stub.GetProposal(pb.GetProposalRequest(id=p.id)).executed_seq
        assert f"executed:  entry {executed}: proposer={label}" in shown.output
        assert re.search(r"[0-9a-f]{64}", shown.output) is None, shown.output
        by_ops = d.stub.Propose(
            signed_proposal(d.stub, ops.credential, "create-tenant", {"tenant": "globex"}, now=now)
        )
        assert by_ops.proposer_name == "ops-bot"
        quorum(d.stub, custodians, "remove-proposer",
               {"proposer": ops.fingerprint, "name": "ops-bot"}, now=now)  # fmt: skip
        again = signed_proposal(
            d.stub, ops.credential, "create-tenant", {"tenant": "initech"}, now=now
        )
        _refused(d, again, grpc.StatusCode.PERMISSION_DENIED, "neither a custodian")
        state, raws = d.daemon.log_snapshot()
        assert replay(raws) == state
        assert ops.fingerprint not in state.proposers
    finally:
        d.close()


# -- 7. a proposal flood ------------------------------------------------------------------------

FLOOD = Limits(
    max_open_proposals=4,
    max_open_proposals_per_proposer=2,
    proposals_per_minute=1,
    proposal_burst=3,
)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_proposal_flood_is_bounded_per_proposer_and_while_open(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    d = _in_process(backend, backend.root / "data", pki, FLOOD)
    try:
        d.stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians))
        unseal(d.stub, custodians)
        now = d.clock()
        alice, bob, carol = (c.credential for c in custodians[:3])

        def request(who: Custodian | object, tenant: str) -> pb.ProposeRequest:
            return signed_proposal(d.stub, who, "create-tenant", {"tenant": tenant}, now=now)  # type: ignore[arg-type]

        # Alice: two open at once, no more.
        d.stub.Propose(request(alice, "a1"))
        d.stub.Propose(request(alice, "a2"))
        _refused(d, request(alice, "a3"), grpc.StatusCode.RESOURCE_EXHAUSTED, "2 proposals open")
        # Forged proposals under Bob's name cost Bob nothing.
        for n in range(6):
            forged = request(alice, f"f{n}")
            forged.proposer = custodians[1].fingerprint
            _refused(d, forged, grpc.StatusCode.PERMISSION_DENIED, "does not verify")
        d.stub.Propose(request(bob, "b1"))
        d.stub.Propose(request(bob, "b2"))
        # Four open: the deployment's bound, whoever asks.
        _refused(
            d, request(carol, "c1"), grpc.StatusCode.RESOURCE_EXHAUSTED, "4 proposals are open"
        )
        # Decided proposals are no longer open; Alice's rate is what stops her then.
        for pid in [p.id for p in d.stub.ListProposals(pb.ListProposalsRequest()).proposals]:
            for c in custodians[:K]:
                actions.verdict(d.stub, pid, c.fingerprint, lambda _t, c=c: c.credential,
                                verdict="approve")  # fmt: skip
        d.stub.Propose(request(alice, "a4"))  # her third token
        _refused(d, request(alice, "a5"), grpc.StatusCode.RESOURCE_EXHAUSTED, "over the rate")
        d.stub.Propose(request(carol, "c2"))  # others are not held back by her
        state, raws = d.daemon.log_snapshot()
        assert replay(raws) == state
        assert len(state.proposals) == 6
    finally:
        d.close()


# -- 8. two histories shown to two witnesses -----------------------------------------------------


@contextmanager
def machine(root: Path, name: str) -> Iterator[None]:
    """Commands run on one person's machine: what its CLI pinned and remembered is its own."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CONFIG_HOME", str(root / f"machine-{name}"))
        yield


def _mtls_port(proc: DaemonProcess) -> int:
    ready = proc.data_dir.parent / f"{proc.data_dir.name}.ready"
    return int(json.loads(ready.read_text())["mtls_port"])


def _witness(
    proc: DaemonProcess, pki: DevPki, who: str, root: Path, log_key: str
) -> tuple[int, str]:
    """One look of witness `who` at the log `proc` serves (`audit witness --once`)."""
    files = pki.client(f"auditor/{who}")
    return run_cli(
        "audit", "witness", "--once", "--server", f"127.0.0.1:{_mtls_port(proc)}",
        "--ca", str(pki.ca_cert), "--cert", str(files.cert), "--key", str(files.key),
        "--signing-key", str(root / f"{who}.cosigner"), "--state", str(root / f"{who}.state"),
        "--log-key", log_key,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_two_histories_shown_to_two_witnesses_are_caught(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    root = backend.root
    mtls = ("--listen-mtls", "127.0.0.1:0", "--client-ca", str(pki.ca_cert))
    keys = {}
    for who in ("w1", "w2"):
        code, out = run_cli(
            "audit", "keygen", "--name", f"{who}.example/witness", "--out",
            str(root / f"{who}.cosigner"),
        )  # fmt: skip
        assert code == 0, out
        keys[who] = out.strip()
    data = root / "data"
    with machine(root, "operator"):
        proc = started_deployment(backend, pki, custodians, data, *mtls)
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        unseal(stub, custodians)
        quorum(stub, custodians, "add-witness", {"witness": keys["w1"], "witness_threshold": 1})
        quorum(stub, custodians, "add-witness", {"witness": keys["w2"], "witness_threshold": 2})
        log_key = status(stub).log_key
        assert status(stub).witness_threshold == 2
    for who in ("w1", "w2"):
        code, out = _witness(proc, pki, who, root, log_key)
        assert code == 0, out
        assert "cosigned the checkpoint" in out
    assert proc.stop() == 0
    # The daemon's operator serves a copy too: from here on, two histories.
    copy = backend.snapshot(data, "copy")
    a = backend.start(pki, data, *mtls)
    backend.serve(copy)
    b = backend.start(pki, copy.data, *mtls)
    with a.channel() as ca, b.channel() as cb:
        x = propose(pb_grpc.CustodianServiceStub(ca), custodians[0].credential, "create-tenant",
                    {"tenant": "history-a"})  # fmt: skip
        y = propose(pb_grpc.CustodianServiceStub(cb), custodians[0].credential, "create-tenant",
                    {"tenant": "history-b"})  # fmt: skip
    assert x.log_position == y.log_position  # one size, two roots
    # Each witness is shown one history first, and cosigns it...
    assert _witness(a, pki, "w1", root, log_key)[0] == 0
    assert _witness(b, pki, "w2", root, log_key)[0] == 0
    # ...then refuses the other one, with both notes as evidence.
    for proc_, who in ((b, "w1"), (a, "w2")):
        code, out = _witness(proc_, pki, who, root, log_key)
        assert code == 1, out
        assert "WITNESS REFUSED" in out
        assert "fork" in out
        assert out.count("a note signed by the log key") == 2
    # No history has the two cosignatures the deployment requires: custodians sign
    # over neither, whichever they see.
    for proc_, pid, who in ((a, x.id, custodians[0]), (b, y.id, custodians[1])):
        with machine(root, who.name):
            code, out = run_cli("custodian", "approve", pid, *proc_.conn_args(),
                                *who.cli_args(), "--witness-wait", "0")  # fmt: skip
        assert code == 1, out
        assert "requires 2 witness cosignature(s)" in out
        assert "You are about to sign" not in out
    # A custodian who saw one history refuses the other outright.
    with machine(root, custodians[0].name):
        code, out = run_cli("custodian", "unseal", *b.conn_args(), *custodians[0].cli_args())
    assert code == 1, out
    assert "does not extend" in out or "rolled back" in out
    assert a.stop() == 0
    assert b.stop() == 0


# -- the log key changes only by the quorum, and everyone follows ---------------------------------


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_quorum_rotation_of_the_log_key_is_followed_by_custodians_and_auditors(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    data = backend.root / "data"
    proc = started_deployment(backend, pki, custodians, data)  # this machine pins the key
    alice = custodians[0]
    assert run_cli("custodian", "confirm", *proc.conn_args(), *alice.cli_args())[0] == 0
    with proc.channel() as channel:
        old_key = status(pb_grpc.CustodianServiceStub(channel)).log_key
    first_export = backend.root / "before.kqexport"
    _export(backend, data, first_export)
    # The auditor pins the key it was given (out of band).
    assert run_cli("audit", "verify", str(first_export), "--log-key", old_key)[0] == 0
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        code, out = run_cli("admin", "log-key", "next", "--data-dir", str(data))
        assert code == 0, out
        new_key = out.strip()
        p = quorum(stub, custodians, "rotate-log-key", {"log_key": new_key}).proposal
        assert f"  new log key: {new_key}" in p.approve_statement  # what the custodians signed
        assert status(stub).log_key == new_key
        pending = propose(stub, custodians[1].credential, "create-tenant", {"tenant": "after"})
    # The daemon now signs with the new key; the next key's file became the key.
    assert not (data / "log-signing-key.next").exists()
    # The custodian's CLI follows the rotation (signed by the key it pinned)...
    code, out = run_cli("custodian", "refuse", pending.id, *proc.conn_args(), *alice.cli_args(),
                        "--witness-wait", "0")  # fmt: skip
    assert code == 0, out
    assert "refused and logged" in out
    # ...and so does the auditor, over the log itself.
    assert proc.stop() == 0
    after = backend.root / "after.kqexport"
    _export(backend, data, after)
    code, out = run_cli("audit", "verify", str(after))
    assert code == 0, out
    assert f"{old_key} (genesis)" in out
    assert f"{new_key} (rotate-log-key, proposal {p.id[:8]}" in out
    # Handing it the new key explicitly is fine now: it is the log's, after the pinned one.
    assert run_cli("audit", "verify", str(after), "--log-key", new_key)[0] == 0
    # The daemon starts on its new key.
    assert backend.start(pki, data).stop() == 0


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_rotation_committed_before_a_crash_is_finished_at_start(
    backend: Backend, pki: DevPki, custodians: list[Custodian]
) -> None:
    """The rotation's entry and checkpoint committed; the daemon died before the next
    key's file became the key. At start it finds the rotation in the log and finishes it;
    a replica holding only the old key refuses to start, naming both keys."""
    from keyquorum.hsm.daemon.logkey import KEY_FILE, NEXT_FILE, LogKey

    data = backend.root / "data"
    d = _in_process(backend, data, pki)
    try:
        d.stub.InitCeremony(ceremony_request(DEPLOYMENT, K, custodians))
        old = (data / KEY_FILE).read_bytes()
        new_key = LogKey.create_next(data, origin=f"keyquorum/{DEPLOYMENT}").vkey
        pending = (data / NEXT_FILE).read_bytes()
        quorum(d.stub, custodians, "rotate-log-key", {"log_key": new_key}, now=d.clock())
        assert d.daemon.state.log_key == new_key
        assert (data / KEY_FILE).read_bytes() == pending
    finally:
        d.close()
    # As the crash left it: the old key in place, the next one beside it.
    (data / KEY_FILE).write_bytes(old)
    (data / NEXT_FILE).write_bytes(pending)
    only_old = backend.root / "only-old"
    shutil.copytree(data, only_old)
    (only_old / NEXT_FILE).unlink()
    store = backend.open_store(data)
    try:
        daemon = Daemon(store, data_dir=data, replica="test-1", limits=DEFAULT_LIMITS,
                        clock=FakeClock(), sweep_seconds=None, follow_seconds=None)  # fmt: skip
        assert daemon.state.log_key == new_key
        daemon.seal_for_shutdown()
    finally:
        store.close()
    assert (data / KEY_FILE).read_bytes() == pending
    assert not (data / NEXT_FILE).exists()
    store = backend.open_store(only_old)
    try:
        with pytest.raises(KeyquorumError, match="the key file or the store was replaced") as info:
            Daemon(store, data_dir=only_old, replica="test-2", limits=DEFAULT_LIMITS,
                   clock=FakeClock(), sweep_seconds=None, follow_seconds=None)  # fmt: skip
        assert new_key in str(info.value)
    finally:
        store.close()
