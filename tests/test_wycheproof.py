"""Wycheproof vectors run against the wrappers keyquorum uses, verdicts pinned.

Each file is run case by case through the project's own entry point (see
tests/vectors/wycheproof/SOURCE.md for which one). Every case gets an
outcome string; the test fails if an outcome disagrees with the Wycheproof
verdict (or, for "acceptable" cases, with what we recorded the library
does), and also if the tally of outcomes differs from the pinned one, so a
case that is silently skipped, or a file that shrank, fails too.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from keyquorum.quorum import aead, kdf, sealing, signatures
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError

VECTORS = Path(__file__).parent / "vectors" / "wycheproof"

Case = tuple[dict[str, Any], dict[str, Any]]

# A fixed, valid X25519 half for sealing keys built around an ML-KEM vector.
X25519_PRIVATE = bytes(range(32))
X25519_PUBLIC = (
    x25519.X25519PrivateKey.from_private_bytes(X25519_PRIVATE).public_key().public_bytes_raw()
)


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text())
    total = sum(len(g["tests"]) for g in data["testGroups"])
    assert total == data["numberOfTests"], (
        f"{name}: {total} cases, header says {data['numberOfTests']}"
    )
    return data


def _cases(data: dict[str, Any]) -> Iterator[Case]:
    for group in data["testGroups"]:
        for test in group["tests"]:
            yield group, test


def _outcome(fn: Callable[[], str]) -> str:
    """Run one case; a typed error becomes its class name, anything else propagates."""
    try:
        return fn()
    except KeyquorumError as e:
        return type(e).__name__


def _run(
    name: str, run: Callable[[Case], str], expect: Callable[[Case], str]
) -> Counter[tuple[str, str]]:
    """Run every case of `name`; assert each outcome; return the (result, outcome) tally."""
    tally: Counter[tuple[str, str]] = Counter()
    wrong: list[str] = []
    for case in _cases(_load(name)):
        got = run(case)
        want = expect(case)
        if got != want:
            wrong.append(f"tcId {case[1]['tcId']} ({case[1]['result']}): got {got}, want {want}")
        tally[case[1]["result"], got] += 1
    assert not wrong, f"{name}: {len(wrong)} cases disagree:\n" + "\n".join(wrong[:20])
    return tally


def _hex(test: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(test.get(key, ""))


# --- AES-GCM against quorum/aead.py ----------------------------------------


def _aes_gcm(case: Case) -> str:
    _, t = case
    key, iv, aad, msg = _hex(t, "key"), _hex(t, "iv"), _hex(t, "aad"), _hex(t, "msg")
    sealed = _hex(t, "ct") + _hex(t, "tag")

    def run() -> str:
        opened = aead.decrypt(key, iv, sealed, aad)
        # Decrypt succeeded: the case must also encrypt to exactly these bytes.
        assert bytes(opened) == msg, f"tcId {t['tcId']}: wrong plaintext"
        assert aead.encrypt(key, iv, msg, aad) == sealed, f"tcId {t['tcId']}: wrong ciphertext"
        return "round-trip"

    got = _outcome(run)
    if got == "InvalidInputError":
        # The wrapper refuses these parameters on both paths, not only on decrypt.
        with pytest.raises(InvalidInputError):
            aead.encrypt(key, iv, msg, aad)
    if got == "DecryptionError":
        assert aead.encrypt(key, iv, msg, aad) != sealed
    return got


def _aes_gcm_expected(case: Case) -> str:
    group, t = case
    if group["keySize"] != 256 or group["ivSize"] != 96:
        return "InvalidInputError"
    return "round-trip" if t["result"] == "valid" else "DecryptionError"


def test_aes_gcm_through_aead_wrapper() -> None:
    tally = _run("aes_gcm_test.json", _aes_gcm, _aes_gcm_expected)
    assert tally == {
        ("valid", "round-trip"): 39,
        ("invalid", "DecryptionError"): 27,
        # 128/192-bit keys and every IV other than 96 bits: refused up front.
        ("valid", "InvalidInputError"): 190,
        ("invalid", "InvalidInputError"): 60,
    }


# --- HKDF-SHA256 against quorum/kdf.py ---------------------------------------


def _hkdf(case: Case) -> str:
    _, t = case
    ikm, salt, info, size = _hex(t, "ikm"), _hex(t, "salt"), _hex(t, "info"), t["size"]

    def run() -> str:
        with kdf.hkdf_sha256(ikm, salt=salt, info=info, length=size) as okm:
            assert okm.reveal() == _hex(t, "okm"), f"tcId {t['tcId']}: wrong okm"
        if not salt:
            # RFC 5869 section 2.2: no salt means HashLen zeros, which HMAC
            # treats like the empty key; `salt=None` must give the same bytes.
            with kdf.hkdf_sha256(ikm, salt=None, info=info, length=size) as okm:
                assert okm.reveal() == _hex(t, "okm"), f"tcId {t['tcId']}: salt=None"
            return "okm-both-salts"
        return "okm"

    return _outcome(run)


def _hkdf_expected(case: Case) -> str:
    _, t = case
    if t["result"] == "invalid":
        # SizeTooLarge: L > 255 * HashLen (RFC 5869 section 2.3) is refused up front.
        return "InvalidInputError"
    return "okm" if t["salt"] else "okm-both-salts"


def test_hkdf_sha256_through_kdf_wrapper() -> None:
    tally = _run("hkdf_sha256_test.json", _hkdf, _hkdf_expected)
    assert tally == {
        ("valid", "okm"): 60,
        ("valid", "okm-both-salts"): 23,
        ("invalid", "InvalidInputError"): 3,
    }


# --- Ed25519 against signatures.verify_ed25519 -----------------------------


def _ed25519(case: Case) -> str:
    group, t = case
    public = bytes.fromhex(group["publicKey"]["pk"])

    def run() -> str:
        signatures.verify_ed25519(public, _hex(t, "msg"), _hex(t, "sig"))
        return "verified"

    return _outcome(run)


def test_ed25519_through_verify_ed25519() -> None:
    tally = _run(
        "ed25519_test.json",
        _ed25519,
        lambda c: "verified" if c[1]["result"] == "valid" else "SignatureError",
    )
    assert tally == {("valid", "verified"): 88, ("invalid", "SignatureError"): 63}


# --- ML-DSA-65 against signatures.verify_mldsa65 / sign_mldsa65_from_seed ---


def _mldsa_verify(case: Case) -> str:
    group, t = case

    def run() -> str:
        signatures.verify_mldsa65(
            bytes.fromhex(group["publicKey"]), _hex(t, "msg"), _hex(t, "sig"), _hex(t, "ctx")
        )
        return "verified"

    return _outcome(run)


def _mldsa_verify_expected(case: Case) -> str:
    _, t = case
    if t["result"] == "valid":
        return "verified"
    # A wrong-size key or an over-long context is the caller's mistake, not a forgery.
    if {"IncorrectPublicKeyLength", "InvalidContext"} & set(t["flags"]):
        return "InvalidInputError"
    return "SignatureError"


def test_mldsa65_verify_through_verify_mldsa65() -> None:
    tally = _run("mldsa_65_verify_test.json", _mldsa_verify, _mldsa_verify_expected)
    assert tally == {
        ("valid", "verified"): 79,
        ("invalid", "SignatureError"): 122,
        ("invalid", "InvalidInputError"): 9,
    }


def _mldsa_public_from_seed(seed: bytes) -> bytes:
    """The ML-DSA-65 public key the hybrid key derives from a seed (any Ed25519 half)."""
    return signatures.HybridSigningKey.from_seeds(bytes(32) + seed).verify_key().mldsa65


def _mldsa_sign(case: Case) -> str:
    group, t = case
    seed, ctx = bytes.fromhex(group["privateSeed"]), _hex(t, "ctx")

    def run() -> str:
        if t["result"] == "invalid":
            signatures.sign_mldsa65_from_seed(seed, _hex(t, "msg"), ctx)
            return "signed"
        public = bytes.fromhex(group["publicKey"])
        assert _mldsa_public_from_seed(seed) == public, f"tcId {t['tcId']}: public key"
        if "msg" not in t:
            # External-mu cases (FIPS 204 Algorithm 7 input): the wrapper signs
            # messages only; the key derivation above is what they check here.
            return "key-only"
        msg = _hex(t, "msg")
        signatures.verify_mldsa65(public, msg, _hex(t, "sig"), ctx)
        fresh = signatures.sign_mldsa65_from_seed(seed, msg, ctx)
        signatures.verify_mldsa65(public, msg, fresh, ctx)
        # Hedged signing (FIPS 204 section 3.4): never the deterministic bytes.
        assert fresh != _hex(t, "sig"), f"tcId {t['tcId']}: signing is not hedged"
        return "signed"

    return _outcome(run)


def test_mldsa65_sign_from_seed() -> None:
    tally = _run(
        "mldsa_65_sign_seed_test.json",
        _mldsa_sign,
        lambda c: (
            "InvalidInputError"
            if c[1]["result"] == "invalid"
            else "signed"
            if "msg" in c[1]
            else "key-only"
        ),
    )
    assert tally == {
        ("valid", "signed"): 84,
        ("valid", "key-only"): 17,
        # 3 seeds of 0, 31 and 33 bytes, 1 context of 256 bytes.
        ("invalid", "InvalidInputError"): 4,
    }


# --- X25519 and ML-KEM-768: the primitives inside sealing.py's HPKE suite ---


def _x25519(case: Case) -> str:
    _, t = case
    try:
        private = x25519.X25519PrivateKey.from_private_bytes(_hex(t, "private"))
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(_hex(t, "public")))
    except ValueError:
        return "ValueError"
    return "shared" if shared == _hex(t, "shared") else "wrong-shared"


def _x25519_expected(case: Case) -> str:
    _, t = case
    # Acceptable cases whose output is all zeros are refused by the library
    # (the RFC 7748 section 6.1 check, which RFC 9180 section 7.1.4 requires
    # of DHKEM); every other acceptable case computes the listed secret.
    if t["result"] == "acceptable" and "ZeroSharedSecret" in t["flags"]:
        return "ValueError"
    return "shared"


def test_x25519_exchange() -> None:
    tally = _run("x25519_test.json", _x25519, _x25519_expected)
    assert tally == {
        ("valid", "shared"): 264,
        ("acceptable", "shared"): 223,
        ("acceptable", "ValueError"): 31,
    }


def _mlkem_decaps(case: Case) -> str:
    _, t = case
    seed = _hex(t, "seed")

    def run() -> str:
        # sealing.py's seed form is ML-KEM-768 seed (d || z) || X25519 key.
        private = sealing.SealingPrivateKey.from_seeds(seed + X25519_PRIVATE)
        if "ek" in t:
            ek = private.public_key().to_bytes()[: sealing.MLKEM768_PUBLIC_SIZE]
            assert ek == _hex(t, "ek"), f"tcId {t['tcId']}: encapsulation key"
        # Decapsulation happens inside hpke.Suite, which takes no ciphertext of
        # its own: run the primitive sealing.py builds its key from.
        try:
            shared = mlkem.MLKEM768PrivateKey.from_seed_bytes(seed).decapsulate(_hex(t, "c"))
        except ValueError:
            return "ValueError"
        # Implicit rejection (FIPS 203 Algorithm 18): a bad ciphertext of the
        # right size still yields the listed pseudo-random K.
        return "shared" if shared == _hex(t, "K") else "wrong-shared"

    return _outcome(run)


def _mlkem_decaps_expected(case: Case) -> str:
    _, t = case
    if t["result"] == "valid":
        return "shared"
    # Seeds of the wrong size are refused by the wrapper; ciphertexts of the
    # wrong size by the library.
    return "InvalidInputError" if len(t["seed"]) != 128 else "ValueError"


def test_mlkem768_from_seed_and_decapsulate() -> None:
    tally = _run("mlkem_768_test.json", _mlkem_decaps, _mlkem_decaps_expected)
    assert tally == {
        ("valid", "shared"): 153,
        ("invalid", "InvalidInputError"): 20,
        ("invalid", "ValueError"): 20,
    }


def _mlkem_encaps_key(case: Case) -> str:
    _, t = case

    def run() -> str:
        key = sealing.SealingPublicKey.from_bytes(_hex(t, "ek") + X25519_PUBLIC)
        # Encapsulation randomness cannot be injected, so c and K cannot be
        # compared; the key must seal, and encapsulate to the FIPS 203 sizes.
        assert len(key.seal(b"share", b"info")) >= sealing.MIN_CIPHERTEXT
        ek = mlkem.MLKEM768PublicKey.from_public_bytes(_hex(t, "ek"))
        shared, ciphertext = ek.encapsulate()
        assert (len(shared), len(ciphertext)) == (32, 1088)
        return "loaded"

    return _outcome(run)


def test_mlkem768_encapsulation_key_check() -> None:
    tally = _run(
        "mlkem_768_encaps_test.json",
        _mlkem_encaps_key,
        lambda c: "loaded" if c[1]["result"] == "valid" else "DeserializationError",
    )
    # Invalid: 100 + 12 keys with a coefficient >= q (the FIPS 203 section
    # 7.2 modulus check) and 20 keys of the wrong size.
    assert tally == {("valid", "loaded"): 133, ("invalid", "DeserializationError"): 132}


def test_x25519_low_order_public_keys_cannot_be_sealed_to() -> None:
    """Every public key of the X25519 file as the X25519 half of a sealing key.

    The keys whose exchange gave an all-zero secret are low-order points:
    sealing to them is refused (RFC 9180 section 7.1.4), for any ephemeral
    key; every other key seals.
    """
    zero: dict[bytes, bool] = {}
    for _, t in _cases(_load("x25519_test.json")):
        zero[_hex(t, "public")] = "ZeroSharedSecret" in t["flags"]
    ek = sealing.SealingPrivateKey.from_seeds(bytes(64) + X25519_PRIVATE).public_key().to_bytes()
    tally: Counter[tuple[bool, str]] = Counter()
    for public, is_zero in zero.items():
        key = sealing.SealingPublicKey.from_bytes(ek[: sealing.MLKEM768_PUBLIC_SIZE] + public)
        try:
            key.seal(b"share", b"info")
            got = "sealed"
        except InvalidInputError:
            got = "InvalidInputError"
        assert got == ("InvalidInputError" if is_zero else "sealed"), public.hex()
        tally[is_zero, got] += 1
    assert tally == {(False, "sealed"): 479, (True, "InvalidInputError"): 14}
