"""AES-256-GCM, in one place.

Every AEAD use in keyquorum goes through `encrypt` / `decrypt` here. They
accept only 32-byte keys and 12-byte nonces (the 96-bit IV of NIST SP
800-38D, section 8.2.2, the only length for which random nonces have the
documented collision bound), and turn every authentication failure into
`DecryptionError`. Nonce generation is the caller's job, done with
`os.urandom` at the edge or passed in by tests, so this module stays pure.
"""

from __future__ import annotations

from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyquorum.quorum.errors import DecryptionError, InvalidInputError, StateError
from keyquorum.quorum.secret import SecretBytes

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

Key = SecretBytes | bytes | bytearray


def _cipher(key: Key) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise InvalidInputError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
    raw = key.view() if isinstance(key, SecretBytes) else key
    return AESGCM(bytes(raw))


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise InvalidInputError(f"AES-GCM nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")


def encrypt(key: Key, nonce: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
    """Return ciphertext || 16-byte tag."""
    _check_nonce(nonce)
    return _cipher(key).encrypt(nonce, plaintext, aad)


def decrypt(key: Key, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytearray:
    """Return the plaintext in a fresh bytearray the caller can wipe.

    Raises DecryptionError when the tag does not verify (wrong key, nonce,
    associated data, or any altered byte).
    """
    _check_nonce(nonce)
    if len(ciphertext) < TAG_SIZE:
        raise DecryptionError(f"ciphertext is shorter than the {TAG_SIZE}-byte tag")
    try:
        return bytearray(_cipher(key).decrypt(nonce, ciphertext, aad))
    except InvalidTag as e:
        raise DecryptionError("ciphertext did not authenticate") from e


class Cipher:
    """One AES-256-GCM key prepared once, for a key that serves many calls.

    `encrypt`/`decrypt` above build the cipher (a copy of the key and its key
    schedule) on every call, right for keys used once. A tenant key version
    serves the data plane all day, so its keyring holds one `Cipher` beside
    the `SecretBytes` it was made from. The cipher reads the key through a
    read-only view of that buffer (no further copy in Python) and keeps
    OpenSSL's prepared context; `close()` drops the context, which OpenSSL
    cleanses when it is freed. The owner closes it exactly when it wipes the
    key; any use after that raises StateError.
    """

    __slots__ = ("_aesgcm",)

    def __init__(self, key: SecretBytes) -> None:
        if not isinstance(key, SecretBytes):
            raise InvalidInputError("a prepared AES-256-GCM key must be SecretBytes")
        if len(key) != KEY_SIZE:
            raise InvalidInputError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
        self._aesgcm: AESGCM | None = AESGCM(key.view())

    def _open(self) -> AESGCM:
        aesgcm = self._aesgcm
        if aesgcm is None:
            raise StateError("this AES-256-GCM key was wiped")
        return aesgcm

    def encrypt(self, nonce: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
        """Return ciphertext || 16-byte tag (as `encrypt` above)."""
        _check_nonce(nonce)
        aesgcm = self._aesgcm
        if aesgcm is None:
            raise StateError("this AES-256-GCM key was wiped")
        return aesgcm.encrypt(nonce, plaintext, aad)

    def decrypt(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytearray:
        """The plaintext in a fresh bytearray (as `decrypt` above)."""
        if len(nonce) != NONCE_SIZE:
            _check_nonce(nonce)
        if len(ciphertext) < TAG_SIZE:
            raise DecryptionError(f"ciphertext is shorter than the {TAG_SIZE}-byte tag")
        aesgcm = self._aesgcm
        if aesgcm is None:
            raise StateError("this AES-256-GCM key was wiped")
        try:
            return bytearray(aesgcm.decrypt(nonce, ciphertext, aad))
        except InvalidTag as e:
            raise DecryptionError("ciphertext did not authenticate") from e

    def close(self) -> None:
        """Drop the prepared key; every later use raises StateError."""
        self._aesgcm = None

    @property
    def closed(self) -> bool:
        return self._aesgcm is None

    def __repr__(self) -> str:
        return f"<aead.Cipher: {'closed' if self._aesgcm is None else 'open'}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("an aead.Cipher cannot be pickled")
