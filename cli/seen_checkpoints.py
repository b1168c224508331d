"""The last checkpoint a custodian's CLI saw, and the check that a log extends it.

A daemon (or a database administrator behind it) could show a custodian an
older log: one restored from a snapshot, from before a seal, a revocation
or a destruction. The daemon checks its own store against the checkpoint
it keeps outside it (hsm/daemon/rollback.py), but a whole-machine snapshot rolls
that file back too. The custodian's machine is outside the daemon's reach,
so the CLI remembers the last checkpoint it saw for each deployment and,
before it unseals or approves, asks the daemon for its current checkpoint
and an RFC 9162 consistency proof from the remembered one
(`CustodianService.GetLogExtension`, on the custodians' own TLS port). It
refuses a log that is shorter or whose proof fails (`RollbackError`,
`evidence.require_extends_notes`), and remembers the new checkpoint otherwise.

Where: `$XDG_CONFIG_HOME/keyquorum/checkpoints/` (default
`~/.config/keyquorum/checkpoints/`), one file per deployment and log key,
`<deployment>-<16 hex of SHA-256(log key)>.json`, mode 0600, RFC 8785
JSON `{"v": 1, "deployment", "log_key", "checkpoint"}`. Keyed by log key
as well as name because a rollback keeps the log key (it lives beside the
store, not in it): a daemon answering with another log key serves another
log altogether (a new ceremony), which the CLI reports on stderr and then
remembers separately.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

from keyquorum.cli.connect import rpc_errors
from keyquorum.quorum import canonical, evidence
from keyquorum.quorum.checkpoint import Checkpoint, parse_verifier_key, verify_checkpoint
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, StorageError
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

VERSION: Final = 1
_DEPLOYMENT = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: A remembered file holds one note and one key; anything larger is not ours.
MAX_FILE_BYTES: Final = 32_768


@dataclass(frozen=True)
class Seen:
    """A remembered checkpoint: the note and the log key that signed it."""

    deployment: str
    log_key: str
    checkpoint: str


def directory() -> Path:
    """`$XDG_CONFIG_HOME/keyquorum/checkpoints`, `~/.config/...` when unset or relative."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "keyquorum" / "checkpoints"


def _path(deployment: str, log_key: str) -> Path:
    if not _DEPLOYMENT.fullmatch(deployment):
        raise InvalidInputError(f"the daemon names a deployment {deployment!r} that is not valid")
    tag = hashlib.sha256(log_key.encode("utf-8")).hexdigest()[:16]
    return directory() / f"{deployment}-{tag}.json"


def load(deployment: str, log_key: str) -> Seen | None:
    """The remembered checkpoint of this deployment and log key, if any."""
    path = _path(deployment, log_key)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}") from e
    if len(raw) > MAX_FILE_BYTES:
        raise DeserializationError(f"{path} is too large to be a remembered checkpoint")
    obj = canonical.decode(raw)
    if (
        not isinstance(obj, dict)
        or obj.get("v") != VERSION
        or set(obj) != {"v", "deployment", "log_key", "checkpoint"}
        or obj["deployment"] != deployment
        or obj["log_key"] != log_key
        or not isinstance(obj["checkpoint"], str)
    ):
        raise DeserializationError(f"{path} is not a remembered checkpoint of {deployment}")
    return Seen(deployment, log_key, obj["checkpoint"])


def others(deployment: str, log_key: str) -> list[Path]:
    """Remembered files of the same deployment name under another log key."""
    mine = _path(deployment, log_key)
    folder = directory()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{deployment}-*.json") if p != mine)


def save(seen: Seen) -> None:
    """Remember `seen` (0600 file in a 0700 directory, replaced atomically)."""
    path = _path(seen.deployment, seen.log_key)
    data = canonical.encode(
        {
            "v": VERSION,
            "deployment": seen.deployment,
            "log_key": seen.log_key,
            "checkpoint": seen.checkpoint,
        }
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except OSError as e:
        raise StorageError(f"cannot remember the checkpoint in {path}: {e}") from e


def require_extension(stub: pb_grpc.CustodianServiceStub) -> Checkpoint | None:
    """Refuse a daemon whose log does not extend the last checkpoint seen here.

    0. the daemon's deployment and log key (`GetStatus`); nothing to check
       before its ceremony (None);
    1. its current checkpoint and a consistency proof from the remembered
       size (`GetLogExtension`);
    2. the checkpoint is signed by that log key, for that deployment's
       origin; with a remembered one, the log extends it
       (`evidence.require_extends_notes`: not shorter, RFC 9162 proof verifies);
    3. remember the new checkpoint.
    Returns the daemon's checkpoint.
    """
    # 0. Which log.
    with rpc_errors():
        status = stub.GetStatus(pb.GetStatusRequest())
    if not status.initialized:
        return None
    verifier = parse_verifier_key(status.log_key)
    if verifier.name != f"keyquorum/{status.deployment}":
        raise InvalidInputError(
            f"the daemon's log key {verifier.name!r} is not deployment {status.deployment}'s"
        )
    seen = load(status.deployment, status.log_key)
    first = 0 if seen is None else verify_checkpoint(seen.checkpoint, verifier).checkpoint.size
    # 1. The extension.
    with rpc_errors():
        extension = stub.GetLogExtension(pb.GetLogExtensionRequest(first_size=first))
    # 2. Checked.
    if seen is None:
        current = verify_checkpoint(extension.checkpoint, verifier).checkpoint
        for path in others(status.deployment, status.log_key):
            click.echo(
                f"note: deployment {status.deployment} answers with a log key this machine "
                f"has not seen before (another log was remembered in {path}); "
                "remembering this one from now on",
                err=True,
            )
    else:
        current = evidence.require_extends_notes(
            seen.checkpoint, extension.checkpoint, list(extension.proof), verifier
        )
    # 3. Remembered.
    if seen is None or current.size >= first:
        save(Seen(status.deployment, status.log_key, extension.checkpoint))
    return current
