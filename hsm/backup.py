"""Snapshots of a store and restoring them (`keyquorum admin snapshot` / `admin restore`).

A snapshot is a directory (0700) holding:

- the store's copy: `store.sqlite` (SQLite's online backup API, a
  consistent copy while the daemon writes) or `store.pgdump` (pg_dump's
  custom format, taken in a REPEATABLE READ transaction whose exported
  snapshot pg_dump uses, so the dump and what this module reads of it are
  one state of the database, the documented way to take a consistent dump);
- `log.entries`: the log's entries as the copy holds them (each a u32be
  length and the bytes), so a PostgreSQL dump is checked before it is
  loaded; the entries are what `audit export` publishes anyway;
- `manifest.json` (0600): the store kind, the copy's file name and SHA-256,
  the log's size, its latest signed checkpoint note, the deployment, the
  log key in force, when it was taken.

Nothing is written unless the copy verifies: every entry replays and the
latest checkpoint is signed by the log key and covers them all (the
daemon's own start-up check). Like the store, a snapshot holds the shred
salts: restoring one taken before a tenant was shredded brings that
tenant's keys back. Keep snapshots as the store is kept, and destroy them
by the same retention rule.

Restoring (the daemon stopped: the data directory's lock is taken) checks
the snapshot whole first (manifest, digest, replay, the checkpoint signed
by this data directory's log key) and compares it with the checkpoint the
directory remembers (hsm/daemon/rollback.py):

- it extends it (or nothing is remembered): restored;
- it is another history (a fork): refused, always;
- it is behind it: refused, unless `abandon_checkpoint`; then the store is
  restored and `restore-pending` written (hsm/daemon/restoring.py): the
  daemon serves no key and logs no proposal but the `approve-restore` that
  names this restore, until k custodians approve it.

The store it replaces is kept first (`before-restore-<time>/` in the data
directory: the SQLite file, or a pg_dump of the schema), so a restore is
itself reversible.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from keyquorum.hsm.daemon import restoring, rollback
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.stores import sqlite as sqlite_store
from keyquorum.hsm.stores.base import Store
from keyquorum.quorum import evidence, merkle
from keyquorum.quorum.checkpoint import parse_verifier_key, unverified_size, verify_checkpoint
from keyquorum.quorum.errors import (
    DeserializationError,
    ForkError,
    InvalidInputError,
    LogIntegrityError,
    RollbackError,
    StateError,
    StorageError,
)
from keyquorum.quorum.log import Entry, GenesisPayload
from keyquorum.quorum.replay import LogState, verify_log

MANIFEST: Final = "manifest.json"
ENTRIES: Final = "log.entries"
COPY_FILES: Final = {"sqlite": "store.sqlite", "postgres": "store.pgdump"}
FORMAT_VERSION: Final = 1
_LENGTH: Final = struct.Struct(">I")
#: libpq's environment variable for each connection-string key pg_dump may need:
#: the DSN (and its password) never goes on a command line others can read.
_LIBPQ_ENV: Final = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "sslmode": "PGSSLMODE",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcrl": "PGSSLCRL",
    "channel_binding": "PGCHANNELBINDING",
    "gssencmode": "PGGSSENCMODE",
    "service": "PGSERVICE",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
}


@dataclass(frozen=True)
class Manifest:
    """What a snapshot holds (see the module docstring)."""

    store: str
    file: str
    sha256: str
    size: int
    checkpoint: str
    deployment: str
    log_key: str
    taken_at: int

    def to_json(self) -> dict[str, object]:
        return {"v": FORMAT_VERSION, **self.__dict__}

    @classmethod
    def from_json(cls, data: object, where: Path) -> Manifest:
        fields = ("store", "file", "sha256", "size", "checkpoint", "deployment", "log_key")
        if not isinstance(data, dict) or data.get("v") != FORMAT_VERSION:
            raise DeserializationError(f"{where} is not a keyquorum snapshot manifest (v1)")
        try:
            manifest = cls(**{k: data[k] for k in (*fields, "taken_at")})
        except (KeyError, TypeError) as e:
            raise DeserializationError(f"{where}: a field is missing or wrong ({e})") from None
        if manifest.store not in COPY_FILES or manifest.file != COPY_FILES[manifest.store]:
            raise DeserializationError(f"{where}: unknown store {manifest.store!r}")
        return manifest


@dataclass(frozen=True)
class VerifiedLog:
    """A log that replays and that its latest signed checkpoint covers exactly."""

    state: LogState
    tree: merkle.MerkleTree
    checkpoint: str
    entries: list[bytes]

    @property
    def size(self) -> int:
        return self.tree.size


def verify_entries(entries: list[bytes], note: str | None) -> VerifiedLog:
    """Replay `entries` and check that `note` (the latest checkpoint) covers exactly them."""
    if not entries:
        raise StateError("the store holds no log yet: nothing to snapshot or restore")
    if note is None or unverified_size(note) != len(entries):
        raise LogIntegrityError(
            f"the store's latest checkpoint does not cover its {len(entries)} entries",
            seq=len(entries) - 1,
        )
    genesis = Entry.from_bytes(entries[0])
    if not isinstance(genesis.payload, GenesisPayload):
        raise LogIntegrityError("the first entry is not the genesis", seq=0)
    state = verify_log(entries, note, genesis.payload.log_key)
    tree = merkle.MerkleTree()
    for raw in entries:
        tree.append(merkle.leaf_hash(raw))
    return VerifiedLog(state, tree, note, entries)


def verify_store(store: Store) -> VerifiedLog:
    size, latest = store.head()
    return verify_entries(
        store.read(0, size) if size else [], None if latest is None else latest[1]
    )


# -- snapshot ----------------------------------------------------------------------------


def snapshot_sqlite(database: Path, out: Path, *, now: int) -> Manifest:
    """A consistent copy of a (running) SQLite store into the new directory `out`."""
    if not database.is_file():
        raise StorageError(f"no SQLite store at {database}")
    _new_directory(out)
    copy = out / COPY_FILES["sqlite"]
    try:
        source = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        try:
            target = sqlite3.connect(copy)
            try:
                source.backup(target)
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as e:
        raise StorageError(f"cannot copy {database}: {e}") from e
    copied = sqlite_store.SqliteStore.open(copy)
    try:
        verified = verify_store(copied)
    finally:
        copied.close()
    return _finish(out, "sqlite", verified, now)


def snapshot_postgres(dsn: str, out: Path, *, now: int) -> Manifest:
    """pg_dump of the store's schema, and its log read in the same database snapshot."""
    import psycopg

    _new_directory(out)
    dump = out / COPY_FILES["postgres"]
    try:
        with psycopg.connect(dsn, autocommit=False) as conn:
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            exported = _one(conn.execute("SELECT pg_export_snapshot()").fetchone())
            schema = _one(conn.execute("SELECT current_schema()").fetchone())
            _pg_tool(
                "pg_dump",
                [
                    "--format=custom",
                    f"--snapshot={exported}",
                    f"--schema={schema}",
                    f"--file={dump}",
                ],
                dsn,
            )
            rows = conn.execute("SELECT entry FROM log_entries ORDER BY seq").fetchall()
            latest = conn.execute(
                "SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1"
            ).fetchone()
    except psycopg.Error as e:
        raise StorageError(f"cannot snapshot the PostgreSQL store: {e}") from e
    verified = verify_entries([bytes(r[0]) for r in rows], None if latest is None else latest[0])
    return _finish(out, "postgres", verified, now)


def _finish(out: Path, kind: str, verified: VerifiedLog, now: int) -> Manifest:
    copy = out / COPY_FILES[kind]
    copy.chmod(0o600)
    _write_private(out / ENTRIES, _encode_entries(verified.entries))
    manifest = Manifest(
        store=kind,
        file=copy.name,
        sha256=_sha256(copy),
        size=verified.size,
        checkpoint=verified.checkpoint,
        deployment=verified.state.deployment,
        log_key=verified.state.log_key,
        taken_at=now,
    )
    _write_private(out / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode())
    return manifest


# -- restore -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What `restore` did."""

    manifest: Manifest
    #: Where the store it replaced was kept (None: there was none).
    kept: Path | None
    #: Set when the restore went behind the remembered checkpoint (awaiting the quorum).
    pending: restoring.PendingRestore | None


def read_snapshot(folder: Path) -> tuple[Manifest, VerifiedLog]:
    """The manifest, its copy's digest checked, and the log it holds verified."""
    path = folder / MANIFEST
    try:
        manifest = Manifest.from_json(json.loads(path.read_bytes()), path)
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from e
    except ValueError as e:
        raise DeserializationError(f"{path} is not JSON") from e
    copy = folder / manifest.file
    if not copy.is_file():
        raise StorageError(f"{copy} is missing")
    if _sha256(copy) != manifest.sha256:
        raise LogIntegrityError(f"{copy} does not have the SHA-256 its manifest records")
    try:
        entries = _decode_entries((folder / ENTRIES).read_bytes())
    except OSError as e:
        raise StorageError(f"cannot read {folder / ENTRIES}: {e.strerror}") from e
    verified = verify_entries(entries, manifest.checkpoint)
    if verified.state.deployment != manifest.deployment or verified.size != manifest.size:
        raise LogIntegrityError(f"{path} does not describe the log the snapshot holds")
    return manifest, verified


def plan_restore(
    data_dir: Path, verified: VerifiedLog, *, abandon_checkpoint: bool
) -> restoring.PendingRestore | None:
    """Whether the snapshot may replace the store (None: it extends what was published).

    Raises `RollbackError` for a snapshot behind the remembered checkpoint
    (unless `abandon_checkpoint`: the pending restore to write), `ForkError`
    for another history, `VerificationError` for another log key.
    """
    key = LogKey.load(data_dir)
    if verified.state.log_key != key.vkey:
        raise InvalidInputError(
            f"the snapshot's log key in force is {verified.state.log_key}, this data directory's "
            f"is {key.vkey} ({key.path}): a snapshot of another deployment, or from before a "
            "log key rotation (restore it with the key file of its time)"
        )
    remembered = rollback.load(data_dir)
    if remembered is None:
        if abandon_checkpoint:
            raise InvalidInputError("no checkpoint is remembered here: there is none to abandon")
        return None
    seen = verify_checkpoint(remembered, parse_verifier_key(key.vkey)).checkpoint
    where = rollback.path_in(data_dir)
    if seen.size <= verified.size:
        try:
            evidence.require_tree_extends(
                remembered, verified.tree, verified.checkpoint, parse_verifier_key(key.vkey)
            )
        except (RollbackError, ForkError) as e:
            raise ForkError(
                f"the snapshot is another history than the checkpoint of {seen.size} entries "
                f"this data directory remembers ({where}): refused ({e})",
                size=seen.size,
                evidence=(remembered, verified.checkpoint),
            ) from e
        if abandon_checkpoint:
            raise InvalidInputError(
                f"the snapshot extends the remembered checkpoint ({seen.size} entries): "
                "nothing to abandon; restore without --abandon-checkpoint"
            )
        return None
    # Behind: a shorter snapshot cannot be proven a prefix of the remembered
    # checkpoint's tree (that tree is gone); the custodians judge it.
    pending = restoring.PendingRestore(verified.size, remembered)
    if not abandon_checkpoint:
        parameters = " ".join(f"--param {k}={v}" for k, v in pending.parameters().items())
        raise RollbackError(
            f"the snapshot holds {verified.size} entries, but this data directory remembers a "
            f"published checkpoint of {seen.size} ({where}): restoring it would undo "
            f"{seen.size - verified.size} entr{'y' if seen.size - verified.size == 1 else 'ies'} "
            "that custodians and auditors may have seen. "
            "If no newer copy exists, restore with --abandon-checkpoint: the daemon then "
            "serves no key until k custodians approve going back (keyquorum proposal new "
            f"approve-restore {parameters})",
            evidence=(remembered, verified.checkpoint),
        )
    return pending


def restore_sqlite(data_dir: Path, folder: Path, *, abandon_checkpoint: bool, now: int) -> Restored:
    """Put a SQLite snapshot back as the data directory's store (its lock held by the caller)."""
    manifest, verified = read_snapshot(folder)
    if manifest.store != "sqlite":
        raise InvalidInputError(f"{folder} is a {manifest.store} snapshot; restore it there")
    pending = plan_restore(data_dir, verified, abandon_checkpoint=abandon_checkpoint)
    live = data_dir / sqlite_store.FILE_NAME
    incoming = data_dir / (sqlite_store.FILE_NAME + ".restoring")
    _remove_sqlite(incoming)
    shutil.copyfile(folder / manifest.file, incoming)
    incoming.chmod(0o600)
    store = sqlite_store.SqliteStore.open(incoming)
    try:
        again = verify_store(store)
    finally:
        store.close()
    if again.checkpoint != verified.checkpoint:
        _remove_sqlite(incoming)
        raise LogIntegrityError(
            f"{folder / manifest.file} does not hold the log its manifest names"
        )
    kept = None
    if live.exists():
        kept = _keep_dir(data_dir, now)
        _checkpoint_wal(live)
        for suffix in ("", "-wal", "-shm"):
            old = live.with_name(live.name + suffix)
            if old.exists():
                old.rename(kept / old.name)
    incoming.replace(live)
    _sync_folder(data_dir)
    _remember(data_dir, verified.checkpoint, pending)
    return Restored(manifest, kept, pending)


def restore_postgres(
    data_dir: Path, folder: Path, dsn: str, *, abandon_checkpoint: bool, now: int
) -> Restored:
    """pg_restore a snapshot into the DSN's schema (the data directory's lock held)."""
    from keyquorum.hsm.stores.postgres import PostgresStore

    manifest, verified = read_snapshot(folder)
    if manifest.store != "postgres":
        raise InvalidInputError(f"{folder} is a {manifest.store} snapshot; restore it there")
    pending = plan_restore(data_dir, verified, abandon_checkpoint=abandon_checkpoint)
    kept = _keep_dir(data_dir, now)
    schema = _current_schema(dsn)
    _pg_tool(
        "pg_dump",
        ["--format=custom", f"--schema={schema}", f"--file={kept / COPY_FILES['postgres']}"],
        dsn,
    )
    _pg_tool(
        "pg_restore",
        [
            "--clean",
            "--if-exists",
            "--single-transaction",
            "--exit-on-error",
            "--no-owner",
            "--no-privileges",
            str(folder / manifest.file),
        ],
        dsn,
        database_flag=True,
    )
    store = PostgresStore.open(dsn, min_connections=1, max_connections=1)
    try:
        again = verify_store(store)
    finally:
        store.close()
    if again.checkpoint != verified.checkpoint:
        raise LogIntegrityError(
            f"the restored database does not hold the log {folder / MANIFEST} names; the "
            f"store it replaced is in {kept}"
        )
    _remember(data_dir, verified.checkpoint, pending)
    return Restored(manifest, kept, pending)


def _remember(data_dir: Path, note: str, pending: restoring.PendingRestore | None) -> None:
    """The pending restore first, then the checkpoint: a crash between leaves it pending."""
    if pending is not None:
        restoring.save(data_dir, pending)
    rollback.save(data_dir, note)


# -- helpers -----------------------------------------------------------------------------


def _pg_tool(tool: str, arguments: list[str], dsn: str, *, database_flag: bool = False) -> None:
    """Run pg_dump or pg_restore against `dsn`, passed through libpq's environment."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    path = shutil.which(tool)
    if path is None:
        raise StorageError(f"{tool} is not installed (PostgreSQL's client tools are needed)")
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as e:
        raise InvalidInputError(f"the DSN is not a libpq connection string ({e})") from None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    for key, value in params.items():
        if key not in _LIBPQ_ENV:
            raise InvalidInputError(f"the DSN sets {key!r}, which {tool} cannot be given here")
        env[_LIBPQ_ENV[key]] = str(value)
    command = [path, *arguments]
    if database_flag:
        # pg_restore without --dbname prints SQL instead of restoring.
        database = env.get("PGDATABASE") or env.get("PGUSER") or getpass.getuser()
        command.insert(1, f"--dbname={database}")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise StorageError(f"{tool} failed (exit {done.returncode}): {last}")


def _current_schema(dsn: str) -> str:
    import psycopg

    try:
        with psycopg.connect(dsn) as conn:
            return _one(conn.execute("SELECT current_schema()").fetchone())
    except psycopg.Error as e:
        raise StorageError(f"cannot reach the PostgreSQL store: {e}") from e


def _one(row: tuple[object, ...] | None) -> str:
    if row is None:
        raise StorageError("PostgreSQL returned no row")
    return str(row[0])


def _new_directory(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInputError(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    out.chmod(0o700)


def _keep_dir(data_dir: Path, now: int) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    kept = data_dir / f"before-restore-{stamp}"
    n = 1
    while kept.exists():
        n += 1
        kept = data_dir / f"before-restore-{stamp}-{n}"
    kept.mkdir(mode=0o700)
    return kept


def _checkpoint_wal(database: Path) -> None:
    """Fold a WAL left by a daemon that crashed into its database, before it is moved."""
    try:
        conn = sqlite3.connect(database, timeout=30)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise StorageError(f"cannot checkpoint {database} before replacing it: {e}") from e


def _remove_sqlite(database: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        database.with_name(database.name + suffix).unlink(missing_ok=True)


def _encode_entries(entries: Iterable[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(raw)) + raw for raw in entries)


def _decode_entries(data: bytes) -> list[bytes]:
    entries, at = [], 0
    while at < len(data):
        if at + _LENGTH.size > len(data):
            raise DeserializationError("the snapshot's log.entries is cut short")
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + length > len(data):
            raise DeserializationError("the snapshot's log.entries is cut short")
        entries.append(data[at : at + length])
        at += length
    return entries


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
