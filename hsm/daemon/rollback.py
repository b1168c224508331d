"""Rollback detection: the last signed checkpoint, kept outside the store.

A database restored from an older snapshot is a valid log: every entry
replays and its own latest checkpoint matches it, so `verify_log` alone
cannot tell it from the real one. What tells them apart is a checkpoint
published later than the snapshot. The daemon therefore keeps the last
checkpoint it signed in a file of its data directory (`last-checkpoint`,
beside the log key, NOT in the store), and custodians' CLIs keep the last
one they saw (`cli/seen_checkpoints.py`). Both refuse a log that does not extend it,
by the one rule of `quorum/evidence.py` (`require_extends`: both notes signed by
the log key, not shorter, an RFC 9162 consistency proof verifies).

Limits: a rollback of the data directory together with the store (one
disk snapshot of the whole machine) rolls this file back too; the
custodians' remembered checkpoints, on their own machines, still catch
it. A daemon started on a data directory without the file trusts the log
it finds (first use) and says so in its log.

The file is written durably after each append's checkpoint, never
before the entries it covers are committed: write to a temporary file,
fsync it, rename it over the old one, fsync the directory. A crash at any
point leaves the old or the new file, never a partial one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

from keyquorum.quorum.errors import (
    DeserializationError,
    StorageError,
)

CHECKPOINT_FILE: Final = "last-checkpoint"
#: A signed checkpoint note is a few hundred bytes; anything larger is not ours.
MAX_NOTE_BYTES: Final = 16_384

log = logging.getLogger(__name__)


def path_in(data_dir: Path) -> Path:
    return data_dir / CHECKPOINT_FILE


def load(data_dir: Path) -> str | None:
    """The remembered checkpoint note, or None when there is none yet."""
    path = path_in(data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}") from e
    if len(raw) > MAX_NOTE_BYTES:
        raise DeserializationError(f"{path} is larger than a checkpoint note can be")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DeserializationError(f"{path} is not UTF-8 text") from None


def save(data_dir: Path, note: str) -> None:
    """Replace the remembered checkpoint durably (temporary file, fsync, rename).

    Any failure is a `StorageError`: after a failed fsync the kernel may
    have dropped the page, so the caller must not report the append it
    records as a success.
    """
    path = path_in(data_dir)
    tmp = path.with_name(CHECKPOINT_FILE + ".tmp")
    data = note.encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise StorageError(f"cannot write {path} durably: {e}") from e
