"""Entry point of the `keyquorum` command.

Every command raises `KeyquorumError` subclasses for expected failures; they
are caught once here and turned into a one-line message and exit code 1.
"""

from __future__ import annotations

import sys

import click

from keyquorum.quorum.errors import KeyquorumError


class _Group(click.Group):
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


def _register() -> None:
    from keyquorum.cli.admin import admin
    from keyquorum.cli.audit import audit_group
    from keyquorum.cli.ceremony import ceremony, status
    from keyquorum.cli.custodian import custodian
    from keyquorum.cli.demo import demo
    from keyquorum.cli.proposal import proposal, tenant
    from keyquorum.cli.server import server

    for command in (
        admin,
        audit_group,
        ceremony,
        custodian,
        demo,
        proposal,
        server,
        status,
        tenant,
    ):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
