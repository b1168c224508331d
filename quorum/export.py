"""The log export file: the quorum log and its signed checkpoints in one file.

An auditor receives this file and nothing else (plus, ideally, the log's
public key and a checkpoint they trusted before). It is JSON Lines (one
JSON value per line, each line RFC 8785 canonical JSON, UTF-8, ending in
``\\n``), so it streams, diffs line by line and opens in any tool:

    line 1        {"format":"keyquorum-log-export","version":1}
    one per entry {"entry":"<base64 of the entry's exact bytes>"}
    one per note  {"checkpoint":"<C2SP signed checkpoint note, verbatim>"}

Entries come in log order (entry i on line i + 2) and are carried as
standard base64 (RFC 4648 section 4) of their exact bytes, because those
bytes are what was hashed, chained and put in the Merkle tree: the file
never re-encodes them. Checkpoints follow the entries, by increasing tree
size; several notes may share a size (a fork, which the verifier reports).

The file carries no trust of its own: nothing in it is believed until the
verifier (`keyquorum.quorum.audit_report.audit`) has checked the
checkpoints against the log key and replayed every entry. So `parse` only
checks the form, strictly: a line that is not canonical JSON of the shape
above, an empty or non-base64 entry, a checkpoint that is not text, lines
out of order or a missing header are refused. A bad entry line raises
`LogIntegrityError` naming the entry's seq (its position), so even a byte
flipped in the base64 is reported against the entry it spoils; any other
problem is a `DeserializationError` naming the line.

The same log and checkpoints always give the same bytes (`produce`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from keyquorum.quorum import canonical
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, LogIntegrityError

__all__ = ["FORMAT", "MAX_LINE", "VERSION", "ExportedLog", "parse", "produce"]

FORMAT: Final = "keyquorum-log-export"
VERSION: Final = 1
#: Longest line `parse` accepts: one entry (base64) or one checkpoint note.
MAX_LINE: Final = 8 * 1024 * 1024
#: Longest checkpoint note accepted (C2SP notes are a few hundred bytes).
MAX_NOTE: Final = 64 * 1024

_HEADER: Final = {"format": FORMAT, "version": VERSION}


@dataclass(frozen=True)
class ExportedLog:
    """What an export file holds, parsed but not yet verified."""

    entries: tuple[bytes, ...]
    #: Checkpoint notes in file order (by increasing tree size).
    checkpoints: tuple[str, ...]


def produce(entries: Iterable[bytes], checkpoints: Iterable[str]) -> Iterator[bytes]:
    """The lines of an export file (each ending in a newline), for streaming to disk."""
    yield canonical.encode(_HEADER) + b"\n"
    for i, raw in enumerate(entries):
        if not isinstance(raw, bytes) or not raw:
            raise InvalidInputError(f"entry {i} must be non-empty bytes")
        yield canonical.encode({"entry": base64.b64encode(raw).decode("ascii")}) + b"\n"
    for note in checkpoints:
        if not isinstance(note, str) or not note:
            raise InvalidInputError("a checkpoint note must be non-empty text")
        yield canonical.encode({"checkpoint": note}) + b"\n"


def parse(lines: Iterable[bytes]) -> ExportedLog:
    """Parse an export file given as its lines (as a binary file iterates them).

    Checks the form only (see the module docstring); verification is the
    auditor's `audit`, over what this returns.
    """
    entries: list[bytes] = []
    notes: list[str] = []
    seen_header = False
    for number, line in enumerate(lines, start=1):
        # 0. Line form: bounded, newline-terminated, canonical JSON object.
        if len(line) > MAX_LINE:
            raise _line_error(number, len(entries), seen_header, notes, "line too long")
        if not line.endswith(b"\n"):
            raise DeserializationError(f"line {number}: no final newline: the file is truncated")
        try:
            value = canonical.decode(line[:-1])
        except DeserializationError as e:
            raise _line_error(number, len(entries), seen_header, notes, str(e)) from e
        if not isinstance(value, dict):
            raise _line_error(number, len(entries), seen_header, notes, "not a JSON object")
        # 1. The header, first and once.
        if not seen_header:
            if value != _HEADER:
                raise DeserializationError(
                    f"line 1: not a keyquorum log export (want {canonical.encode(_HEADER)!r})"
                )
            seen_header = True
            continue
        # 2. Entries, then checkpoints.
        if set(value) == {"entry"}:
            if notes:
                raise DeserializationError(f"line {number}: an entry after the checkpoints")
            entries.append(_entry(value["entry"], len(entries)))
        elif set(value) == {"checkpoint"}:
            notes.append(_note(value["checkpoint"], number))
        else:
            raise _line_error(
                number, len(entries), seen_header, notes, f"unknown record {sorted(value)}"
            )
    if not seen_header:
        raise DeserializationError("the file is empty: not a keyquorum log export")
    return ExportedLog(tuple(entries), tuple(notes))


def _entry(value: object, seq: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise LogIntegrityError("the export holds no entry bytes here", seq=seq)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise LogIntegrityError("the entry's base64 is damaged", seq=seq) from e
    if base64.b64encode(raw).decode("ascii") != value:
        raise LogIntegrityError("the entry's base64 is not canonical", seq=seq)
    return raw


def _note(value: object, number: int) -> str:
    if not isinstance(value, str) or not value:
        raise DeserializationError(f"line {number}: a checkpoint must be non-empty text")
    if len(value) > MAX_NOTE:
        raise DeserializationError(f"line {number}: checkpoint note longer than {MAX_NOTE}")
    return value


def _line_error(
    number: int, entries: int, seen_header: bool, notes: list[str], why: str
) -> Exception:
    """A damaged line: named as the entry it would be, when it is in the entry block."""
    if seen_header and not notes:
        return LogIntegrityError(f"line {number} of the export is damaged: {why}", seq=entries)
    return DeserializationError(f"line {number}: {why}")
