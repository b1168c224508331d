"""Custodian credentials (quorum/credentials.py) and the KDFs under them (quorum/kdf.py)."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import pickle
import re
import struct
import unicodedata
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import canonical, kdf
from keyquorum.quorum import credentials as cr
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    UnsupportedVersionError,
    WrongPassphraseError,
)
from keyquorum.quorum.secret import SecretBytes

FAST = kdf.Argon2Params.insecure_for_tests()
PASSPHRASE = b"correct horse battery staple"


def _counter() -> Callable[[int], bytes]:
    """Deterministic 'randomness' so that files and keys are byte-exact."""
    state = [0]

    def random_bytes(n: int) -> bytes:
        out = hashlib.shake_256(state[0].to_bytes(4, "big")).digest(n)
        state[0] += 1
        return out

    return random_bytes


CRED = cr.CustodianCredential.generate("Alice Example", random_bytes=_counter())
PUBLIC = CRED.public()
FILE = CRED.encrypt(PASSPHRASE, params=FAST, random_bytes=_counter())


def _open(data: bytes, passphrase: bytes = PASSPHRASE) -> cr.CustodianCredential:
    return cr.CustodianCredential.decrypt(data, passphrase, allow_insecure_params=True)


def _with_checksum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _same(a: cr.CustodianCredential, b: cr.CustodianCredential) -> None:
    assert a.public() == b.public()
    assert a._signing.same_key(b._signing)
    with a._sealing.seeds() as x, b._sealing.seeds() as y:
        assert x.equals(y)


# --- kdf.Argon2Params -------------------------------------------------------


def test_argon2_defaults_are_rfc9106_second_option() -> None:
    params = kdf.Argon2Params()
    assert (params.time_cost, params.memory_kib, params.lanes) == (3, 64 * 1024, 4)
    assert not params.insecure
    assert params.meets_minimum()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((2, 65536, 4), "below the minimum"),
        ((3, 65535, 4), "below the minimum"),
        ((1, 64, 1), "below the minimum"),
        ((3, 65536, 0), "lanes must be"),
        ((3, 65536, 65), "lanes must be"),
        ((0, 65536, 4), "time cost must be"),
        ((65, 65536, 4), "time cost must be"),
        ((3, 4 * 1024 * 1024 + 1, 4), "memory must be"),
        ((3, True, 4), "must be an int"),
        ((3.0, 65536, 4), "must be an int"),
    ],
    ids=[
        "t2",
        "m-one-short",
        "test-params",
        "no-lanes",
        "too-many-lanes",
        "t0",
        "t-above-cap",
        "m-above-cap",
        "bool",
        "float",
    ],
)
def test_argon2_params_refused(args: tuple[int, int, int], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        kdf.Argon2Params(*args)


def test_argon2_stronger_params_and_escape_hatch() -> None:
    assert kdf.Argon2Params(4, 256 * 1024, 1).meets_minimum()
    weak = kdf.Argon2Params.insecure_for_tests(1, 64, 2)
    assert weak.insecure
    assert not weak.meets_minimum()
    with pytest.raises(InvalidInputError, match="memory must be 16"):
        kdf.Argon2Params.insecure_for_tests(1, 15, 2)  # RFC 9106: m >= 8p


def test_argon2id_at_real_parameters_matches_the_library() -> None:
    salt = bytes(range(16))
    expected = _argon2id_raw(PASSPHRASE, salt, kdf.Argon2Params())
    with kdf.argon2id(SecretBytes(PASSPHRASE), salt=salt, params=kdf.Argon2Params()) as key:
        assert key.equals(expected)
    assert kdf.argon2id(PASSPHRASE, salt=salt, params=FAST).reveal() != expected


def _argon2id_raw(passphrase: bytes, salt: bytes, p: kdf.Argon2Params) -> bytes:
    return Argon2id(
        salt=salt, length=32, iterations=p.time_cost, lanes=p.lanes, memory_cost=p.memory_kib
    ).derive(passphrase)


@pytest.mark.parametrize(
    ("passphrase", "salt", "length", "match"),
    [
        (b"", bytes(16), 32, "must not be empty"),
        ("text", bytes(16), 32, "SecretBytes or bytes"),
        (b"pw", bytes(15), 32, "salt must be 16..64"),
        (b"pw", bytes(65), 32, "salt must be 16..64"),
        (b"pw", bytes(16), 15, "length must be 16..64"),
        (b"pw", bytes(16), 65, "length must be 16..64"),
    ],
    ids=["empty", "str", "short-salt", "long-salt", "short-output", "long-output"],
)
def test_argon2id_preconditions(passphrase: bytes, salt: bytes, length: int, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        kdf.argon2id(passphrase, salt=salt, params=FAST, length=length)


# --- kdf.hkdf_sha256 against a naive RFC 5869 reference ----------------------


def _hkdf_reference(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869, section 2.2 and 2.3, written out with HMAC-SHA256."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


@settings(max_examples=40, deadline=None)
@given(
    ikm=st.binary(min_size=1, max_size=80),
    salt=st.none() | st.binary(max_size=80),
    info=st.binary(max_size=80),
    length=st.integers(min_value=1, max_value=300),
)
def test_hkdf_matches_reference(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> None:
    out = kdf.hkdf_sha256(SecretBytes(ikm), salt=salt, info=info, length=length)
    assert out.reveal() == _hkdf_reference(ikm, salt, info, length)


def test_hkdf_longest_output() -> None:
    out = kdf.hkdf_sha256(b"k", salt=None, info=b"", length=255 * 32)
    assert out.reveal() == _hkdf_reference(b"k", None, b"", 255 * 32)


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "length", "match"),
    [
        (b"k", None, b"", 0, "1..8160"),
        (b"k", None, b"", 8161, "1..8160"),
        (b"k", None, b"", True, "must be an int"),
        (b"", None, b"", 32, "must not be empty"),
        ("k", None, b"", 32, "SecretBytes or bytes"),
        (b"k", "s", b"", 32, "salt must be bytes"),
        (b"k", None, "i", 32, "info must be bytes"),
    ],
    ids=["zero", "too-long", "bool", "empty-ikm", "str-ikm", "str-salt", "str-info"],
)
def test_hkdf_preconditions(ikm: bytes, salt: bytes, info: bytes, length: int, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        kdf.hkdf_sha256(ikm, salt=salt, info=info, length=length)


# --- names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", " alice", "alice ", "al\nice", "al\tice", "a\x00", "a" * 65, "e\u0301", 7],
    ids=[
        "empty",
        "leading-space",
        "trailing-space",
        "newline",
        "tab",
        "nul",
        "too-long",
        "nfd",
        "int",
    ],
)
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(InvalidInputError, match="custodian name"):
        cr.check_name(name)
    with pytest.raises(InvalidInputError, match="custodian name"):
        cr.CustodianCredential.generate(name)


@pytest.mark.parametrize(
    "name", ["alice", "Zoë Ødegaard", "a" * 64, "李小龙", "o'brien-2"], ids=str
)
def test_good_names(name: str) -> None:
    assert cr.check_name(name) == name


# --- private credential -----------------------------------------------------


def test_generate_is_deterministic_under_injected_randomness() -> None:
    again = cr.CustodianCredential.generate("Alice Example", random_bytes=_counter())
    _same(again, CRED)
    other = cr.CustodianCredential.generate("Alice Example")
    assert other.fingerprint != CRED.fingerprint


def test_sign_and_open_sealed() -> None:
    sig = CRED.sign("approve", b"statement")
    PUBLIC.verify_key.verify("approve", b"statement", sig)
    ct = PUBLIC.sealing_key.seal(b"share", b"info")
    with CRED.open_sealed(ct, b"info") as plain:
        assert plain.equals(b"share")
    assert CRED.name == "Alice Example"
    assert CRED.fingerprint == PUBLIC.fingerprint


def test_file_round_trip_fast_params() -> None:
    opened = _open(FILE)
    _same(opened, CRED)
    assert opened.name == CRED.name


def test_file_round_trip_real_params_and_secret_passphrase() -> None:
    passphrase = SecretBytes(PASSPHRASE, label="passphrase")
    data = CRED.encrypt(passphrase)
    assert not passphrase.wiped  # the caller owns and wipes its passphrase
    _same(cr.CustodianCredential.decrypt(data, passphrase), CRED)
    with pytest.raises(WrongPassphraseError, match="wrong passphrase for credential 'Alice"):
        cr.CustodianCredential.decrypt(data, b"correct horse battery stapler")


def test_file_layout() -> None:
    name = b"Alice Example"
    assert FILE[:6] == b"KQCRED"
    assert FILE[6] == 1
    assert struct.unpack(">IIB", FILE[7:16]) == (1, 64, 1)
    assert FILE[16] == 16  # salt length
    assert FILE[17 + 16 + 12] == len(name)
    header_end = 17 + 16 + 12 + 1 + len(name)
    assert FILE[header_end - len(name) : header_end] == name
    assert len(FILE) == header_end + 160 + 16 + 32
    assert FILE[-32:] == hashlib.sha256(FILE[:-32]).digest()


def test_file_is_byte_exact_under_injected_randomness() -> None:
    assert CRED.encrypt(PASSPHRASE, params=FAST, random_bytes=_counter()) == FILE
    assert CRED.encrypt(PASSPHRASE, params=FAST) != FILE


@pytest.mark.parametrize(
    "passphrase",
    [b"correct horse battery stapl", b"Correct horse battery staple", b"x"],
    ids=["one-short", "capital", "other"],
)
def test_wrong_passphrase(passphrase: bytes) -> None:
    with pytest.raises(WrongPassphraseError):
        _open(FILE, passphrase)


def test_every_bit_flip_is_reported_as_corruption() -> None:
    seen = set()
    for bit in range(len(FILE) * 8):
        flipped = bytearray(FILE)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DeserializationError, match="corrupted") as info:
            _open(bytes(flipped))
        assert not isinstance(info.value, UnsupportedVersionError)
        seen.add(bit // 8)
    assert seen == set(range(len(FILE)))


def test_flipped_bit_in_version_is_corruption_not_a_new_version() -> None:
    flipped = bytearray(FILE)
    flipped[6] ^= 0x02
    with pytest.raises(DeserializationError, match="checksum mismatch") as info:
        _open(bytes(flipped))
    assert type(info.value) is DeserializationError


@pytest.mark.parametrize("version", [0, 2, 255], ids=["v0", "v2", "v255"])
def test_unknown_version_with_intact_checksum(version: int) -> None:
    body = bytearray(FILE[:-32])
    body[6] = version
    with pytest.raises(UnsupportedVersionError, match=f"version {version} is not supported"):
        _open(_with_checksum(bytes(body)))


@pytest.mark.parametrize(
    "size", [0, 5, 38, 39, 40, 60, 100, len(FILE) - 33, len(FILE) - 1], ids=str
)
def test_truncated(size: int) -> None:
    with pytest.raises(DeserializationError, match="truncated"):
        _open(FILE[:size])


def test_trailing_bytes_are_corruption() -> None:
    with pytest.raises(DeserializationError, match="corrupted"):
        _open(FILE + b"\0")


@pytest.mark.parametrize(
    "data",
    [b"PK\x03\x04" + bytes(300), b"{}" + bytes(100), b"kqcred" + FILE[6:]],
    ids=["zip", "json", "lowercase-magic"],
)
def test_wrong_magic(data: bytes) -> None:
    with pytest.raises(DeserializationError, match="wrong magic"):
        _open(data)


def test_oversized_and_non_bytes() -> None:
    with pytest.raises(DeserializationError, match="too large"):
        _open(FILE + bytes(1024))
    with pytest.raises(InvalidInputError, match="must be bytes"):
        _open(FILE.hex())  # type: ignore[arg-type]


# Attacks that rewrite the file and recompute the (unkeyed) checksum.


def _rewrite(offset: int, new: bytes) -> bytes:
    body = bytearray(FILE[:-32])
    body[offset : offset + len(new)] = new
    return _with_checksum(bytes(body))


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (_rewrite(17, bytes(16)), WrongPassphraseError, "wrong passphrase"),
        (_rewrite(33, bytes(12)), WrongPassphraseError, "wrong passphrase"),
        (_rewrite(46, b"Alice Exampld"), WrongPassphraseError, "'Alice Exampld'"),
        (_rewrite(len(FILE) - 40, bytes(8)), WrongPassphraseError, "wrong passphrase"),
        (_rewrite(7, struct.pack(">IIB", 2, 64, 1)), WrongPassphraseError, "wrong passphrase"),
        (_rewrite(16, b"\x0f"), DeserializationError, "salt must be 16..64"),
        (_rewrite(45, b"\x0c"), DeserializationError, "ciphertext is 177 bytes"),
        (_rewrite(46, b"\n"), DeserializationError, "bad custodian name"),
        (_rewrite(45, b"\xff"), DeserializationError, "header is truncated"),
        (_with_checksum(FILE[:-33]), DeserializationError, "ciphertext is 175 bytes"),
        (_rewrite(7, struct.pack(">IIB", 1, 64, 0)), DeserializationError, "lanes must be"),
    ],
    ids=[
        "salt-zeroed",
        "nonce-zeroed",
        "name-changed",
        "ciphertext-changed",
        "time-cost-changed",
        "salt-too-short",
        "name-length-one-short",
        "name-with-newline",
        "name-beyond-end",
        "ciphertext-one-short",
        "zero-lanes",
    ],
)
def test_rewritten_file_with_matching_checksum(
    data: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        _open(data)


def test_weak_params_are_refused_unless_explicitly_allowed() -> None:
    # The downgrade defence: a file claiming t=1, m=64 KiB does not even reach Argon2id.
    with pytest.raises(DeserializationError, match=r"below the minimum.*downgrade"):
        cr.CustodianCredential.decrypt(FILE, PASSPHRASE)
    stronger = CRED.encrypt(PASSPHRASE, params=kdf.Argon2Params(3, 65536, 1))
    _same(cr.CustodianCredential.decrypt(stronger, PASSPHRASE), CRED)
    body = bytearray(stronger[:-32])
    body[7:16] = struct.pack(">IIB", 2, 65536, 1)
    with pytest.raises(DeserializationError, match="downgrade"):
        cr.CustodianCredential.decrypt(_with_checksum(bytes(body)), PASSPHRASE)


def test_credential_is_opaque() -> None:
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(CRED)
    with pytest.raises(TypeError, match="copied"):
        copy.copy(CRED)
    with pytest.raises(TypeError, match="copied"):
        copy.deepcopy(CRED)
    with pytest.raises(AttributeError):
        CRED.passphrase = PASSPHRASE  # type: ignore[attr-defined]
    assert repr(CRED) == f"<CustodianCredential 'Alice Example' {PUBLIC.short_fingerprint}>"


def test_constructor_checks_key_types() -> None:
    with pytest.raises(InvalidInputError, match="HybridSigningKey"):
        cr.CustodianCredential("a", object(), CRED._sealing)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="SealingPrivateKey"):
        cr.CustodianCredential("a", CRED._signing, object())  # type: ignore[arg-type]


# --- public credential ------------------------------------------------------


def test_public_file_and_fingerprints() -> None:
    data = PUBLIC.to_bytes()
    assert data == canonical.encode(PUBLIC.to_json())
    doc = json.loads(data)
    assert doc["format"] == "keyquorum/public-credential"
    assert doc["version"] == 1
    assert doc["name"] == "Alice Example"
    assert doc["sealing_key"] == PUBLIC.sealing_key.to_bytes().hex()
    assert PUBLIC.fingerprint == hashlib.sha256(data).hexdigest()
    short = PUBLIC.short_fingerprint
    assert re.fullmatch(r"[A-Z2-7]{4}(-[A-Z2-7]{4}){3}", short)
    digest = hashlib.sha256(data).digest()
    assert short.replace("-", "") == base64.b32encode(digest[:10]).decode()
    again = cr.PublicCredential.from_bytes(data)
    assert again == PUBLIC
    assert again.fingerprint == PUBLIC.fingerprint
    assert cr.PublicCredential.from_json(PUBLIC.to_json()) == PUBLIC
    assert PUBLIC.short_fingerprint in repr(PUBLIC)


def test_fingerprint_binds_the_name() -> None:
    renamed = cr.PublicCredential("Mallory", PUBLIC.verify_key, PUBLIC.sealing_key)
    assert renamed.fingerprint != PUBLIC.fingerprint
    assert renamed.short_fingerprint != PUBLIC.short_fingerprint


def _doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = dict(PUBLIC.to_json())
    for key, value in changes.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "error", "match"),
    [
        ([], DeserializationError, "JSON object"),
        (_doc(format="other"), DeserializationError, "format must be"),
        (_doc(format=None), DeserializationError, "format must be"),
        (_doc(version=2), UnsupportedVersionError, "version 2"),
        (_doc(version="1"), DeserializationError, "version must be an integer"),
        (_doc(version=True), DeserializationError, "version must be an integer"),
        (_doc(name=None), DeserializationError, "expected fields"),
        (_doc(extra="x"), DeserializationError, "expected fields"),
        (_doc(name="a\nb"), DeserializationError, "custodian name"),
        (_doc(verify_key={"ed25519": "00"}), DeserializationError, "verify key"),
        (_doc(sealing_key="00" * 1215), DeserializationError, "1216 bytes"),
        (_doc(sealing_key="ff" * 1216), DeserializationError, "ML-KEM-768"),
        (_doc(sealing_key=5), DeserializationError, "hex string"),
    ],
    ids=[
        "not-object",
        "other-format",
        "no-format",
        "version-2",
        "version-string",
        "version-bool",
        "no-name",
        "extra-field",
        "bad-name",
        "bad-verify-key",
        "short-sealing-key",
        "invalid-mlkem-key",
        "sealing-key-not-string",
    ],
)
def test_public_from_json_refuses(doc: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        cr.PublicCredential.from_json(doc)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b" " + PUBLIC.to_bytes(), "canonical"),
        (json.dumps(PUBLIC.to_json(), indent=1).encode(), "canonical"),
        (b"\xff", "not UTF-8"),
        (bytes(16 * 1024 + 1), "too large"),
        ("{}", "must be bytes"),
    ],
    ids=["leading-space", "indented", "not-utf8", "too-large", "str"],
)
def test_public_from_bytes_refuses(data: bytes, match: str) -> None:
    with pytest.raises(DeserializationError, match=match):
        cr.PublicCredential.from_bytes(data)


@settings(max_examples=15, deadline=None)
@given(
    name=st.text(min_size=1, max_size=64)
    .map(lambda s: s.strip())
    .filter(lambda s: s and s.isprintable() and len(s.encode()) <= 255)
    .filter(lambda s: unicodedata.normalize("NFC", s) == s)
)
def test_any_valid_name_round_trips(name: str) -> None:
    cred = cr.CustodianCredential(name, CRED._signing, CRED._sealing)
    assert cr.PublicCredential.from_bytes(cred.public().to_bytes()) == cred.public()
    opened = _open(cred.encrypt(PASSPHRASE, params=FAST))
    assert opened.name == name
    assert opened.public() == cred.public()
