"""`keyquorum admin`: operator tools that hold no key and approve nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from keyquorum.hsm.pki import CA_DAYS, LEAF_DAYS, ROLES, URI_SCHEME, make_dev_pki


@click.group()
def admin() -> None:
    """Operator tools: development PKI, the log key's next key, snapshot and restore."""


_DEV_PKI_HELP = f"""Make a development CA, a server certificate and client certificates.

For development, tests and the demo only: the keys are unencrypted files.
ECDSA P-256; the CA is valid {CA_DAYS} days, the other certificates
{LEAF_DAYS} days. A client's identity is the URI {URI_SCHEME}://ROLE/NAME in
its certificate (subject alternative name); grants name that URI.

\b
Examples:
  keyquorum admin dev-pki --out ./pki
  keyquorum admin dev-pki --out ./pki --server-name hsm.internal \\
      --client backend/booking --client auditor/alice
"""


@admin.command("dev-pki", help=_DEV_PKI_HELP)
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write into (created 0700; existing files are never overwritten).",
)
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    metavar="NAME",
    help="Extra DNS name or IP address of the server (repeatable); "
    "localhost, 127.0.0.1 and ::1 are always included.",
)
@click.option(
    "--client",
    "clients",
    multiple=True,
    metavar="ROLE/NAME",
    help=f"Client certificate to issue (repeatable); ROLE is one of {', '.join(ROLES)}.",
)
def dev_pki(out: Path, server_names: tuple[str, ...], clients: tuple[str, ...]) -> None:
    """Make a development CA, a server certificate and client certificates."""
    pki = make_dev_pki(out, server_names=server_names, clients=clients)
    click.echo(f"wrote a development PKI to {pki.directory}:")
    click.echo(f"  CA certificate      {pki.ca_cert}")
    click.echo(f"  CA private key      {pki.ca_key}  (0600)")
    click.echo(f"  server certificate  {pki.server_cert}  ({', '.join(pki.server_names)})")
    click.echo(f"  server private key  {pki.server_key}  (0600)")
    for c in pki.clients:
        click.echo(f"  client {c.identity.uri}")
        click.echo(f"    certificate       {c.cert}")
        click.echo(f"    private key       {c.key}  (0600)")
    click.echo("Development only: keep the CA key away from anything real.")


@admin.group("log-key")
def log_key() -> None:
    """The log's signing key: make the next one for a rotate-log-key proposal."""


@log_key.command("next")
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The daemon's data directory (it holds log-signing-key).",
)
def log_key_next(data_dir: Path) -> None:
    """Make the key a rotation will put in force; print its verifier key.

    Writes log-signing-key.next (mode 0600) beside the key in force. Propose
    the rotation with the printed key; the custodians approve it (k of
    them); the daemon that executes it signs that entry with the old key,
    the checkpoint after it with this one, and makes this file the key.
    With several replicas, copy the file into every replica's data
    directory before the rotation executes (docs/replicas.md).

    \b
    Example:
      keyquorum admin log-key next --data-dir /var/lib/keyquorum
      keyquorum proposal new rotate-log-key --param log_key='keyquorum/acme-prod+...' \\
          --credential ~/.keyquorum/alice.kqcred
    """
    from keyquorum.hsm.daemon.logkey import LogKey

    current = LogKey.load(data_dir)
    key = LogKey.create_next(data_dir, origin=current.origin)
    click.echo(key.vkey)


_STORE_OPTIONS = (
    click.option(
        "--data-dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="The daemon's data directory (its log key, its remembered checkpoint; "
        "with --store sqlite, the store).",
    ),
    click.option(
        "--store",
        type=click.Choice(["sqlite", "postgres"]),
        default="sqlite",
        show_default=True,
        help="The daemon's store, as `server run --store`.",
    ),
    click.option(
        "--dsn",
        envvar="KEYQUORUM_DSN",
        metavar="DSN",
        help="With --store postgres: the libpq connection string (better: the environment "
        "variable KEYQUORUM_DSN). Handed to pg_dump/pg_restore through libpq's environment.",
    ),
)


def _store_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_STORE_OPTIONS):
        f = option(f)
    return f


def _dsn_for(store: str, dsn: str | None) -> str:
    if store == "postgres" and not dsn:
        raise click.UsageError("--store postgres needs --dsn (or KEYQUORUM_DSN)")
    if store == "sqlite" and dsn:
        raise click.UsageError("--dsn is for --store postgres")
    return dsn or ""


@admin.command("snapshot")
@_store_options
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A new (or empty) directory for the snapshot (made 0700).",
)
def snapshot(data_dir: Path, store: str, dsn: str | None, out: Path) -> None:
    """Copy a running daemon's store, consistently, with its signed checkpoint.

    SQLite: the online backup API (the daemon keeps serving). PostgreSQL:
    pg_dump in the same database snapshot as the log this command reads.
    The copy is verified (every entry replayed, the latest checkpoint
    signed by the log key and covering them all) before the manifest is
    written. A snapshot holds the store's shred salts: keep it as the store
    is kept. The log key files of the data directory are not in it (back
    them up once, apart).

    \b
    Example:
      keyquorum admin snapshot --data-dir /var/lib/keyquorum --out /backup/kq-2026-12-02
    """
    import time as _time

    from keyquorum.hsm import backup
    from keyquorum.hsm.stores import sqlite

    conn = _dsn_for(store, dsn)
    now = int(_time.time())
    if store == "postgres":
        manifest = backup.snapshot_postgres(conn, out, now=now)
    else:
        manifest = backup.snapshot_sqlite(data_dir / sqlite.FILE_NAME, out, now=now)
    click.echo(
        f"snapshot of {manifest.deployment}: {manifest.size} entries, {manifest.store} copy "
        f"{out / manifest.file} (sha256 {manifest.sha256[:16]}...)"
    )
    click.echo(f"signed checkpoint: {out / backup.MANIFEST}")


@admin.command("restore")
@_store_options
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A directory `admin snapshot` wrote.",
)
@click.option(
    "--abandon-checkpoint",
    is_flag=True,
    help="Restore a snapshot behind the checkpoint this data directory remembers. The daemon "
    "then serves no key and logs no proposal but approve-restore until k custodians approve "
    "going back.",
)
def restore(
    data_dir: Path, store: str, dsn: str | None, source: Path, abandon_checkpoint: bool
) -> None:
    """Put a snapshot back as the daemon's store (the daemon must be stopped).

    Takes the data directory's lock (a running daemon is named by its pid),
    verifies the snapshot whole, and compares it with the checkpoint the
    data directory remembers: a snapshot that extends it is restored; one
    of another history is refused; one behind it is refused unless
    --abandon-checkpoint, after which the quorum decides (`keyquorum
    proposal new approve-restore`, printed below). The store it replaces
    is kept in before-restore-TIME/ in the data directory.

    \b
    Example:
      systemctl stop keyquorum
      keyquorum admin restore --data-dir /var/lib/keyquorum --from /backup/kq-2026-12-02
      systemctl start keyquorum
    """
    import time as _time

    from keyquorum.hsm import backup
    from keyquorum.hsm.datadir import DataDirectory

    conn = _dsn_for(store, dsn)
    now = int(_time.time())
    with DataDirectory.lock(data_dir) as locked:
        if store == "postgres":
            done = backup.restore_postgres(
                locked.path, source, conn, abandon_checkpoint=abandon_checkpoint, now=now
            )
        else:
            done = backup.restore_sqlite(
                locked.path, source, abandon_checkpoint=abandon_checkpoint, now=now
            )
    click.echo(f"restored {done.manifest.deployment}: {done.manifest.size} entries")
    if done.kept is not None:
        click.echo(f"the store it replaced is kept in {done.kept}")
    if done.pending is not None:
        params = " ".join(f"--param {k}={v}" for k, v in done.pending.parameters().items())
        click.echo(
            f"behind the published checkpoint of {done.pending.abandoned_size} entries: the "
            "daemon serves no key until k custodians approve:\n"
            f"  keyquorum proposal new approve-restore {params}"
        )
