"""Machine output of the read commands: `--json`, one document per run.

Every document is a JSON object with `format` ("keyquorum/<what>") and
`version` (1), described by a JSON Schema in docs/schemas/<what>.schema.json
that the tests validate the real output against. Custodians appear as
`{"name", "fingerprint", "short_fingerprint"}`: the full 64-hex fingerprint
is for machines, the base32 groups the form people read (quorum/people.py).
Times are Unix seconds (integers), never local.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from keyquorum.quorum import people

F = TypeVar("F", bound=Callable[..., Any])

VERSION = 1


def json_option(f: F) -> F:
    """`--json`: print one JSON document (docs/schemas/) instead of text."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON for machines (schema: docs/schemas/), full fingerprints included.",
    )(f)


def document(kind: str, **fields: Any) -> dict[str, Any]:
    """A machine document of `kind` with its format and version."""
    return {"format": f"keyquorum/{kind}", "version": VERSION, **fields}


def emit(doc: dict[str, Any]) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False))


def person(name: str, fingerprint: str) -> dict[str, str]:
    """A custodian in machine output."""
    return {
        "name": name,
        "fingerprint": fingerprint,
        "short_fingerprint": people.display_fingerprint(fingerprint),
    }
