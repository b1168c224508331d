"""Conformance suite of the `Store` contract, run on real databases.

Every test takes `store_factory`, parametrised by backend: SQLite (real
files in tmp_path) and PostgreSQL (a fresh database per test on the
throw-away cluster of tests/pg.py, or on `KEYQUORUM_TEST_PG_DSN`).
Backend-specific checks (SQLite pragmas and raw files; PostgreSQL
triggers, durability settings, outages, notifications) sit at the end,
named as such.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyquorum.hsm.stores import postgres as postgres_store
from keyquorum.hsm.stores import sqlite as sqlite_store
from keyquorum.hsm.stores.base import LogRecord, ShredSalt, Store, leaf_hash
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import (
    AppendConflictError,
    InvalidInputError,
    LimitExceededError,
    StateError,
    StorageError,
    UnsupportedVersionError,
)
from keyquorum.quorum.log import GENESIS_PREV
from keyquorum.quorum.merkle import EMPTY_ROOT
from keyquorum.quorum.note import NoteSigner
from tests.pg import PgServer, Restartable


@dataclass
class StoreFactory:
    """Opens the one store of a test, as many times as the test likes."""

    kind: str
    open: Callable[[], Store]
    files: Callable[[], list[Path]]
    """Every file holding the store's bytes, for searching them."""
    set_schema_version: Callable[[int], None]
    """Write a schema_version behind the store's back (simulates a newer build)."""
    expected_durability: dict[str, str]
    schema_version: int
    opened: list[Store] = field(default_factory=list)


def _sqlite_factory(directory: Path) -> StoreFactory:
    path = directory / sqlite_store.FILE_NAME

    def files() -> list[Path]:
        return [p for p in (path, Path(f"{path}-wal")) if p.exists()]

    def set_schema_version(version: int) -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        conn.close()

    return StoreFactory(
        kind="sqlite",
        open=lambda: SqliteStore.in_directory(directory),
        files=files,
        set_schema_version=set_schema_version,
        expected_durability={"journal_mode": "wal", "synchronous": "FULL", "secure_delete": "ON"},
        schema_version=sqlite_store.SCHEMA_VERSION,
    )


def _postgres_factory(dsn: str) -> StoreFactory:
    def set_schema_version(version: int) -> None:
        with psycopg.connect(dsn) as conn:
            conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(version),))

    return StoreFactory(
        kind="postgres",
        open=lambda: PostgresStore.open(dsn, timeout=2.0),
        files=list,  # the bytes live in the server's data directory; see the PG tests
        set_schema_version=set_schema_version,
        expected_durability={
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
        },
        schema_version=postgres_store.SCHEMA_VERSION,
    )


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    if request.param == "sqlite":
        factory = _sqlite_factory(tmp_path)
    else:
        factory = _postgres_factory(request.getfixturevalue("pg_dsn"))
    opened: list[Store] = []

    def tracked_open(inner: Callable[[], Store] = factory.open) -> Store:
        s = inner()
        opened.append(s)
        return s

    factory.open = tracked_open
    yield factory
    for s in opened:
        s.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> Store:
    return store_factory.open()


def rec(seq: int, body: bytes | None = None) -> LogRecord:
    entry = body if body is not None else b'{"seq":%d}' % seq
    return (seq, leaf_hash(entry), entry)


_NOTE_KEY = NoteSigner.generate("keyquorum/store-tests")


def note(size: int) -> str:
    """A signed checkpoint note claiming `size` (the store reads only its size)."""
    root = hashlib.sha256(b"%d" % size).digest() if size else EMPTY_ROOT
    return _NOTE_KEY.sign_checkpoint(size, root)


def note_for(expected_size: int, entries: Sequence[LogRecord]) -> str:
    """The note an append of `entries` at `expected_size` writes with them."""
    return note(expected_size + len(entries))


def salt(n: int) -> bytes:
    # Distinctive 32-byte pattern that appears nowhere else in the file.
    return bytes([0xA5, n]) * 16


def fill(s: Store, n: int) -> None:
    s.append(
        [rec(i) for i in range(n)],
        expected_size=0,
        checkpoint=note_for(0, [rec(i) for i in range(n)]),
    )


# -- log -----------------------------------------------------------------


def test_empty_store(store: Store) -> None:
    assert store.size() == 0
    assert store.read(0, 0) == []
    assert list(store.read_all()) == []
    assert store.leaf_hashes() == []
    assert store.latest_checkpoint() is None
    assert store.checkpoints() == []


def test_append_read_round_trip(store: Store) -> None:
    store.append([rec(0)], expected_size=0, checkpoint=note_for(0, [rec(0)]))
    store.append(
        [rec(1), rec(2), rec(3)], expected_size=1, checkpoint=note_for(1, [rec(1), rec(2), rec(3)])
    )
    assert store.size() == 4
    assert store.read(0, 4) == [rec(i)[2] for i in range(4)]
    assert store.read(1, 3) == [rec(1)[2], rec(2)[2]]
    assert store.read(4, 4) == []
    assert list(store.read_all()) == [rec(i)[2] for i in range(4)]
    assert store.leaf_hashes() == [rec(i)[1] for i in range(4)]


def test_read_all_crosses_batches(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyquorum.hsm.stores.base.READ_BATCH", 3)
    fill(store, 10)
    assert list(store.read_all()) == [rec(i)[2] for i in range(10)]


def test_entry_bytes_are_kept_exactly(store: Store) -> None:
    odd = bytes(range(256)) + b"\x00\xff" * 100  # NULs, high bytes: not text
    store.append([rec(0, odd)], expected_size=0, checkpoint=note_for(0, [rec(0, odd)]))
    assert store.read(0, 1) == [odd]


def test_multi_entry_append_is_one_transaction(store: Store) -> None:
    store.append(
        [rec(0)], expected_size=0, checkpoint=note_for(0, [rec(0)]), shred_salts=[("t", 1, salt(1))]
    )
    # The second salt collides with a stored one, so the whole call fails:
    # neither its entries nor its other salt may appear.
    with pytest.raises(StateError, match="exists"):
        store.append(
            [rec(1), rec(2), rec(3)],
            expected_size=1,
            checkpoint=note_for(1, [rec(1), rec(2), rec(3)]),
            shred_salts=[("u", 1, salt(2)), ("t", 1, salt(3))],
        )
    assert store.size() == 1
    assert store.get_shred_salt("u", 1) is None
    assert store.get_shred_salt("t", 1) == salt(1)
    store.append(
        [rec(1), rec(2), rec(3)], expected_size=1, checkpoint=note_for(1, [rec(1), rec(2), rec(3)])
    )
    assert store.size() == 4


@pytest.mark.parametrize(
    "expected", [0, 1, 3, 9], ids=["behind-by-two", "behind-by-one", "ahead-by-one", "far-ahead"]
)
def test_conflict_on_wrong_expected_size_writes_nothing(store: Store, expected: int) -> None:
    store.append(
        [rec(0)],
        expected_size=0,
        checkpoint=note_for(0, [rec(0)]),
        shred_salts=[("gone", 1, salt(9))],
    )
    store.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
    with pytest.raises(AppendConflictError, match="log size is 2") as info:
        store.append(
            [rec(expected, b"loser"), rec(expected + 1, b"loser2")],
            expected_size=expected,
            checkpoint=note_for(expected, [rec(expected, b"loser"), rec(expected + 1, b"loser2")]),
            shred_salts=[("new", 1, salt(1))],
            erase_tenants=["gone"],
        )
    assert (info.value.expected_size, info.value.actual_size) == (expected, 2)
    assert store.size() == 2
    assert store.read(0, 2) == [rec(0)[2], rec(1)[2]]
    assert store.get_shred_salt("new", 1) is None
    assert store.get_shred_salt("gone", 1) == salt(9)


_GOOD_HASH = leaf_hash(b"x")
BAD_APPENDS: list[tuple[str, list[LogRecord], int, list[ShredSalt], list[str], str]] = [
    ("no-entries", [], 0, [], [], "at least one entry"),
    ("negative-size", [rec(0)], -1, [], [], "non-negative"),
    ("first-seq-not-expected", [rec(1)], 0, [], [], "entry 0 has seq 1, expected 0"),
    ("gap-inside-batch", [rec(0), rec(2)], 0, [], [], "entry 1 has seq 2, expected 1"),
    ("duplicate-inside-batch", [rec(0), rec(0)], 0, [], [], "entry 1 has seq 0"),
    ("bool-seq", [(False, _GOOD_HASH, b"x")], 0, [], [], "has seq False"),
    ("empty-entry", [(0, leaf_hash(b""), b"")], 0, [], [], "non-empty"),
    ("short-leaf-hash", [(0, bytes(31), b"x")], 0, [], [], "32 bytes"),
    ("wrong-leaf-hash", [(0, leaf_hash(b"y"), b"x")], 0, [], [], "SHA-256"),
    ("node-hash-as-leaf", [(0, bytes(32), b"x")], 0, [], [], "SHA-256"),
    ("short-salt", [rec(0)], 0, [("t", 1, bytes(31))], [], "32 bytes, got 31"),
    ("version-zero", [rec(0)], 0, [("t", 0, salt(1))], [], "version must be an int >= 1"),
    ("empty-tenant", [rec(0)], 0, [("", 1, salt(1))], [], "non-empty"),
    ("nul-in-tenant", [rec(0)], 0, [("a\x00b", 1, salt(1))], [], "without NUL"),
    ("salt-twice", [rec(0)], 0, [("t", 1, salt(1)), ("t", 1, salt(2))], [], "given twice"),
    ("store-and-erase", [rec(0)], 0, [("t", 1, salt(1))], ["t"], "both stores and erases"),
    ("erase-empty-tenant", [rec(0)], 0, [], [""], "non-empty"),
]


@pytest.mark.parametrize(
    ("entries", "expected", "salts", "erase", "message"),
    [case[1:] for case in BAD_APPENDS],
    ids=[case[0] for case in BAD_APPENDS],
)
def test_malformed_append_is_refused_before_writing(
    store: Store,
    entries: list[LogRecord],
    expected: int,
    salts: list[ShredSalt],
    erase: list[str],
    message: str,
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        store.append(
            entries,
            expected_size=expected,
            checkpoint=note_for(expected, entries),
            shred_salts=salts,
            erase_tenants=erase,
        )
    assert store.size() == 0
    assert store.get_shred_salt("t", 1) is None


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (-1, 2, "start must be a non-negative"),
        (0, -1, "end must be a non-negative"),
        (3, 2, "start is after end: 3 > 2"),
        (0, 6, "end is beyond the log size: 6 > 5"),
        (5, 6, "end is beyond the log size: 6 > 5"),
    ],
    ids=["negative-start", "negative-end", "reversed", "past-end", "empty-past-end"],
)
def test_read_preconditions(store: Store, start: int, end: int, message: str) -> None:
    fill(store, 5)
    with pytest.raises(InvalidInputError, match=message):
        store.read(start, end)


def test_reopen_keeps_everything(store_factory: StoreFactory) -> None:
    a = store_factory.open()
    fill(a, 3)
    a.append(
        [rec(3)],
        expected_size=3,
        checkpoint=note_for(3, [rec(3)]),
        shred_salts=[("t", 1, salt(1)), ("t", 2, salt(2))],
    )
    cosigned = note(4) + "— witness AAAAAAAA\n"
    a.put_checkpoint(4, cosigned)
    a.set_meta("deployment", "clinic-eu")
    a.close()
    b = store_factory.open()
    assert b.size() == 4
    assert list(b.read_all()) == [rec(i)[2] for i in range(4)]
    assert b.leaf_hashes() == [rec(i)[1] for i in range(4)]
    assert b.get_shred_salt("t", 2) == salt(2)
    assert b.latest_checkpoint() == (4, cosigned)
    assert b.head() == (4, (4, cosigned))
    assert b.get_meta("deployment") == "clinic-eu"
    with pytest.raises(AppendConflictError):
        b.append([rec(3)], expected_size=3, checkpoint=note_for(3, [rec(3)]))
    b.append([rec(4)], expected_size=4, checkpoint=note_for(4, [rec(4)]))


@pytest.mark.parametrize("backend", BACKENDS)
@given(batches=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=8))
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_any_batching_reads_back_as_one_log(
    backend: str, request: pytest.FixtureRequest, batches: list[int]
) -> None:
    # A fresh store per example: tmp_path and pg_dsn are per test, not per example.
    with tempfile.TemporaryDirectory() as d:
        database = None
        if backend == "sqlite":
            factory = _sqlite_factory(Path(d))
        else:
            server: PgServer = request.getfixturevalue("pg_server")
            database, dsn = server.create_schema()
            factory = _postgres_factory(dsn)
        s = factory.open()
        try:
            size = 0
            for n in batches:
                s.append(
                    [rec(size + i) for i in range(n)],
                    expected_size=size,
                    checkpoint=note_for(size, [rec(size + i) for i in range(n)]),
                )
                size += n
            assert s.size() == size
            assert s.read(0, size) == [rec(i)[2] for i in range(size)]
            assert s.leaf_hashes() == [rec(i)[1] for i in range(size)]
            mid = size // 2
            assert s.read(0, mid) + s.read(mid, size) == s.read(0, size)
        finally:
            s.close()
            if database is not None:
                server.drop_schema(database)


# -- concurrency ---------------------------------------------------------


def test_racing_appends_have_exactly_one_winner(store_factory: StoreFactory) -> None:
    """Eight writers (own connections, as replicas) race for position 1."""
    first = store_factory.open()
    fill(first, 1)
    writers = [store_factory.open() for _ in range(8)]
    barrier = threading.Barrier(len(writers))
    outcome: dict[int, str] = {}

    def race(i: int) -> None:
        barrier.wait()
        try:
            writers[i].append(
                [rec(1, b"writer %d" % i)],
                expected_size=1,
                checkpoint=note_for(1, [rec(1, b"writer %d" % i)]),
            )
            outcome[i] = "won"
        except AppendConflictError:
            outcome[i] = "conflict"

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(writers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcome.items() if o == "won"]
    assert len(outcome) == len(writers)
    assert len(winners) == 1
    assert first.read(1, 2) == [b"writer %d" % winners[0]]
    assert first.size() == 2


def test_thread_pool_appends_are_gap_free(store: Store) -> None:
    """Threads sharing one store (a gRPC pool) retry on conflict; every
    position ends up with exactly the entry of the thread that won it."""
    threads_n, per_thread = 6, 15
    won: list[tuple[int, bytes]] = []
    won_lock = threading.Lock()
    conflicts = [0]

    def worker(t: int) -> None:
        for k in range(per_thread):
            body = b"thread %d item %d" % (t, k)
            while True:
                size = store.size()
                try:
                    store.append(
                        [rec(size, body)],
                        expected_size=size,
                        checkpoint=note_for(size, [rec(size, body)]),
                    )
                except AppendConflictError:
                    with won_lock:
                        conflicts[0] += 1
                    continue
                with won_lock:
                    won.append((size, body))
                break

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads_n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    total = threads_n * per_thread
    assert store.size() == total
    assert sorted(seq for seq, _ in won) == list(range(total))  # one winner per position
    stored = store.read(0, total)
    for seq, body in won:
        assert stored[seq] == body
    assert len(set(stored)) == total  # no entry written twice


# -- checkpoints ---------------------------------------------------------


def test_checkpoints_are_written_with_their_entries(store: Store) -> None:
    """Every append stores the note of its new size in its own transaction; a note
    is later replaced only by one of the same size (cosignatures added)."""
    assert store.head() == (0, None)
    store.append([rec(0)], expected_size=0, checkpoint=note(1))
    store.append([rec(1), rec(2)], expected_size=1, checkpoint=note(3))
    assert store.checkpoints() == [(1, note(1)), (3, note(3))]
    assert store.head() == (3, (3, note(3)))
    assert store.checkpoint_at(3) == note(3)
    assert store.checkpoint_at(2) is None
    cosigned = note(1) + "— witness AAAAAAAA\n"
    store.put_checkpoint(1, cosigned)  # same size: replaced
    assert store.checkpoints() == [(1, cosigned), (3, note(3))]
    assert store.latest_checkpoint() == (3, note(3))
    with pytest.raises(StateError, match="written with the entries"):
        store.put_checkpoint(2, note(2))  # never added apart from its entries
    # A size no store can hold (an RPC's uint64) is a clear refusal, not a driver error.
    for size in (2**63, 2**64 - 1, -1):
        with pytest.raises(
            InvalidInputError, match="checkpoint size must be a non-negative int below 2\\^63"
        ):
            store.checkpoint_at(size)
    with pytest.raises(InvalidInputError, match="beyond the log: 6 > 3"):
        store.put_checkpoint(6, note(6))
    with pytest.raises(InvalidInputError, match="of tree size 3, not 1"):
        store.put_checkpoint(1, note(3))  # a row and its note never disagree
    with pytest.raises(InvalidInputError, match="non-empty"):
        store.put_checkpoint(1, "")
    with pytest.raises(InvalidInputError, match="UTF-8"):
        store.put_checkpoint(1, "bad \udc80 surrogate")
    with pytest.raises(InvalidInputError, match="not a checkpoint"):
        store.put_checkpoint(1, "one\n")
    assert store.checkpoints() == [(1, cosigned), (3, note(3))]


@pytest.mark.parametrize(
    ("size", "text", "message"),
    [
        (2, lambda: note(3), "of tree size 3, not 2"),
        (2, lambda: note(1), "of tree size 1, not 2"),
        (2, lambda: "not a note", "not a checkpoint"),
    ],
    ids=["note-too-long", "note-too-short", "not-a-note"],
)
def test_an_append_whose_checkpoint_is_not_of_its_size_writes_nothing(
    store: Store, size: int, text: Callable[[], str], message: str
) -> None:
    fill(store, 1)
    with pytest.raises(InvalidInputError, match=message):
        store.append([rec(1)], expected_size=1, checkpoint=text())
    assert store.head() == (1, (1, note(1)))


# -- shred salts ---------------------------------------------------------


def test_salts_round_trip_and_are_write_once(store: Store) -> None:
    store.put_shred_salt("clinic", 1, salt(1))
    store.append(
        [rec(0)],
        expected_size=0,
        checkpoint=note_for(0, [rec(0)]),
        shred_salts=[("clinic", 2, salt(2))],
    )
    assert store.get_shred_salt("clinic", 1) == salt(1)
    assert store.get_shred_salt("clinic", 2) == salt(2)
    assert store.get_shred_salt("clinic", 3) is None
    assert store.get_shred_salt("other", 1) is None
    with pytest.raises(StateError, match="exists"):
        store.put_shred_salt("clinic", 1, salt(7))
    assert store.get_shred_salt("clinic", 1) == salt(1)


def test_erase_removes_every_version_of_one_tenant_only(store: Store) -> None:
    for v in (1, 2, 3):
        store.put_shred_salt("doomed", v, salt(v))
    store.put_shred_salt("kept", 1, salt(4))
    assert store.erase_shred_salts("doomed") == 3
    assert [store.get_shred_salt("doomed", v) for v in (1, 2, 3)] == [None, None, None]
    assert store.get_shred_salt("kept", 1) == salt(4)
    assert store.erase_shred_salts("doomed") == 0  # idempotent


def test_erase_in_the_same_transaction_as_the_shred_entry(store: Store) -> None:
    store.append(
        [rec(0)],
        expected_size=0,
        checkpoint=note_for(0, [rec(0)]),
        shred_salts=[("doomed", 1, salt(1))],
    )
    store.append(
        [rec(1, b"shred doomed")],
        expected_size=1,
        checkpoint=note_for(1, [rec(1, b"shred doomed")]),
        erase_tenants=["doomed"],
    )
    assert store.get_shred_salt("doomed", 1) is None
    assert store.read(1, 2) == [b"shred doomed"]


def test_replacing_salts_erases_the_old_ones_in_the_same_transaction(store: Store) -> None:
    """A roster change re-wraps every key under a fresh salt: the old salt is gone
    in the transaction that logs the new wrapping, and nothing else changes."""
    fill(store, 1)
    store.put_shred_salt("clinic", 1, salt(1))
    store.put_shred_salt("clinic", 2, salt(2))
    store.put_shred_salt("other", 1, salt(3))
    store.append(
        [rec(1, b"roster change")],
        expected_size=1,
        checkpoint=note(2),
        replace_salts=[("clinic", 1, salt(11)), ("clinic", 2, salt(12))],
    )
    assert store.get_shred_salt("clinic", 1) == salt(11)
    assert store.get_shred_salt("clinic", 2) == salt(12)
    assert store.get_shred_salt("other", 1) == salt(3)
    # Only a stored salt is replaced; a refused append changes nothing.
    with pytest.raises(StateError, match="replace"):
        store.append(
            [rec(2)],
            expected_size=2,
            checkpoint=note(3),
            replace_salts=[("clinic", 1, salt(21)), ("clinic", 9, salt(22))],
        )
    assert store.head() == (2, (2, note(2)))
    assert store.get_shred_salt("clinic", 1) == salt(11)
    with pytest.raises(InvalidInputError, match="given twice"):
        store.append(
            [rec(2)],
            expected_size=2,
            checkpoint=note(3),
            shred_salts=[("clinic", 1, salt(31))],
            replace_salts=[("clinic", 1, salt(32))],
        )


def test_sqlite_replaced_salt_bytes_are_gone_from_the_files(tmp_path: Path) -> None:
    store_factory = _sqlite_factory(tmp_path)
    s = store_factory.open()
    old_salt = bytes.fromhex("6b28" * 16)
    fill(s, 1)
    s.put_shred_salt("clinic", 1, old_salt)
    assert old_salt in _file_bytes(store_factory)
    s.append([rec(1)], expected_size=1, checkpoint=note(2), replace_salts=[("clinic", 1, salt(5))])
    assert old_salt not in _file_bytes(store_factory)
    assert s.get_shred_salt("clinic", 1) == salt(5)


def _file_bytes(factory: StoreFactory) -> bytes:
    return b"".join(p.read_bytes() for p in factory.files())


@pytest.mark.parametrize("via", ["erase_shred_salts", "append"], ids=["erase-call", "in-append"])
def test_sqlite_erased_salt_bytes_are_gone_from_the_files(tmp_path: Path, via: str) -> None:
    """SQLite only: PostgreSQL keeps dead tuples and WAL (docs/postgres.md);
    its erasure is checked at the SQL level in the PostgreSQL section."""
    store_factory = _sqlite_factory(tmp_path)
    s = store_factory.open()
    secret_salt = bytes.fromhex("5a17" * 16)
    s.append(
        [rec(0)],
        expected_size=0,
        checkpoint=note_for(0, [rec(0)]),
        shred_salts=[("doomed", 1, secret_salt)],
    )
    s.put_shred_salt("kept", 1, salt(3))
    fill_more = [rec(i, b"padding %d" % i + bytes(200)) for i in range(1, 40)]
    s.append(fill_more, expected_size=1, checkpoint=note_for(1, fill_more))
    assert secret_salt in _file_bytes(store_factory)  # the search can see it
    if via == "append":
        s.append(
            [rec(40, b"shred")],
            expected_size=40,
            checkpoint=note_for(40, [rec(40, b"shred")]),
            erase_tenants=["doomed"],
        )
    else:
        s.erase_shred_salts("doomed")
    # While still open (WAL file present or truncated) and after close.
    assert secret_salt not in _file_bytes(store_factory)
    assert salt(3) in _file_bytes(store_factory)
    s.close()
    assert secret_salt not in _file_bytes(store_factory)


def test_search_detects_a_salt_after_a_plain_delete(tmp_path: Path) -> None:
    """Control: without secure_delete and a WAL checkpoint, a DELETE leaves
    the bytes in the file, so the test above would catch a regression."""
    path = tmp_path / "plain.sqlite3"
    secret_salt = bytes.fromhex("5a17" * 16)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA secure_delete=OFF")
    conn.execute("CREATE TABLE s (k TEXT, v BLOB)")
    conn.execute("INSERT INTO s VALUES ('a', ?), ('b', ?)", (secret_salt, salt(3)))
    conn.execute("DELETE FROM s WHERE k = 'a'")
    conn.close()
    assert secret_salt in path.read_bytes()


# -- counters ------------------------------------------------------------


def test_reserve_block_hands_out_consecutive_blocks(store: Store) -> None:
    assert store.reserve_block("enc/acme/v1", 100, 2**32) == (0, 100)
    assert store.reserve_block("enc/acme/v1", 100, 2**32) == (100, 200)
    assert store.reserve_block("enc/acme/v1", 7, 2**32) == (200, 207)
    # Counters are independent of each other.
    assert store.reserve_block("enc/acme/v2", 100, 2**32) == (0, 100)


def test_reserve_block_stops_at_the_limit_and_writes_nothing(store: Store) -> None:
    assert store.reserve_block("c", 4, 10) == (0, 4)
    assert store.reserve_block("c", 4, 10) == (4, 8)
    assert store.reserve_block("c", 4, 10) == (8, 10)  # clamped to the limit
    for _ in range(2):
        with pytest.raises(LimitExceededError, match="counter c reached its limit of 10"):
            store.reserve_block("c", 4, 10)
    # A higher limit (e.g. for another key) continues where the counter stood.
    assert store.reserve_block("c", 4, 20) == (10, 14)


def test_reserved_blocks_survive_reopen(store_factory: StoreFactory) -> None:
    a = store_factory.open()
    assert a.reserve_block("enc/t/v1", 1000, 2**32) == (0, 1000)
    a.close()
    b = store_factory.open()
    assert b.reserve_block("enc/t/v1", 1000, 2**32) == (1000, 2000)


def test_concurrent_reservations_are_disjoint(store_factory: StoreFactory) -> None:
    stores = [store_factory.open(), store_factory.open()]
    got: list[tuple[int, int]] = []
    lock = threading.Lock()

    def reserve(s: Store) -> None:
        for _ in range(10):
            block = s.reserve_block("shared", 3, 2**32)
            with lock:
                got.append(block)

    threads = [threading.Thread(target=reserve, args=(s,)) for s in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [(i, i + 3) for i in range(0, 120, 3)]


@pytest.mark.parametrize(
    ("counter", "block", "limit", "message"),
    [
        ("", 1, 1, "counter name"),
        ("Upper", 1, 1, "counter name"),
        ("x" * 256, 1, 1, "counter name"),
        ("c", 0, 10, "block must be"),
        ("c", True, 10, "block must be"),
        ("c", 1, 0, "limit must be"),
        ("c", 1, 2**63, "limit must be"),
    ],
    ids=["empty", "uppercase", "too-long", "zero-block", "bool-block", "zero-limit", "huge-limit"],
)
def test_reserve_block_preconditions(
    store: Store, counter: str, block: int, limit: int, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        store.reserve_block(counter, block, limit)
    assert store.reserve_block("c", 1, 10) == (0, 1)


def test_sqlite_version_1_store_migrates_to_counters(tmp_path: Path) -> None:
    path = tmp_path / sqlite_store.FILE_NAME
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in sqlite_store.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    conn.close()
    s = SqliteStore.in_directory(tmp_path)
    try:
        assert s.schema_version() == sqlite_store.SCHEMA_VERSION
        assert s.reserve_block("c", 5, 10) == (0, 5)
    finally:
        s.close()


# -- meta and schema -----------------------------------------------------


def test_meta(store: Store) -> None:
    assert store.get_meta("deployment") is None
    store.set_meta("deployment", "clinic-eu")
    store.set_meta("deployment", "clinic-eu-2")
    assert store.get_meta("deployment") == "clinic-eu-2"
    with pytest.raises(InvalidInputError, match="migrations only"):
        store.set_meta("schema_version", "99")
    with pytest.raises(InvalidInputError, match="meta key"):
        store.set_meta("Bad Key", "x")


def test_schema_version_is_current(store_factory: StoreFactory) -> None:
    store = store_factory.open()
    assert store.schema_version() == store_factory.schema_version
    assert store.get_meta("schema_version") == str(store_factory.schema_version)


def test_newer_schema_is_refused(store_factory: StoreFactory) -> None:
    s = store_factory.open()
    fill(s, 2)
    s.close()
    newer = store_factory.schema_version + 1
    store_factory.set_schema_version(newer)
    with pytest.raises(UnsupportedVersionError, match=f"schema version {newer}, newer than"):
        store_factory.open()


def test_durability_settings_are_read_back(store_factory: StoreFactory) -> None:
    s = store_factory.open()
    assert s.durability_settings() == store_factory.expected_durability


# -- SQLite specifics ----------------------------------------------------


def test_sqlite_pragmas_on_the_file_and_permissions(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as s:
        fill(s, 1)
        raw = sqlite3.connect(s.path)
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
        raw.close()
        for p in (s.path, Path(f"{s.path}-wal")):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


class _NoWalConnection(sqlite3.Connection):
    """A connection on a file system without shared memory: WAL is refused
    and SQLite answers with the mode it kept, as it does on such a VFS."""

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        if sql.upper() == "PRAGMA JOURNAL_MODE=WAL":
            sql = "PRAGMA journal_mode"
        return super().execute(sql, *args)  # type: ignore[arg-type]


def test_sqlite_refuses_to_open_without_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        return real(*args, factory=_NoWalConnection, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(StorageError, match="refused journal_mode=WAL"):
        SqliteStore.in_directory(tmp_path)


def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / sqlite_store.FILE_NAME).write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError, match="cannot use"):
        SqliteStore.in_directory(tmp_path)


def test_sqlite_missing_data_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        SqliteStore.in_directory(tmp_path / "nowhere")


def test_sqlite_failed_write_rolls_back_and_stops_the_store(tmp_path: Path) -> None:
    s = SqliteStore.in_directory(tmp_path)
    fill(s, 1)
    # Make the third entry of a batch fail inside SQLite, after two inserts.
    s._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 1000)
    batch = [rec(1), rec(2, b"x" * 5000), rec(3)]
    with pytest.raises(StorageError, match="nothing was committed"):
        s.append(batch, expected_size=1, checkpoint=note_for(1, batch))
    with pytest.raises(StorageError, match="stopped after a failed write"):
        s.size()
    with pytest.raises(StorageError, match="stopped after a failed write"):
        s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
    s.close()
    with SqliteStore.in_directory(tmp_path) as again:
        assert again.size() == 1
        again.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE log_entries SET entry = x'00' WHERE seq = 1",
        "DELETE FROM log_entries WHERE seq = 2",
        "INSERT INTO log_entries VALUES (5, zeroblob(32), x'01')",
        "INSERT INTO log_entries VALUES (2, zeroblob(32), x'01')",
        "UPDATE shred_salts SET salt = zeroblob(32)",
        "UPDATE counters SET next = 0",
        "DELETE FROM counters",
    ],
    ids=[
        "update-entry", "delete-entry", "insert-gap", "insert-duplicate", "replace-salt",
        "counter-back", "delete-counter",
    ],
)  # fmt: skip
def test_sqlite_schema_refuses_writes_that_bypass_the_class(tmp_path: Path, sql: str) -> None:
    with SqliteStore.in_directory(tmp_path) as s:
        fill(s, 3)
        s.put_shred_salt("t", 1, salt(1))
        s.reserve_block("c", 5, 100)
        raw = sqlite3.connect(s.path)
        with pytest.raises(sqlite3.IntegrityError):
            raw.execute(sql)
        raw.rollback()
        raw.close()
        assert s.read(0, 3) == [rec(i)[2] for i in range(3)]
        assert s.get_shred_salt("t", 1) == salt(1)
        assert s.reserve_block("c", 5, 100) == (5, 10)


def test_sqlite_gap_made_by_hand_is_reported_not_skipped(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as s:
        fill(s, 4)
        raw = sqlite3.connect(s.path)
        raw.execute("DROP TRIGGER log_entries_no_delete")
        raw.execute("DELETE FROM log_entries WHERE seq = 1")
        raw.commit()
        raw.close()
        with pytest.raises(StorageError, match="gap: seq 1 missing"):
            s.read(0, 4)
        with pytest.raises(StorageError, match="gap"):
            list(s.read_all())
        with pytest.raises(StorageError, match="gap"):
            s.leaf_hashes()


def test_sqlite_closed_store_refuses_calls(tmp_path: Path) -> None:
    s = SqliteStore.open(tmp_path / "any-name.sqlite3")
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.size()


# -- PostgreSQL specifics --------------------------------------------------

pg = pytest.mark.postgres


def _raw(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    """A plain connection outside the store, as psql or another program."""
    return psycopg.connect(dsn, autocommit=True)


def _raw_insert(conn: psycopg.Connection[tuple[object, ...]], seq: int, prev: bytes) -> None:
    """Another writer's append, done by hand: the entry and the checkpoint covering it."""
    body = b"raw %d" % seq
    with conn.transaction():
        conn.execute(
            "INSERT INTO log_entries (seq, leaf_hash, prev_leaf_hash, entry) "
            "VALUES (%s, %s, %s, %s)",
            (seq, leaf_hash(body), prev, body),
        )
        conn.execute(
            "INSERT INTO checkpoints (size, note) VALUES (%s, %s)", (seq + 1, note(seq + 1))
        )


_H2 = rec(2)[1]
_BYPASS: list[tuple[str, str, tuple[object, ...], str]] = [
    ("update-entry", "UPDATE log_entries SET entry = '\\x00' WHERE seq = 1", (), "append-only"),
    ("delete-entry", "DELETE FROM log_entries WHERE seq = 2", (), "append-only"),
    ("truncate-log", "TRUNCATE log_entries", (), "append-only"),
    (
        "insert-gap",
        "INSERT INTO log_entries VALUES (5, %s, %s, 'x')",
        (leaf_hash(b"x"), _H2),
        "log seq 5 is not the log size 3",
    ),
    (
        "insert-duplicate",
        "INSERT INTO log_entries VALUES (2, %s, %s, 'x')",
        (leaf_hash(b"x"), rec(1)[1]),
        "log seq 2 is not the log size 3",
    ),
    (
        "insert-broken-chain",
        "INSERT INTO log_entries VALUES (3, %s, %s, 'x')",
        (leaf_hash(b"x"), bytes(32)),
        "entry 3 does not chain to the leaf hash of entry 2",
    ),
    (
        "insert-wrong-leaf-hash",
        "INSERT INTO log_entries VALUES (3, %s, %s, 'x')",
        (leaf_hash(b"y"), _H2),
        "leaf_hash_is_rfc9162",
    ),
    ("move-head", "UPDATE log_head SET size = 0", (), "moves only by appending"),
    (
        "entry-without-its-checkpoint",
        "INSERT INTO log_entries VALUES (3, %s, %s, 'x')",
        (leaf_hash(b"x"), _H2),
        "committed without the checkpoint that covers them",
    ),
    ("delete-checkpoint", "DELETE FROM checkpoints", (), "never deleted"),
    ("truncate-checkpoints", "TRUNCATE checkpoints", (), "never deleted"),
    ("delete-head", "DELETE FROM log_head", (), "one fixed row"),
    ("replace-salt", "UPDATE shred_salts SET salt = %s", (bytes(32),), "never replaced"),
    ("counter-back", "UPDATE counters SET next = 0", (), "never goes back"),
    ("delete-counter", "DELETE FROM counters", (), "never deleted"),
    ("truncate-counters", "TRUNCATE counters", (), "never deleted"),
]


@pg
@pytest.mark.parametrize(
    ("sql", "params", "message"), [c[1:] for c in _BYPASS], ids=[c[0] for c in _BYPASS]
)
def test_postgres_schema_refuses_writes_that_bypass_the_class(
    pg_dsn: str, sql: str, params: tuple[object, ...], message: str
) -> None:
    with PostgresStore.open(pg_dsn) as s:
        fill(s, 3)
        s.put_shred_salt("t", 1, salt(1))
        s.reserve_block("c", 5, 100)
        with _raw(pg_dsn) as raw, pytest.raises(psycopg.errors.CheckViolation, match=message):
            raw.execute(sql, params)
        assert s.reserve_block("c", 5, 100) == (5, 10)
        assert s.size() == 3
        assert s.read(0, 3) == [rec(i)[2] for i in range(3)]
        assert s.leaf_hashes() == [rec(i)[1] for i in range(3)]
        assert s.get_shred_salt("t", 1) == salt(1)
        s.append(
            [rec(3)], expected_size=3, checkpoint=note_for(3, [rec(3)])
        )  # the head still agrees with the rows


@pg
def test_postgres_rows_carry_the_chain_of_leaf_hashes(pg_dsn: str) -> None:
    with PostgresStore.open(pg_dsn) as s:
        fill(s, 2)
        s.append([rec(2), rec(3)], expected_size=2, checkpoint=note_for(2, [rec(2), rec(3)]))
        with _raw(pg_dsn) as raw:
            rows = raw.execute(
                "SELECT seq, prev_leaf_hash, leaf_hash FROM log_entries ORDER BY seq"
            ).fetchall()
            head = raw.execute("SELECT size, leaf_hash FROM log_head").fetchone()
    assert [r[1] for r in rows] == [GENESIS_PREV] + [rec(i)[1] for i in range(3)]
    assert head == (4, rec(3)[1])


@pg
def test_postgres_loser_waits_for_the_head_lock_then_conflicts(pg_dsn: str) -> None:
    """A writer holding the head (another replica mid-append) makes ours wait;
    when it commits, ours reads the new head, raises and writes nothing."""
    with PostgresStore.open(pg_dsn) as s, _raw(pg_dsn) as other:
        fill(s, 1)
        outcome: list[BaseException | None] = []
        with other.transaction():
            other.execute("SELECT size FROM log_head FOR UPDATE")
            thread = threading.Thread(target=_append_into, args=(s, rec(1, b"ours"), outcome))
            thread.start()
            thread.join(0.5)
            assert thread.is_alive()  # queued behind the lock, not failed, not written
            _raw_insert(other, 1, rec(0)[1])
        thread.join(10)
        assert len(outcome) == 1
        assert isinstance(outcome[0], AppendConflictError)
        assert (outcome[0].expected_size, outcome[0].actual_size) == (1, 2)
        assert s.read(1, 2) == [b"raw 1"]


def _append_into(s: Store, record: LogRecord, outcome: list[BaseException | None]) -> None:
    try:
        s.append([record], expected_size=record[0], checkpoint=note_for(record[0], [record]))
        outcome.append(None)
    except BaseException as e:
        outcome.append(e)


@pg
@pytest.mark.parametrize(
    ("setting", "refused"),
    [("off", True), ("local", True), ("remote_write", False), ("remote_apply", False)],
    ids=["off", "local", "remote_write", "remote_apply"],
)
def test_postgres_synchronous_commit_in_the_dsn(pg_dsn: str, setting: str, refused: bool) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    params["options"] = f"{params['options']} -c synchronous_commit={setting}"
    dsn = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    if refused:
        with pytest.raises(StorageError, match=f"synchronous_commit is {setting}: a crash"):
            PostgresStore.open(dsn)
    else:
        with PostgresStore.open(dsn) as s:
            fill(s, 1)
            assert s.durability_settings()["synchronous_commit"] == setting


@pg
def test_postgres_synchronous_commit_set_for_the_database_is_refused(pg_server: PgServer) -> None:
    """`ALTER DATABASE ... SET` reaches every new session of the store;
    another session's own `SET` does not, and is no reason to refuse."""
    name, dsn = pg_server.create_database()
    try:
        with _raw(dsn) as raw:
            raw.execute("SET synchronous_commit = off")  # this session only
            with PostgresStore.open(dsn) as s:
                fill(s, 1)
            raw.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        with pytest.raises(StorageError, match="synchronous_commit is off"):
            PostgresStore.open(dsn)
    finally:
        pg_server.drop_database(name)


@pg
def test_postgres_fsync_turned_off_by_reload_stops_appends(pg_restartable: Restartable) -> None:
    """fsync can change under open connections (SIGHUP): each append checks it
    in its first statement, so nothing is written on an unsafe server."""
    dsn = pg_restartable.dsn
    with PostgresStore.open(dsn) as s, _raw(dsn) as admin:
        fill(s, 1)
        admin.execute("ALTER SYSTEM SET fsync = off")
        try:
            admin.execute("SELECT pg_reload_conf()")
            _until(lambda: s.durability_settings()["fsync"] == "off")
            with pytest.raises(StorageError, match="fsync is off"):
                s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
            with pytest.raises(StorageError, match="fsync is off"):
                PostgresStore.open(dsn)
            assert s.size() == 1
        finally:
            admin.execute("ALTER SYSTEM RESET fsync")
            admin.execute("SELECT pg_reload_conf()")
        _until(lambda: s.durability_settings()["fsync"] == "on")
        s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))


@pg
def test_postgres_server_started_with_fsync_off_is_refused(pg_restartable: Restartable) -> None:
    cluster, dsn = pg_restartable.cluster, pg_restartable.dsn
    with PostgresStore.open(dsn, timeout=1.0) as s:
        fill(s, 1)
        cluster.restart(["fsync=off"])
        with pytest.raises(StorageError, match="fsync is off"):
            PostgresStore.open(dsn)
        with pytest.raises(StorageError, match="fsync is off"):  # the pool refuses too
            s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
        cluster.restart()
        _until(lambda: _succeeds(s.size))
        assert s.size() == 1
        s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))


@pg
def test_postgres_stopped_under_the_store_fails_clearly_and_recovers(
    pg_restartable: Restartable, caplog: pytest.LogCaptureFixture
) -> None:
    cluster, dsn = pg_restartable.cluster, pg_restartable.dsn
    caplog.set_level(logging.WARNING, logger="keyquorum.hsm.stores.postgres")
    with PostgresStore.open(dsn, timeout=1.0, min_connections=2) as s:
        fill(s, 2)
        s.put_shred_salt("t", 1, salt(1))
        cluster.stop()
        for call in (
            s.size,
            lambda: s.append([rec(2)], expected_size=2, checkpoint=note_for(2, [rec(2)])),
            lambda: s.read(0, 2),
            lambda: s.get_shred_salt("t", 1),
        ):
            started = time.monotonic()
            with pytest.raises(StorageError, match="is unavailable"):
                call()
            assert time.monotonic() - started < 5  # the pool timeout, not a hang
        warnings = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
        assert len(warnings) == 1  # logged once per outage, not once per call
        cluster.start()
        started = time.monotonic()
        _until(lambda: _succeeds(s.size))
        assert time.monotonic() - started < 10
        assert s.read(0, 2) == [rec(0)[2], rec(1)[2]]
        assert s.get_shred_salt("t", 1) == salt(1)
        s.append([rec(2)], expected_size=2, checkpoint=note_for(2, [rec(2)]))
        assert any("available again" in r.getMessage() for r in caplog.records)


def _succeeds(call: Callable[[], object]) -> bool:
    try:
        call()
    except StorageError:
        return False
    return True


def _until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pg
def test_postgres_follower_is_woken_by_notify(pg_dsn: str) -> None:
    """Two stores on two connections; the poll interval is far beyond the
    test, so only the notification can wake the follower this fast."""
    with (
        PostgresStore.open(pg_dsn, poll_interval=60) as follower,
        PostgresStore.open(pg_dsn) as leader,
    ):
        fill(leader, 1)
        timer = threading.Timer(
            0.3, lambda: leader.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
        )
        started = time.monotonic()
        timer.start()
        assert follower.wait_for_append(1, timeout=20) == 2
        assert time.monotonic() - started < 3
        timer.join()


@pg
def test_postgres_follower_polls_when_no_notification_comes(pg_dsn: str) -> None:
    """A writer that does not NOTIFY (raw SQL) still reaches the follower
    within the poll interval."""
    with PostgresStore.open(pg_dsn, poll_interval=0.2) as follower, _raw(pg_dsn) as writer:
        fill(follower, 1)
        timer = threading.Timer(0.3, lambda: _raw_insert(writer, 1, rec(0)[1]))
        started = time.monotonic()
        timer.start()
        assert follower.wait_for_append(1, timeout=20) == 2
        assert time.monotonic() - started < 2
        timer.join()


@pg
def test_postgres_follower_survives_losing_its_listen_connection(pg_dsn: str) -> None:
    with (
        PostgresStore.open(pg_dsn, poll_interval=0.2) as follower,
        PostgresStore.open(pg_dsn) as leader,
        _raw(pg_dsn) as admin,
    ):
        fill(leader, 1)
        assert follower.wait_for_append(0, timeout=1) == 1  # listening now
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN keyquorum_log%%' AND pid <> pg_backend_pid()"
        ).fetchone()
        assert killed == (1,)
        timer = threading.Timer(
            0.3, lambda: leader.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
        )
        timer.start()
        assert follower.wait_for_append(1, timeout=20) == 2
        timer.join()
        leader.append([rec(2)], expected_size=2, checkpoint=note_for(2, [rec(2)]))
        assert follower.wait_for_append(2, timeout=20) == 3  # listening again


@pg
def test_postgres_wait_for_append_times_out_with_the_size(pg_dsn: str) -> None:
    with PostgresStore.open(pg_dsn) as s:
        fill(s, 2)
        assert s.wait_for_append(1, timeout=0) == 2  # already longer: no wait
        started = time.monotonic()
        assert s.wait_for_append(2, timeout=0.3) == 2
        assert 0.25 < time.monotonic() - started < 2
        with pytest.raises(InvalidInputError, match="after_size must be a non-negative"):
            s.wait_for_append(-1, timeout=1)
        with pytest.raises(InvalidInputError, match="timeout must be non-negative"):
            s.wait_for_append(0, timeout=-1)


@pg
def test_postgres_replicas_starting_together_migrate_once(pg_dsn: str) -> None:
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore.open(pg_dsn))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert [s.schema_version() for s in stores] == [postgres_store.SCHEMA_VERSION] * 4
        stores[0].append([rec(0)], expected_size=0, checkpoint=note_for(0, [rec(0)]))
        assert [s.size() for s in stores] == [1] * 4
    finally:
        for s in stores:
            s.close()


@pg
def test_postgres_erased_salt_is_gone_for_every_session(pg_dsn: str) -> None:
    """What PostgreSQL can promise: after the commit no session sees the salt.
    (Dead tuples and WAL keep the bytes for a while: docs/postgres.md.)"""
    with PostgresStore.open(pg_dsn) as s, _raw(pg_dsn) as raw:
        secret_salt = bytes.fromhex("5a17" * 16)
        s.append(
            [rec(0)],
            expected_size=0,
            checkpoint=note_for(0, [rec(0)]),
            shred_salts=[("doomed", 1, secret_salt)],
        )
        s.append(
            [rec(1, b"shred")],
            expected_size=1,
            checkpoint=note_for(1, [rec(1, b"shred")]),
            erase_tenants=["doomed"],
        )
        found = raw.execute("SELECT count(*) FROM shred_salts WHERE salt = %s", (secret_salt,))
        assert found.fetchone() == (0,)
        assert s.get_shred_salt("doomed", 1) is None


@pg
def test_postgres_text_with_nul_is_refused_as_input(pg_dsn: str) -> None:
    with PostgresStore.open(pg_dsn) as s:
        fill(s, 1)
        with pytest.raises(InvalidInputError, match="must not contain NUL"):
            s.put_checkpoint(1, note(1) + "\x00")
        with pytest.raises(InvalidInputError, match="must not contain NUL"):
            s.set_meta("deployment", "a\x00b")
        with pytest.raises(InvalidInputError, match="PostgreSQL refused a value"):
            s.put_shred_salt("t", 2**31, salt(1))
        assert s.latest_checkpoint() == (1, note(1))


@pg
def test_postgres_dsn_secrets_stay_out_of_repr_and_errors(pg_dsn: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    params["password"] = "hunter2-not-shown"  # trust auth ignores it
    dsn = psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    with PostgresStore.open(dsn) as s:
        assert "hunter2" not in repr(s)
        assert repr(s).startswith("<PostgresStore 127.0.0.1:")
    params["port"] = "1"  # nothing listens there
    with pytest.raises(StorageError, match="cannot open the store") as info:
        PostgresStore.open(psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()}))
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dsn": ""}, "non-empty string"),
        ({"dsn": "host='unterminated"}, "does not parse"),
        ({"dsn": "host=x", "min_connections": 0}, "min_connections"),
        ({"dsn": "host=x", "min_connections": 3, "max_connections": 2}, "min_connections"),
        ({"dsn": "host=x", "timeout": 0}, "positive"),
    ],
    ids=["empty", "unparsable", "no-connections", "min-above-max", "zero-timeout"],
)
def test_postgres_bad_arguments_are_refused_before_connecting(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        PostgresStore.open(**kwargs)  # type: ignore[arg-type]


@pg
def test_postgres_closed_store_refuses_calls(pg_dsn: str) -> None:
    s = PostgresStore.open(pg_dsn)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError, match="closed"):
        s.size()


@pg
def test_postgres_connection_lost_during_commit_says_the_outcome_is_unknown(pg_dsn: str) -> None:
    """A deferred trigger kills the session inside COMMIT (before the commit
    record), as a crash or a network cut there would: the caller is told to
    re-read, and the store goes on working once the cause is gone."""
    with PostgresStore.open(pg_dsn) as s, _raw(pg_dsn) as admin:
        fill(s, 1)
        admin.execute(
            "CREATE FUNCTION die_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$"
        )
        admin.execute(
            "CREATE CONSTRAINT TRIGGER die_at_commit AFTER INSERT ON log_entries "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION die_at_commit()"
        )
        with pytest.raises(StorageError, match="failed during COMMIT, so the write may or may not"):
            s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
        admin.execute("DROP TRIGGER die_at_commit ON log_entries")
        assert s.size() == 1  # re-read: this one did not commit
        s.append([rec(1)], expected_size=1, checkpoint=note_for(1, [rec(1)]))
        assert s.read(1, 2) == [rec(1)[2]]
