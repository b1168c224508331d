"""A witness: cosigns a checkpoint only if it extends the last one it cosigned.

`keyquorum audit witness` runs this as a polling loop against the daemon's
AuditService (over mTLS, with an auditor certificate): every `interval`
seconds it reads the latest checkpoint, checks it, cosigns it (C2SP
tlog-cosignature/v1) and sends the cosignature back (`AddCosignature`); the
daemon merges it into the stored note if the quorum put this witness's key
in the log (`add-witness`). Polling, not a service the daemon calls: the
daemon needs no route to its witnesses, and a witness it cannot reach
cannot be left out without the custodians noticing (they sign nothing
fewer than m witnesses cosigned).

One look (`step`), in order:

0. the state: the log key this witness follows and the last checkpoint it
   cosigned (a file, written before any cosignature leaves: a witness never
   cosigns two histories, even across a crash);
1. the latest checkpoint, signed by the followed key; if another key signed
   it, the `rotate-log-key` entries since the last cosigned checkpoint,
   each proven included and signed by the key before it, lead to that key
   (`follow_rotations`), or the checkpoint is refused;
2. not shorter than the last cosigned one; of the same size only with the
   same root (else a fork: both notes are the evidence); larger only with
   an RFC 9162 consistency proof from it (else a rollback or another
   history, with both notes);
3. remember it, then cosign it and send the cosignature.

A daemon that shows this witness one history and another witness (or a
custodian) another cannot get both cosigned by it: the second is refused
with the evidence, and the process stops (exit 1) so that someone looks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from keyquorum.quorum import canonical, evidence
from keyquorum.quorum.checkpoint import (
    Checkpoint,
    NoteSigner,
    cosign_checkpoint,
    parse_verifier_key,
    unverified_size,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    DeserializationError,
    ForkError,
    KeyquorumError,
    LogIntegrityError,
    RollbackError,
    StorageError,
    UnverifiedNoteError,
    VerificationError,
)
from keyquorum.quorum.log import Entry, ExecutionPayload, log_signature_message
from keyquorum.quorum.operations import LogKeyRotated

VERSION: Final = 1
#: Entries read at once while looking for rotations.
SCAN_BATCH: Final = 5000


class WitnessSource(Protocol):
    """What a witness reads from the daemon, and the one thing it sends."""

    def latest(self) -> tuple[int, str]: ...

    def entries(self, start: int, end: int) -> Iterator[bytes]: ...

    def inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes, str]: ...

    def consistency(self, size1: int, size2: int) -> tuple[list[bytes], str]: ...

    def add_cosignature(self, note: str) -> str: ...


@dataclass(frozen=True)
class WitnessState:
    """The log key a witness follows and the last checkpoint it cosigned ("" before any)."""

    log_key: str
    checkpoint: str = ""


def load_state(path: Path) -> WitnessState | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read the witness state {path}: {e}") from e
    obj = canonical.decode(raw)
    if (
        not isinstance(obj, dict)
        or set(obj) != {"v", "log_key", "checkpoint"}
        or obj["v"] != VERSION
        or not isinstance(obj["log_key"], str)
        or not isinstance(obj["checkpoint"], str)
    ):
        raise DeserializationError(f"{path} is not a keyquorum witness state")
    return WitnessState(obj["log_key"], obj["checkpoint"])


def save_state(path: Path, state: WitnessState) -> None:
    """Durably replace the state (temporary file, fsync, rename, directory fsync)."""
    data = canonical.encode(
        {"v": VERSION, "log_key": state.log_key, "checkpoint": state.checkpoint}
    )
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise StorageError(f"cannot write the witness state {path}: {e}") from e


def follow_rotations(source: WitnessSource, key: str, start: int, note: str) -> str:
    """The key that signed `note`, reached from `key` by the rotations in [start, size).

    Each `rotate-log-key` entry found must be included in the tree `note`
    claims, name the followed key as its previous one and be signed by it;
    the note must then verify under the last key. Refused otherwise.
    """
    claimed = Checkpoint.parse(note.rpartition("\n\n")[0] + "\n")
    for lo in range(start, claimed.size, SCAN_BATCH):
        hi = min(lo + SCAN_BATCH, claimed.size)
        for seq, raw in enumerate(source.entries(lo, hi), start=lo):
            if b'"operation":"rotate-log-key"' not in raw:
                continue
            entry = Entry.from_bytes(raw)
            payload = entry.payload
            if not isinstance(payload, ExecutionPayload) or not isinstance(
                payload.result, LogKeyRotated
            ):
                continue
            proof, served, _ = source.inclusion(seq, claimed.size)
            if served != raw:
                raise LogIntegrityError("the daemon served two versions of one entry", seq=seq)
            evidence.require_included(seq, raw, proof, claimed)
            if payload.result.previous_log_key != key or payload.log_signature is None:
                raise VerificationError(
                    f"entry {seq} rotates the log key from {payload.result.previous_log_key}, "
                    f"not from {key}, the key this witness follows"
                )
            parse_verifier_key(key).verify_message(
                log_signature_message(entry), payload.log_signature
            )
            key = payload.result.log_key
    verify_checkpoint(note, parse_verifier_key(key))
    return key


def step(
    source: WitnessSource,
    signer: NoteSigner,
    state: WitnessState,
    now: int,
    remember: Callable[[WitnessState], None],
) -> tuple[WitnessState, Checkpoint | None]:
    """One look at the log (module docstring): the new state, and what was cosigned."""
    # 1. The latest checkpoint, under the followed key (or one it rotated to).
    _, note = source.latest()
    key = state.log_key
    last = state.checkpoint
    last_size = 0 if not last else unverified_size(last)
    try:
        current = verify_checkpoint(note, parse_verifier_key(key)).checkpoint
    except UnverifiedNoteError:
        key = follow_rotations(source, key, last_size, note)
        current = verify_checkpoint(note, parse_verifier_key(key)).checkpoint
    # 2. It extends what this witness cosigned.
    if last:
        seen = verify_checkpoint(last, parse_verifier_key(state.log_key)).checkpoint
        if current.size == seen.size:
            if current.root != seen.root:
                raise ForkError(
                    f"fork: the daemon shows a checkpoint of size {current.size} with another "
                    "root than the one this witness cosigned: two histories",
                    size=current.size,
                    evidence=(last, note),
                )
            return state, None
        proof: list[bytes] = []
        if 0 < seen.size < current.size:
            proof, _ = source.consistency(seen.size, current.size)
        try:
            evidence.require_extends(seen, current, proof)
        except RollbackError as e:
            raise RollbackError(f"refusing to cosign: {e}", evidence=(last, note)) from e.__cause__
    # 3. Remembered before it leaves, then cosigned and sent.
    cosigned = cosign_checkpoint(note, parse_verifier_key(key), signer, now)
    new_state = WitnessState(key, cosigned)
    remember(new_state)
    source.add_cosignature(cosigned)
    return new_state, current


def refusal_lines(error: KeyquorumError) -> list[str]:
    """A refusal as the witness prints it: the reason, then every note of evidence."""
    lines = [f"WITNESS REFUSED: {error}"]
    notes: tuple[str, ...] = ()
    if isinstance(error, RollbackError | ForkError):
        notes = error.evidence
    for i, n in enumerate(notes, start=1):
        lines.append(f"\nevidence {i} (a note signed by the log key):\n{n}")
    return lines
