"""The embedded SQLite `Store`: one file under the data directory.

Durability: the connection runs with journal_mode=WAL and synchronous=FULL,
so every commit fsyncs the write-ahead log before it returns
(https://sqlite.org/pragma.html#pragma_synchronous). Both are read back
after they are set, and the store refuses to open when the file system
or the file cannot give them (`StorageError`): the daemon never runs on
unsafe durability.

Append-only, gap-free log: `seq` is the INTEGER PRIMARY KEY (the rowid), so
a duplicate is impossible; a trigger refuses any insert whose seq is not
max(seq) + 1 and others refuse UPDATE and DELETE on the log, so even a
writer that bypasses this class cannot leave a gap. Each append runs in
`BEGIN IMMEDIATE`, which takes SQLite's one write lock before the size is
read, so the size check and the inserts form one atomic step across
threads and processes.

Threads: one connection behind one lock. SQLite serialises writers anyway;
one connection means our own threads never meet SQLITE_BUSY, pragmas are
set and verified once, and reads are short (the daemon serves state from
its replayed memory, not from the store). `busy_timeout` covers other
processes (an offline `audit export` reading the same file).

Erasure: secure_delete=ON makes SQLite overwrite deleted cells and freed
pages with zeros. In WAL mode the zeroed page first lands in the -wal
file while the old page (with the salt) is still in the main file and
older WAL frames, so after a commit that erases salts the store runs
`PRAGMA wal_checkpoint(TRUNCATE)`: the zeroed pages are copied over the
old ones and the WAL is cut to zero bytes. What this cannot reach: copies
made before the erasure (backups, snapshots, replicas), blocks the file
system or an SSD's flash translation layer keeps after an overwrite or a
truncate. docs/store-and-tls.md says so for operators.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final, TypeVar

from keyquorum.hsm.stores import base as store
from keyquorum.hsm.stores.base import LogRecord, ShredSalt
from keyquorum.quorum.errors import (
    AppendConflictError,
    InvalidInputError,
    StateError,
    StorageError,
    UnsupportedVersionError,
)

#: The store's file in a data directory: the one name `server run`, `audit
#: export --data-dir` and the tests use (through `in_directory`), so that no
#: caller opens a new, empty store beside a live one.
FILE_NAME: Final = "keyquorum.sqlite"
BUSY_TIMEOUT_MS: Final = 5000

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Migrations: MIGRATIONS[i] takes the schema from version i to i + 1, in one
# transaction together with the new schema_version row. Append only; never
# edit a released step.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE meta (
             key TEXT PRIMARY KEY NOT NULL,
             value TEXT NOT NULL
           ) STRICT""",
        """CREATE TABLE log_entries (
             seq INTEGER PRIMARY KEY CHECK (seq >= 0),
             leaf_hash BLOB NOT NULL CHECK (length(leaf_hash) = 32),
             entry BLOB NOT NULL CHECK (length(entry) > 0)
           ) STRICT""",
        """CREATE TRIGGER log_entries_gap_free BEFORE INSERT ON log_entries
           WHEN NEW.seq IS NOT coalesce((SELECT max(seq) FROM log_entries), -1) + 1
           BEGIN SELECT RAISE(ABORT, 'keyquorum: log seq must equal the log size'); END""",
        """CREATE TRIGGER log_entries_no_update BEFORE UPDATE ON log_entries
           BEGIN SELECT RAISE(ABORT, 'keyquorum: the log is append-only'); END""",
        """CREATE TRIGGER log_entries_no_delete BEFORE DELETE ON log_entries
           BEGIN SELECT RAISE(ABORT, 'keyquorum: the log is append-only'); END""",
        """CREATE TABLE checkpoints (
             size INTEGER PRIMARY KEY CHECK (size >= 0),
             note TEXT NOT NULL
           ) STRICT""",
        """CREATE TABLE shred_salts (
             tenant TEXT NOT NULL,
             version INTEGER NOT NULL CHECK (version >= 1),
             salt BLOB NOT NULL CHECK (length(salt) = 32),
             PRIMARY KEY (tenant, version)
           ) STRICT""",
        """CREATE TRIGGER shred_salts_write_once BEFORE UPDATE ON shred_salts
           BEGIN SELECT RAISE(ABORT, 'keyquorum: a shred salt is never replaced'); END""",
    ),
    (
        """CREATE TABLE counters (
             name TEXT PRIMARY KEY NOT NULL,
             next INTEGER NOT NULL CHECK (next >= 0)
           ) STRICT""",
        """CREATE TRIGGER counters_only_grow BEFORE UPDATE ON counters
           WHEN NEW.next < OLD.next
           BEGIN SELECT RAISE(ABORT, 'keyquorum: a counter never goes back'); END""",
        """CREATE TRIGGER counters_kept BEFORE DELETE ON counters
           BEGIN SELECT RAISE(ABORT, 'keyquorum: a counter is never deleted'); END""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
_SYNCHRONOUS: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


class SqliteStore:
    """`Store` on one SQLite file; see the module docstring for the guarantees."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()
        self._failed: str | None = None
        self._closed = False
        self._scrub_pending = False
        _create_private_file(self._path)
        try:
            self._conn = sqlite3.connect(
                self._path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as e:
            raise StorageError(f"cannot open the store {self._path}: {e}") from e
        try:
            self._configure()
            self._migrate()
        except BaseException:
            self._conn.close()
            self._closed = True
            raise

    @classmethod
    def open(cls, path: Path) -> SqliteStore:
        """Open (or create) the store at `path`; the same as `SqliteStore(path)`."""
        return cls(path)

    @classmethod
    def in_directory(cls, data_dir: Path, *, create: bool = True) -> SqliteStore:
        """Open the store file (`FILE_NAME`) inside a data directory.

        `create=False` (readers such as `audit export --data-dir`) refuses a
        directory without one instead of making an empty store there.
        """
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise StorageError(f"data directory {data_dir} does not exist")
        path = data_dir / FILE_NAME
        if not create and not path.is_file():
            raise StorageError(f"no keyquorum store in {data_dir} ({FILE_NAME} is missing)")
        return cls(path)

    @property
    def path(self) -> Path:
        return self._path

    # -- opening ---------------------------------------------------------

    def _configure(self) -> None:
        """Set and verify the durability pragmas; refuse to run without them."""
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA secure_delete=ON")
            self._conn.execute("PRAGMA trusted_schema=OFF")
            self._conn.execute("PRAGMA cell_size_check=ON")
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            sync = self._conn.execute("PRAGMA synchronous").fetchone()[0]
            secure = self._conn.execute("PRAGMA secure_delete").fetchone()[0]
        except sqlite3.Error as e:
            raise StorageError(f"cannot use {self._path} as a SQLite store: {e}") from e
        if str(mode).lower() != "wal":
            raise StorageError(
                f"{self._path}: SQLite refused journal_mode=WAL (got {mode!r}); "
                "the store needs a local file system that supports WAL"
            )
        if sync != 2:
            raise StorageError(f"{self._path}: synchronous=FULL not in effect (got {sync})")
        if secure != 1:
            raise StorageError(f"{self._path}: secure_delete=ON not in effect (got {secure})")

    def _migrate(self) -> None:
        version = self._read_schema_version()
        if version > SCHEMA_VERSION:
            raise UnsupportedVersionError(
                f"{self._path} has schema version {version}, newer than this build "
                f"understands ({SCHEMA_VERSION}); upgrade keyquorum to open it"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):

            def step(cur: sqlite3.Cursor, target: int = target) -> None:
                # Re-read inside the write lock: another process may have migrated.
                if self._read_schema_version() >= target:
                    return
                for statement in MIGRATIONS[target - 1]:
                    cur.execute(statement)
                cur.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (store.SCHEMA_VERSION_KEY, str(target)),
                )

            with self._lock:
                self._write(step)

    def _read_schema_version(self) -> int:
        try:
            has_meta = self._conn.execute(
                "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta'"
            ).fetchone()
            if has_meta is None:
                return 0
            row = self._conn.execute(
                "SELECT value FROM meta WHERE key = ?", (store.SCHEMA_VERSION_KEY,)
            ).fetchone()
        except sqlite3.Error as e:
            raise StorageError(f"cannot read the schema of {self._path}: {e}") from e
        if row is None:
            raise StorageError(f"{self._path} has a meta table but no schema_version row")
        try:
            return int(row[0])
        except ValueError as e:
            raise StorageError(f"{self._path}: schema_version {row[0]!r} is not a number") from e

    # -- transactions ----------------------------------------------------

    def _usable(self) -> None:
        if self._closed:
            raise StorageError("the store is closed")
        if self._failed is not None:
            raise StorageError(
                f"the store stopped after a failed write ({self._failed}); "
                "restart to re-read what is on disk"
            )

    def _write(self, body: Callable[[sqlite3.Cursor], _T]) -> _T:
        """Run `body` in BEGIN IMMEDIATE ... COMMIT; the caller holds the lock.

        Typed errors from `body` (conflicts, state errors) roll back and pass
        through. A database error after BEGIN, or at COMMIT, stops the store.
        """
        self._usable()
        cur = self._conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise StorageError(f"cannot start a write transaction: {e}") from e
        try:
            result = body(cur)
            cur.execute("COMMIT")
        except sqlite3.IntegrityError as e:
            self._rollback()
            raise StateError(f"the store refused the write: {e}") from e
        except sqlite3.Error as e:
            self._rollback()
            self._failed = str(e)
            raise StorageError(f"write failed, nothing was committed: {e}") from e
        except BaseException:
            self._rollback()
            raise
        finally:
            cur.close()
        return result

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                self._failed = f"rollback failed: {e}"

    def _read(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._lock:
            self._usable()
            try:
                return body(self._conn)
            except sqlite3.Error as e:
                raise StorageError(f"read failed: {e}") from e

    def _scrub_wal(self) -> bool:
        """Copy zeroed pages over old ones and empty the WAL; the caller holds the lock.

        False when another connection kept the checkpoint from finishing.
        """
        try:
            busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as e:
            _log.warning("WAL checkpoint after a salt erasure failed: %s", e)
            self._scrub_pending = True
            return False
        self._scrub_pending = busy != 0
        if self._scrub_pending:
            _log.warning(
                "erased shred salts may remain in %s-wal: another connection blocks the "
                "checkpoint; retried after the next append",
                self._path,
            )
        return not self._scrub_pending

    # -- log -------------------------------------------------------------

    @staticmethod
    def _size(conn: sqlite3.Connection | sqlite3.Cursor) -> int:
        # max(seq) on the rowid is a b-tree descent; count(*) would scan.
        value = conn.execute("SELECT coalesce(max(seq), -1) + 1 FROM log_entries").fetchone()[0]
        return int(value)

    def size(self) -> int:
        return self._read(self._size)

    def append(
        self,
        entries: Sequence[LogRecord],
        *,
        expected_size: int,
        checkpoint: str,
        shred_salts: Sequence[ShredSalt] = (),
        erase_tenants: Sequence[str] = (),
        replace_salts: Sequence[ShredSalt] = (),
    ) -> None:
        store.check_append(
            entries,
            expected_size=expected_size,
            checkpoint=checkpoint,
            shred_salts=shred_salts,
            erase_tenants=erase_tenants,
            replace_salts=replace_salts,
        )

        def body(cur: sqlite3.Cursor) -> None:
            actual = self._size(cur)
            if actual != expected_size:
                raise AppendConflictError(
                    f"log size is {actual}, the append expected {expected_size}",
                    expected_size=expected_size,
                    actual_size=actual,
                )
            for tenant, version, _ in shred_salts:
                if _has_salt(cur, tenant, version):
                    raise StateError(f"a shred salt for {tenant!r} version {version} exists")
            for tenant, version, _ in replace_salts:
                if not _has_salt(cur, tenant, version):
                    raise StateError(f"no shred salt for {tenant!r} version {version} to replace")
            cur.executemany(
                "INSERT INTO log_entries (seq, leaf_hash, entry) VALUES (?, ?, ?)", entries
            )
            # The new log size, vouched for in the same transaction. A row of
            # that size cannot exist (sizes only grow): the insert refuses it.
            cur.execute(
                "INSERT INTO checkpoints (size, note) VALUES (?, ?)",
                (expected_size + len(entries), checkpoint),
            )
            cur.executemany(
                "INSERT INTO shred_salts (tenant, version, salt) VALUES (?, ?, ?)", shred_salts
            )
            cur.executemany(
                "DELETE FROM shred_salts WHERE tenant = ? AND version = ?",
                [(t, v) for t, v, _ in replace_salts],
            )
            cur.executemany(
                "INSERT INTO shred_salts (tenant, version, salt) VALUES (?, ?, ?)", replace_salts
            )
            cur.executemany(
                "DELETE FROM shred_salts WHERE tenant = ?", [(t,) for t in erase_tenants]
            )

        with self._lock:
            self._write(body)
            if erase_tenants or replace_salts or self._scrub_pending:
                self._scrub_wal()

    def head(self) -> store.Head:
        def body(conn: sqlite3.Connection) -> store.Head:
            # One connection behind one lock: nothing of ours writes between
            # the two reads, and only this process writes the file.
            size = self._size(conn)
            row = conn.execute(
                "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            return size, None if row is None else (int(row[0]), str(row[1]))

        return self._read(body)

    def read(self, start: int, end: int) -> list[bytes]:
        def body(conn: sqlite3.Connection) -> list[bytes]:
            store.check_range(start, end, self._size(conn))
            rows = conn.execute(
                "SELECT seq, entry FROM log_entries WHERE seq >= ? AND seq < ? ORDER BY seq",
                (start, end),
            ).fetchall()
            return _contiguous(rows, start, end)

        return self._read(body)

    def read_all(self) -> Iterator[bytes]:
        end = self.size()
        for start in range(0, end, store.READ_BATCH):
            yield from self.read(start, min(start + store.READ_BATCH, end))

    def leaf_hashes(self) -> list[bytes]:
        def body(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute("SELECT seq, leaf_hash FROM log_entries ORDER BY seq").fetchall()
            return _contiguous(rows, 0, len(rows))

        return self._read(body)

    # -- checkpoints -----------------------------------------------------

    def put_checkpoint(self, size: int, note_text: str) -> None:
        """Replace the note of an appended checkpoint (the same checkpoint with
        cosignatures added); a checkpoint is never added apart from its entries."""
        store.check_checkpoint(size, note_text)

        def body(cur: sqlite3.Cursor) -> None:
            log_size = self._size(cur)
            if size > log_size:
                raise InvalidInputError(f"checkpoint size is beyond the log: {size} > {log_size}")
            updated = cur.execute(
                "UPDATE checkpoints SET note = ? WHERE size = ?", (note_text, size)
            ).rowcount
            if updated != 1:
                raise StateError(
                    f"no checkpoint of size {size} is stored: checkpoints are written with "
                    "the entries they cover"
                )

        with self._lock:
            self._write(body)

    def checkpoint_at(self, size: int) -> str | None:
        store.check_size("checkpoint size", size)

        def body(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT note FROM checkpoints WHERE size = ?", (size,)).fetchone()
            return None if row is None else str(row[0])

        return self._read(body)

    def latest_checkpoint(self) -> tuple[int, str] | None:
        def body(conn: sqlite3.Connection) -> tuple[int, str] | None:
            row = conn.execute(
                "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return self._read(body)

    def checkpoints(self) -> list[tuple[int, str]]:
        def body(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            rows = conn.execute("SELECT size, note FROM checkpoints ORDER BY size").fetchall()
            return [(int(size), str(note)) for size, note in rows]

        return self._read(body)

    # -- shred salts -----------------------------------------------------

    def put_shred_salt(self, tenant: str, version: int, salt: bytes) -> None:
        store.check_salt(tenant, version, salt)

        def body(cur: sqlite3.Cursor) -> None:
            if _has_salt(cur, tenant, version):
                raise StateError(f"a shred salt for {tenant!r} version {version} exists")
            cur.execute(
                "INSERT INTO shred_salts (tenant, version, salt) VALUES (?, ?, ?)",
                (tenant, version, salt),
            )

        with self._lock:
            self._write(body)

    def get_shred_salt(self, tenant: str, version: int) -> bytes | None:
        store.check_tenant(tenant)
        store.check_version(version)

        def body(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute(
                "SELECT salt FROM shred_salts WHERE tenant = ? AND version = ?",
                (tenant, version),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self._read(body)

    def erase_shred_salts(self, tenant: str) -> int:
        """Delete the tenant's salts, then overwrite and truncate the WAL.

        Idempotent: if another connection kept the WAL from being emptied
        (`StorageError`), the rows are already gone and calling again
        finishes the scrub.
        """
        store.check_tenant(tenant)

        def body(cur: sqlite3.Cursor) -> int:
            return cur.execute("DELETE FROM shred_salts WHERE tenant = ?", (tenant,)).rowcount

        with self._lock:
            erased = self._write(body)
            if not self._scrub_wal():
                raise StorageError(
                    f"salts of {tenant!r} are deleted but old pages may remain in the WAL "
                    "(another connection holds it open); call again to finish"
                )
        return erased

    # -- counters --------------------------------------------------------

    def reserve_block(self, counter: str, block: int, limit: int) -> tuple[int, int]:
        store.check_reserve(counter, block, limit)

        def body(cur: sqlite3.Cursor) -> tuple[int, int]:
            row = cur.execute("SELECT next FROM counters WHERE name = ?", (counter,)).fetchone()
            start = 0 if row is None else int(row[0])
            end = store.next_block(counter, start, block, limit)
            cur.execute(
                "INSERT INTO counters (name, next) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET next = excluded.next",
                (counter, end),
            )
            return start, end

        # BEGIN IMMEDIATE holds SQLite's write lock from the read to the commit.
        with self._lock:
            return self._write(body)

    def counters(self) -> dict[str, int]:
        def body(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT name, next FROM counters ORDER BY name").fetchall()
            return {str(name): int(value) for name, value in rows}

        return self._read(body)

    # -- meta ------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        store.check_meta(key)

        def body(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return self._read(body)

    def set_meta(self, key: str, value: str) -> None:
        store.check_meta(key, value)
        if key == store.SCHEMA_VERSION_KEY:
            raise InvalidInputError("schema_version is written by migrations only")

        def body(cur: sqlite3.Cursor) -> None:
            cur.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        with self._lock:
            self._write(body)

    def schema_version(self) -> int:
        with self._lock:
            self._usable()
            return self._read_schema_version()

    # -- life cycle ------------------------------------------------------

    def durability_settings(self) -> dict[str, str]:
        """The settings in force on this connection, read back from SQLite."""

        def body(conn: sqlite3.Connection) -> dict[str, str]:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            secure = conn.execute("PRAGMA secure_delete").fetchone()[0]
            return {
                "journal_mode": str(mode).lower(),
                "synchronous": _SYNCHRONOUS.get(sync, str(sync)),
                "secure_delete": "ON" if secure == 1 else str(secure),
            }

        return self._read(body)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._scrub_pending and self._failed is None:
                self._scrub_wal()
            self._closed = True
            self._conn.close()

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SqliteStore {self._path}>"


def _has_salt(cur: sqlite3.Cursor, tenant: str, version: int) -> bool:
    row = cur.execute(
        "SELECT 1 FROM shred_salts WHERE tenant = ? AND version = ?", (tenant, version)
    ).fetchone()
    return row is not None


def _contiguous(rows: list[tuple[int, bytes]], start: int, end: int) -> list[bytes]:
    """The blobs of `rows`, checked to be exactly seq start..end-1 in order.

    The triggers make a gap impossible through SQLite; a file edited by hand
    could still have one, and a silent short read would hide it.
    """
    out: list[bytes] = []
    for want, (seq, blob) in enumerate(rows, start):
        if seq != want:
            raise StorageError(f"the stored log has a gap: seq {want} missing, found {seq}")
        out.append(bytes(blob))
    if len(out) != end - start:
        raise StorageError(f"the stored log has a gap: read {len(out)} of {end - start} entries")
    return out


def _create_private_file(path: Path) -> None:
    """Create the database file owner-only (SQLite gives -wal/-shm the same mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as e:
        raise StorageError(f"cannot create the store {path}: {e}") from e
    os.close(fd)
