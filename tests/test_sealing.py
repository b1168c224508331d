from __future__ import annotations

import copy
import pickle

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import sealing as sl
from keyquorum.quorum.errors import DecryptionError, DeserializationError, InvalidInputError
from keyquorum.quorum.secret import SecretBytes

SEEDS = bytes(range(96))
KEY = sl.SealingPrivateKey.from_seeds(SEEDS)
PUB = KEY.public_key()
OTHER = sl.SealingPrivateKey.from_seeds(bytes(range(1, 97)))
INFO = b"keyquorum/v1/share deployment=prod index=3"
SECRET = b"share value bytes 0123456789abcdef"
CT = PUB.seal(SECRET, INFO)


def test_round_trip_and_sizes() -> None:
    assert sl.ENC_SIZE == 1120
    assert len(CT) == sl.ENC_SIZE + len(SECRET) + 16
    with KEY.open(CT, INFO) as opened:
        assert opened.equals(SECRET)
    assert len(PUB.to_bytes()) == sl.PUBLIC_SIZE == 1216


def test_sealing_is_randomised() -> None:
    assert PUB.seal(SECRET, INFO) != CT


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"x", bytes(4096), SecretBytes(b"tenant key")],
    ids=["empty", "one-byte", "4-KiB", "secret-bytes"],
)
def test_round_trip_plaintexts(plaintext: bytes | SecretBytes) -> None:
    ct = PUB.seal(plaintext, b"")
    expected = plaintext.reveal() if isinstance(plaintext, SecretBytes) else plaintext
    assert KEY.open(ct, b"").reveal() == expected


def test_layout_matches_the_library_suite() -> None:
    # The public form is ML-KEM-768 key || X25519 key from the seed halves, and
    # the ciphertext opens with the library's own suite and keys.
    kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(SEEDS[:64])
    dh = x25519.X25519PrivateKey.from_private_bytes(SEEDS[64:])
    assert (
        PUB.to_bytes() == kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw()
    )
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    assert suite.decrypt(CT, hpke.MLKEM768X25519PrivateKey(kem, dh), INFO) == SECRET
    with KEY.seeds() as seeds:
        assert seeds.equals(SEEDS)


def test_generate_uses_injected_randomness() -> None:
    key = sl.SealingPrivateKey.generate(random_bytes=lambda n: SEEDS[:n])
    assert key.public_key() == PUB
    assert sl.SealingPrivateKey.generate().public_key() != PUB
    with pytest.raises(InvalidInputError, match="96 bytes"):
        sl.SealingPrivateKey.generate(random_bytes=lambda n: bytes(n + 1))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize(
    ("key", "ciphertext", "info"),
    [
        (OTHER, CT, INFO),
        (KEY, CT, INFO + b"!"),
        (KEY, CT, b""),
        (KEY, _flip(CT, 0), INFO),
        (KEY, _flip(CT, 1087), INFO),
        (KEY, _flip(CT, sl.ENC_SIZE - 1), INFO),
        (KEY, _flip(CT, sl.ENC_SIZE), INFO),
        (KEY, _flip(CT, len(CT) - 1), INFO),
        (KEY, CT[:-1], INFO),
        (KEY, CT + b"\0", INFO),
        (KEY, PUB.seal(SECRET, INFO)[: sl.ENC_SIZE] + CT[sl.ENC_SIZE :], INFO),
    ],
    ids=[
        "wrong-key",
        "wrong-info",
        "empty-info",
        "flip-first-enc-byte",
        "flip-in-mlkem-ciphertext",
        "flip-in-x25519-enc",
        "flip-first-aead-byte",
        "flip-tag",
        "truncated-by-one",
        "extended-by-one",
        "enc-from-another-seal",
    ],
)
def test_open_refuses(key: sl.SealingPrivateKey, ciphertext: bytes, info: bytes) -> None:
    with pytest.raises(DecryptionError, match="did not open"):
        key.open(ciphertext, info)


@pytest.mark.parametrize(
    "size", [0, 1, sl.ENC_SIZE, sl.MIN_CIPHERTEXT - 1], ids=["empty", "one", "enc-only", "no-tag"]
)
def test_open_refuses_too_short(size: int) -> None:
    with pytest.raises(InvalidInputError, match="too short"):
        KEY.open(CT[:size], INFO)


def test_minimum_length_ciphertext_opens() -> None:
    ct = PUB.seal(b"", INFO)
    assert len(ct) == sl.MIN_CIPHERTEXT
    assert len(KEY.open(ct, INFO)) == 0


def test_argument_types_and_info_limit() -> None:
    with pytest.raises(InvalidInputError, match="info must be bytes"):
        PUB.seal(SECRET, "info")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="info too long"):
        PUB.seal(SECRET, bytes(sl.MAX_INFO + 1))
    with pytest.raises(InvalidInputError, match="info too long"):
        KEY.open(CT, bytes(sl.MAX_INFO + 1))
    with pytest.raises(InvalidInputError, match="plaintext"):
        PUB.seal("text", INFO)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="must be bytes"):
        KEY.open("text", INFO)  # type: ignore[arg-type]


def test_public_key_bytes_round_trip() -> None:
    again = sl.SealingPublicKey.from_bytes(PUB.to_bytes())
    assert again == PUB
    assert hash(again) == hash(PUB)
    assert pickle.loads(pickle.dumps(PUB)) == PUB
    assert again != OTHER.public_key()
    with KEY.open(again.seal(SECRET, INFO), INFO) as opened:
        assert opened.equals(SECRET)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "1216 bytes"),
        (PUB.to_bytes()[:-1], "1216 bytes"),
        (PUB.to_bytes() + b"\0", "1216 bytes"),
        (b"\xff" * 1184 + bytes(32), "not a valid ML-KEM-768 key"),
        ("00" * 1216, "must be bytes"),
    ],
    ids=["empty", "short", "long", "mlkem-modulus-check", "str"],
)
def test_public_key_from_bytes_refuses(data: bytes, match: str) -> None:
    with pytest.raises(DeserializationError, match=match):
        sl.SealingPublicKey.from_bytes(data)


def test_low_order_x25519_key_is_refused_when_sealing() -> None:
    pub = sl.SealingPublicKey(PUB.to_bytes()[:1184] + bytes(32))
    with pytest.raises(InvalidInputError, match="low-order"):
        pub.seal(SECRET, INFO)


@pytest.mark.parametrize(
    "seeds", [b"", bytes(95), bytes(97), 5], ids=["empty", "short", "long", "int"]
)
def test_from_seeds_checks(seeds: bytes) -> None:
    with pytest.raises(InvalidInputError, match="sealing seeds"):
        sl.SealingPrivateKey.from_seeds(seeds)


def test_private_key_is_opaque() -> None:
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(KEY)
    with pytest.raises(TypeError, match="copied"):
        copy.copy(KEY)
    with pytest.raises(TypeError, match="copied"):
        copy.deepcopy(KEY)
    with pytest.raises(TypeError):
        sl.SealingPrivateKey()
    with pytest.raises(AttributeError):
        PUB._raw = b""
    assert PUB.fingerprint()[:16] in repr(KEY)
    assert SEEDS.hex()[:16] not in repr(KEY)


@settings(max_examples=25, deadline=None)
@given(index=st.integers(min_value=0, max_value=len(CT) - 1), bit=st.integers(0, 7))
def test_any_bit_flip_fails(index: int, bit: int) -> None:
    flipped = bytearray(CT)
    flipped[index] ^= 1 << bit
    with pytest.raises(DecryptionError):
        KEY.open(bytes(flipped), INFO)


@settings(max_examples=15, deadline=None)
@given(plaintext=st.binary(max_size=200), info=st.binary(max_size=100))
def test_any_plaintext_and_info_round_trip(plaintext: bytes, info: bytes) -> None:
    assert KEY.open(PUB.seal(plaintext, info), info).reveal() == plaintext
