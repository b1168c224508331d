from __future__ import annotations

import pytest

from keyquorum.quorum import aead
from keyquorum.quorum.errors import DecryptionError, InvalidInputError
from keyquorum.quorum.secret import SecretBytes

KEY = bytes(range(32))
NONCE = bytes(12)


def test_round_trip_with_secret_key() -> None:
    ct = aead.encrypt(SecretBytes(KEY), NONCE, b"hello", b"ad")
    assert aead.decrypt(KEY, NONCE, ct, b"ad") == b"hello"


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 64])
def test_only_32_byte_keys(size: int) -> None:
    with pytest.raises(InvalidInputError, match="32 bytes"):
        aead.encrypt(bytes(size), NONCE, b"x", b"")


@pytest.mark.parametrize("size", [0, 8, 11, 13, 16])
def test_only_12_byte_nonces(size: int) -> None:
    with pytest.raises(InvalidInputError, match="12 bytes"):
        aead.encrypt(KEY, bytes(size), b"x", b"")
    with pytest.raises(InvalidInputError, match="12 bytes"):
        aead.decrypt(KEY, bytes(size), bytes(32), b"")


def test_every_bit_flip_and_wrong_aad_fail() -> None:
    ct = aead.encrypt(KEY, NONCE, b"tenant key bytes", b"ad")
    for i in range(len(ct) * 8):
        flipped = bytearray(ct)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(DecryptionError):
            aead.decrypt(KEY, NONCE, bytes(flipped), b"ad")
    with pytest.raises(DecryptionError):
        aead.decrypt(KEY, NONCE, ct, b"other")
    with pytest.raises(DecryptionError, match="shorter"):
        aead.decrypt(KEY, NONCE, ct[:15], b"ad")


def test_prepared_cipher_never_prints_or_leaves_its_box() -> None:
    import copy
    import pickle

    cipher = aead.Cipher(SecretBytes(KEY))
    for text in (repr(cipher), str(cipher), f"{cipher!r}"):
        assert KEY.hex() not in text
        assert "open" in text
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            attempt(cipher)
    cipher.close()
    assert "closed" in repr(cipher)
