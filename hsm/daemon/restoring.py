"""A restore behind a published checkpoint, waiting for the quorum's consent.

`keyquorum admin restore --abandon-checkpoint` puts back a snapshot older
than the checkpoint this data directory remembers (hsm/daemon/rollback.py).
It does not decide that going back is right: it writes `restore-pending`
here, naming the restored size and the abandoned checkpoint note, and a
daemon started on the directory then

- refuses to unseal (no key is served from a history the quorum has not
  accepted),
- logs no proposal but the `approve-restore` that names exactly this
  restore (restored size, abandoned checkpoint's size and root), and
- removes the file once that proposal executes: k custodians approved
  going back, and the log says so for every auditor.

The file is JSON `{"restored_size", "abandoned_checkpoint"}`, written
durably (temporary file, fsync, rename). An operator holding the data
directory can delete it, as they can delete `last-checkpoint`; what they
cannot do is make the custodians' CLIs accept a shorter log without an
executed `approve-restore` in it (cli/seen_checkpoints.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from keyquorum.quorum.checkpoint import Checkpoint, unverified_size
from keyquorum.quorum.errors import DeserializationError, StateError, StorageError

PENDING_FILE: Final = "restore-pending"
_MAX_BYTES: Final = 65_536


@dataclass(frozen=True)
class PendingRestore:
    """What `admin restore --abandon-checkpoint` did, and what the quorum must approve."""

    restored_size: int
    abandoned_checkpoint: str

    @property
    def abandoned_size(self) -> int:
        return unverified_size(self.abandoned_checkpoint)

    @property
    def abandoned_root(self) -> str:
        """The abandoned checkpoint's RFC 9162 root hash, lowercase hex."""
        return unverified_checkpoint(self.abandoned_checkpoint).root.hex()

    def parameters(self) -> dict[str, str | int]:
        """The `approve-restore` parameters that approve exactly this restore."""
        return {
            "restored_size": self.restored_size,
            "abandoned_size": self.abandoned_size,
            "abandoned_root": self.abandoned_root,
        }

    def require_approving(self, operation: str, parameters: dict[str, str | int]) -> None:
        """Refuse (StateError) any proposal but the `approve-restore` of this restore."""
        wanted = self.parameters()
        if operation == "approve-restore" and parameters == wanted:
            return
        raise StateError(
            f"this daemon's store was restored behind a published checkpoint "
            f"({self.restored_size} entries kept, {self.abandoned_size} published): until "
            "k custodians approve going back, it logs no other proposal and serves no key; "
            "propose: keyquorum proposal new approve-restore "
            + " ".join(f"--param {k}={v}" for k, v in wanted.items())
        )


def unverified_checkpoint(note: str) -> Checkpoint:
    """The checkpoint a note's body states, its signatures not checked."""
    text, sep, _ = note.rpartition("\n\n")
    if not sep:
        raise DeserializationError("a checkpoint note has a blank line before its signatures")
    return Checkpoint.parse(text + "\n")


def path_in(data_dir: Path) -> Path:
    return Path(data_dir) / PENDING_FILE


def load(data_dir: Path) -> PendingRestore | None:
    """The restore awaiting approval in `data_dir`, or None."""
    path = path_in(data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e.strerror}") from e
    if len(raw) > _MAX_BYTES:
        raise DeserializationError(f"{path} is too large to be a pending restore")
    try:
        data = json.loads(raw)
        pending = PendingRestore(int(data["restored_size"]), str(data["abandoned_checkpoint"]))
        pending.parameters()
    except (ValueError, KeyError, TypeError, DeserializationError) as e:
        raise DeserializationError(f"{path} is not a pending restore ({e})") from None
    return pending


def save(data_dir: Path, pending: PendingRestore) -> None:
    """Write the pending restore durably (temporary file, fsync, rename, fsync the folder)."""
    path = path_in(data_dir)
    tmp = path.with_name(PENDING_FILE + ".tmp")
    data = json.dumps(
        {
            "restored_size": pending.restored_size,
            "abandoned_checkpoint": pending.abandoned_checkpoint,
        }
    ).encode()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        _sync_folder(Path(data_dir))
    except OSError as e:
        raise StorageError(f"cannot write {path} durably: {e.strerror}") from e


def clear(data_dir: Path) -> None:
    """The quorum approved: the restore is pending no more."""
    try:
        path_in(data_dir).unlink(missing_ok=True)
        _sync_folder(Path(data_dir))
    except OSError as e:
        raise StorageError(f"cannot remove {path_in(data_dir)}: {e.strerror}") from e


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
