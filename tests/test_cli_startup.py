"""The CLI imports a command's module only when that command runs (cli/main.py).

Start-up time itself is measured by `python -m bench cli` against `python -c
pass`, never by a timed assertion; these tests pin what makes it fast: what
`keyquorum --help` and `keyquorum status` import, and that the top-level
listing, written down in `COMMANDS` so that it needs no import, says what
each command's own help says.
"""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from keyquorum.cli.main import COMMANDS, load_command, main

#: Top-level packages whose import costs start-up time.
HEAVY = ("grpc", "cryptography", "psycopg", "prometheus_client", "rfc8785", "google")


def _imported_after(args: list[str]) -> set[str]:
    """Top-level packages imported once `keyquorum ARGS` has run (in a fresh interpreter)."""
    probe = (
        "import json, sys\n"
        "from keyquorum.cli.main import main\n"
        "try:\n"
        f"    main({args!r}, standalone_mode=False)\n"
        "except (SystemExit, Exception):\n"
        "    pass\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_imports_neither_grpc_nor_cryptography() -> None:
    imported = _imported_after(["--help"])
    assert "click" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_a_command_help_imports_only_that_command() -> None:
    imported = _imported_after(["ceremony", "--help"])
    assert "grpc" in imported  # ceremony's module talks gRPC
    assert not imported & {"psycopg", "prometheus_client"}


def test_status_imports_grpc_but_not_the_daemon_or_cryptography() -> None:
    # A TLS status call against nothing: it fails to connect, after its imports.
    imported = _imported_after(["status", "--server", "127.0.0.1:1", "--ca", __file__])
    assert "grpc" in imported
    assert not imported & {"cryptography", "psycopg", "prometheus_client", "rfc8785"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_listing_matches_each_commands_own_help(name: str) -> None:
    command = load_command(name)
    assert command.name == name or (name, command.name) == ("audit", "audit")
    assert COMMANDS[name].summary == command.get_short_help_str(10_000)


def test_every_command_is_listed_and_reachable() -> None:
    ctx = click.Context(main)
    assert main.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        assert main.get_command(ctx, name) is load_command(name)
    assert main.get_command(ctx, "no-such-command") is None


def test_a_missing_extra_is_named_not_a_traceback() -> None:
    """A cli-only install running `keyquorum server`: psycopg is missing."""
    probe = (
        "import sys\n"
        "sys.modules['psycopg'] = None  # as if not installed\n"
        "from keyquorum.cli.main import main\n"
        "main(['server', 'run', '--help'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "Error: `keyquorum server` needs the 'server' extra (module psycopg is missing): "
        "pip install 'keyquorum[server]'"
    ]
