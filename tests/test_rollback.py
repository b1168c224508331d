"""Rollback: a log restored from an older snapshot is refused, by the daemon and by the CLI.

A restored store is a valid log on its own: it replays and matches its own
latest checkpoint. What catches it is a checkpoint published later and
kept elsewhere: the daemon's copy in its data directory (hsm/daemon/rollback.py),
and each custodian's copy on their own machine (cli/seen_checkpoints.py),
both checked with RFC 9162 consistency proofs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from keyquorum.cli import seen_checkpoints
from keyquorum.cli.main import main as cli_main
from keyquorum.hsm.daemon import Daemon, rollback
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum import evidence, merkle
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import (
    RollbackError,
    SignatureError,
    UnverifiedNoteError,
)
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.note import NoteSigner
from keyquorum.quorum.replay import verify_log
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    make_custodians,
    signed_proposal,
    start_daemon_process,
)

STORE_FILE = "keyquorum.sqlite"
THRESHOLD = 2

# -- check_extends, the pure part ------------------------------------------------


def _tree(leaves: list[bytes]) -> merkle.MerkleTree:
    tree = merkle.MerkleTree()
    for leaf in leaves:
        tree.append(merkle.leaf_hash(leaf))
    return tree


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    return NoteSigner.generate("keyquorum/rollback-test")


def _note(signer: NoteSigner, tree: merkle.MerkleTree, size: int | None = None) -> str:
    size = tree.size if size is None else size
    return signer.sign_checkpoint(size, tree.root(size))


LEAVES = [f"entry {i}".encode() for i in range(9)]
FORK = [*LEAVES[:4], b"rewritten entry 4", *LEAVES[5:]]


def test_a_log_that_extends_the_remembered_checkpoint_is_accepted(signer: NoteSigner) -> None:
    tree = _tree(LEAVES)
    old = _note(signer, tree, 5)
    new = _note(signer, tree)
    current = evidence.require_extends_notes(
        old, new, tree.consistency_proof(5, 9), signer.verifier()
    )
    assert current.size == 9
    # The same checkpoint again (no new entries) needs an empty proof.
    assert evidence.require_extends_notes(new, new, [], signer.verifier()).size == 9


CASES: list[tuple[str, Callable[[NoteSigner], tuple[str, str, list[bytes]]], type[Exception]]] = [
    (
        "shorter-log-rolled-back",
        lambda s: (_note(s, _tree(LEAVES)), _note(s, _tree(LEAVES[:5])), []),
        RollbackError,
    ),
    (
        "same-size-other-history",
        lambda s: (_note(s, _tree(LEAVES), 6), _note(s, _tree(FORK), 6), []),
        RollbackError,
    ),
    (
        "longer-log-other-history",
        lambda s: (
            _note(s, _tree(LEAVES), 6),
            _note(s, _tree(FORK)),
            _tree(FORK).consistency_proof(6, 9),
        ),
        RollbackError,
    ),
    (
        "proof-with-a-flipped-hash",
        lambda s: (
            _note(s, _tree(LEAVES), 5),
            _note(s, _tree(LEAVES)),
            [bytes([h[0] ^ 1]) + h[1:] for h in _tree(LEAVES).consistency_proof(5, 9)],
        ),
        RollbackError,
    ),
    (
        "proof-missing",
        lambda s: (_note(s, _tree(LEAVES), 5), _note(s, _tree(LEAVES)), []),
        RollbackError,
    ),
    (
        "current-checkpoint-signed-by-another-key",
        lambda s: (
            _note(s, _tree(LEAVES), 5),
            _note(NoteSigner.generate(s.name), _tree(LEAVES)),
            _tree(LEAVES).consistency_proof(5, 9),
        ),
        UnverifiedNoteError,
    ),
]


@pytest.mark.parametrize(("make", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_log_that_does_not_extend_the_remembered_checkpoint_is_refused(
    signer: NoteSigner,
    make: Callable[[NoteSigner], tuple[str, str, list[bytes]]],
    error: type[Exception],
) -> None:
    old, new, proof = make(signer)
    with pytest.raises(error):
        evidence.require_extends_notes(old, new, proof, signer.verifier())
    assert issubclass(error, RollbackError | SignatureError)


def test_the_checkpoint_file_is_replaced_whole(tmp_path: Path, signer: NoteSigner) -> None:
    assert rollback.load(tmp_path) is None
    first, second = _note(signer, _tree(LEAVES[:3])), _note(signer, _tree(LEAVES))
    rollback.save(tmp_path, first)
    rollback.save(tmp_path, second)
    assert rollback.load(tmp_path) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == [rollback.CHECKPOINT_FILE]
    assert (tmp_path / rollback.CHECKPOINT_FILE).stat().st_mode & 0o777 == 0o600


# -- the daemon, over a real data directory ----------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"), names=("alice", "bob", "carol"))


#: Who signs the proposals of these tests (a custodian of the ceremony).
SIGNER: list[CustodianCredential] = []


def propose(proc: DaemonProcess, tenant: str) -> str:
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        return stub.Propose(
            signed_proposal(stub, SIGNER[0], "create-tenant", {"tenant": tenant})
        ).id


def start_daemon(data: Path) -> Daemon:
    return Daemon(
        SqliteStore.open(data / STORE_FILE),
        data_dir=data,
        replica="proc-1",
        limits=DEFAULT_LIMITS,
        clock=lambda: 1_790_000_000,
        sweep_seconds=None,
        follow_seconds=None,
    )


@pytest.fixture
def history(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> tuple[Path, Path, DaemonProcess]:
    """A running daemon with 4 entries, and a copy of its whole data directory
    taken (daemon stopped) when it had 2: (data, snapshot, daemon)."""
    data, snapshot = tmp_path / "data", tmp_path / "snapshot"
    proc = start_daemon_process(data, pki)
    with proc.channel() as channel:
        pb_grpc.CustodianServiceStub(channel).InitCeremony(
            ceremony_request("rollback", THRESHOLD, custodians, proc.ceremony_code())
        )
    SIGNER[:] = [custodians[0].credential]
    propose(proc, "early")
    assert proc.stop() == 0
    shutil.copytree(data, snapshot)
    proc = start_daemon_process(data, pki)
    propose(proc, "late-1")
    propose(proc, "late-2")
    return data, snapshot, proc


def restore(snapshot: Path, data: Path, *names: str) -> None:
    """Put back the snapshot's copy of `names` (all of the data directory if none)."""
    if not names:
        shutil.rmtree(data)
        shutil.copytree(snapshot, data)
        return
    for name in names:
        (data / name).unlink(missing_ok=True)
        shutil.copy2(snapshot / name, data / name)


def test_a_store_restored_from_an_older_snapshot_is_refused_at_start(
    history: tuple[Path, Path, DaemonProcess], pki: DevPki
) -> None:
    data, snapshot, proc = history
    assert proc.stop() == 0
    restore(snapshot, data, STORE_FILE)
    # The restored store is consistent with itself: only the outside checkpoint tells.
    store = SqliteStore.open(data / STORE_FILE)
    try:
        latest = store.latest_checkpoint()
        assert latest is not None
        verify_log(list(store.read_all()), latest[1], LogKey.load(data).vkey)
    finally:
        store.close()
    with pytest.raises(RuntimeError, match="rolled back"):
        start_daemon_process(data, pki)
    with pytest.raises(
        RollbackError, match="the store has 2 entries, but this daemon published a checkpoint of 4"
    ):
        start_daemon(data)


def test_an_emptied_store_is_refused_at_start(history: tuple[Path, Path, DaemonProcess]) -> None:
    data, _snapshot, proc = history
    assert proc.stop() == 0
    for wal in data.glob(f"{STORE_FILE}*"):
        wal.unlink()
    with pytest.raises(RollbackError, match="the store is empty"):
        start_daemon(data)


def test_another_history_of_the_same_length_is_refused_at_start(
    history: tuple[Path, Path, DaemonProcess], pki: DevPki
) -> None:
    """Rolled back, then grown again past the remembered size by other entries: a fork."""
    data, snapshot, proc = history
    assert proc.stop() == 0
    remembered = rollback.load(data)
    assert remembered is not None
    restore(snapshot, data)
    proc = start_daemon_process(data, pki)  # its own checkpoint file was rolled back too
    for n in range(3):
        propose(proc, f"forked-{n}")
    assert proc.stop() == 0
    (data / rollback.CHECKPOINT_FILE).write_text(remembered)
    with pytest.raises(RollbackError, match="another history"):
        start_daemon(data)


# -- the custodian's CLI ------------------------------------------------------------


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return 1, f"{result.output}{result.exception}"
    return result.exit_code, result.output


def test_the_custodian_cli_refuses_a_log_that_does_not_extend_what_it_saw(
    history: tuple[Path, Path, DaemonProcess],
    pki: DevPki,
    custodians: list[Custodian],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole-machine snapshot rolls the daemon's own file back too; the
    custodians' machines still remember the later checkpoint."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "alice-laptop"))
    data, snapshot, proc = history
    alice, bob = custodians[0], custodians[1]
    conn = ["--server", proc.target, "--ca", str(pki.ca_cert)]
    code, output = cli("custodian", "unseal", *conn, *alice.cli_args())
    assert code == 0, output
    with proc.channel() as channel:
        early = next(
            p.id
            for p in pb_grpc.CustodianServiceStub(channel)
            .ListProposals(pb.ListProposalsRequest())
            .proposals
            if p.parameters[0].value == "early"
        )
    # Alice's laptop now remembers a checkpoint of 5 entries (with her share).
    assert proc.stop() == 0
    restore(snapshot, data)
    proc = start_daemon_process(data, pki)  # starts: its own file was rolled back too
    conn = ["--server", proc.target, "--ca", str(pki.ca_cert)]
    try:
        for command in (
            ["custodian", "unseal", *conn, *alice.cli_args()],
            ["custodian", "approve", early, *conn, *alice.cli_args()],
        ):
            code, output = cli(*command)
            assert code != 0
            assert "rolled back" in output, output
            assert "You are about to sign" not in output
        # Nothing reached the daemon.
        with proc.channel() as channel:
            status = pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest())
            assert (status.log_size, status.unseal_progress) == (2, 0)
        # Bob's machine never saw the later log: first use, accepted and remembered.
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "bob-laptop"))
        code, output = cli("custodian", "approve", early, *conn, *bob.cli_args())
        assert code == 0, output
        assert list((tmp_path / "bob-laptop" / "keyquorum" / "checkpoints").iterdir())
    finally:
        proc.stop()


def test_the_custodian_cli_refuses_another_history_through_its_consistency_proof(
    history: tuple[Path, Path, DaemonProcess],
    pki: DevPki,
    custodians: list[Custodian],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "laptop"))
    data, snapshot, proc = history
    alice = custodians[0]
    with proc.channel() as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        assert seen_checkpoints.require_extension(stub) is not None  # remembers size 4
    assert proc.stop() == 0
    restore(snapshot, data)
    proc = start_daemon_process(data, pki)
    try:
        for n in range(4):
            propose(proc, f"forked-{n}")  # 6 entries now, another history after entry 1
        code, output = cli(
            "custodian", "unseal", "--server", proc.target, "--ca", str(pki.ca_cert),
            *alice.cli_args(),
        )  # fmt: skip
        assert code != 0
        assert "another history" in output, output
    finally:
        proc.stop()
