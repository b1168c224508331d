"""Throw-away PostgreSQL servers for tests and benchmarks, and their pytest fixtures.

Where the server comes from, in order (DESIGN.md, "Storage"):

1. `KEYQUORUM_TEST_PG_DSN`: an existing server. The role must be allowed
   to CREATE DATABASE: the session makes one test database, every test a
   fresh schema in it (its store's tables land there through search_path),
   and both are dropped afterwards.
2. The PostgreSQL binaries (`/usr/lib/postgresql/<version>/bin` or
   `pg_ctl` on PATH): `initdb` a cluster in a temporary directory and run
   it on a free loopback port for the whole session. PostgreSQL refuses to
   run as root, so as root the directory is given to the `postgres` user
   and every command runs through `runuser -u postgres --`.
3. Neither: the tests that need PostgreSQL skip, saying why, unless
   `KEYQUORUM_REQUIRE_PG=1` (CI), where a missing PostgreSQL fails them.

Tests that stop, restart or reconfigure the server (`pg_cluster`) always
use a cluster of their own making: with `KEYQUORUM_TEST_PG_DSN` they start
one from the binaries, since nobody should restart a server they were
lent. The clusters run with the durability settings the store demands
(fsync, synchronous_commit, full_page_writes on); nothing here trades
safety for speed, so a test can never pass only because durability is off.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

DSN_ENV = "KEYQUORUM_TEST_PG_DSN"
REQUIRE_ENV = "KEYQUORUM_REQUIRE_PG"
START_TIMEOUT_S = 60
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_NEEDED = ("initdb", "pg_ctl", "postgres")
_names = itertools.count()


class PostgresUnavailableError(Exception):
    """No PostgreSQL server and no binaries to start one."""


def find_bindir() -> Path | None:
    """The newest directory holding initdb, pg_ctl and postgres, or None."""
    candidates: list[Path] = []
    if _DEBIAN_ROOT.is_dir():

        def version(p: Path) -> tuple[int, ...]:
            digits = p.parent.name.split(".")
            return tuple(int(d) for d in digits if d.isdigit())

        candidates += sorted(_DEBIAN_ROOT.glob("*/bin"), key=version, reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _NEEDED):
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgServer:
    """A server tests may create databases and schemas on."""

    controllable = False

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self._test_database: str | None = None

    def dsn(self, dbname: str, *, schema: str | None = None) -> str:
        """The admin DSN pointed at another database (keeps host, user, password),
        with `schema` first on the search_path when given."""
        params = {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(self.admin_dsn).items()}
        params["dbname"] = dbname
        if schema is not None:
            params["options"] = f"-c search_path={schema}"
        return psycopg.conninfo.make_conninfo(**params)

    def create_database(self, prefix: str = "kq_test") -> tuple[str, str]:
        """A fresh, empty database: (name, dsn). About 0.1-0.3 s; schemas are faster."""
        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name, self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a test database, disconnecting whatever a failed test left open."""
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def create_schema(self, prefix: str = "kq_test") -> tuple[str, str]:
        """A fresh, empty schema in the session's test database: (name, dsn).

        A store opened on the dsn puts its tables there (search_path), so each
        test gets its own store in about a millisecond instead of a database.
        """
        if self._test_database is None:
            self._test_database, _ = self.create_database("kq_tests")
        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        dsn = self.dsn(self._test_database)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        return name, self.dsn(self._test_database, schema=name)

    def clone_schema(self, source: str) -> tuple[str, str]:
        """A new schema holding a copy of the store in `source`: (name, dsn).

        What restoring the database from a snapshot (or serving a copy of it
        from a second daemon) looks like: the store's tables are created by
        opening a store there, then every row is copied in one transaction,
        log entries in seq order, so the store's own triggers accept them.
        """
        from keyquorum.hsm.stores.postgres import PostgresStore

        name, dsn = self.create_schema("kq_clone")
        PostgresStore.open(dsn).close()
        assert self._test_database is not None
        src, dst = sql.Identifier(source), sql.Identifier(name)
        with psycopg.connect(self.dsn(self._test_database)) as conn, conn.transaction():
            for statement in (
                "INSERT INTO {dst}.log_entries (seq, leaf_hash, prev_leaf_hash, entry) "
                "SELECT seq, leaf_hash, prev_leaf_hash, entry FROM {src}.log_entries ORDER BY seq",
                "INSERT INTO {dst}.checkpoints SELECT * FROM {src}.checkpoints",
                "INSERT INTO {dst}.shred_salts SELECT * FROM {src}.shred_salts",
                "INSERT INTO {dst}.counters SELECT * FROM {src}.counters",
                "INSERT INTO {dst}.meta SELECT * FROM {src}.meta WHERE key <> 'schema_version'",
            ):
                conn.execute(sql.SQL(statement).format(src=src, dst=dst))
        return name, dsn

    def schema_dsn(self, name: str) -> str:
        """The DSN of a schema this server made (create_schema, clone_schema)."""
        assert self._test_database is not None
        return self.dsn(self._test_database, schema=name)

    def drop_schema(self, name: str) -> None:
        if self._test_database is None:
            return
        with psycopg.connect(self.dsn(self._test_database), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))

    def drop_test_database(self) -> None:
        if self._test_database is not None:
            self.drop_database(self._test_database)
            self._test_database = None


class ThrowawayCluster(PgServer):
    """A cluster in a temporary directory that this process starts and stops."""

    controllable = True

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.directory = Path(tempfile.mkdtemp(prefix="keyquorum-pg-"))
        self.data = self.directory / "data"
        self.logfile = self.directory / "server.log"
        self.port = _free_port()
        self.running = False
        self.options: tuple[str, ...] = ()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.directory, user="postgres")
        self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "-D", str(self.data))
        super().__init__(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres")
        atexit.register(self.destroy)

    def _run(self, tool: str, *args: str) -> None:
        argv = [str(self.bindir / tool), *args]
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = self.logfile.read_text()[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{log}".strip()
            )

    def start(self, options: Sequence[str] = ()) -> None:
        """Start on the cluster's port; `options` are extra `-c name=value` settings."""
        settings = [f"-k {self.directory}", f"-p {self.port}", "-c listen_addresses=127.0.0.1"]
        settings += [f"-c {option}" for option in options]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.logfile),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "start",
            "-o",
            " ".join(settings),
        )
        self.running = True
        self.options = tuple(options)

    def stop(self) -> None:
        """`pg_ctl -m fast stop`: sessions are disconnected, the shutdown is clean."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            self.running = False

    def restart(self, options: Sequence[str] = ()) -> None:
        self.stop()
        self.start(options)

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _unavailable_reason() -> str:
    return (
        f"no PostgreSQL: {DSN_ENV} is not set and no initdb/pg_ctl/postgres were found "
        f"under {_DEBIAN_ROOT}/*/bin or on PATH (install postgresql, or point {DSN_ENV} "
        "at a server whose role may CREATE DATABASE)"
    )


def start_cluster() -> ThrowawayCluster:
    """Start a throw-away cluster; `PostgresUnavailableError` when there are no binaries."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailableError(_unavailable_reason())
    cluster = ThrowawayCluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.destroy()
        raise
    return cluster


@contextlib.contextmanager
def server_from_environment() -> Iterator[PgServer]:
    """The server tests and benchmarks use: `KEYQUORUM_TEST_PG_DSN` or a new cluster."""
    dsn = os.environ.get(DSN_ENV)
    if dsn:
        server = PgServer(dsn)
        try:
            yield server
        finally:
            server.drop_test_database()
        return
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _missing(reason: str) -> None:
    """Skip, or fail when CI demands PostgreSQL (`KEYQUORUM_REQUIRE_PG=1`)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this a failure", pytrace=False)
    pytest.skip(reason)


# -- pytest fixtures (registered by tests/conftest.py) -------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """The session's PostgreSQL server, started on first use."""
    if not os.environ.get(DSN_ENV) and find_bindir() is None:
        _missing(_unavailable_reason())
    with server_from_environment() as server:
        yield server


@pytest.fixture(scope="session")
def pg_cluster(pg_server: PgServer) -> Iterator[ThrowawayCluster]:
    """A cluster the test may stop, restart and reconfigure; running when handed out."""
    if isinstance(pg_server, ThrowawayCluster):
        yield pg_server
        return
    if find_bindir() is None:
        _missing(f"{DSN_ENV} names a server the tests must not restart, and no binaries exist")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


@dataclass(frozen=True)
class Restartable:
    """A fresh schema on a cluster the test may stop and reconfigure."""

    cluster: ThrowawayCluster
    dsn: str


@pytest.fixture
def pg_restartable(pg_cluster: ThrowawayCluster) -> Iterator[Restartable]:
    """A fresh schema on `pg_cluster`; afterwards the cluster runs again with
    the default settings, whatever the test left behind, and the schema goes."""
    name, dsn = pg_cluster.create_schema()
    yield Restartable(pg_cluster, dsn)
    if not pg_cluster.running or pg_cluster.options:
        pg_cluster.restart()
    pg_cluster.drop_schema(name)


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    """DSN of a fresh, empty schema on the session's server, dropped afterwards."""
    name, dsn = pg_server.create_schema()
    yield dsn
    pg_server.drop_schema(name)
