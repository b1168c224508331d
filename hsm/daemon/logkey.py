"""The log's signing key, kept in a file beside (not in) the store.

The key signs C2SP checkpoints, and the entries the daemon writes on its
own (executions, shreds, its own seal at shutdown: `log.log_signature_message`).
It lives in the data directory, mode 0600, outside the database, so a
database administrator who rewrites the store cannot also re-sign a
checkpoint. It is not a custodian key: who authorised what is proven by the
custodians' own signatures in the entries; the log key proves what this
daemon published, so that a later rewrite or a rollback is detectable.
README's threat model says who can read it.

The key belongs to the deployment: the genesis names it, custodians' CLIs
and auditors pin it, and it changes only by the quorum operation
`rotate-log-key`. The next key is made beforehand, here, in
`log-signing-key.next` (`create_next`, `keyquorum admin log-key next`): the
proposal names its verifier key, and when the rotation executes the daemon
signs that entry with the old key and the checkpoint covering it with the
new one, then makes the next key the key (`promote_next`). A daemon that
stops in between finds the rotation in the log at start and finishes it.

File format (one line each): `keyquorum-log-key v1`, the key name (also
the checkpoint origin), the 32-byte Ed25519 seed in hex.
"""

from __future__ import annotations

import os
from pathlib import Path

from keyquorum.quorum.errors import DeserializationError, StateError
from keyquorum.quorum.note import NoteSigner
from keyquorum.quorum.secret import SecretBytes

KEY_FILE = "log-signing-key"
NEXT_FILE = "log-signing-key.next"
_MAGIC = "keyquorum-log-key v1"


class LogKey:
    """The daemon's checkpoint signer, loaded from or created in the data directory."""

    __slots__ = ("_path", "_signer")

    def __init__(self, signer: NoteSigner, path: Path) -> None:
        self._signer = signer
        self._path = path

    @property
    def vkey(self) -> str:
        """The C2SP note verifier key string recorded in the genesis entry."""
        return self._signer.verifier_key()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def origin(self) -> str:
        return self._signer.name

    def sign_checkpoint(self, size: int, root: bytes) -> str:
        return self._signer.sign_checkpoint(size, root)

    def sign_message(self, message: bytes) -> bytes:
        """The log key's signature over an entry the daemon writes on its own."""
        return self._signer.sign_message(message)

    @classmethod
    def create(cls, data_dir: Path, *, origin: str) -> LogKey:
        """A new key, written durably with mode 0600; refuses to replace one."""
        return cls._create(data_dir / KEY_FILE, origin)

    @classmethod
    def create_next(cls, data_dir: Path, *, origin: str) -> LogKey:
        """The key a `rotate-log-key` proposal will name; refuses to replace one."""
        return cls._create(data_dir / NEXT_FILE, origin)

    @classmethod
    def _create(cls, path: Path, origin: str) -> LogKey:
        data_dir = path.parent
        signer = NoteSigner.generate(origin)
        with signer.export_seed() as seed:
            text = f"{_MAGIC}\n{origin}\n{seed.reveal().hex()}\n".encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise StateError(f"{path} exists: this data directory already has a log key") from None
        try:
            os.write(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return cls(signer, path)

    @classmethod
    def load(cls, data_dir: Path) -> LogKey:
        """Load the key; `verify_log` then checks the log names this key."""
        path = data_dir / KEY_FILE
        try:
            return cls._read(path)
        except FileNotFoundError:
            raise StateError(
                f"{path} is missing: the log is initialised but its signing key is gone"
            ) from None

    @classmethod
    def load_next(cls, data_dir: Path) -> LogKey | None:
        """The next key made for a rotation, or None."""
        try:
            return cls._read(data_dir / NEXT_FILE)
        except FileNotFoundError:
            return None

    @staticmethod
    def promote_next(data_dir: Path) -> None:
        """The next key becomes the key (a rotation committed); the old file is gone."""
        (data_dir / NEXT_FILE).replace(data_dir / KEY_FILE)
        dir_fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @classmethod
    def _read(cls, path: Path) -> LogKey:
        raw = path.read_bytes()
        lines = raw.decode("ascii", errors="replace").split("\n")
        if len(lines) != 4 or lines[0] != _MAGIC or lines[3] != "":
            raise DeserializationError(f"{path} is not a keyquorum log key file")
        try:
            seed_bytes = bytearray.fromhex(lines[2])
        except ValueError:
            raise DeserializationError(f"{path}: the key is not hex") from None
        with SecretBytes.adopt(seed_bytes, label="log key seed") as seed:
            signer = NoteSigner(lines[1], seed)
        return cls(signer, path)

    def remove(self) -> None:
        """Delete the key file (only when the genesis entry could not be written)."""
        self._path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"<LogKey {self._signer.name}>"
