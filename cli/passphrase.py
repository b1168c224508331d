"""Reading a passphrase: a hidden prompt, a file, or an inherited descriptor.

The passphrase goes straight into a SecretBytes; it is never echoed, logged
or passed on a command line (where `ps` would show it).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.secret import SecretBytes

MAX_PASSPHRASE = 1024


def passphrase_options(f: click.decorators.FC) -> click.decorators.FC:
    f = click.option(
        "--passphrase-fd",
        type=int,
        help="Read the passphrase from this open file descriptor (automation).",
    )(f)
    return click.option(
        "--passphrase-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Read the passphrase from the first line of this file (automation).",
    )(f)


def _strip(raw: bytes) -> bytearray:
    line = bytearray(raw.split(b"\n", 1)[0])
    if line.endswith(b"\r"):
        del line[-1]
    return line


def read_passphrase(
    *, file: Path | None, fd: int | None, prompt: str, confirm: bool = False
) -> SecretBytes:
    """The passphrase from --passphrase-file, --passphrase-fd or a hidden prompt."""
    if file is not None and fd is not None:
        raise InvalidInputError("give --passphrase-file or --passphrase-fd, not both")
    if file is not None:
        raw = _strip(file.read_bytes()[: MAX_PASSPHRASE + 1])
    elif fd is not None:
        with os.fdopen(fd, "rb", closefd=False) as stream:
            raw = _strip(stream.read(MAX_PASSPHRASE + 1))
    else:
        text = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        raw = bytearray(text.encode("utf-8"))
    secret = SecretBytes.adopt(raw, label="passphrase")
    if len(secret) == 0:
        secret.wipe()
        raise InvalidInputError("the passphrase is empty")
    if len(secret) > MAX_PASSPHRASE:
        secret.wipe()
        raise InvalidInputError(f"the passphrase is longer than {MAX_PASSPHRASE} bytes")
    return secret
