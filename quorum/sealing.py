"""Sealing to a custodian or a session: HPKE (RFC 9180), base mode.

The suite is `cryptography`'s hybrid KEM ML-KEM-768 + X25519 with
HKDF-SHA256 and AES-256-GCM, used exactly as the library offers it
(`hpke.Suite.encrypt` / `decrypt`, RFC 9180 section 6.1 single-shot
APIs): no hand-rolled HPKE. A recorded ciphertext stays confidential
while either X25519 or ML-KEM-768 holds.

The library's API takes no fixed ephemeral key and no associated data,
so sealing is randomised by the library itself (no `random_bytes`
argument) and RFC 9180's test vectors cannot be run through it; binding
to a context goes through `info` (RFC 9180, section 5.1), which callers
build from what the ciphertext is for (deployment, split, custodian).

Byte forms:
- public key: ML-KEM-768 encapsulation key (1184 bytes, FIPS 203) ||
  X25519 public key (32 bytes, RFC 7748), 1216 bytes;
- private seeds: ML-KEM-768 seed (64 bytes, FIPS 203 `d || z`) ||
  X25519 private key (32 bytes), 96 bytes, for the credential file only;
- ciphertext: the library's `enc || AEAD ciphertext`, at least
  `ENC_SIZE + 16` bytes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from keyquorum.quorum.errors import DecryptionError, DeserializationError, InvalidInputError
from keyquorum.quorum.secret import SecretBytes

MLKEM768_PUBLIC_SIZE = 1184
MLKEM768_SEED_SIZE = 64
X25519_SIZE = 32
PUBLIC_SIZE = MLKEM768_PUBLIC_SIZE + X25519_SIZE
SEEDS_SIZE = MLKEM768_SEED_SIZE + X25519_SIZE
TAG_SIZE = 16
MAX_INFO = 64 * 1024
#: HPKE info of a data key sealed to a backend: this label, then the wrapped key it
#: belongs to (the data plane seals, the backend's SDK opens).
SEALED_DATA_KEY_INFO = b"keyquorum/v1/sealed-data-key\x00"

_SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
ENC_SIZE = hpke.KEM.MLKEM768_X25519.enc_length()
MIN_CIPHERTEXT = ENC_SIZE + TAG_SIZE


def _info(info: object) -> bytes:
    if not isinstance(info, bytes):
        raise InvalidInputError("HPKE info must be bytes")
    if len(info) > MAX_INFO:
        raise InvalidInputError(f"HPKE info too long: {len(info)} > {MAX_INFO} bytes")
    return info


class SealingPublicKey:
    """Where shares and session secrets are sealed to (public, immutable)."""

    __slots__ = ("_hpke", "_raw")

    _raw: bytes
    _hpke: hpke.MLKEM768X25519PublicKey

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise InvalidInputError("sealing public key must be bytes")
        if len(raw) != PUBLIC_SIZE:
            raise InvalidInputError(
                f"sealing public key must be {PUBLIC_SIZE} bytes "
                f"(ML-KEM-768 {MLKEM768_PUBLIC_SIZE} + X25519 {X25519_SIZE}), got {len(raw)}"
            )
        data = bytes(raw)
        try:
            kem = mlkem.MLKEM768PublicKey.from_public_bytes(data[:MLKEM768_PUBLIC_SIZE])
        except ValueError as e:
            # FIPS 203, section 7.2: the encapsulation key modulus check.
            raise InvalidInputError("sealing public key: not a valid ML-KEM-768 key") from e
        dh = x25519.X25519PublicKey.from_public_bytes(data[MLKEM768_PUBLIC_SIZE:])
        object.__setattr__(self, "_raw", data)
        object.__setattr__(self, "_hpke", hpke.MLKEM768X25519PublicKey(kem, dh))

    @classmethod
    def from_bytes(cls, data: bytes) -> SealingPublicKey:
        """Parse the 1216-byte public form; DeserializationError if it is not one."""
        try:
            return cls(data)
        except InvalidInputError as e:
            raise DeserializationError(str(e)) from e

    def to_bytes(self) -> bytes:
        return self._raw

    def fingerprint(self) -> str:
        """Hex SHA-256 of the public form."""
        return hashlib.sha256(self._raw).hexdigest()

    def seal(self, plaintext: bytes | SecretBytes, info: bytes) -> bytes:
        """HPKE base-mode single-shot seal (RFC 9180, section 6.1) with `info`."""
        if not isinstance(plaintext, bytes | bytearray | SecretBytes):
            raise InvalidInputError("plaintext to seal must be bytes or SecretBytes")
        context = _info(info)
        data = plaintext.view() if isinstance(plaintext, SecretBytes) else plaintext
        try:
            return _SUITE.encrypt(data, self._hpke, context)
        except ValueError as e:
            # X25519 with a low-order public key gives an all-zero shared
            # secret, which RFC 9180 section 7.1.4 says to refuse.
            raise InvalidInputError(
                "sealing public key is unusable (X25519 low-order point)"
            ) from e

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SealingPublicKey):
            return NotImplemented
        return self._raw == other._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._raw,))

    def __repr__(self) -> str:
        return f"<SealingPublicKey {self.fingerprint()[:16]}>"


class SealingPrivateKey:
    """The private half (opaque: never prints, pickles or copies)."""

    __slots__ = ("_hpke", "_kem", "_public", "_x25519")

    _kem: mlkem.MLKEM768PrivateKey
    _x25519: x25519.X25519PrivateKey
    _hpke: hpke.MLKEM768X25519PrivateKey
    _public: SealingPublicKey

    def __init__(self) -> None:
        raise TypeError("use SealingPrivateKey.generate() or SealingPrivateKey.from_seeds()")

    @classmethod
    def generate(
        cls, *, random_bytes: Callable[[int], bytes] = secrets.token_bytes
    ) -> SealingPrivateKey:
        """A fresh key from SEEDS_SIZE random bytes."""
        fresh = random_bytes(SEEDS_SIZE)
        if not isinstance(fresh, bytes) or len(fresh) != SEEDS_SIZE:
            raise InvalidInputError(f"random_bytes must return {SEEDS_SIZE} bytes")
        with SecretBytes(fresh, label="sealing seeds") as seeds:
            return cls.from_seeds(seeds)

    @classmethod
    def from_seeds(cls, seeds: SecretBytes | bytes) -> SealingPrivateKey:
        """Rebuild from the 96-byte seed form (ML-KEM-768 seed || X25519 private key)."""
        if isinstance(seeds, SecretBytes):
            raw = seeds.view()
        elif isinstance(seeds, bytes | bytearray):
            raw = memoryview(seeds)
        else:
            raise InvalidInputError("sealing seeds must be SecretBytes or bytes")
        if raw.nbytes != SEEDS_SIZE:
            raise InvalidInputError(f"sealing seeds must be {SEEDS_SIZE} bytes, got {raw.nbytes}")
        kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:MLKEM768_SEED_SIZE])
        dh = x25519.X25519PrivateKey.from_private_bytes(raw[MLKEM768_SEED_SIZE:])
        obj = object.__new__(cls)
        obj._kem = kem
        obj._x25519 = dh
        obj._hpke = hpke.MLKEM768X25519PrivateKey(kem, dh)
        obj._public = SealingPublicKey(
            kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()
        )
        return obj

    def seeds(self) -> SecretBytes:
        """The 96-byte seed form, for the encrypted credential file only."""
        buf = bytearray(self._kem.private_bytes_raw())
        buf += self._x25519.private_bytes_raw()
        return SecretBytes.adopt(buf, label="sealing seeds")

    def public_key(self) -> SealingPublicKey:
        return self._public

    def open(self, ciphertext: bytes, info: bytes) -> SecretBytes:
        """HPKE base-mode single-shot open (RFC 9180, section 6.1).

        Raises InvalidInputError for a ciphertext shorter than enc + tag
        and DecryptionError when it does not open (wrong key, wrong info,
        any altered byte).
        """
        if not isinstance(ciphertext, bytes | bytearray | memoryview):
            raise InvalidInputError("sealed ciphertext must be bytes")
        context = _info(info)
        if len(ciphertext) < MIN_CIPHERTEXT:
            raise InvalidInputError(
                f"sealed ciphertext too short: {len(ciphertext)} < {MIN_CIPHERTEXT} bytes "
                f"({ENC_SIZE}-byte enc + {TAG_SIZE}-byte tag)"
            )
        try:
            plaintext = _SUITE.decrypt(ciphertext, self._hpke, context)
        except (InvalidTag, ValueError) as e:
            raise DecryptionError(
                f"sealed ciphertext did not open with key {self._public.fingerprint()[:16]} "
                "and this info"
            ) from e
        # The library returns immutable bytes; this copy is wipeable.
        return SecretBytes(plaintext, label="unsealed plaintext")

    def __repr__(self) -> str:
        return f"<SealingPrivateKey for {self._public.fingerprint()[:16]}>"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("SealingPrivateKey cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("SealingPrivateKey cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError("SealingPrivateKey cannot be copied")
