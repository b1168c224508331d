"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys and cosignatures.

A note is a UTF-8 text ending in a newline, a blank line, and one or more
signature lines ``— <key name> base64(key hash || signature)``. The text
means nothing until a trusted key's signature on it has been verified, so
`open_note` is the only way to get a text out of a note and it returns only
a `VerifiedNote`.

Contract of `open_note`, in order:

0. the caller's verifiers are distinct (name and key hash);
1. the note is valid UTF-8 with no control character other than newline;
2. the text is everything up to the last blank line and ends in a newline;
   the signature block is non-empty and ends in a newline;
3. at most `MAX_SIGNATURES` signature lines (the spec asks for at least 16;
   100 is what the Go implementation accepts), else `LimitExceededError`
   before any parsing or verification;
4. every line parses: em dash, space, a valid key name, space, canonical
   base64 of at least 5 bytes; else `DeserializationError`;
5. lines whose (name, key hash) matches no verifier are skipped and
   reported in `unknown_signers`; every line from a known key must verify,
   else `SignatureError` naming the key (the spec's SHOULD, taken as MUST);
6. at least one known key signed, else `UnverifiedNoteError`.

Signature types (first byte of a verifier key, and input to the key hash):
``0x01`` Ed25519 over the text; ``0x04`` C2SP tlog-cosignature/v1: an
8-byte big-endian timestamp then an Ed25519 signature over
``"cosignature/v1\\ntime <T>\\n" || text``. Verifier keys are
``<name>+<8 lowercase hex key hash>+<base64(type || 32-byte public key)>``
with key hash ``SHA-256(name || "\\n" || type || public key)[:4]``.

Private keys live only inside `NoteSigner` (opaque, never printed or
pickled). This module has no private key string form: tests that need
the Go ``PRIVATE+KEY+...`` form parse it themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    LimitExceededError,
    SignatureError,
    UnsupportedVersionError,
    UnverifiedNoteError,
)
from keyquorum.quorum.secret import SecretBytes

#: Most signature lines `open_note` reads (C2SP: at least 16; Go: 100).
MAX_SIGNATURES = 100
#: Largest cosignature timestamp (tlog-cosignature: at most 2^63 - 1).
MAX_TIMESTAMP = 2**63 - 1
KEY_HASH_SIZE = 4
ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64

_SIG_PREFIX = "— "  # em dash U+2014, space
_COSIGNATURE_HEADER = b"cosignature/v1\n"


class SignatureType(IntEnum):
    """C2SP signed-note signature type identifiers this module implements."""

    ED25519 = 0x01
    COSIGNATURE_V1 = 0x04


# -- names, hashes, encodings ------------------------------------------------------


def check_key_name(name: str) -> None:
    """C2SP signed-note: a key name is non-empty with no Unicode space and no '+'."""
    if not name:
        raise InvalidInputError("key name must not be empty")
    for ch in name:
        if ch == "+" or ch.isspace() or ord(ch) < 0x20:
            raise InvalidInputError(f"key name {name!r} contains {ch!r}")
    _require_utf8(name, "key name")


def key_hash(name: str, sig_type: SignatureType, public_key: bytes) -> bytes:
    """``SHA-256(name || 0x0A || type || public key)[:4]`` (C2SP signed-note)."""
    data = name.encode("utf-8") + b"\n" + bytes([sig_type]) + public_key
    return hashlib.sha256(data).digest()[:KEY_HASH_SIZE]


def _require_utf8(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{what} is not valid UTF-8: {e.reason}") from e


def _b64decode(text: str, what: str) -> bytes:
    """Strict RFC 4648 section 4 base64: alphabet, padding, and canonical form."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as e:
        raise DeserializationError(f"{what} is not base64") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise DeserializationError(f"{what} is not canonical base64")
    return raw


def _b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_note_chars(text: str, error: type[Exception]) -> bytes:
    # C2SP signed-note: valid UTF-8, no ASCII control character but newline.
    for i, ch in enumerate(text):
        if ord(ch) < 0x20 and ch != "\n":
            raise error(f"control character U+{ord(ch):04X} at offset {i}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise error(f"not valid UTF-8: {e.reason}") from e


def _check_timestamp(now: int) -> None:
    if not 0 <= now <= MAX_TIMESTAMP:
        raise InvalidInputError(f"timestamp must be between 0 and 2^63-1, got {now}")


def _cosigned_message(timestamp: int, text: bytes) -> bytes:
    """tlog-cosignature "Ed25519 signed message": header, time line, note text."""
    return _COSIGNATURE_HEADER + b"time " + str(timestamp).encode("ascii") + b"\n" + text


# -- verifiers ------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteVerifier:
    """A trusted public key: name, Ed25519 key and signature type.

    The key hash is derived, never given, so a verifier cannot carry a hash
    that does not belong to its key.
    """

    name: str
    public_key: bytes
    sig_type: SignatureType = SignatureType.ED25519

    def __post_init__(self) -> None:
        check_key_name(self.name)
        if len(self.public_key) != ED25519_KEY_SIZE:
            raise InvalidInputError(
                f"Ed25519 public key must be {ED25519_KEY_SIZE} bytes, got {len(self.public_key)}"
            )
        if self.sig_type not in tuple(SignatureType):
            raise InvalidInputError(f"unsupported signature type {self.sig_type}")
        object.__setattr__(self, "sig_type", SignatureType(self.sig_type))

    @property
    def key_hash(self) -> bytes:
        """The 4-byte key ID that prefixes this key's signatures."""
        return key_hash(self.name, self.sig_type, self.public_key)

    def vkey(self) -> str:
        """The verifier key string ``<name>+<hex key hash>+<base64(type || key)>``."""
        material = bytes([self.sig_type]) + self.public_key
        return f"{self.name}+{self.key_hash.hex()}+{_b64encode(material)}"

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key string; `DeserializationError` if it is malformed,
        `UnsupportedVersionError` for a signature type other than 0x01 or 0x04."""
        # 0. Three fields; base64 may itself contain '+', names may not.
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise DeserializationError("verifier key must be <name>+<hash>+<key>")
        name, hash_hex, key_b64 = parts
        # 1. Each field on its own.
        try:
            check_key_name(name)
        except InvalidInputError as e:
            raise DeserializationError(f"verifier key: {e}") from e
        if len(hash_hex) != 2 * KEY_HASH_SIZE or any(c not in "0123456789abcdef" for c in hash_hex):
            raise DeserializationError("verifier key hash must be 8 lowercase hex digits")
        material = _b64decode(key_b64, "verifier key")
        if not material:
            raise DeserializationError("verifier key material is empty")
        # 2. The hash covers type and key as given, before they are interpreted.
        digest = hashlib.sha256(name.encode("utf-8") + b"\n" + material).digest()
        if digest[:KEY_HASH_SIZE] != bytes.fromhex(hash_hex):
            raise DeserializationError(f"verifier key hash {hash_hex} does not match the key")
        # 3. Type and key size.
        if material[0] not in tuple(SignatureType):
            raise UnsupportedVersionError(f"unsupported signature type 0x{material[0]:02x}")
        if len(material) - 1 != ED25519_KEY_SIZE:
            raise DeserializationError(
                f"Ed25519 verifier key must be {ED25519_KEY_SIZE} bytes, got {len(material) - 1}"
            )
        return cls(name, material[1:], SignatureType(material[0]))

    def verify(self, text: bytes, signature: bytes) -> int | None:
        """Check `signature` (without the key hash) over the note text `text`.

        Returns the cosignature timestamp for type 0x04, None for 0x01.
        Raises `SignatureError` naming this key.
        """
        is_cosignature = self.sig_type is SignatureType.COSIGNATURE_V1
        want = ED25519_SIGNATURE_SIZE + (8 if is_cosignature else 0)
        if len(signature) != want:
            raise SignatureError(
                f"signature by {self._label()} is {len(signature)} bytes, want {want}"
            )
        timestamp: int | None = None
        message, sig = text, signature
        if is_cosignature:
            timestamp = int.from_bytes(signature[:8], "big")
            if timestamp > MAX_TIMESTAMP:
                raise SignatureError(f"cosignature by {self._label()} has timestamp > 2^63-1")
            message, sig = _cosigned_message(timestamp, text), signature[8:]
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(sig, message)
        except InvalidSignature as e:
            raise SignatureError(f"signature by {self._label()} does not verify") from e
        return timestamp

    def verify_message(self, message: bytes, signature: bytes) -> None:
        """Check a plain Ed25519 signature made by `NoteSigner.sign_message`.

        Only for type 0x01 keys, and only for messages that carry a NUL byte
        in their first `MESSAGE_DOMAIN_BYTES` (a domain prefix): a note text
        holds no control character, so such a message can never be taken
        for a signed note or a cosignature, nor the reverse.
        """
        _check_message(message)
        if self.sig_type is not SignatureType.ED25519:
            raise InvalidInputError(f"{self._label()} is not an Ed25519 (0x01) key")
        if len(signature) != ED25519_SIGNATURE_SIZE:
            raise SignatureError(
                f"signature by {self._label()} is {len(signature)} bytes, "
                f"want {ED25519_SIGNATURE_SIZE}"
            )
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except InvalidSignature as e:
            raise SignatureError(f"signature by {self._label()} does not verify") from e

    def _label(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}"


#: A message signed with `sign_message` has a NUL byte within its first this many bytes.
MESSAGE_DOMAIN_BYTES = 64


def _check_message(message: bytes) -> None:
    if not isinstance(message, bytes) or b"\x00" not in message[:MESSAGE_DOMAIN_BYTES]:
        raise InvalidInputError(
            "a signed message starts with a domain prefix ending in NUL, so that it can "
            "never be read as a note text"
        )


# -- signers ---------------------------------------------------------------------------


class NoteSigner:
    """An Ed25519 note or cosignature signing key. Opaque: its repr shows the
    name and key hash only, and it refuses pickling and copying."""

    __slots__ = ("_key", "_verifier")

    def __init__(
        self, name: str, seed: SecretBytes, sig_type: SignatureType = SignatureType.ED25519
    ) -> None:
        """Take the 32-byte RFC 8032 private key (seed); the caller keeps and wipes `seed`."""
        check_key_name(name)
        if len(seed) != ED25519_KEY_SIZE:
            raise InvalidInputError(
                f"Ed25519 seed must be {ED25519_KEY_SIZE} bytes, got {len(seed)}"
            )
        self._key = Ed25519PrivateKey.from_private_bytes(seed.view())
        self._verifier = NoteVerifier(name, self._key.public_key().public_bytes_raw(), sig_type)

    @classmethod
    def generate(
        cls,
        name: str,
        *,
        sig_type: SignatureType = SignatureType.ED25519,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> NoteSigner:
        """A fresh key from `random_bytes` (injectable for reproducible tests)."""
        with SecretBytes(random_bytes(ED25519_KEY_SIZE), label="note key seed") as seed:
            return cls(name, seed, sig_type)

    @property
    def name(self) -> str:
        return self._verifier.name

    @property
    def sig_type(self) -> SignatureType:
        return self._verifier.sig_type

    def verifier(self) -> NoteVerifier:
        """The public half."""
        return self._verifier

    def verifier_key(self) -> str:
        """The public half as a verifier key string."""
        return self._verifier.vkey()

    def export_seed(self) -> SecretBytes:
        """The 32-byte private key, for storage wrapped under another key."""
        return SecretBytes(self._key.private_bytes_raw(), label="note key seed")

    def sign_checkpoint(self, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
        """A C2SP checkpoint with this key's name as origin, signed by this key."""
        # Imported here: checkpoint builds on this module.
        from keyquorum.quorum.checkpoint import Checkpoint, sign_checkpoint

        return sign_checkpoint(Checkpoint(self.name, size, root, tuple(extensions)), self)

    def sign_message(self, message: bytes) -> bytes:
        """A plain Ed25519 signature over `message` (a 0x01 key only).

        `message` must carry a NUL-terminated domain prefix (see
        `NoteVerifier.verify_message`), so the same key's note signatures
        and message signatures never stand in for each other.
        """
        _check_message(message)
        if self.sig_type is not SignatureType.ED25519:
            raise InvalidInputError(f"{self!r} is not an Ed25519 (0x01) key")
        return self._key.sign(message)

    def _signature_line(self, text: bytes, timestamp: int | None) -> str:
        if self.sig_type is SignatureType.ED25519:
            sig = self._key.sign(text)
        else:
            if timestamp is None:
                raise InvalidInputError(f"cosigner {self.name} needs the time (`now`)")
            _check_timestamp(timestamp)
            sig = timestamp.to_bytes(8, "big") + self._key.sign(_cosigned_message(timestamp, text))
        return f"{_SIG_PREFIX}{self.name} {_b64encode(self._verifier.key_hash + sig)}\n"

    def __repr__(self) -> str:
        return f"<NoteSigner {self._verifier._label()}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("NoteSigner cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("NoteSigner cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("NoteSigner cannot be copied")


# -- signing -----------------------------------------------------------------------------


def sign_note(text: str, signers: Sequence[NoteSigner], *, now: int | None = None) -> str:
    """The signed note: `text`, a blank line, one signature line per signer.

    `now` (Unix seconds) is required when a signer is a cosigner (type 0x04).
    """
    raw = _check_text(text)
    return text + "\n" + _signature_lines(raw, signers, [], now)


def add_signatures(note: str, signers: Sequence[NoteSigner], *, now: int | None = None) -> str:
    """`note` with a signature line from each of `signers` appended.

    Checks the note's structure, not its signatures: callers that add a
    cosignature verify the note first (see `checkpoint.cosign_checkpoint`).
    """
    text, lines = _split(note)
    raw = text.encode("utf-8")
    return note + _signature_lines(raw, signers, lines, now)


def _check_text(text: str) -> bytes:
    if not text.endswith("\n"):
        raise InvalidInputError("note text must end with a newline")
    return _check_note_chars(text, InvalidInputError)


def _signature_lines(
    raw: bytes, signers: Sequence[NoteSigner], existing: list[_Line], now: int | None
) -> str:
    if not signers:
        raise InvalidInputError("at least one signer is required")
    if len(existing) + len(signers) > MAX_SIGNATURES:
        raise LimitExceededError(f"a note carries at most {MAX_SIGNATURES} signatures")
    seen = {(line.name, line.key_hash) for line in existing}
    out = []
    for signer in signers:
        ident = (signer.name, signer.verifier().key_hash)
        if ident in seen:
            raise InvalidInputError(f"{signer!r} already signed this note")
        seen.add(ident)
        out.append(signer._signature_line(raw, now))
    return "".join(out)


# -- opening -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    name: str
    key_hash: bytes
    signature: bytes


@dataclass(frozen=True)
class VerifiedSignature:
    """One signature that verified: who, which key, and for a cosignature, when."""

    name: str
    key_hash: bytes
    sig_type: SignatureType
    timestamp: int | None


@dataclass(frozen=True)
class VerifiedNote:
    """A note text that at least one trusted key signed."""

    text: str
    signatures: tuple[VerifiedSignature, ...]
    #: Names on signature lines from keys the caller did not trust (skipped).
    unknown_signers: tuple[str, ...]

    @property
    def signed_by(self) -> tuple[str, ...]:
        """Names of the trusted keys that signed, in note order, once each."""
        return tuple(dict.fromkeys(s.name for s in self.signatures))


def _split(note: str) -> tuple[str, list[_Line]]:
    """Steps 1-4 of the module contract: the text and the parsed signature lines."""
    # 1. Characters.
    _check_note_chars(note, DeserializationError)
    # 2. Text and signature block, split at the last blank line.
    split = note.rfind("\n\n")
    if split < 0:
        raise DeserializationError("note has no blank line before its signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block:
        raise DeserializationError("note has no signature lines")
    if not block.endswith("\n"):
        raise DeserializationError("note does not end with a newline")
    # 3. Bound the work before doing any.
    count = block.count("\n")
    if count > MAX_SIGNATURES:
        raise LimitExceededError(f"note has {count} signature lines, at most {MAX_SIGNATURES}")
    # 4. Every line well-formed.
    lines = []
    for number, line in enumerate(block[:-1].split("\n"), start=1):
        if not line.startswith(_SIG_PREFIX):
            raise DeserializationError(f"signature line {number} does not start with an em dash")
        name, space, sig_b64 = line[len(_SIG_PREFIX) :].partition(" ")
        if not space:
            raise DeserializationError(f"signature line {number} has no signature")
        try:
            check_key_name(name)
        except InvalidInputError as e:
            raise DeserializationError(f"signature line {number}: {e}") from e
        sig = _b64decode(sig_b64, f"signature line {number}")
        if len(sig) <= KEY_HASH_SIZE:
            raise DeserializationError(f"signature line {number} is too short")
        lines.append(_Line(name, sig[:KEY_HASH_SIZE], sig[KEY_HASH_SIZE:]))
    return text, lines


def open_note(note: str | bytes, verifiers: Sequence[NoteVerifier]) -> VerifiedNote:
    """Parse `note` and verify its signatures from `verifiers` (see the module contract)."""
    # 0. Distinct verifiers.
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for v in verifiers:
        ident = (v.name, v.key_hash)
        if ident in known:
            raise InvalidInputError(f"verifier {v.vkey()} is given twice")
        known[ident] = v
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DeserializationError(f"note is not valid UTF-8: {e.reason}") from e
    # 1-4. Structure.
    text, lines = _split(note)
    raw = text.encode("utf-8")
    # 5. Verify every line from a known key; skip the others.
    verified: list[VerifiedSignature] = []
    unknown: list[str] = []
    for line in lines:
        verifier = known.get((line.name, line.key_hash))
        if verifier is None:
            unknown.append(line.name)
            continue
        timestamp = verifier.verify(raw, line.signature)
        verified.append(VerifiedSignature(line.name, line.key_hash, verifier.sig_type, timestamp))
    # 6. At least one.
    if not verified:
        raise UnverifiedNoteError(
            f"no signature from a trusted key (signed by: {', '.join(unknown)})"
        )
    return VerifiedNote(text, tuple(verified), tuple(dict.fromkeys(unknown)))
