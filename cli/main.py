"""Entry point of the `keyquorum` command.

Every command raises `KeyquorumError` subclasses for expected failures; they
are caught once here and turned into a one-line message and exit code 1.

Start-up time: a command's module is imported only when that command runs
(or shows its help), so `keyquorum --help` imports click and nothing of
gRPC, cryptography or the daemon, and `keyquorum status` only what a status
call needs. `COMMANDS` names each command's module and carries its one-line
help for the top-level listing; tests/test_cli_startup.py checks that it
matches each command's own help and that `--help` imports no grpc.

A base install (`pip install keyquorum`: the backend client only) has no
click; the command then says which extra to install instead of a traceback,
and so does a command whose extra is missing (`server` needs
`keyquorum[server]`).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Final, NamedTuple

try:
    import click
except ModuleNotFoundError as missing:  # pragma: no cover - exercised in a base-only venv
    if missing.name != "click":
        raise
    sys.exit(
        "error: the keyquorum command needs the CLI's dependencies, which a base install "
        "(the backend client only) leaves out: pip install 'keyquorum[cli]' "
        "(or 'keyquorum[server]' for the daemon)"
    )

from keyquorum.quorum.errors import KeyquorumError


class _Command(NamedTuple):
    module: str
    attribute: str
    summary: str
    extra: str


COMMANDS: Final[dict[str, _Command]] = {
    "admin": _Command(
        "keyquorum.cli.admin",
        "admin",
        "Operator tools: development PKI, the log key's next key, snapshot and restore.",
        "cli",
    ),
    "audit": _Command(
        "keyquorum.cli.audit",
        "audit_group",
        "Export the quorum log and verify it offline; proofs and receipts.",
        "cli",
    ),
    "backend": _Command(
        "keyquorum.cli.backend",
        "backend",
        "Wrap, unwrap and encrypt files as a backend (mTLS, the backend's certificate).",
        "cli",
    ),
    "ceremony": _Command(
        "keyquorum.cli.ceremony", "ceremony", "The one-time init ceremony.", "cli"
    ),
    "custodian": _Command(
        "keyquorum.cli.custodian",
        "custodian",
        "Custodian credentials, share confirmation, unseal, seal, approvals.",
        "cli",
    ),
    "demo": _Command(
        "keyquorum.cli.demo",
        "demo",
        "Run the full story: ceremony, confirm, unseal, a quorum-approved tenant key, seal.",
        "server",
    ),
    "proposal": _Command(
        "keyquorum.cli.proposal",
        "proposal",
        "Propose quorum operations and look at proposals.",
        "cli",
    ),
    "server": _Command("keyquorum.cli.server", "server", "Run the key-custody daemon.", "server"),
    "status": _Command(
        "keyquorum.cli.ceremony",
        "status",
        "Show whether the daemon is sealed, unseal progress, the roster and the log key.",
        "cli",
    ),
    "tenant": _Command(
        "keyquorum.cli.proposal", "tenant", "Tenants as the quorum log records them.", "cli"
    ),
}


#: Commands that run a daemon: gRPC's C core logs there, relayed into the
#: daemon's log (hsm/stderr_relay.py), as GRPC_VERBOSITY says.
DAEMON_COMMANDS: Final = frozenset({"server", "demo"})


def quiet_grpc_core(name: str) -> None:
    """Keep the gRPC C core's own lines off a client command's terminal.

    Set before the command's module imports grpc: a handshake failure is
    explained by the CLI in its own words (cli/connect.py, cli/diagnose.py),
    not by "ssl_transport_security.cc: Handshake failed". Set
    KEYQUORUM_GRPC_VERBOSITY=DEBUG|INFO|ERROR to see the C core's lines again.
    """
    if name not in DAEMON_COMMANDS:
        os.environ["GRPC_VERBOSITY"] = os.environ.get("KEYQUORUM_GRPC_VERBOSITY", "NONE")


def load_command(name: str) -> click.Command:
    """Import the module of command `name` and return its click command."""
    entry = COMMANDS[name]
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "keyquorum":
            raise
        raise click.ClickException(
            f"`keyquorum {name}` needs the {entry.extra!r} extra (module {e.name} is missing): "
            f"pip install 'keyquorum[{entry.extra}]'"
        ) from None
    command = getattr(module, entry.attribute)
    if not isinstance(command, click.Command):  # pragma: no cover - a wrong table entry
        raise TypeError(f"{entry.module}.{entry.attribute} is not a click command")
    return command


class _Group(click.Group):
    """Loads commands on first use; lists them from `COMMANDS` without importing."""

    @property  # type: ignore[override]
    def commands(self) -> dict[str, click.Command]:
        """Every command, imported: for what walks the whole tree (tests, docs)."""
        return {name: load_command(name) for name in COMMANDS}

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        if value:  # click.Group.__init__ sets it; ours are in COMMANDS
            raise TypeError("keyquorum's commands are listed in COMMANDS")

    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002 (click API)
        return sorted(COMMANDS)

    def get_command(
        self,
        ctx: click.Context,  # noqa: ARG002 (click API)
        cmd_name: str,
    ) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        quiet_grpc_core(cmd_name)
        return load_command(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        width = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [
            (name, click.Command(name, help=COMMANDS[name].summary).get_short_help_str(width))
            for name in self.list_commands(ctx)
        ]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except KeyquorumError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="keyquorum")
def main() -> None:
    """keyquorum: threshold master-key custody (a software HSM)."""


if __name__ == "__main__":
    main()
