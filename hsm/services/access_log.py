"""The optional access log of the data plane: one JSON line per item.

`server run --access-log PATH` appends, per Wrap, Unwrap, GenerateDataKey
or Rewrap item:

    {"backend":"booking","context_hmac":"9f2c...","operation":"unwrap",
     "outcome":"OK","tenant":"acme-health","time":"2026-05-01T09:30:12.345Z"}

`context_hmac` is HMAC-SHA256 (RFC 2104) of the encryption context's RFC
8785 encoding, under a 32-byte key kept in the data directory
(`access-log.key`, mode 0600, made on first use): the same context gives
the same value, so an investigator holding a context can find its uses,
but the log itself names no patient or doctor (contexts of health data
do), and without the key a guessed context cannot be confirmed. It is
null when the context could not be encoded. The log never holds a
context, a plaintext or key material. `tenant` is "-" unless the backend
was granted it; `outcome` is "OK" or the gRPC status code name.

Lines are written whole under a lock and flushed, not fsynced: this is a
usage record, not the quorum log.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, NoReturn, TextIO

from keyquorum.hsm.services.status import code_for
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError

KEY_FILE: Final = "access-log.key"
KEY_SIZE: Final = 32


def load_or_create_key(
    data_dir: Path, *, random_bytes: Callable[[int], bytes] = os.urandom
) -> bytes:
    """The deployment's access-log HMAC key, created (0600) if it does not exist."""
    path = Path(data_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_bytes()
        if len(key) != KEY_SIZE:
            raise InvalidInputError(
                f"{path} must hold {KEY_SIZE} bytes, has {len(key)}: not an access-log key"
            ) from None
        return key
    key = random_bytes(KEY_SIZE)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class AccessLog:
    """Appends one JSON line per data-plane item (see the module docstring)."""

    __slots__ = ("_clock", "_file", "_lock", "_mac", "_path")

    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if len(key) != KEY_SIZE:
            raise InvalidInputError(f"the access-log key must be {KEY_SIZE} bytes")
        self._path = Path(path)
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._lock = threading.Lock()
        self._clock = clock
        try:
            self._file: TextIO = self._path.open("a", encoding="utf-8")
        except OSError as e:
            raise InvalidInputError(f"cannot open the access log {path}: {e.strerror}") from e

    @classmethod
    def in_data_dir(cls, path: Path, data_dir: Path) -> AccessLog:
        return cls(path, load_or_create_key(data_dir))

    def context_hmac(self, context: bytes) -> str:
        """Hex HMAC-SHA256 of a canonical context under the deployment's key."""
        mac = self._mac.copy()
        mac.update(context)
        return mac.hexdigest()

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        self.record_outcome(
            backend, tenant, operation, "OK" if error is None else code_for(error).name, context
        )

    def record_outcome(
        self, backend: str, tenant: str, operation: str, outcome: str, context: bytes | None
    ) -> None:
        """One line for an item whose outcome is already a code name (a worker's record)."""
        now = self._clock() if self._clock is not None else None
        when = (
            datetime.datetime.now(datetime.UTC)
            if now is None
            else datetime.datetime.fromtimestamp(now, datetime.UTC)
        )
        line = json.dumps(
            {
                "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "backend": backend,
                "tenant": tenant,
                "operation": operation,
                "outcome": outcome,
                "context_hmac": None if context is None else self.context_hmac(context),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def reopen(self, path: Path | None = None) -> None:
        """Append to `path` (default: the same path) from now on: a rotated file's successor.

        The new file is opened before the old one is closed, so a path that
        cannot be opened changes nothing (InvalidInputError).
        """
        target = self._path if path is None else Path(path)
        try:
            new: TextIO = target.open("a", encoding="utf-8")
        except OSError as e:
            raise InvalidInputError(f"cannot open the access log {target}: {e.strerror}") from e
        with self._lock:
            old, self._file, self._path = self._file, new, target
        old.close()

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __repr__(self) -> str:
        return f"<AccessLog {self._path}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("an AccessLog cannot be pickled")
