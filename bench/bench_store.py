"""Log appends on both stores against their database's own insert-and-commit.

Each store row appends one entry per call through the `Store` (checks,
conflict detection, triggers, NOTIFY) and its baseline inserts the same
bytes into a plain table with the same durability settings and commits:
SQLite with WAL and synchronous=FULL, PostgreSQL with fsync and
synchronous_commit on. So the ratio is the price of the store's
guarantees, not of the disk. Rounds alternate store and baseline, so
drift in the machine hits both. Names carry the median and 99th
percentile latency of one append.

Every append writes its entry and the signed checkpoint covering it in
ONE transaction. The "checkpoint in the same transaction" rows measure
that against the way appends were written before (entries committed,
then the checkpoint in a second transaction), replayed here with the
same SQL statements on a store of the same schema, on the same database
and disk, rounds alternating: the ratio is what writing both at once
costs or saves.

The concurrent PostgreSQL row has four replicas (four stores, four pools)
appending as fast as they can, each re-reading the size and retrying on
`AppendConflictError`; its baseline is four plain connections inserting
rows that never collide. PostgreSQL comes from tests/pg.py: a throw-away
cluster, or `KEYQUORUM_TEST_PG_DSN`; without either its rows are left out.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from bench.harness import Row
from keyquorum.hsm.stores import sqlite as sqlite_store
from keyquorum.hsm.stores.base import leaf_hash
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import AppendConflictError
from keyquorum.quorum.merkle import CompactRange
from keyquorum.quorum.note import NoteSigner
from tests.pg import PgServer, PostgresUnavailableError, server_from_environment

ENTRY_SIZE = 7000
"""About one approval entry: its hybrid ML-DSA-65 + Ed25519 signature in hex."""

WRITERS = 4


def _entry(seq: int) -> tuple[int, bytes, bytes]:
    body = seq.to_bytes(8, "big") + b"e" * (ENTRY_SIZE - 8)
    return seq, leaf_hash(body), body


class _Notes:
    """The signed checkpoint after each entry, made before the timing starts."""

    def __init__(self, count: int) -> None:
        signer = NoteSigner.generate("keyquorum/bench")
        tree = CompactRange()
        self._notes = []
        for seq in range(count):
            tree.append(_entry(seq)[1])
            self._notes.append(signer.sign_checkpoint(tree.size, tree.root()))

    def after(self, seq: int) -> str:
        """The note of the log once entry `seq` is in it (size seq + 1)."""
        return self._notes[seq]


def _timed(step: Callable[[int], None], start: int, n: int, latencies: list[float]) -> float:
    began = time.perf_counter()
    for seq in range(start, start + n):
        t0 = time.perf_counter()
        step(seq)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - began


def _paired(
    name: str,
    store_step: Callable[[int], None],
    baseline_name: str,
    raw_step: Callable[[int], None],
    *,
    per_round: int,
    rounds: int,
) -> Row:
    store_lat: list[float] = []
    raw_lat: list[float] = []
    store_time = raw_time = 0.0
    store_step(0)  # warm up both, and give each its first row
    raw_step(0)
    for r in range(rounds):
        start = 1 + r * per_round
        store_time += _timed(store_step, start, per_round, store_lat)
        raw_time += _timed(raw_step, start, per_round, raw_lat)
    total = per_round * rounds
    return Row(
        f"{name} ({_percentiles(store_lat)})",
        total / store_time,
        f"{baseline_name} ({_percentiles(raw_lat)})",
        total / raw_time,
        "appends/s",
    )


def _percentiles(latencies: list[float]) -> str:
    cuts = statistics.quantiles(latencies, n=100)
    return f"p50 {statistics.median(latencies) * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms"


def _sqlite_row(directory: Path, per_round: int, rounds: int, notes: _Notes) -> Row:
    s = SqliteStore.in_directory(directory)
    raw = sqlite3.connect(directory / "raw.sqlite3", isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("CREATE TABLE raw (seq INTEGER PRIMARY KEY, leaf_hash BLOB, entry BLOB)")

    def raw_step(seq: int) -> None:
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO raw VALUES (?, ?, ?)", _entry(seq))
        raw.execute("COMMIT")

    try:
        return _paired(
            f"sqlite append, 1 x {ENTRY_SIZE:,} B (WAL, synchronous=FULL)",
            lambda seq: s.append([_entry(seq)], expected_size=seq, checkpoint=notes.after(seq)),
            "raw sqlite3 INSERT + COMMIT, same bytes and pragmas",
            raw_step,
            per_round=per_round,
            rounds=rounds,
        )
    finally:
        raw.close()
        s.close()


def _sqlite_checkpoint_row(directory: Path, per_round: int, rounds: int, notes: _Notes) -> Row:
    """The append with its checkpoint, against entries then checkpoint in two commits."""
    (directory / "one").mkdir()
    (directory / "two").mkdir()
    s = SqliteStore.in_directory(directory / "one")
    SqliteStore.in_directory(directory / "two").close()  # the same schema and triggers
    old = sqlite3.connect(directory / "two" / sqlite_store.FILE_NAME, isolation_level=None)
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("PRAGMA synchronous=FULL")
    old.execute("PRAGMA secure_delete=ON")

    def separate(seq: int) -> None:
        # What the store's append and put_checkpoint ran, one after the other.
        old.execute("BEGIN IMMEDIATE")
        old.execute("SELECT coalesce(max(seq), -1) + 1 FROM log_entries").fetchone()
        old.execute("INSERT INTO log_entries (seq, leaf_hash, entry) VALUES (?, ?, ?)", _entry(seq))
        old.execute("COMMIT")
        old.execute("BEGIN IMMEDIATE")
        old.execute("SELECT coalesce(max(seq), -1) + 1 FROM log_entries").fetchone()
        old.execute("SELECT max(size) FROM checkpoints").fetchone()
        old.execute(
            "INSERT INTO checkpoints (size, note) VALUES (?, ?)", (seq + 1, notes.after(seq))
        )
        old.execute("COMMIT")

    try:
        return _paired(
            "sqlite append with its checkpoint in the same transaction",
            lambda seq: s.append([_entry(seq)], expected_size=seq, checkpoint=notes.after(seq)),
            "entries, then the checkpoint in a second transaction (as before)",
            separate,
            per_round=per_round,
            rounds=rounds,
        )
    finally:
        old.close()
        s.close()


def _postgres_checkpoint_row(server: PgServer, per_round: int, rounds: int, notes: _Notes) -> Row:
    """PostgreSQL: the append with its checkpoint, against two commits as before."""
    one, one_dsn = server.create_schema("kq_bench_one")
    two, two_dsn = server.create_schema("kq_bench_two")
    try:
        PostgresStore.open(two_dsn).close()
        with PostgresStore.open(one_dsn) as s, psycopg.connect(two_dsn) as old:
            old.execute("DROP TRIGGER log_entries_covered ON log_entries")  # not there before
            old.commit()
            head = [bytes(32)]

            def separate(seq: int) -> None:
                # What the store's append and put_checkpoint ran, one after the other.
                old.execute(
                    "SELECT size, leaf_hash, current_setting('fsync'), "
                    "current_setting('synchronous_commit'), current_setting('full_page_writes') "
                    "FROM log_head FOR UPDATE"
                ).fetchone()
                _, hashed, body = _entry(seq)
                old.execute(
                    "INSERT INTO log_entries (seq, leaf_hash, prev_leaf_hash, entry) "
                    "VALUES (%s, %s, %s, %s)",
                    (seq, hashed, head[0], body),
                )
                old.execute("SELECT pg_notify('keyquorum_log', %s)", (str(seq + 1),))
                old.commit()
                head[0] = hashed
                old.execute("SELECT size FROM log_head FOR UPDATE").fetchone()
                old.execute("SELECT max(size) FROM checkpoints").fetchone()
                old.execute(
                    "INSERT INTO checkpoints (size, note) VALUES (%s, %s) "
                    "ON CONFLICT (size) DO UPDATE SET note = excluded.note",
                    (seq + 1, notes.after(seq)),
                )
                old.commit()

            return _paired(
                "postgres append with its checkpoint in the same transaction",
                lambda seq: s.append([_entry(seq)], expected_size=seq, checkpoint=notes.after(seq)),
                "entries, then the checkpoint in a second transaction (as before)",
                separate,
                per_round=per_round,
                rounds=rounds,
            )
    finally:
        server.drop_schema(one)
        server.drop_schema(two)


def _postgres_rows(
    server: PgServer, per_round: int, rounds: int, seconds: float, notes: _Notes
) -> list[Row]:
    schema, dsn = server.create_schema("kq_bench")
    try:
        with PostgresStore.open(dsn) as s, psycopg.connect(dsn) as raw:
            raw.execute("CREATE TABLE raw (seq bigint PRIMARY KEY, leaf_hash bytea, entry bytea)")
            raw.commit()

            def raw_step(seq: int) -> None:
                raw.execute("INSERT INTO raw VALUES (%s, %s, %s)", _entry(seq))
                raw.commit()

            single = _paired(
                f"postgres append, 1 x {ENTRY_SIZE:,} B (fsync, synchronous_commit=on)",
                lambda seq: s.append([_entry(seq)], expected_size=seq, checkpoint=notes.after(seq)),
                "raw psycopg INSERT + COMMIT, same bytes and server",
                raw_step,
                per_round=per_round,
                rounds=rounds,
            )
            base = s.size()
        racing = _racing(dsn, base, seconds, notes)
        plain = _plain_writers(dsn, seconds)
        return [
            single,
            Row(
                f"postgres append, {WRITERS} replicas racing (retry on conflict)",
                racing,
                f"{WRITERS} raw connections, INSERT + COMMIT, no collisions",
                plain,
                "appends/s",
            ),
        ]
    finally:
        server.drop_schema(schema)


def _racing(dsn: str, base: int, seconds: float, notes: _Notes) -> float:
    stores = [PostgresStore.open(dsn) for _ in range(WRITERS)]
    done = [0] * WRITERS
    stop = time.perf_counter() + seconds

    def writer(i: int) -> None:
        s = stores[i]
        while time.perf_counter() < stop:
            size = s.size()
            try:
                s.append([_entry(size)], expected_size=size, checkpoint=notes.after(size))
            except AppendConflictError:
                continue
            done[i] += 1

    began = time.perf_counter()
    _run_threads(writer)
    elapsed = time.perf_counter() - began
    final = stores[0].size()
    for s in stores:
        s.close()
    if final != base + sum(done):  # every acknowledged append is there, once
        raise RuntimeError(f"log size {final} after {sum(done)} appends on {base}")
    return sum(done) / elapsed


def _plain_writers(dsn: str, seconds: float) -> float:
    conns = [psycopg.connect(dsn) for _ in range(WRITERS)]
    done = [0] * WRITERS
    stop = time.perf_counter() + seconds

    def writer(i: int) -> None:
        conn = conns[i]
        seq = 1_000_000 * (i + 1)
        while time.perf_counter() < stop:
            conn.execute("INSERT INTO raw VALUES (%s, %s, %s)", _entry(seq))
            conn.commit()
            seq += 1
            done[i] += 1

    began = time.perf_counter()
    _run_threads(writer)
    elapsed = time.perf_counter() - began
    for conn in conns:
        conn.close()
    return sum(done) / elapsed


def _run_threads(target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run(quick: bool) -> list[Row]:
    per_round, rounds, seconds = (100, 2, 1.0) if quick else (400, 5, 3.0)
    # Enough notes for every append, the racing replicas' included.
    notes = _Notes(1 + per_round * rounds + (5_000 if quick else 20_000))
    with tempfile.TemporaryDirectory() as d:
        rows = [_sqlite_row(Path(d), per_round, rounds, notes)]
    with tempfile.TemporaryDirectory() as d:
        rows.append(_sqlite_checkpoint_row(Path(d), per_round, rounds, notes))
    try:
        with server_from_environment() as server:
            rows += _postgres_rows(server, per_round, rounds, seconds, notes)
            rows.append(_postgres_checkpoint_row(server, per_round, rounds, notes))
    except PostgresUnavailableError as e:
        print(f"# bench_store: PostgreSQL rows left out: {e}", file=sys.stderr)
    return rows
