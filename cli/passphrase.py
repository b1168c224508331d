"""Reading a passphrase: a hidden prompt, a file, or an inherited descriptor.

The passphrase goes straight into a SecretBytes; it is never echoed, logged
or passed on a command line (where `ps` would show it).

A new passphrase must be strong enough (`check_strength`, docs/credentials.md):
at least `MIN_LENGTH` characters, and at least 10^`MIN_GUESSES_LOG10`
guesses by zxcvbn's estimate, which knows common passwords, names, words,
keyboard patterns, dates, repeats and l33t substitutions, and is told the
custodian's own name. The estimate needs the passphrase as a Python str,
an immutable copy that cannot be wiped; the hidden prompt already returns
one, and the copy lives only for the check.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.secret import SecretBytes

MAX_PASSPHRASE = 1024
#: The least a new passphrase may have: characters, and log10 of zxcvbn's guesses.
MIN_LENGTH = 12
MIN_GUESSES_LOG10 = 12
#: zxcvbn refuses longer input (its matching is quadratic); a longer
#: passphrase is judged by its first 72 characters.
ZXCVBN_MAX = 72


def check_strength(passphrase: SecretBytes, *, name: str) -> None:
    """Refuse a weak new passphrase, saying why (module docstring for the rule).

    The message never holds the passphrase: only its length and zxcvbn's
    generic feedback ("this is a top-100 common password", "add another
    word or two").
    """
    from zxcvbn import zxcvbn

    text = passphrase.reveal().decode("utf-8", errors="replace")
    if len(text) < MIN_LENGTH:
        raise InvalidInputError(
            f"the new passphrase has {len(text)} characters; use at least {MIN_LENGTH} "
            "(several unrelated words are easiest to remember)"
        )
    estimate = zxcvbn(text[:ZXCVBN_MAX], user_inputs=[name, "keyquorum", "custodian"])
    magnitude = float(estimate["guesses_log10"])
    if magnitude < MIN_GUESSES_LOG10:
        feedback = estimate["feedback"]
        hints = [str(feedback.get("warning") or ""), *map(str, feedback.get("suggestions", []))]
        why = " ".join(h.rstrip(".") + "." for h in hints if h)
        raise InvalidInputError(
            f"the new passphrase is too easy to guess: about 10^{magnitude:.0f} "
            f"guesses, fewer than the 10^{MIN_GUESSES_LOG10} required. "
            + (why or "Use several unrelated words.")
        )


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
