"""`keyquorum admin`: operator tools that hold no key and approve nothing."""

from __future__ import annotations

from pathlib import Path

import click

from keyquorum.hsm.pki import CA_DAYS, LEAF_DAYS, ROLES, URI_SCHEME, make_dev_pki


@click.group()
def admin() -> None:
    """Operator tools (development PKI)."""


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
