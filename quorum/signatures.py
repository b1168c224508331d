"""Hybrid custodian signatures: Ed25519 and ML-DSA-65, both must verify.

A custodian signature is valid only if both halves verify, so it stays
unforgeable while either algorithm holds: Ed25519 (RFC 8032) against
today's attacks, ML-DSA-65 (FIPS 204) against a future quantum computer.

Domain separation (docs/credentials.md): for `sign(domain, message)`

- Ed25519 signs `b"keyquorum/v1/" + domain + b"\\0" + message` (pure
  Ed25519 has no context input, so the domain is a prefix; a domain never
  contains NUL, so the split is unambiguous);
- ML-DSA-65 signs `message` with the FIPS 204 context string
  `b"keyquorum/v1/" + domain` (section 5.2, ctx of at most 255 bytes).

A domain is lowercase ASCII (`[a-z0-9]` then `[a-z0-9._/-]`), so the
prefix is short enough for the ML-DSA context and no two domains encode
the same way.

Wire form of a signature: 64-byte Ed25519 signature || 3309-byte ML-DSA-65
signature, 3373 bytes, nothing else. The seed form of a signing key (for
the credential file) is the 32-byte Ed25519 private key || the 32-byte
ML-DSA-65 seed (FIPS 204 `xi`).

The per-algorithm functions (`verify_ed25519`, `verify_mldsa65`,
`sign_ed25519_from_seed`, `sign_mldsa65_from_seed`) are what the hybrid
code itself calls, so public vectors test exactly the code path custodians
use. Their errors: a key of the wrong size or an over-long context is the
caller's mistake (`InvalidInputError`); a signature of the wrong size or
one that does not verify is `SignatureError`.

ML-DSA-65 signing in OpenSSL is hedged (fresh randomness per signature,
FIPS 204 section 3.4), so two signatures of one message differ; both
verify. Ed25519 is deterministic.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa

from keyquorum.quorum import canonical
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, SignatureError
from keyquorum.quorum.secret import SecretBytes

DOMAIN_PREFIX = b"keyquorum/v1/"

ED25519_PUBLIC_SIZE = 32
ED25519_SEED_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
MLDSA65_PUBLIC_SIZE = 1952
MLDSA65_SEED_SIZE = 32
MLDSA65_SIGNATURE_SIZE = 3309
MLDSA_MAX_CONTEXT = 255  # FIPS 204, section 5.2

SEEDS_SIZE = ED25519_SEED_SIZE + MLDSA65_SEED_SIZE
SIGNATURE_SIZE = ED25519_SIGNATURE_SIZE + MLDSA65_SIGNATURE_SIZE
MAX_DOMAIN = MLDSA_MAX_CONTEXT - len(DOMAIN_PREFIX)

_DOMAIN = re.compile(r"[a-z0-9][a-z0-9._/-]*")

Bytes = bytes | bytearray | memoryview


# --- domain separation ------------------------------------------------------


def domain_bytes(domain: str) -> bytes:
    """Check a signing domain and return its ASCII bytes."""
    if not isinstance(domain, str):
        raise InvalidInputError("signing domain must be a str")
    if not _DOMAIN.fullmatch(domain):
        raise InvalidInputError(
            "signing domain must be lowercase ASCII letters, digits and ._/- "
            "(starting with a letter or digit)"
        )
    if len(domain) > MAX_DOMAIN:
        raise InvalidInputError(f"signing domain too long: {len(domain)} > {MAX_DOMAIN} characters")
    return domain.encode("ascii")


def ed25519_input(domain: str, message: bytes) -> bytes:
    """The exact bytes the Ed25519 half signs: prefix || domain || NUL || message."""
    return DOMAIN_PREFIX + domain_bytes(domain) + b"\0" + _message(message)


def mldsa65_context(domain: str) -> bytes:
    """The FIPS 204 context string of the ML-DSA-65 half: prefix || domain."""
    return DOMAIN_PREFIX + domain_bytes(domain)


def _message(message: object) -> bytes:
    if not isinstance(message, bytes | bytearray | memoryview):
        raise InvalidInputError("message to sign or verify must be bytes")
    return bytes(message)


def _exact(name: str, data: object, size: int, error: type[Exception]) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError(f"{name} must be bytes")
    if len(data) != size:
        raise error(f"{name} must be {size} bytes, got {len(data)}")
    return bytes(data)


# --- per-algorithm primitives ----------------------------------------------


def _ed25519_public(public: object) -> ed25519.Ed25519PublicKey:
    raw = _exact("Ed25519 public key", public, ED25519_PUBLIC_SIZE, InvalidInputError)
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def _mldsa65_public(public: object) -> mldsa.MLDSA65PublicKey:
    raw = _exact("ML-DSA-65 public key", public, MLDSA65_PUBLIC_SIZE, InvalidInputError)
    return mldsa.MLDSA65PublicKey.from_public_bytes(raw)


def _ed25519_verify_with(key: ed25519.Ed25519PublicKey, message: bytes, signature: object) -> None:
    sig = _exact("Ed25519 signature", signature, ED25519_SIGNATURE_SIZE, SignatureError)
    try:
        key.verify(sig, message)
    except InvalidSignature as e:
        raise SignatureError("Ed25519 signature does not verify") from e


def _mldsa65_verify_with(
    key: mldsa.MLDSA65PublicKey, message: bytes, signature: object, context: bytes
) -> None:
    sig = _exact("ML-DSA-65 signature", signature, MLDSA65_SIGNATURE_SIZE, SignatureError)
    try:
        key.verify(sig, message, context)
    except InvalidSignature as e:
        raise SignatureError("ML-DSA-65 signature does not verify") from e


def _check_context(context: object) -> bytes:
    if not isinstance(context, bytes | bytearray | memoryview):
        raise InvalidInputError("ML-DSA-65 context must be bytes")
    if len(context) > MLDSA_MAX_CONTEXT:
        raise InvalidInputError(
            f"ML-DSA-65 context too long: {len(context)} > {MLDSA_MAX_CONTEXT} bytes"
        )
    return bytes(context)


def verify_ed25519(public: bytes, message: bytes, signature: bytes) -> None:
    """Verify a pure Ed25519 signature (RFC 8032, section 5.1.7).

    Raises InvalidInputError for a public key that is not 32 bytes and
    SignatureError for a signature that is not 64 bytes or does not verify.
    """
    key = _ed25519_public(public)
    _ed25519_verify_with(key, _message(message), signature)


def verify_mldsa65(public: bytes, message: bytes, signature: bytes, context: bytes) -> None:
    """Verify an ML-DSA-65 signature with a context string (FIPS 204, Algorithm 3).

    Raises InvalidInputError for a public key that is not 1952 bytes or a
    context longer than 255 bytes, and SignatureError for a signature that
    is not 3309 bytes or does not verify.
    """
    ctx = _check_context(context)
    key = _mldsa65_public(public)
    _mldsa65_verify_with(key, _message(message), signature, ctx)


def _seed_view(name: str, seed: object, size: int) -> memoryview:
    """Check a private seed's size and return a view of it (no copy of the secret)."""
    if isinstance(seed, SecretBytes):
        raw = seed.view()
    elif isinstance(seed, bytes | bytearray | memoryview):
        raw = memoryview(seed)
    else:
        raise InvalidInputError(f"{name} must be SecretBytes or bytes")
    if raw.nbytes != size:
        raise InvalidInputError(f"{name} must be {size} bytes, got {raw.nbytes}")
    return raw


def _ed25519_private(seed: object) -> ed25519.Ed25519PrivateKey:
    raw = _seed_view("Ed25519 private key", seed, ED25519_SEED_SIZE)
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw)


def _mldsa65_private(seed: object) -> mldsa.MLDSA65PrivateKey:
    raw = _seed_view("ML-DSA-65 seed", seed, MLDSA65_SEED_SIZE)
    return mldsa.MLDSA65PrivateKey.from_seed_bytes(raw)


def sign_ed25519_from_seed(seed: SecretBytes | bytes, message: bytes) -> bytes:
    """Pure Ed25519 signature (RFC 8032, section 5.1.6) from a 32-byte private key."""
    return _ed25519_private(seed).sign(_message(message))


def sign_mldsa65_from_seed(seed: SecretBytes | bytes, message: bytes, context: bytes) -> bytes:
    """Hedged ML-DSA-65 signature (FIPS 204, Algorithm 2) from a 32-byte seed."""
    ctx = _check_context(context)
    return _mldsa65_private(seed).sign(_message(message), ctx)


# --- hybrid keys and signatures --------------------------------------------


class HybridSignature:
    """A hybrid signature: Ed25519 half and ML-DSA-65 half (public, immutable)."""

    __slots__ = ("_ed25519", "_mldsa65")

    _ed25519: bytes
    _mldsa65: bytes

    def __init__(self, ed25519_signature: bytes, mldsa65_signature: bytes) -> None:
        object.__setattr__(
            self,
            "_ed25519",
            _exact(
                "Ed25519 signature", ed25519_signature, ED25519_SIGNATURE_SIZE, InvalidInputError
            ),
        )
        object.__setattr__(
            self,
            "_mldsa65",
            _exact(
                "ML-DSA-65 signature", mldsa65_signature, MLDSA65_SIGNATURE_SIZE, InvalidInputError
            ),
        )

    @property
    def ed25519(self) -> bytes:
        return self._ed25519

    @property
    def mldsa65(self) -> bytes:
        return self._mldsa65

    def to_bytes(self) -> bytes:
        """The 3373-byte wire form: Ed25519 signature || ML-DSA-65 signature."""
        return self._ed25519 + self._mldsa65

    @classmethod
    def from_bytes(cls, data: bytes) -> HybridSignature:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise DeserializationError("hybrid signature must be bytes")
        if len(data) != SIGNATURE_SIZE:
            raise DeserializationError(
                f"hybrid signature must be {SIGNATURE_SIZE} bytes, got {len(data)}"
            )
        raw = bytes(data)
        return cls(raw[:ED25519_SIGNATURE_SIZE], raw[ED25519_SIGNATURE_SIZE:])

    def to_hex(self) -> str:
        return self.to_bytes().hex()

    @classmethod
    def from_hex(cls, text: str) -> HybridSignature:
        return cls.from_bytes(canonical.hex_bytes(text, field="signature", size=SIGNATURE_SIZE))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HybridSignature):
            return NotImplemented
        return self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.to_bytes())

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._ed25519, self._mldsa65))

    def __repr__(self) -> str:
        return f"<HybridSignature ed25519={self._ed25519[:4].hex()}...>"


class HybridVerifyKey:
    """The public half of a custodian's signing key (immutable, comparable)."""

    __slots__ = ("_ed25519", "_ed25519_key", "_mldsa65", "_mldsa65_key")

    _ed25519: bytes
    _mldsa65: bytes
    _ed25519_key: ed25519.Ed25519PublicKey
    _mldsa65_key: mldsa.MLDSA65PublicKey

    def __init__(self, ed25519_public: bytes, mldsa65_public: bytes) -> None:
        ed_key = _ed25519_public(ed25519_public)
        ml_key = _mldsa65_public(mldsa65_public)
        object.__setattr__(self, "_ed25519", bytes(ed25519_public))
        object.__setattr__(self, "_mldsa65", bytes(mldsa65_public))
        object.__setattr__(self, "_ed25519_key", ed_key)
        object.__setattr__(self, "_mldsa65_key", ml_key)

    @property
    def ed25519(self) -> bytes:
        return self._ed25519

    @property
    def mldsa65(self) -> bytes:
        return self._mldsa65

    def verify(self, domain: str, message: bytes, signature: HybridSignature) -> None:
        """Raise SignatureError unless both halves verify for (domain, message).

        Both halves are always checked, so the error names every half that
        failed ("Ed25519 half", "ML-DSA-65 half" or both).
        """
        if not isinstance(signature, HybridSignature):
            raise InvalidInputError("signature must be a HybridSignature")
        ed_message = ed25519_input(domain, message)
        context = mldsa65_context(domain)
        failed = []
        try:
            _ed25519_verify_with(self._ed25519_key, ed_message, signature.ed25519)
        except SignatureError:
            failed.append("Ed25519")
        try:
            _mldsa65_verify_with(self._mldsa65_key, _message(message), signature.mldsa65, context)
        except SignatureError:
            failed.append("ML-DSA-65")
        if failed:
            halves = " and ".join(failed)
            noun = "halves" if len(failed) == 2 else "half"
            raise SignatureError(
                f"hybrid signature invalid in domain {domain!r}: {halves} {noun} failed "
                f"(key {self.fingerprint()[:16]})"
            )

    def to_json(self) -> dict[str, Any]:
        """{"ed25519": hex, "ml_dsa_65": hex}: the form inside public credentials."""
        return {"ed25519": self._ed25519.hex(), "ml_dsa_65": self._mldsa65.hex()}

    @classmethod
    def from_json(cls, value: object) -> HybridVerifyKey:
        if not isinstance(value, dict):
            raise DeserializationError("verify key: expected a JSON object")
        if set(value) != {"ed25519", "ml_dsa_65"}:
            raise DeserializationError(
                f"verify key: expected fields ed25519, ml_dsa_65; got {sorted(map(str, value))}"
            )
        ed = canonical.hex_bytes(value["ed25519"], field="ed25519", size=ED25519_PUBLIC_SIZE)
        ml = canonical.hex_bytes(value["ml_dsa_65"], field="ml_dsa_65", size=MLDSA65_PUBLIC_SIZE)
        try:
            return cls(ed, ml)
        except (InvalidInputError, ValueError) as e:
            raise DeserializationError(f"verify key: {e}") from e

    def fingerprint(self) -> str:
        """Hex SHA-256 of the canonical JSON of the key (RFC 8785)."""
        return hashlib.sha256(canonical.encode(self.to_json())).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HybridVerifyKey):
            return NotImplemented
        return self._ed25519 == other._ed25519 and self._mldsa65 == other._mldsa65

    def __hash__(self) -> int:
        return hash((self._ed25519, self._mldsa65))

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._ed25519, self._mldsa65))

    def __repr__(self) -> str:
        return f"<HybridVerifyKey {self.fingerprint()[:16]}>"


class HybridSigningKey:
    """A custodian's private signing key (opaque: never prints, pickles or copies)."""

    __slots__ = ("_ed25519", "_mldsa65", "_verify_key")

    _ed25519: ed25519.Ed25519PrivateKey
    _mldsa65: mldsa.MLDSA65PrivateKey
    _verify_key: HybridVerifyKey

    def __init__(self) -> None:
        raise TypeError("use HybridSigningKey.generate() or HybridSigningKey.from_seeds()")

    @classmethod
    def generate(
        cls, *, random_bytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> HybridSigningKey:
        """A fresh key from SEEDS_SIZE random bytes."""
        fresh = random_bytes(SEEDS_SIZE)
        if not isinstance(fresh, bytes) or len(fresh) != SEEDS_SIZE:
            raise InvalidInputError(f"random_bytes must return {SEEDS_SIZE} bytes")
        with SecretBytes(fresh, label="signing seeds") as seeds:
            return cls.from_seeds(seeds)

    @classmethod
    def from_seeds(cls, seeds: SecretBytes | bytes) -> HybridSigningKey:
        """Rebuild a key from its 64-byte seed form (Ed25519 key || ML-DSA-65 seed)."""
        raw = _seed_view("signing seeds", seeds, SEEDS_SIZE)
        ed = _ed25519_private(raw[:ED25519_SEED_SIZE])
        ml = _mldsa65_private(raw[ED25519_SEED_SIZE:])
        obj = object.__new__(cls)
        obj._ed25519 = ed
        obj._mldsa65 = ml
        obj._verify_key = HybridVerifyKey(
            ed.public_key().public_bytes_raw(), ml.public_key().public_bytes_raw()
        )
        return obj

    def seeds(self) -> SecretBytes:
        """The 64-byte seed form, for the encrypted credential file only."""
        buf = bytearray(self._ed25519.private_bytes_raw())
        buf += self._mldsa65.private_bytes_raw()
        return SecretBytes.adopt(buf, label="signing seeds")

    def verify_key(self) -> HybridVerifyKey:
        return self._verify_key

    def sign(self, domain: str, message: bytes) -> HybridSignature:
        """Sign `message` in `domain` with both algorithms (see the module docstring)."""
        ed_message = ed25519_input(domain, message)
        context = mldsa65_context(domain)
        return HybridSignature(
            self._ed25519.sign(ed_message), self._mldsa65.sign(_message(message), context)
        )

    def same_key(self, other: HybridSigningKey) -> bool:
        """Constant-time comparison of two signing keys by their seeds."""
        with self.seeds() as mine, other.seeds() as theirs:
            return hmac.compare_digest(mine.view(), theirs.view())

    def __repr__(self) -> str:
        return f"<HybridSigningKey for {self._verify_key.fingerprint()[:16]}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("HybridSigningKey cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("HybridSigningKey cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("HybridSigningKey cannot be copied")
