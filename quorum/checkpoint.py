"""C2SP tlog-checkpoint bodies in signed notes, and tlog-cosignatures on them.

A checkpoint body (c2sp.org/tlog-checkpoint) is, one per line: the log's
origin, the tree size in decimal with no leading zeros, the base64 RFC 9162
root hash (32 bytes), then optional non-empty extension lines. The log signs
it as a signed note (`quorum.note`) with an Ed25519 key (type 0x01) whose
name is the origin; auditors add C2SP tlog-cosignature/v1 lines (type 0x04,
timestamped) after checking consistency with what they saw before.

Contract of `verify_checkpoint`, in order:

0. the log verifier is type 0x01, every cosigner type 0x04, and no two
   cosigners share a name;
1. the note opens (`note.open_note`) under the log key and the cosigners:
   malformed, forged by a known key, or signed by no known key all raise;
2. the log key itself signed (`UnverifiedNoteError` if only cosigners did);
3. the body parses as a checkpoint (`DeserializationError`);
4. the origin is the one expected: `origin` if given, else the log key's
   name (`VerificationError`), so a checkpoint of another log signed by the
   same key is not taken for this one.

It returns which cosigners signed and at which time; `require_cosigners`
turns that into a raising threshold check. Whether a cosignature's time is
acceptable (not in the future, recent enough) is the caller's policy.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    ThresholdError,
    UnverifiedNoteError,
    VerificationError,
)
from keyquorum.quorum.merkle import EMPTY_ROOT, HASH_SIZE, MAX_TREE_SIZE
from keyquorum.quorum.note import (
    NoteSigner,
    NoteVerifier,
    SignatureType,
    add_signatures,
    open_note,
    sign_note,
)

__all__ = [
    "Checkpoint",
    "NoteSigner",
    "NoteVerifier",
    "VerifiedCheckpoint",
    "cosign_checkpoint",
    "parse_verifier_key",
    "sign_checkpoint",
    "unverified_size",
    "verify_checkpoint",
]

_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")


def _check_line(value: str, what: str) -> None:
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    for i, ch in enumerate(value):
        if ord(ch) < 0x20:
            raise InvalidInputError(f"{what} contains control character U+{ord(ch):04X} at {i}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{what} is not valid UTF-8: {e.reason}") from e


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: origin, size, RFC 9162 root, and opaque extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not 0 <= self.size <= MAX_TREE_SIZE:
            raise InvalidInputError(f"tree size must be between 0 and 2^64-1, got {self.size}")
        if len(self.root) != HASH_SIZE:
            raise InvalidInputError(f"root hash must be {HASH_SIZE} bytes, got {len(self.root)}")
        if self.size == 0 and self.root != EMPTY_ROOT:
            raise InvalidInputError("the root of an empty tree must be SHA-256 of nothing")
        object.__setattr__(self, "extensions", tuple(self.extensions))
        for i, line in enumerate(self.extensions):
            _check_line(line, f"extension line {i}")

    def body(self) -> str:
        """The note text: origin, size, base64 root, extensions, each ending in newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii")]
        return "".join(line + "\n" for line in (*lines, *self.extensions))

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        """Parse a checkpoint body strictly; `DeserializationError` says what is wrong.

        Only `body()` of the result is ever signed or compared, and parse
        refuses every text `body()` would not produce, so the two agree.
        """
        if not body.endswith("\n"):
            raise DeserializationError("checkpoint body must end with a newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise DeserializationError(f"checkpoint body has {len(lines)} lines, at least 3")
        origin, size_text, root_text, *extensions = lines
        if not _SIZE.fullmatch(size_text):
            raise DeserializationError(f"tree size {size_text!r} is not canonical decimal")
        try:
            root = base64.b64decode(root_text.encode("ascii"), validate=True)
        except (UnicodeEncodeError, ValueError) as e:
            raise DeserializationError("root hash is not base64") from e
        if base64.b64encode(root).decode("ascii") != root_text:
            raise DeserializationError("root hash is not canonical base64")
        try:
            checkpoint = cls(origin, int(size_text), root, tuple(extensions))
        except InvalidInputError as e:
            raise DeserializationError(f"checkpoint: {e}") from e
        return checkpoint


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint the log signed, and the cosigners that vouched for it."""

    checkpoint: Checkpoint
    #: Cosigner name -> cosignature time (Unix seconds), for each that signed.
    cosigned_by: Mapping[str, int]
    #: Names on signature lines from keys the caller did not configure.
    unknown_signers: tuple[str, ...] = ()

    def require_cosigners(self, threshold: int) -> None:
        """Raise `ThresholdError` unless at least `threshold` known cosigners signed."""
        if len(self.cosigned_by) < threshold:
            raise ThresholdError(
                f"checkpoint cosigned by {len(self.cosigned_by)} known cosigners, "
                f"{threshold} required"
            )


def unverified_size(note: str) -> int:
    """The tree size a checkpoint note claims, read without checking any signature.

    For indexing and cheap consistency checks only (a store row against its
    note, a note filed under its size); nothing may be trusted on it.
    `DeserializationError` if the note's body is not a checkpoint.
    """
    if not isinstance(note, str):
        raise DeserializationError("a checkpoint note is text")
    text, sep, _ = note.rpartition("\n\n")
    if not sep:
        raise DeserializationError("a checkpoint note has a blank line before its signatures")
    return Checkpoint.parse(text + "\n").size


def parse_verifier_key(vkey: str) -> NoteVerifier:
    """A verifier key string ``<name>+<hex hash>+<base64 key>`` (see `NoteVerifier.from_vkey`)."""
    return NoteVerifier.from_vkey(vkey)


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The checkpoint as a signed note, signed by the log key (type 0x01)."""
    if signer.sig_type is not SignatureType.ED25519:
        raise InvalidInputError("a log signs checkpoints with an Ed25519 (0x01) note key")
    return sign_note(checkpoint.body(), [signer])


def verify_checkpoint(
    note: str | bytes,
    log_verifier: NoteVerifier,
    cosigners: Sequence[NoteVerifier] = (),
    *,
    origin: str | None = None,
) -> VerifiedCheckpoint:
    """Open a signed checkpoint (see the module contract, steps 0-4)."""
    # 0. Key types.
    if log_verifier.sig_type is not SignatureType.ED25519:
        raise InvalidInputError("the log verifier must be an Ed25519 (0x01) note key")
    names: set[str] = set()
    for c in cosigners:
        if c.sig_type is not SignatureType.COSIGNATURE_V1:
            raise InvalidInputError(f"cosigner {c.name} must be a cosignature (0x04) key")
        if c.name in names:
            # `cosigned_by` is keyed by name, so names must tell cosigners apart.
            raise InvalidInputError(f"two cosigners are named {c.name}")
        names.add(c.name)
    # 1. Signatures.
    opened = open_note(note, [log_verifier, *cosigners])
    # 2. The log's own.
    log_id = (log_verifier.name, log_verifier.key_hash)
    if not any((s.name, s.key_hash) == log_id for s in opened.signatures):
        raise UnverifiedNoteError(f"checkpoint is not signed by the log key {log_verifier.name}")
    # 3. Body.
    checkpoint = Checkpoint.parse(opened.text)
    # 4. Origin.
    expected = log_verifier.name if origin is None else origin
    if checkpoint.origin != expected:
        raise VerificationError(
            f"checkpoint origin {checkpoint.origin!r} is not the expected {expected!r}"
        )
    cosigned = {
        s.name: s.timestamp
        for s in opened.signatures
        if s.sig_type is SignatureType.COSIGNATURE_V1 and s.timestamp is not None
    }
    return VerifiedCheckpoint(checkpoint, MappingProxyType(cosigned), opened.unknown_signers)


def cosign_checkpoint(
    note: str,
    log_verifier: NoteVerifier,
    cosigner: NoteSigner,
    now: int,
    *,
    origin: str | None = None,
) -> str:
    """`note` with a tlog-cosignature/v1 line from `cosigner` dated `now` appended.

    Verifies the log's signature first; checking that the checkpoint is
    consistent with the last one the cosigner saw is the caller's job
    (`merkle.verify_consistency`) and must come before this call.
    """
    if cosigner.sig_type is not SignatureType.COSIGNATURE_V1:
        raise InvalidInputError("a cosigner signs with a cosignature (0x04) key")
    verify_checkpoint(note, log_verifier, origin=origin)
    return add_signatures(note, [cosigner], now=now)
