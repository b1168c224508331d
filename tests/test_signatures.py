from __future__ import annotations

import copy
import pickle

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, mldsa
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import signatures as sg
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, SignatureError
from keyquorum.quorum.secret import SecretBytes

SEEDS = bytes(range(64))
KEY = sg.HybridSigningKey.from_seeds(SEEDS)
VK = KEY.verify_key()
MSG = b"approve proposal 7"
SIG = KEY.sign("approve", MSG)


def _other_key() -> sg.HybridSigningKey:
    return sg.HybridSigningKey.from_seeds(bytes(range(1, 65)))


def test_round_trip_and_sizes() -> None:
    VK.verify("approve", MSG, SIG)
    assert len(SIG.ed25519) == 64
    assert len(SIG.mldsa65) == 3309
    assert len(SIG.to_bytes()) == sg.SIGNATURE_SIZE == 3373
    assert len(VK.ed25519) == 32
    assert len(VK.mldsa65) == 1952


def test_halves_use_the_documented_domain_separation() -> None:
    # Ed25519 over prefix || domain || NUL || message; ML-DSA over message
    # with context prefix || domain: checked with the raw library.
    ed = ed25519.Ed25519PublicKey.from_public_bytes(VK.ed25519)
    ed.verify(SIG.ed25519, b"keyquorum/v1/approve\0" + MSG)
    ml = mldsa.MLDSA65PublicKey.from_public_bytes(VK.mldsa65)
    ml.verify(SIG.mldsa65, MSG, b"keyquorum/v1/approve")
    # The same through the exposed per-algorithm functions.
    sg.verify_ed25519(VK.ed25519, b"keyquorum/v1/approve\0" + MSG, SIG.ed25519)
    sg.verify_mldsa65(VK.mldsa65, MSG, SIG.mldsa65, b"keyquorum/v1/approve")


def test_seed_layout_matches_the_library() -> None:
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(SEEDS[:32])
    ml = mldsa.MLDSA65PrivateKey.from_seed_bytes(SEEDS[32:])
    assert VK.ed25519 == ed.public_key().public_bytes_raw()
    assert VK.mldsa65 == ml.public_key().public_bytes_raw()
    with KEY.seeds() as seeds:
        assert seeds.equals(SEEDS)
    assert sg.sign_ed25519_from_seed(SEEDS[:32], b"m") == ed.sign(b"m")
    ml.public_key().verify(
        sg.sign_mldsa65_from_seed(SecretBytes(SEEDS[32:]), b"m", b"c"), b"m", b"c"
    )


def test_generate_uses_injected_randomness() -> None:
    key = sg.HybridSigningKey.generate(random_bytes=lambda n: SEEDS[:n])
    assert key.verify_key() == VK
    assert key.same_key(KEY)
    assert not _other_key().same_key(KEY)
    fresh = sg.HybridSigningKey.generate()
    assert fresh.verify_key() != VK


def test_generate_refuses_short_randomness() -> None:
    with pytest.raises(InvalidInputError, match="64 bytes"):
        sg.HybridSigningKey.generate(random_bytes=lambda n: bytes(n - 1))


@pytest.mark.parametrize(
    ("domain", "message", "sig", "halves"),
    [
        ("refuse", MSG, SIG, "Ed25519 and ML-DSA-65 halves"),
        ("approve", MSG + b"!", SIG, "Ed25519 and ML-DSA-65 halves"),
        ("approve", MSG, sg.HybridSignature(bytes(64), SIG.mldsa65), "Ed25519 half"),
        ("approve", MSG, sg.HybridSignature(SIG.ed25519, bytes(3309)), "ML-DSA-65 half"),
        (
            "approve",
            MSG,
            sg.HybridSignature(SIG.ed25519, KEY.sign("refuse", MSG).mldsa65),
            "ML-DSA-65 half",
        ),
        (
            "approve",
            MSG,
            sg.HybridSignature(KEY.sign("refuse", MSG).ed25519, SIG.mldsa65),
            "Ed25519 half",
        ),
    ],
    ids=[
        "other-domain",
        "altered-message",
        "zero-ed25519-half",
        "zero-mldsa-half",
        "mldsa-half-from-other-domain",
        "ed25519-half-from-other-domain",
    ],
)
def test_verify_names_the_failed_half(
    domain: str, message: bytes, sig: sg.HybridSignature, halves: str
) -> None:
    with pytest.raises(SignatureError, match=f"{halves} failed"):
        VK.verify(domain, message, sig)


def test_other_key_fails_both_halves() -> None:
    with pytest.raises(SignatureError, match="Ed25519 and ML-DSA-65 halves failed"):
        _other_key().verify_key().verify("approve", MSG, SIG)


def test_domain_is_not_ambiguous_with_message() -> None:
    # "ab" + NUL + "c..." must not equal "a" + NUL + "b...": NUL is not allowed in domains.
    sig = KEY.sign("a", b"b")
    with pytest.raises(SignatureError):
        VK.verify("ab", b"", sig)
    with pytest.raises(InvalidInputError):
        KEY.sign("a\0b", b"")


@pytest.mark.parametrize(
    "domain",
    ["", "Approve", "appr ove", "-approve", "approve\n", "é", "a" * 243, "x\0"],
    ids=["empty", "uppercase", "space", "leading-dash", "newline", "non-ascii", "too-long", "nul"],
)
def test_bad_domains_are_refused(domain: str) -> None:
    with pytest.raises(InvalidInputError, match="signing domain"):
        KEY.sign(domain, MSG)
    with pytest.raises(InvalidInputError, match="signing domain"):
        VK.verify(domain, MSG, SIG)


def test_longest_domain_fits_the_mldsa_context() -> None:
    domain = "a" * sg.MAX_DOMAIN
    VK.verify(domain, MSG, KEY.sign(domain, MSG))


def test_message_must_be_bytes() -> None:
    with pytest.raises(InvalidInputError, match="bytes"):
        KEY.sign("approve", "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="HybridSignature"):
        VK.verify("approve", MSG, SIG.to_bytes())  # type: ignore[arg-type]


def test_signature_wire_forms() -> None:
    assert sg.HybridSignature.from_bytes(SIG.to_bytes()) == SIG
    assert sg.HybridSignature.from_hex(SIG.to_hex()) == SIG
    assert SIG.to_bytes()[:64] == SIG.ed25519
    assert hash(sg.HybridSignature.from_bytes(SIG.to_bytes())) == hash(SIG)
    assert pickle.loads(pickle.dumps(SIG)) == SIG


@pytest.mark.parametrize(
    "size", [0, 64, 3309, 3372, 3374], ids=["empty", "ed-only", "ml-only", "short", "long"]
)
def test_signature_from_bytes_checks_length(size: int) -> None:
    with pytest.raises(DeserializationError, match="3373 bytes"):
        sg.HybridSignature.from_bytes(bytes(size))


@pytest.mark.parametrize(
    ("text", "match"),
    [("ab", "3373 bytes"), ("zz" * 3373, "not hex"), ("AB" * 3373, "lowercase"), (7, "hex")],
    ids=["short", "not-hex", "uppercase", "not-a-string"],
)
def test_signature_from_hex_checks(text: str, match: str) -> None:
    with pytest.raises(DeserializationError, match=match):
        sg.HybridSignature.from_hex(text)


def test_signature_constructor_checks_halves() -> None:
    with pytest.raises(InvalidInputError, match="Ed25519 signature must be 64"):
        sg.HybridSignature(bytes(63), bytes(3309))
    with pytest.raises(InvalidInputError, match="ML-DSA-65 signature must be 3309"):
        sg.HybridSignature(bytes(64), bytes(3310))


def test_public_objects_are_immutable() -> None:
    with pytest.raises(AttributeError):
        SIG._ed25519 = bytes(64)
    with pytest.raises(AttributeError):
        VK._ed25519 = bytes(32)


def test_verify_key_json_round_trip_and_fingerprint() -> None:
    doc = VK.to_json()
    assert set(doc) == {"ed25519", "ml_dsa_65"}
    again = sg.HybridVerifyKey.from_json(doc)
    assert again == VK
    assert again.fingerprint() == VK.fingerprint()
    assert len(VK.fingerprint()) == 64
    assert VK.fingerprint() != _other_key().verify_key().fingerprint()
    assert pickle.loads(pickle.dumps(VK)) == VK


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "JSON object"),
        ({"ed25519": "00" * 32}, "expected fields"),
        ({"ed25519": "00" * 32, "ml_dsa_65": "00" * 1952, "x": 1}, "expected fields"),
        ({"ed25519": "00" * 31, "ml_dsa_65": "00" * 1952}, "ed25519: expected 32"),
        ({"ed25519": "00" * 32, "ml_dsa_65": "00" * 1951}, "ml_dsa_65: expected 1952"),
        ({"ed25519": "0G" * 32, "ml_dsa_65": "00" * 1952}, "lowercase"),
        ({"ed25519": 5, "ml_dsa_65": "00" * 1952}, "hex string"),
    ],
    ids=["not-object", "missing", "extra", "short-ed", "short-ml", "bad-hex", "not-string"],
)
def test_verify_key_from_json_refuses(doc: object, match: str) -> None:
    with pytest.raises(DeserializationError, match=match):
        sg.HybridVerifyKey.from_json(doc)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((bytes(31), bytes(1952)), "Ed25519 public key must be 32"),
        ((bytes(32), bytes(1953)), "ML-DSA-65 public key must be 1952"),
    ],
    ids=["short-ed", "long-ml"],
)
def test_verify_key_constructor_checks(args: tuple[bytes, bytes], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        sg.HybridVerifyKey(*args)


@pytest.mark.parametrize(
    "seeds", [b"", bytes(63), bytes(65), "x" * 64], ids=["empty", "short", "long", "str"]
)
def test_from_seeds_checks(seeds: bytes) -> None:
    with pytest.raises(InvalidInputError, match="signing seeds"):
        sg.HybridSigningKey.from_seeds(seeds)


def test_signing_key_is_opaque() -> None:
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(KEY)
    with pytest.raises(TypeError, match="copied"):
        copy.copy(KEY)
    with pytest.raises(TypeError, match="copied"):
        copy.deepcopy(KEY)
    with pytest.raises(TypeError):
        sg.HybridSigningKey()
    with pytest.raises(AttributeError):
        KEY.extra = 1  # type: ignore[attr-defined]
    text = repr(KEY) + str(KEY) + f"{KEY}"
    assert VK.fingerprint()[:16] in text
    assert SEEDS.hex() not in text
    assert SEEDS[:32].hex() not in text


# --- per-algorithm functions: the preconditions vector tests rely on ---------


@pytest.mark.parametrize(
    ("public", "signature", "error", "match"),
    [
        (bytes(31), bytes(64), InvalidInputError, "public key must be 32"),
        (VK.ed25519, bytes(63), SignatureError, "signature must be 64"),
        (VK.ed25519, SIG.ed25519 + b"\0", SignatureError, "signature must be 64"),
        (VK.ed25519, bytes(64), SignatureError, "does not verify"),
    ],
    ids=["short-key", "short-sig", "long-sig", "zero-sig"],
)
def test_verify_ed25519_errors(
    public: bytes, signature: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sg.verify_ed25519(public, b"keyquorum/v1/approve\0" + MSG, signature)


@pytest.mark.parametrize(
    ("public", "signature", "context", "error", "match"),
    [
        (bytes(1951), SIG.mldsa65, b"keyquorum/v1/approve", InvalidInputError, "must be 1952"),
        (VK.mldsa65, SIG.mldsa65[:-1], b"keyquorum/v1/approve", SignatureError, "must be 3309"),
        (VK.mldsa65, SIG.mldsa65, b"x" * 256, InvalidInputError, "context too long"),
        (VK.mldsa65, SIG.mldsa65, b"keyquorum/v1/refuse", SignatureError, "does not verify"),
        (VK.mldsa65, SIG.mldsa65, b"", SignatureError, "does not verify"),
    ],
    ids=["short-key", "short-sig", "long-context", "other-context", "empty-context"],
)
def test_verify_mldsa65_errors(
    public: bytes, signature: bytes, context: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sg.verify_mldsa65(public, MSG, signature, context)


def test_sign_from_seed_checks() -> None:
    with pytest.raises(InvalidInputError, match="Ed25519 private key must be 32"):
        sg.sign_ed25519_from_seed(bytes(31), b"m")
    with pytest.raises(InvalidInputError, match="ML-DSA-65 seed must be 32"):
        sg.sign_mldsa65_from_seed(bytes(33), b"m", b"")
    with pytest.raises(InvalidInputError, match="context too long"):
        sg.sign_mldsa65_from_seed(bytes(32), b"m", bytes(256))


@settings(max_examples=40, deadline=None)
@given(bit=st.integers(min_value=0, max_value=sg.SIGNATURE_SIZE * 8 - 1))
def test_every_bit_flip_in_a_signature_fails(bit: int) -> None:
    flipped = bytearray(SIG.to_bytes())
    flipped[bit // 8] ^= 1 << (bit % 8)
    half = "Ed25519 half" if bit < 64 * 8 else "ML-DSA-65 half"
    with pytest.raises(SignatureError, match=half):
        VK.verify("approve", MSG, sg.HybridSignature.from_bytes(bytes(flipped)))


@settings(max_examples=20, deadline=None)
@given(domain=st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,40}", fullmatch=True), message=st.binary())
def test_any_valid_domain_and_message_round_trip(domain: str, message: bytes) -> None:
    sig = KEY.sign(domain, message)
    VK.verify(domain, message, sig)
    with pytest.raises(SignatureError):
        VK.verify(domain, message + b"\0", sig)
