"""Writing credential files durably: create-only, or replace atomically.

A credential file is the only copy of a custodian's keys: a crash, a full
disk or a power cut while it is written must leave either the old file or
the new one, never half of one. `replace_atomically` writes a temporary
file in the same directory (mode 0600 from its creation), fsyncs it,
renames it over the old one (POSIX `rename` is atomic) and fsyncs the
directory so the rename itself survives a crash; on any failure the
temporary file is removed and the old file is untouched.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` (never overwrite) with `mode`, durably (file and directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_directory(path.parent)


def replace_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` by `data`: temp file, fsync, rename, fsync directory (docstring)."""
    directory = path.parent
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    temporary = Path(name)
    try:
        try:
            os.fchmod(fd, mode)
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
