"""The PostgreSQL `Store`: several daemon replicas over one database.

Same contract as SQLite (`keyquorum.hsm.stores.base`), same conformance suite
(tests/test_store.py, parametrised by backend). What differs is how each
rule is kept, and that several processes on several machines write.

Linearisable appends. A one-row table `log_head (size, leaf_hash)` is the
log's head. Every append runs in ONE READ COMMITTED transaction that
starts with `SELECT ... FROM log_head FOR UPDATE`: the row lock makes
appenders queue, one at a time, across every connection of every replica.
A writer that waited gets the head as the winner committed it (READ
COMMITTED re-reads a locked row once the lock is granted), sees that the
size moved and raises `AppendConflictError` before inserting anything, so
the loser writes nothing and learns the new size. We chose the row lock
over SERIALIZABLE plus the primary key: with SERIALIZABLE the loser fails
with a serialization failure or a unique violation, possibly only at
COMMIT, and the failure also hits unrelated readers and checkpoint writers
(false positives the caller would have to retry); the lock gives a
deterministic answer in the first statement and needs no retry loop. The
isolation level is set on every connection, so a server default of
`default_transaction_isolation = serializable` changes nothing.

What the database itself enforces, for every writer (also one that
bypasses this class, e.g. psql), in the inserting transaction:

- `seq` is the primary key: no duplicates.
- Gap-free: a BEFORE INSERT trigger locks `log_head` and refuses a row
  whose `seq` is not the current size, then advances the head.
- Hash link: each row carries `prev_leaf_hash`, the leaf hash of entry
  seq-1 (32 zero bytes for seq 0, as the log format's genesis `prev`); the
  trigger refuses a row whose `prev_leaf_hash` differs from the head's
  leaf hash. The stored rows therefore form a chain of leaf hashes.
- `leaf_hash = sha256(0x00 || entry)` (RFC 9162 section 2.1.1) as a CHECK.
- No UPDATE, DELETE or TRUNCATE of the log; `log_head` changes only
  through the trigger; a shred salt is never replaced.

What it does not check: the `prev` field inside the entry bytes (the store
does not parse entries; replay does, and the store's chain column is what
that field must equal). The triggers stop mistakes and writers that go
around keyquorum; a database administrator can drop them. The verifier,
not the database, is what catches an administrator (README.md, threat model).

Followers. Each append sends `NOTIFY keyquorum_log, '<new size>'` inside
its transaction, so PostgreSQL delivers it at COMMIT and only if it
committed. `wait_for_append(after_size, timeout)` listens on its own
connection and re-reads the size at least every `poll_interval` seconds,
so a lost notification, a dropped listener connection or a writer that
does not notify delays a follower by at most `poll_interval`, never for
ever.

Durability. Every connection is checked when the pool opens it, and every
append re-checks in its first statement (no extra round trip): `fsync`
must be on, `synchronous_commit` neither `off` nor `local` (`on`,
`remote_write` and `remote_apply` all flush the commit record locally
before COMMIT returns; `local` is refused because it stops waiting for
synchronous standbys, so a fail-over could lose acknowledged entries),
and `full_page_writes` on (without it a crash can tear a page). The values
checked are the ones in force on the store's own sessions: the server
configuration as changed by `ALTER SYSTEM`, `ALTER DATABASE/ROLE ... SET`
and `options` in the DSN. Another session's `SET` cannot weaken ours. A
store that finds them unsafe refuses to open, and an append that finds
them unsafe (a reload turned fsync off) writes nothing: `StorageError`.

Outages. Connections come from a psycopg_pool `ConnectionPool` that
checks each connection before handing it out and reconnects in the
background. While PostgreSQL is unreachable every call raises
`StorageError` (the daemon answers UNAVAILABLE) after at most `timeout`
seconds; once it is back, calls succeed again without reopening the store.
A connection lost during COMMIT leaves the outcome unknown: the error says
so, and the caller must re-read the log before deciding again (its next
append at the old size would get `AppendConflictError` if the entry did
land). Unlike SQLite the store does not stop after a failed commit:
PostgreSQL itself stops (PANIC) on an fsync failure and recovers from its
WAL, so there is no silently dropped page for a retry to paper over.

Erasure. `erase_shred_salts` DELETEs the rows in a committed transaction:
no query, on any connection, returns them again. PostgreSQL does not
overwrite the bytes: the dead tuple stays in the table file until VACUUM
reclaims the space (and even then the bytes stay until the space is
reused), and the salt was written to the WAL when it was inserted, which
is kept until recycled and forever in WAL archives, base backups and
standbys. docs/postgres.md tells operators what that means and what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from keyquorum.hsm.stores import base as store
from keyquorum.hsm.stores.base import LogRecord, ShredSalt
from keyquorum.quorum.errors import (
    AppendConflictError,
    InvalidInputError,
    StateError,
    StorageError,
    UnsupportedVersionError,
)

NOTIFY_CHANNEL: Final = "keyquorum_log"
"""Channel of the per-append notification; its payload is the new log size."""

"""`prev_leaf_hash` of entry 0, as the log format's genesis `prev`."""

DEFAULT_TIMEOUT_S: Final = 5.0
DEFAULT_POLL_INTERVAL_S: Final = 1.0
_MIGRATION_LOCK: Final = 0x6B65_7971_756F_7275  # "keyquorum" as an advisory lock key
_SAFE_SYNCHRONOUS_COMMIT: Final = frozenset({"on", "remote_write", "remote_apply"})
_DURABILITY_SQL: Final = (
    "SELECT current_setting('fsync'), current_setting('synchronous_commit'), "
    "current_setting('full_page_writes')"
)
# The append's first statement: lock the head, read durability in the same trip.
_LOCK_HEAD_SQL: Final = (
    "SELECT size, leaf_hash, current_setting('fsync'), current_setting('synchronous_commit'), "
    "current_setting('full_page_writes') FROM log_head FOR UPDATE"
)

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Conn = psycopg.Connection[TupleRow]

# Migrations: MIGRATIONS[i] takes the schema from version i to i + 1, in one
# transaction together with the new schema_version row. Append only; never
# edit a released step. Unqualified names: the tables live in the first
# schema of the DSN's search_path, which the functions pin at creation.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE meta (
             key text PRIMARY KEY,
             value text NOT NULL
           )""",
        """CREATE TABLE log_head (
             one boolean PRIMARY KEY DEFAULT true CHECK (one),
             size bigint NOT NULL CHECK (size >= 0),
             leaf_hash bytea NOT NULL CHECK (length(leaf_hash) = 32)
           )""",
        """INSERT INTO log_head (one, size, leaf_hash)
           VALUES (true, 0, decode(repeat('00', 32), 'hex'))""",
        """CREATE TABLE log_entries (
             seq bigint PRIMARY KEY CHECK (seq >= 0),
             leaf_hash bytea NOT NULL CONSTRAINT leaf_hash_is_rfc9162
               CHECK (leaf_hash = sha256(decode('00', 'hex') || entry)),
             prev_leaf_hash bytea NOT NULL CHECK (length(prev_leaf_hash) = 32),
             entry bytea NOT NULL CHECK (length(entry) > 0)
           )""",
        """CREATE FUNCTION keyquorum_log_append() RETURNS trigger
           LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
           DECLARE
             head_size bigint;
             head_hash bytea;
           BEGIN
             SELECT size, leaf_hash INTO head_size, head_hash FROM log_head FOR UPDATE;
             IF NEW.seq IS DISTINCT FROM head_size THEN
               RAISE EXCEPTION 'keyquorum: log seq % is not the log size %', NEW.seq, head_size
                 USING ERRCODE = 'check_violation';
             END IF;
             IF NEW.prev_leaf_hash IS DISTINCT FROM head_hash THEN
               RAISE EXCEPTION 'keyquorum: entry % does not chain to the leaf hash of entry %',
                 NEW.seq, NEW.seq - 1 USING ERRCODE = 'check_violation';
             END IF;
             UPDATE log_head SET size = head_size + 1, leaf_hash = NEW.leaf_hash;
             RETURN NEW;
           END $$""",
        """CREATE TRIGGER log_entries_gap_free_chain BEFORE INSERT ON log_entries
           FOR EACH ROW EXECUTE FUNCTION keyquorum_log_append()""",
        """CREATE FUNCTION keyquorum_refuse() RETURNS trigger
           LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
           BEGIN
             RAISE EXCEPTION 'keyquorum: %', TG_ARGV[0] USING ERRCODE = 'check_violation';
           END $$""",
        """CREATE TRIGGER log_entries_append_only BEFORE UPDATE OR DELETE ON log_entries
           FOR EACH ROW EXECUTE FUNCTION keyquorum_refuse('the log is append-only')""",
        """CREATE TRIGGER log_entries_no_truncate BEFORE TRUNCATE ON log_entries
           FOR EACH STATEMENT EXECUTE FUNCTION keyquorum_refuse('the log is append-only')""",
        # The head moves only from inside the insert trigger: a WHEN clause sees
        # the depth of the statement, 0 for a client and 1 inside a trigger.
        """CREATE TRIGGER log_head_by_trigger_only BEFORE UPDATE ON log_head
           FOR EACH ROW WHEN (pg_trigger_depth() = 0)
           EXECUTE FUNCTION keyquorum_refuse('the log head moves only by appending')""",
        """CREATE TRIGGER log_head_kept BEFORE INSERT OR DELETE ON log_head
           FOR EACH ROW EXECUTE FUNCTION keyquorum_refuse('the log head is one fixed row')""",
        """CREATE TRIGGER log_head_no_truncate BEFORE TRUNCATE ON log_head
           FOR EACH STATEMENT EXECUTE FUNCTION keyquorum_refuse('the log head is one fixed row')""",
        """CREATE TABLE checkpoints (
             size bigint PRIMARY KEY CHECK (size >= 0),
             note text NOT NULL
           )""",
        """CREATE TABLE shred_salts (
             tenant text NOT NULL,
             version integer NOT NULL CHECK (version >= 1),
             salt bytea NOT NULL CHECK (length(salt) = 32),
             PRIMARY KEY (tenant, version)
           )""",
        """CREATE TRIGGER shred_salts_write_once BEFORE UPDATE ON shred_salts
           FOR EACH ROW EXECUTE FUNCTION keyquorum_refuse('a shred salt is never replaced')""",
    ),
    (
        """CREATE TABLE counters (
             name text PRIMARY KEY,
             next bigint NOT NULL CHECK (next >= 0)
           )""",
        """CREATE TRIGGER counters_only_grow BEFORE UPDATE ON counters
           FOR EACH ROW WHEN (NEW.next < OLD.next)
           EXECUTE FUNCTION keyquorum_refuse('a counter never goes back')""",
        """CREATE TRIGGER counters_kept BEFORE DELETE ON counters
           FOR EACH ROW EXECUTE FUNCTION keyquorum_refuse('a counter is never deleted')""",
        """CREATE TRIGGER counters_no_truncate BEFORE TRUNCATE ON counters
           FOR EACH STATEMENT EXECUTE FUNCTION keyquorum_refuse('a counter is never deleted')""",
    ),
    (
        # No entry commits without the checkpoint that covers it: checked at
        # COMMIT (a deferred constraint trigger), after the append's own
        # checkpoint insert, for every writer that goes through PostgreSQL.
        """CREATE FUNCTION keyquorum_log_covered() RETURNS trigger
           LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
           BEGIN
             IF NOT EXISTS (
               SELECT 1 FROM checkpoints WHERE size = (SELECT size FROM log_head)
             ) THEN
               RAISE EXCEPTION 'keyquorum: log entries committed without the checkpoint '
                 'that covers them' USING ERRCODE = 'check_violation';
             END IF;
             RETURN NULL;
           END $$""",
        """CREATE CONSTRAINT TRIGGER log_entries_covered AFTER INSERT ON log_entries
           DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION keyquorum_log_covered()""",
        """CREATE TRIGGER checkpoints_kept BEFORE DELETE ON checkpoints
           FOR EACH ROW EXECUTE FUNCTION keyquorum_refuse('a checkpoint is never deleted')""",
        """CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints
           FOR EACH STATEMENT EXECUTE FUNCTION keyquorum_refuse('a checkpoint is never deleted')""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class _CommitUnknownError(Exception):
    """The connection failed while COMMIT was in flight."""


class PostgresStore:
    """`Store` on one PostgreSQL database; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 8,
        timeout: float = DEFAULT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    ) -> None:
        if not isinstance(dsn, str) or not dsn:
            raise InvalidInputError("the PostgreSQL DSN must be a non-empty string")
        if not 1 <= min_connections <= max_connections:
            raise InvalidInputError(
                f"need 1 <= min_connections <= max_connections, got "
                f"{min_connections} and {max_connections}"
            )
        if not timeout > 0 or not poll_interval > 0:
            raise InvalidInputError("timeout and poll_interval must be positive seconds")
        try:
            params = psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.Error as e:
            raise InvalidInputError(f"the PostgreSQL DSN does not parse: {e}") from e
        # Never the password: this names the database in errors and repr.
        self._where = "{}:{}/{}".format(
            params.get("host", "local"), params.get("port", "5432"), params.get("dbname", "")
        )
        self._dsn = dsn
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._closed = False
        self._refused: str | None = None
        self._unavailable = False
        self._listen_lock = threading.Lock()
        self._listener: _Conn | None = None
        self._connect_kwargs: dict[str, object] = {
            "autocommit": True,  # transactions are explicit (conn.transaction())
            "connect_timeout": max(1, round(timeout)),
            "application_name": "keyquorum",
            "client_encoding": "UTF8",
        }
        # Open, check and migrate on one connection before the pool exists,
        # so a refusal (durability, newer schema) is immediate and precise.
        try:
            with psycopg.connect(dsn, **self._connect_kwargs) as conn:  # type: ignore[arg-type]
                self._configure(conn)
                self._migrate(conn)
        except psycopg.Error as e:
            raise StorageError(f"cannot open the store at {self._where}: {e}") from e
        self._pool: ConnectionPool[_Conn] = ConnectionPool(
            dsn,
            kwargs=self._connect_kwargs,
            min_size=min_connections,
            max_size=max_connections,
            open=False,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            timeout=timeout,
            # Give up a background reconnection after a few seconds: the next
            # call then starts a fresh attempt at once, instead of waiting out
            # an exponential back-off that grew while the server was away.
            reconnect_timeout=max(2 * timeout, 5.0),
            name=f"keyquorum {self._where}",
        )
        self._pool.open(wait=False)

    @classmethod
    def open(
        cls,
        dsn: str,
        *,
        min_connections: int = 1,
        max_connections: int = 8,
        timeout: float = DEFAULT_TIMEOUT_S,
        poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    ) -> PostgresStore:
        """Open (and create or migrate) the store in the database `dsn` names."""
        return cls(
            dsn,
            min_connections=min_connections,
            max_connections=max_connections,
            timeout=timeout,
            poll_interval=poll_interval,
        )

    # -- opening ---------------------------------------------------------

    def _configure(self, conn: _Conn) -> None:
        """Run on every new connection: pin the isolation level, check durability."""
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        row = conn.execute(_DURABILITY_SQL).fetchone()
        if row is None:
            raise StorageError("PostgreSQL returned no settings")
        try:
            self._check_durability(str(row[0]), str(row[1]), str(row[2]))
        except StorageError as e:
            self._refused = str(e)
            raise
        self._refused = None

    def _check_durability(self, fsync: str, synchronous_commit: str, full_pages: str) -> None:
        problem = None
        if fsync != "on":
            problem = f"fsync is {fsync}"
        elif synchronous_commit not in _SAFE_SYNCHRONOUS_COMMIT:
            problem = f"synchronous_commit is {synchronous_commit}"
        elif full_pages != "on":
            problem = f"full_page_writes is {full_pages}"
        if problem is not None:
            raise StorageError(
                f"PostgreSQL at {self._where} runs with {problem}: a crash could lose or "
                "corrupt acknowledged log entries, so keyquorum refuses to use it (needs "
                "fsync=on, synchronous_commit=on/remote_write/remote_apply, full_page_writes=on)"
            )

    def _migrate(self, conn: _Conn) -> None:
        with conn.transaction():
            # Replicas starting together: one migrates, the others wait and
            # then find the work done.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            version = self._read_schema_version(conn)
            if version > SCHEMA_VERSION:
                raise UnsupportedVersionError(
                    f"the database at {self._where} has schema version {version}, newer than "
                    f"this build understands ({SCHEMA_VERSION}); upgrade keyquorum to open it"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1]:
                    conn.execute(statement.encode())
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (store.SCHEMA_VERSION_KEY, str(target)),
                )

    def _read_schema_version(self, conn: _Conn) -> int:
        exists = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        if exists is None or not exists[0]:
            return 0
        row = conn.execute(
            "SELECT value FROM meta WHERE key = %s", (store.SCHEMA_VERSION_KEY,)
        ).fetchone()
        if row is None:
            raise StorageError(
                f"the database at {self._where} has a meta table but no schema_version"
            )
        try:
            return int(row[0])
        except ValueError as e:
            raise StorageError(f"schema_version {row[0]!r} is not a number") from e

    # -- running statements ----------------------------------------------

    def _usable(self) -> None:
        if self._closed:
            raise StorageError("the store is closed")

    def _unavailable_error(self, e: Exception) -> StorageError:
        if isinstance(e, PoolTimeout):
            detail = self._refused or "is PostgreSQL running and reachable?"
            message = (
                f"PostgreSQL at {self._where} is unavailable: no working connection "
                f"within {self._timeout:g} s ({detail})"
            )
        else:
            message = f"PostgreSQL at {self._where} is unavailable: {e}"
        if not self._unavailable:
            self._unavailable = True
            _log.warning("%s", message)
        return StorageError(message)

    def _available(self) -> None:
        if self._unavailable:
            self._unavailable = False
            _log.warning("PostgreSQL at %s is available again", self._where)

    def _run(self, body: Callable[[_Conn], _T], *, write: bool) -> _T:
        """Run `body` on a pooled connection, in one transaction when `write`.

        Typed errors raised by `body` roll back and pass through. Integrity
        violations become `StateError`, values PostgreSQL cannot hold
        `InvalidInputError`, everything else `StorageError`.
        """
        self._usable()
        try:
            with self._pool.connection() as conn:
                result = self._transaction(conn, body) if write else body(conn)
        except _CommitUnknownError as e:
            cause = e.__cause__ if isinstance(e.__cause__, Exception) else e
            raise StorageError(
                f"the connection to PostgreSQL at {self._where} failed during COMMIT, so "
                f"the write may or may not have been committed; re-read before deciding "
                f"again ({cause})"
            ) from cause
        except pg_errors.IntegrityError as e:
            raise StateError(f"the store refused the write: {e.diag.message_primary}") from e
        except pg_errors.DataError as e:
            raise InvalidInputError(f"PostgreSQL refused a value: {e.diag.message_primary}") from e
        except (PoolTimeout, psycopg.OperationalError) as e:
            raise self._unavailable_error(e) from e
        except psycopg.Error as e:
            raise StorageError(f"PostgreSQL at {self._where}: {e}") from e
        self._available()
        return result

    @staticmethod
    def _transaction(conn: _Conn, body: Callable[[_Conn], _T]) -> _T:
        committing = False
        try:
            with conn.transaction():
                result = body(conn)
                committing = True  # leaving the block sends COMMIT
        except psycopg.OperationalError as e:
            if committing:
                raise _CommitUnknownError from e
            raise
        return result

    # -- log -------------------------------------------------------------

    @staticmethod
    def _size(conn: _Conn) -> int:
        row = conn.execute("SELECT size FROM log_head").fetchone()
        if row is None:
            raise StorageError("the log head row is missing")
        return int(row[0])

    def size(self) -> int:
        return self._run(self._size, write=False)

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
        _check_no_nul("checkpoint note", checkpoint)

        def body(conn: _Conn) -> None:
            # 1. Lock the head: appenders queue here, one at a time.
            row = conn.execute(_LOCK_HEAD_SQL).fetchone()
            if row is None:
                raise StorageError("the log head row is missing")
            actual, head_hash = int(row[0]), bytes(row[1])
            # 2. Durability as it is now, not as it was at connect.
            self._check_durability(str(row[2]), str(row[3]), str(row[4]))
            # 3. The size the caller decided on.
            if actual != expected_size:
                raise AppendConflictError(
                    f"log size is {actual}, the append expected {expected_size}",
                    expected_size=expected_size,
                    actual_size=actual,
                )
            # 4. Salts are write-once.
            if shred_salts:
                taken = conn.execute(
                    "SELECT s.tenant, s.version FROM shred_salts s "
                    "JOIN unnest(%s::text[], %s::integer[]) AS n (tenant, version) "
                    "USING (tenant, version) LIMIT 1",
                    ([t for t, _, _ in shred_salts], [v for _, v, _ in shred_salts]),
                ).fetchone()
                if taken is not None:
                    raise StateError(f"a shred salt for {taken[0]!r} version {taken[1]} exists")
            if replace_salts:
                held = conn.execute(
                    "SELECT count(*) FROM shred_salts s "
                    "JOIN unnest(%s::text[], %s::integer[]) AS n (tenant, version) "
                    "USING (tenant, version)",
                    ([t for t, _, _ in replace_salts], [v for _, v, _ in replace_salts]),
                ).fetchone()
                if held is None or int(held[0]) != len(replace_salts):
                    raise StateError("a salt to replace is not stored")
            # 5. Rows chained to the head; the trigger checks seq and chain again.
            prevs = [head_hash, *(hashed for _, hashed, _ in entries[:-1])]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO log_entries (seq, leaf_hash, prev_leaf_hash, entry) "
                    "VALUES (%s, %s, %s, %s)",
                    [
                        (seq, hashed, prev, raw)
                        for (seq, hashed, raw), prev in zip(entries, prevs, strict=True)
                    ],
                )
                # The new log size, vouched for in the same transaction (the
                # deferred trigger checks it is there at COMMIT).
                cur.execute(
                    "INSERT INTO checkpoints (size, note) VALUES (%s, %s)",
                    (expected_size + len(entries), checkpoint),
                )
                if shred_salts:
                    cur.executemany(
                        "INSERT INTO shred_salts (tenant, version, salt) VALUES (%s, %s, %s)",
                        list(shred_salts),
                    )
                if replace_salts:
                    cur.executemany(
                        "DELETE FROM shred_salts WHERE tenant = %s AND version = %s",
                        [(t, v) for t, v, _ in replace_salts],
                    )
                    cur.executemany(
                        "INSERT INTO shred_salts (tenant, version, salt) VALUES (%s, %s, %s)",
                        list(replace_salts),
                    )
                if erase_tenants:
                    cur.execute(
                        "DELETE FROM shred_salts WHERE tenant = ANY(%s::text[])",
                        (list(erase_tenants),),
                    )
            # 6. Followers hear of it at COMMIT, and only if it commits.
            conn.execute(
                "SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(expected_size + len(entries)))
            )

        self._run(body, write=True)

    def head(self) -> store.Head:
        def body(conn: _Conn) -> store.Head:
            # One statement, one snapshot: an append commits its entries and
            # its checkpoint together, so both are seen or neither.
            row = conn.execute(
                "SELECT h.size, c.size, c.note FROM log_head h LEFT JOIN LATERAL "
                "(SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1) c ON true"
            ).fetchone()
            if row is None:
                raise StorageError("the log head row is missing")
            latest = None if row[1] is None else (int(row[1]), str(row[2]))
            return int(row[0]), latest

        return self._run(body, write=False)

    def read(self, start: int, end: int) -> list[bytes]:
        def body(conn: _Conn) -> list[bytes]:
            store.check_range(start, end, self._size(conn))
            rows = conn.execute(
                "SELECT seq, entry FROM log_entries WHERE seq >= %s AND seq < %s ORDER BY seq",
                (start, end),
            ).fetchall()
            return _contiguous(rows, start, end)

        return self._run(body, write=False)

    def read_all(self) -> Iterator[bytes]:
        end = self.size()
        for start in range(0, end, store.READ_BATCH):
            yield from self.read(start, min(start + store.READ_BATCH, end))

    def leaf_hashes(self) -> list[bytes]:
        def body(conn: _Conn) -> list[bytes]:
            rows = conn.execute("SELECT seq, leaf_hash FROM log_entries ORDER BY seq").fetchall()
            return _contiguous(rows, 0, len(rows))

        return self._run(body, write=False)

    def wait_for_append(self, after_size: int, timeout: float) -> int:
        """Block until the log is longer than `after_size` or `timeout` seconds pass.

        Returns the size read last (greater than `after_size` unless the time
        ran out). Woken by NOTIFY; re-reads the size at least every
        `poll_interval` seconds whatever happens to notifications, so this
        is the follower's bound when they are lost. One waiter at a time.
        """
        store.check_size("after_size", after_size)
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
            raise InvalidInputError(f"timeout must be non-negative seconds, got {timeout!r}")
        deadline = time.monotonic() + timeout
        with self._listen_lock:
            while True:
                # Listen first, then read: an append between the two still wakes us.
                listener = self._listening()
                size = self.size()
                remaining = deadline - time.monotonic()
                if size > after_size or remaining <= 0:
                    return size
                pause = min(remaining, self._poll_interval)
                if listener is None:
                    time.sleep(pause)
                    continue
                try:
                    for _ in listener.notifies(timeout=pause, stop_after=1):
                        pass
                except psycopg.Error as e:
                    _log.warning("lost the LISTEN connection (%s); polling until it is back", e)
                    self._drop_listener()

    def _listening(self) -> _Conn | None:
        """The LISTEN connection, (re)made on demand; None while that fails."""
        if self._listener is not None and not self._listener.closed:
            return self._listener
        try:
            conn = psycopg.connect(self._dsn, **self._connect_kwargs)  # type: ignore[arg-type]
            conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        except psycopg.Error as e:
            _log.warning("cannot LISTEN at %s (%s); polling instead", self._where, e)
            return None
        self._listener = conn
        return conn

    def _drop_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- checkpoints -----------------------------------------------------

    def put_checkpoint(self, size: int, note_text: str) -> None:
        """Replace the note of an appended checkpoint (the same checkpoint with
        cosignatures added); a checkpoint is never added apart from its entries."""
        store.check_checkpoint(size, note_text)
        _check_no_nul("checkpoint note", note_text)

        def body(conn: _Conn) -> None:
            row = conn.execute("SELECT size FROM log_head").fetchone()
            log_size = 0 if row is None else int(row[0])
            if size > log_size:
                raise InvalidInputError(f"checkpoint size is beyond the log: {size} > {log_size}")
            updated = conn.execute(
                "UPDATE checkpoints SET note = %s WHERE size = %s", (note_text, size)
            ).rowcount
            if updated != 1:
                raise StateError(
                    f"no checkpoint of size {size} is stored: checkpoints are written with "
                    "the entries they cover"
                )

        self._run(body, write=True)

    def checkpoint_at(self, size: int) -> str | None:
        store.check_size("checkpoint size", size)

        def body(conn: _Conn) -> str | None:
            row = conn.execute("SELECT note FROM checkpoints WHERE size = %s", (size,)).fetchone()
            return None if row is None else str(row[0])

        return self._run(body, write=False)

    def latest_checkpoint(self) -> tuple[int, str] | None:
        def body(conn: _Conn) -> tuple[int, str] | None:
            row = conn.execute(
                "SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
            return None if row is None else (int(row[0]), str(row[1]))

        return self._run(body, write=False)

    def checkpoints(self) -> list[tuple[int, str]]:
        def body(conn: _Conn) -> list[tuple[int, str]]:
            rows = conn.execute("SELECT size, note FROM checkpoints ORDER BY size").fetchall()
            return [(int(size), str(note)) for size, note in rows]

        return self._run(body, write=False)

    # -- shred salts -----------------------------------------------------

    def put_shred_salt(self, tenant: str, version: int, salt: bytes) -> None:
        store.check_salt(tenant, version, salt)

        def body(conn: _Conn) -> None:
            cur = conn.execute(
                "INSERT INTO shred_salts (tenant, version, salt) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (tenant, version, salt),
            )
            if cur.rowcount != 1:
                raise StateError(f"a shred salt for {tenant!r} version {version} exists")

        self._run(body, write=True)

    def get_shred_salt(self, tenant: str, version: int) -> bytes | None:
        store.check_tenant(tenant)
        store.check_version(version)

        def body(conn: _Conn) -> bytes | None:
            row = conn.execute(
                "SELECT salt FROM shred_salts WHERE tenant = %s AND version = %s",
                (tenant, version),
            ).fetchone()
            return None if row is None else bytes(row[0])

        return self._run(body, write=False)

    def erase_shred_salts(self, tenant: str) -> int:
        """Delete the tenant's salts; see the module docstring for what stays on disk."""
        store.check_tenant(tenant)

        def body(conn: _Conn) -> int:
            return conn.execute("DELETE FROM shred_salts WHERE tenant = %s", (tenant,)).rowcount

        return self._run(body, write=True)

    # -- counters --------------------------------------------------------

    def reserve_block(self, counter: str, block: int, limit: int) -> tuple[int, int]:
        store.check_reserve(counter, block, limit)

        def body(conn: _Conn) -> tuple[int, int]:
            # The row lock queues reservations of one counter across replicas.
            conn.execute(
                "INSERT INTO counters (name, next) VALUES (%s, 0) ON CONFLICT DO NOTHING",
                (counter,),
            )
            row = conn.execute(
                "SELECT next FROM counters WHERE name = %s FOR UPDATE", (counter,)
            ).fetchone()
            if row is None:
                raise StorageError(f"counter {counter} vanished inside its transaction")
            start = int(row[0])
            end = store.next_block(counter, start, block, limit)
            conn.execute("UPDATE counters SET next = %s WHERE name = %s", (end, counter))
            return start, end

        return self._run(body, write=True)

    def counters(self) -> dict[str, int]:
        def body(conn: _Conn) -> dict[str, int]:
            rows = conn.execute("SELECT name, next FROM counters ORDER BY name").fetchall()
            return {str(name): int(value) for name, value in rows}

        return self._run(body, write=False)

    # -- meta ------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        store.check_meta(key)

        def body(conn: _Conn) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
            return None if row is None else str(row[0])

        return self._run(body, write=False)

    def set_meta(self, key: str, value: str) -> None:
        store.check_meta(key, value)
        _check_no_nul("meta value", value)
        if key == store.SCHEMA_VERSION_KEY:
            raise InvalidInputError("schema_version is written by migrations only")

        def body(conn: _Conn) -> None:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

        self._run(body, write=True)

    def schema_version(self) -> int:
        return self._run(self._read_schema_version, write=False)

    # -- life cycle ------------------------------------------------------

    def durability_settings(self) -> dict[str, str]:
        """The settings in force on the store's sessions, read back from PostgreSQL."""

        def body(conn: _Conn) -> dict[str, str]:
            row = conn.execute(_DURABILITY_SQL).fetchone()
            if row is None:
                raise StorageError("PostgreSQL returned no settings")
            return {
                "fsync": str(row[0]),
                "synchronous_commit": str(row[1]),
                "full_page_writes": str(row[2]),
            }

        return self._run(body, write=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._listen_lock:
            self._drop_listener()
        self._pool.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PostgresStore {self._where}>"


def _check_no_nul(name: str, value: str) -> None:
    """PostgreSQL text cannot hold NUL; refuse it as input, not as a server error."""
    if "\x00" in value:
        raise InvalidInputError(f"{name} must not contain NUL")


def _contiguous(rows: list[TupleRow], start: int, end: int) -> list[bytes]:
    """The blobs of `rows`, checked to be exactly seq start..end-1 in order.

    The trigger makes a gap impossible through PostgreSQL; an administrator
    who dropped it could still make one, and a short read would hide it.
    """
    out: list[bytes] = []
    for want, (seq, blob) in enumerate(rows, start):
        if seq != want:
            raise StorageError(f"the stored log has a gap: seq {want} missing, found {seq}")
        out.append(bytes(blob))
    if len(out) != end - start:
        raise StorageError(f"the stored log has a gap: read {len(out)} of {end - start} entries")
    return out
