"""What anyone holding a checkpoint can check about the log: extension, inclusion, receipts.

One rule each, used by the daemon (its checkpoint kept outside the store,
hsm/daemon/rollback.py), the custodians' CLI (the checkpoint each
remembers, cli/seen_checkpoints.py) and the auditor (cli/audit.py):

- `require_extends`: a log whose checkpoint is `current` extends the one a
  party trusted (`trusted`): not shorter, and an RFC 9162 section 2.1.4
  consistency proof from the trusted size verifies against both roots.
  Refused as `RollbackError` (the cause says which check failed).
- `require_included`: an entry is the one at `seq` of the tree a checkpoint
  commits to (RFC 9162 section 2.1.3 inclusion proof, the entry's own
  `seq` field agreeing). Refused as `LogIntegrityError` naming the entry.
- Receipts (c2sp.org/tlog-proof@v1, with the entry itself on its `extra`
  line): `make_receipt`, `parse_receipt`, and `verify_receipt`, which checks
  the checkpoint's signature (and cosigners), then the inclusion.

Preconditions are checked before any hashing (STYLE.md 3).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from keyquorum.quorum import merkle
from keyquorum.quorum.checkpoint import (
    Checkpoint,
    NoteVerifier,
    VerifiedCheckpoint,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    ProofError,
    RollbackError,
    VerificationError,
)
from keyquorum.quorum.log import Entry

RECEIPT_HEADER: Final = "c2sp.org/tlog-proof@v1"


def require_extends(trusted: Checkpoint, current: Checkpoint, proof: Sequence[bytes]) -> None:
    """The log of `current` extends the one of `trusted` (see the module docstring)."""
    # 1. Not shorter.
    if current.size < trusted.size:
        raise RollbackError(
            f"the log has {current.size} entries, but a checkpoint of {trusted.size} entries "
            "was seen before: the log was truncated or rolled back (a store restored from an "
            "older snapshot?)"
        )
    # 2. The same history, extended (RFC 9162 2.1.4).
    if trusted.size == 0:
        return
    try:
        merkle.verify_consistency(trusted.size, current.size, proof, trusted.root, current.root)
    except (ProofError, InvalidInputError) as e:
        raise RollbackError(
            f"the log of {current.size} entries does not extend the checkpoint of "
            f"{trusted.size} entries seen before: another history ({e})"
        ) from e


def require_extends_notes(
    trusted_note: str,
    current_note: str,
    proof: Sequence[bytes],
    verifier: NoteVerifier,
    current_verifier: NoteVerifier | None = None,
) -> Checkpoint:
    """`require_extends` for two signed notes, checked under the log key first.

    `trusted_note` is checked under `verifier`, `current_note` under
    `current_verifier` (the same key unless the log key was rotated in
    between: the caller has checked that rotation). A refusal carries both
    notes as its evidence. Returns the current checkpoint.
    """
    trusted = verify_checkpoint(trusted_note, verifier).checkpoint
    current = verify_checkpoint(current_note, current_verifier or verifier).checkpoint
    try:
        require_extends(trusted, current, proof)
    except RollbackError as e:
        raise RollbackError(str(e), evidence=(trusted_note, current_note)) from e.__cause__
    return current


def require_tree_extends(
    trusted_note: str,
    tree: merkle.MerkleTree,
    current_note: str,
    verifier: NoteVerifier,
    current_verifier: NoteVerifier | None = None,
) -> None:
    """`require_extends_notes` for a holder of the whole tree: it makes the proof itself."""
    trusted = verify_checkpoint(trusted_note, verifier).checkpoint
    proof: list[bytes] = []
    if 0 < trusted.size < tree.size:
        proof = tree.consistency_proof(trusted.size, tree.size)
    require_extends_notes(trusted_note, current_note, proof, verifier, current_verifier)


def require_included(seq: int, entry: bytes, proof: Sequence[bytes], cp: Checkpoint) -> None:
    """`entry` is entry `seq` of the tree `cp` commits to (RFC 9162 2.1.3)."""
    try:
        decoded = Entry.from_bytes(entry)
    except DeserializationError as e:
        raise LogIntegrityError(f"the entry is malformed: {e}", seq=seq) from e
    if decoded.seq != seq:
        raise LogIntegrityError(f"the entry served says it is entry {decoded.seq}", seq=seq)
    try:
        merkle.verify_inclusion(seq, cp.size, merkle.leaf_hash(entry), proof, cp.root)
    except KeyquorumError as e:
        raise LogIntegrityError(
            f"not included in the tree of size {cp.size} you trust: {e}", seq=seq
        ) from e


@dataclass(frozen=True)
class Receipt:
    """Portable proof that one entry is in the log: the entry, its proof, a checkpoint."""

    seq: int
    entry: bytes
    proof: tuple[bytes, ...]
    note: str


def make_receipt(seq: int, entry: bytes, proof: Sequence[bytes], note: str) -> str:
    """c2sp.org/tlog-proof@v1: extra (the entry), index, proof hashes, blank, checkpoint."""
    lines = [
        RECEIPT_HEADER,
        "extra " + base64.b64encode(entry).decode("ascii"),
        f"index {seq}",
        *(base64.b64encode(h).decode("ascii") for h in proof),
    ]
    return "\n".join(lines) + "\n\n" + note


def parse_receipt(text: str) -> Receipt:
    """Read a receipt strictly (c2sp.org/tlog-proof layout); DeserializationError if not one."""
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise DeserializationError("a receipt has a blank line before its checkpoint")
    lines = head.split("\n")
    if len(lines) < 3 or lines[0] != RECEIPT_HEADER:
        raise DeserializationError(f"a receipt starts with {RECEIPT_HEADER!r}")
    if not lines[1].startswith("extra "):
        raise DeserializationError("a keyquorum receipt carries its entry on the 'extra' line")
    if not lines[2].startswith("index "):
        raise DeserializationError("the third line must be 'index N'")
    index = lines[2][len("index ") :]
    if not index.isdigit() or (index != "0" and index.startswith("0")):
        raise DeserializationError("the index must be decimal without leading zeros")
    try:
        entry = base64.b64decode(lines[1][len("extra ") :], validate=True)
        proof = tuple(base64.b64decode(h, validate=True) for h in lines[3:])
    except binascii.Error as e:
        raise DeserializationError("the receipt's base64 is damaged") from e
    return Receipt(int(index), entry, proof, note)


def verify_receipt(
    receipt: Receipt,
    log_verifier: NoteVerifier,
    cosigners: Sequence[NoteVerifier] = (),
    *,
    min_cosigners: int = 0,
) -> VerifiedCheckpoint:
    """Check a receipt offline: its checkpoint (and cosigners), then the entry's inclusion."""
    try:
        verified = verify_checkpoint(receipt.note, log_verifier, list(cosigners))
    except KeyquorumError as e:
        raise VerificationError(f"the receipt's checkpoint does not check: {e}") from e
    verified.require_cosigners(min_cosigners)
    require_included(receipt.seq, receipt.entry, receipt.proof, verified.checkpoint)
    return verified
