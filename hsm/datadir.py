"""The daemon's data directory: private, locked while a daemon runs on it.

A data directory holds one daemon's state: the SQLite store (`--store
sqlite`), the log signing key and the last checkpoint the daemon published
(hsm/daemon/rollback.py). Two daemons on one directory would both append,
both rewrite the remembered checkpoint and both sign with one key, so the
running daemon holds an exclusive lock on `daemon.lock` in it for its whole
life, and a second daemon is refused, naming the first one's pid.

The lock is a POSIX record lock (`fcntl.lockf`, F_SETLK): the kernel drops
it when the process ends, however it ends, so a crashed daemon never leaves
a stale lock behind, and it works on local and NFS file systems alike. Such
a lock belongs to the process and ends when ANY descriptor of the file is
closed, so this module opens the file once and keeps it open; children
(the stderr relay) do not inherit it. The holder writes its pid into the
file for the refusal's message; the file itself is left in place after
exit (removing a lock file races with the next daemon taking it).

A store missing from a directory that holds a daemon's other files (its
log key, its last checkpoint) is refused rather than created empty, so a
mistyped path inside a live directory or a lost database file cannot start
a second deployment beside the first one's key.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path
from typing import Final

from keyquorum.hsm.daemon.logkey import KEY_FILE
from keyquorum.hsm.daemon.rollback import CHECKPOINT_FILE
from keyquorum.quorum.errors import InvalidInputError, StateError, StorageError

LOCK_FILE: Final = "daemon.lock"
#: Files that only a daemon that has run here writes.
DAEMON_FILES: Final = (KEY_FILE, CHECKPOINT_FILE)
#: How long a refused daemon waits for the holder to have written its pid.
_PID_WAIT_SECONDS: Final = 0.5


class DataDirectory:
    """An open, locked data directory; `release()` (or exit) gives the lock up."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._fd: int | None = lock_fd

    @classmethod
    def lock(cls, path: Path) -> DataDirectory:
        """Create `path` (mode 0700) if needed and take its lock, or refuse."""
        path = Path(path)
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise StorageError(f"cannot create the data directory {path}: {e.strerror}") from e
        if not path.is_dir():
            raise InvalidInputError(f"the data directory {path} is not a directory")
        lock_path = path / LOCK_FILE
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the lock file {lock_path}: {e.strerror}") from e
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise StorageError(f"cannot lock {lock_path}: {e.strerror}") from e
            raise StateError(
                f"the data directory {path} is in use by another keyquorum daemon "
                f"(pid {holder or 'unknown'}); stop it first or give another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def require_store(self, store_file: str) -> None:
        """Refuse to create `store_file` afresh where a daemon has already run."""
        if (self.path / store_file).exists():
            return
        found = [name for name in DAEMON_FILES if (self.path / name).exists()]
        if found:
            raise StorageError(
                f"the data directory {self.path} holds {' and '.join(found)} of a daemon "
                f"that ran here, but no store ({store_file}): restore the store, or use an "
                "empty directory for a new deployment"
            )

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the record lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DataDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DataDirectory({str(self.path)!r}, locked={self.locked})"


def _holder_pid(fd: int) -> int | None:
    """The pid the lock's holder wrote, waiting briefly for a holder that just took it."""
    deadline = time.monotonic() + _PID_WAIT_SECONDS
    while True:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
