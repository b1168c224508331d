"""A throw-away PostgreSQL cluster for `keyquorum demo --store postgres`.

The same recipe the tests use (tests/pg.py, DESIGN.md "Storage"): `initdb`
in a temporary directory, `pg_ctl start` on a free loopback port with the
durability settings left at their safe defaults, `pg_ctl -m fast stop` and
removal at the end. PostgreSQL refuses to run as root, so as root the
directory is given to the `postgres` user and each tool runs through
`runuser -u postgres --`. Development only: trust authentication on
127.0.0.1, no password.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from keyquorum.quorum.errors import StateError

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_NEEDED = ("initdb", "pg_ctl", "postgres")


def _bindir() -> Path:
    candidates = sorted(_DEBIAN_ROOT.glob("*/bin"), reverse=True) if _DEBIAN_ROOT.is_dir() else []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in _NEEDED):
            return bindir
    raise StateError(
        f"the PostgreSQL demo needs initdb, pg_ctl and postgres (under {_DEBIAN_ROOT}/*/bin "
        "or on PATH); install postgresql, or run the demo with --store sqlite"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def throwaway_cluster() -> Iterator[str]:
    """Start a cluster; yield its libpq DSN; stop and delete it afterwards."""
    bindir = _bindir()
    directory = Path(tempfile.mkdtemp(prefix="keyquorum-demo-pg-"))
    as_postgres = os.geteuid() == 0
    if as_postgres:
        shutil.chown(directory, user="postgres")
    data, logfile, port = directory / "data", directory / "server.log", _free_port()

    def run(tool: str, *args: str) -> None:
        argv = [str(bindir / tool), *args]
        if as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = logfile.read_text()[-2000:] if logfile.exists() else ""
            raise StateError(f"{tool} failed: {done.stderr.strip()}\n{log}".strip())

    started = False
    try:
        run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "-D", str(data))
        options = f"-k {directory} -p {port} -c listen_addresses=127.0.0.1"
        run("pg_ctl", "-D", str(data), "-l", str(logfile), "-w", "start", "-o", options)
        started = True
        click.echo(f"PostgreSQL {bindir.parent.name} on 127.0.0.1:{port} (throw-away cluster)")
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        if started:
            run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)
