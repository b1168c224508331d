"""C2SP signed notes: the golang/mod and C2SP vectors, and every parse rule."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import note
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    SignatureError,
    UnsupportedVersionError,
    UnverifiedNoteError,
)
from keyquorum.quorum.note import NoteSigner, NoteVerifier, SignatureType
from keyquorum.quorum.secret import SecretBytes

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "signed-note" / "signed_note_vectors.json").read_text()
)
KEYS = VECTORS["keys"]
VERIFIERS = {name: NoteVerifier.from_vkey(k["vkey"]) for name, k in KEYS.items()}
TEXT = VECTORS["valid_notes"][0]["note"].split("\n\n")[0] + "\n"


def signer_from_skey(skey: str) -> NoteSigner:
    """TEST ONLY: the Go `PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>` form."""
    private, key, name, hash_hex, material_b64 = skey.split("+", 4)
    assert (private, key) == ("PRIVATE", "KEY")
    material = base64.b64decode(material_b64, validate=True)
    assert material[0] == SignatureType.ED25519
    signer = NoteSigner(name, SecretBytes(material[1:]))
    assert signer.verifier().key_hash.hex() == hash_hex
    return signer


PETER = signer_from_skey(KEYS["PeterNeumann"]["skey_TEST_ONLY"])


def _seeded(name: str, tag: bytes, sig_type: SignatureType = SignatureType.ED25519) -> NoteSigner:
    return NoteSigner.generate(
        name, sig_type=sig_type, random_bytes=lambda n: hashlib.sha256(tag).digest()[:n]
    )


# -- verifier keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hash_hex"),
    [("PeterNeumann", "c74f20a3"), ("EnochRoot", "af0cfe78"), ("example.com/foo", "530d903a")],
    ids=["PeterNeumann", "EnochRoot", "example.com-foo"],
)
def test_vkey_round_trip_and_key_hash(name: str, hash_hex: str) -> None:
    vkey = KEYS[name]["vkey"]
    v = VERIFIERS[name]
    assert v.name == name
    assert v.sig_type is SignatureType.ED25519
    assert v.key_hash.hex() == hash_hex
    digest = hashlib.sha256(name.encode() + b"\n\x01" + v.public_key).digest()
    assert v.key_hash == digest[:4]
    assert v.vkey() == vkey
    assert NoteVerifier(name, v.public_key) == v


def test_skey_reproduces_the_vkey() -> None:
    assert PETER.verifier_key() == KEYS["PeterNeumann"]["vkey"]
    assert PETER.verifier() == VERIFIERS["PeterNeumann"]


PETER_KEY = VERIFIERS["PeterNeumann"].public_key


def _vkey(name: str, material: bytes, hash_hex: str | None = None) -> str:
    if hash_hex is None:
        hash_hex = hashlib.sha256(name.encode() + b"\n" + material).digest()[:4].hex()
    return f"{name}+{hash_hex}+{base64.b64encode(material).decode()}"


BAD_VKEYS = [
    # The two upstream cases. The first fails earlier here than in Go: its
    # base64 is not canonical ("BADKEY==" has stray bits), which Go accepts.
    (VECTORS["bad_vkeys"][0]["vkey"], DeserializationError, "not canonical base64"),
    (VECTORS["bad_vkeys"][1]["vkey"], UnsupportedVersionError, "signature type 0x65"),
    # Ours: each rule on its own.
    (_vkey("PeterNeumann", b"\x01" + PETER_KEY + b"\x00"), DeserializationError, "got 33"),
    (_vkey("PeterNeumann", b"\x01" + PETER_KEY[:31]), DeserializationError, "got 31"),
    (_vkey("PeterNeumann", b"\x01" + PETER_KEY, "c74f20a4"), DeserializationError, "not match"),
    (_vkey("PeterNeumann", b"\x01" + PETER_KEY, "C74F20A3"), DeserializationError, "lowercase"),
    (_vkey("PeterNeumann", b"\x01" + PETER_KEY, "c74f20"), DeserializationError, "8 lowercase"),
    (_vkey("PeterNeumann", b"\x02" + PETER_KEY), UnsupportedVersionError, "0x02"),
    (_vkey("Peter Neumann", b"\x01" + PETER_KEY), DeserializationError, "key name"),
    (_vkey("", b"\x01" + PETER_KEY), DeserializationError, "must not be empty"),
    (_vkey("PeterNeumann", b""), DeserializationError, "empty"),
    ("PeterNeumann+c74f20a3", DeserializationError, "<name>\\+<hash>\\+<key>"),
    ("PeterNeumann+c74f20a3+!!!!", DeserializationError, "not base64"),
    (
        "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T",
        DeserializationError,
        "base64",
    ),
]


@pytest.mark.parametrize(
    ("vkey", "error", "message"),
    BAD_VKEYS,
    ids=[
        "upstream-wrong-length-noncanonical",
        "upstream-unknown-algorithm",
        "key-33-bytes",
        "key-31-bytes",
        "hash-mismatch",
        "hash-uppercase",
        "hash-short",
        "ecdsa-type-unsupported",
        "name-with-space",
        "name-empty",
        "no-key-material",
        "two-fields",
        "key-not-base64",
        "key-unpadded",
    ],
)
def test_bad_vkeys(vkey: str, error: type[KeyquorumError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        NoteVerifier.from_vkey(vkey)
    assert type(info.value) is error


@pytest.mark.parametrize(
    "name",
    ["", "a+b", "a b", "a\tb", "a\u00a0b", "a\u2003b", "a\x01b", "\ud800"],
    ids=["empty", "plus", "space", "tab", "nbsp", "em-space", "control", "surrogate"],
)
def test_key_name_rules(name: str) -> None:
    with pytest.raises(InvalidInputError):
        note.check_key_name(name)
    with pytest.raises(InvalidInputError):
        NoteVerifier(name, PETER_KEY)


def test_key_names_may_be_urls_and_non_ascii() -> None:
    for name in ("example.com/log42", "oid/1.3.6.1.4.1", "quasimodo.example/salvatore", "é"):
        note.check_key_name(name)


def test_verifier_refuses_wrong_key_size_and_type() -> None:
    with pytest.raises(InvalidInputError, match="32 bytes"):
        NoteVerifier("n", bytes(31))
    with pytest.raises(InvalidInputError, match="unsupported signature type"):
        NoteVerifier("n", bytes(32), 2)  # type: ignore[arg-type]


# -- golden notes ----------------------------------------------------------------------

VALID_IDS = ["peter", "peter-ignores-enoch", "peter-and-enoch", "no-verifiers", "c2sp-example"]


@pytest.mark.parametrize("case", VECTORS["valid_notes"], ids=VALID_IDS)
def test_valid_notes(case: dict[str, Any]) -> None:
    verifiers = [VERIFIERS[n] for n in case["verifiers"]]
    if case["expect"] != "ok":
        assert case["expect"] == "error: no verifiable signatures"
        with pytest.raises(UnverifiedNoteError) as info:
            note.open_note(case["note"], verifiers)
        assert type(info.value) is UnverifiedNoteError
        return
    opened = note.open_note(case["note"], verifiers)
    assert opened.signed_by == tuple(case.get("verified", case["verifiers"]))
    assert opened.unknown_signers == tuple(case.get("unverified", ()))
    assert case["note"].startswith(opened.text + "\n")
    for sig in opened.signatures:
        assert sig.timestamp is None
        assert sig.key_hash == VERIFIERS[sig.name].key_hash
    # The same note as bytes opens the same way.
    assert note.open_note(case["note"].encode(), verifiers) == opened


def test_re_signing_from_the_test_skey_reproduces_the_signature() -> None:
    case = VECTORS["valid_notes"][0]
    assert case["deterministic_sign_output_of_skey"]
    assert note.sign_note(TEXT, [PETER]) == case["note"]


INVALID = [
    (SignatureError, "signature by PeterNeumann\\+c74f20a3 is 67 bytes"),
    (LimitExceededError, "101 signature lines, at most 100"),
    (DeserializationError, "no blank line"),
    (DeserializationError, "no signature lines"),
    (DeserializationError, "does not end with a newline"),
    (DeserializationError, "control character U\\+0001 at offset 0"),
    # Upstream's bad-key-name case also lacks the final newline; that is
    # found first. tests below cover the key name on its own.
    (DeserializationError, "does not end with a newline"),
    (DeserializationError, "signature line 2 does not start with an em dash"),
    (DeserializationError, "not valid UTF-8"),
]
INVALID_IDS = [
    "bad-signature",
    "101-signatures",
    "no-blank-line",
    "blank-line-no-signatures",
    "no-final-newline",
    "control-character",
    "bad-name-no-final-newline",
    "trailing-text-line",
    "invalid-utf8",
]


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [(c, e, m) for c, (e, m) in zip(VECTORS["invalid_notes"], INVALID, strict=True)],
    ids=INVALID_IDS,
)
def test_invalid_notes(case: dict[str, Any], error: type[KeyquorumError], message: str) -> None:
    text: str | bytes = case["note"] if "note" in case else bytes.fromhex(case["note_hex"])
    with pytest.raises(error, match=message) as info:
        note.open_note(text, [VERIFIERS[n] for n in case["verifiers"]])
    assert type(info.value) is error


def test_tree_note_golden_is_a_checkpoint_body() -> None:
    from keyquorum.quorum.checkpoint import Checkpoint
    from keyquorum.quorum.merkle import leaf_hash

    golden = VECTORS["tree_note_golden"]
    cp = Checkpoint.parse(golden["text"])
    assert (cp.origin, cp.size, cp.root) == (
        "go.sum database tree",
        golden["size"],
        leaf_hash(b"hello world"),
    )
    assert cp.body() == golden["text"]


# -- parse rules one by one -------------------------------------------------------------

SIGNED = VECTORS["valid_notes"][0]["note"]
PETER_LINE = SIGNED.split("\n\n")[1]
PETER_SIG = PETER_LINE.split(" ")[2].strip()


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (TEXT + "\n— Peter+Neumann " + PETER_SIG + "\n", DeserializationError, "key name"),
        (TEXT + "\n— Bad Name " + PETER_SIG + "\n", DeserializationError, "line 1 is not base64"),
        (TEXT + "\n— PeterNeumann\n", DeserializationError, "has no signature"),
        (TEXT + "\n— PeterNeumann \n", DeserializationError, "too short"),
        (TEXT + "\n— PeterNeumann AQIDBA==\n", DeserializationError, "too short"),
        (TEXT + "\n— PeterNeumann " + PETER_SIG[:-1] + "\n", DeserializationError, "base64"),
        (TEXT + "\n— PeterNeumann  " + PETER_SIG + "\n", DeserializationError, "key name|base64"),
        (TEXT + "\n- PeterNeumann " + PETER_SIG + "\n", DeserializationError, "em dash"),
        (TEXT + "\n—PeterNeumann " + PETER_SIG + "\n", DeserializationError, "em dash"),
        (TEXT + "\n" + PETER_LINE + "\n", DeserializationError, "no signature lines"),
        (TEXT + "\n" + PETER_LINE + "\n" + PETER_LINE, SignatureError, "does not verify"),
        (TEXT.replace("\n", "\r\n") + "\n" + PETER_LINE, DeserializationError, "U\\+000D"),
        (TEXT + "\n" + PETER_LINE.replace("x08go", "x08g\x7f"), DeserializationError, "base64"),
        ("\n\n", DeserializationError, "no signature lines"),
        ("", DeserializationError, "no blank line"),
        (TEXT + "\ud800\n\n" + PETER_LINE, DeserializationError, "UTF-8"),
    ],
    ids=[
        "name-with-plus",
        "name-with-space",
        "no-signature-field",
        "empty-signature",
        "signature-only-key-hash",
        "signature-not-base64",
        "double-space",
        "hyphen-not-em-dash",
        "no-space-after-dash",
        "blank-line-after-signatures",
        "blank-line-between-signatures-moves-the-text",
        "carriage-return",
        "delete-in-base64",
        "only-blank-line",
        "empty",
        "lone-surrogate",
    ],
)
def test_malformed_notes(text: str, error: type[KeyquorumError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        note.open_note(text, [VERIFIERS["PeterNeumann"]])
    assert type(info.value) is error


def test_text_is_split_at_the_last_blank_line() -> None:
    text = "first paragraph\n\nsecond\n\n\nafter two blank lines\n"
    signed = note.sign_note(text, [PETER])
    assert note.open_note(signed, [PETER.verifier()]).text == text
    # A text that itself ends in a blank line still round-trips.
    signed = note.sign_note("x\n\n", [PETER])
    assert note.open_note(signed, [PETER.verifier()]).text == "x\n\n"


def test_signature_cap_is_exactly_100_lines() -> None:
    unknown = [_seeded(f"w{i}", bytes([i])) for i in range(99)]
    ok = note.sign_note(TEXT, [PETER, *unknown])
    assert note.open_note(ok, [PETER.verifier()]).signed_by == ("PeterNeumann",)
    with pytest.raises(LimitExceededError):
        note.sign_note(TEXT, [PETER, *unknown, _seeded("w99", b"99")])
    with pytest.raises(LimitExceededError):
        note.add_signatures(ok, [_seeded("w99", b"99")])
    over = ok + "— w99 " + PETER_SIG + "\n"
    with pytest.raises(LimitExceededError, match="101"):
        note.open_note(over, [PETER.verifier()])
    assert note.MAX_SIGNATURES >= 16


def test_unknown_keys_are_skipped_even_with_a_known_name_or_hash() -> None:
    other = _seeded("PeterNeumann", b"impostor")  # same name, other key: other hash
    assert other.verifier().key_hash != PETER.verifier().key_hash
    signed = note.sign_note(TEXT, [other, PETER])
    opened = note.open_note(signed, [PETER.verifier()])
    assert opened.signed_by == ("PeterNeumann",)
    assert opened.unknown_signers == ("PeterNeumann",)
    # Same hash under another name: unknown too (the tuple identifies a key).
    renamed = SIGNED.replace("— PeterNeumann ", "— Someone ")
    with pytest.raises(UnverifiedNoteError, match="signed by: Someone"):
        note.open_note(renamed, [PETER.verifier()])
    with pytest.raises(UnverifiedNoteError):
        note.open_note(note.sign_note(TEXT, [other]), [PETER.verifier()])


def test_forged_signature_from_a_known_key_rejects_the_whole_note() -> None:
    enoch = _seeded("EnochRoot2", b"enoch")
    signed = note.sign_note(TEXT, [PETER, enoch])
    raw = base64.b64decode(PETER_SIG)
    forged_sig = base64.b64encode(raw[:-1] + bytes([raw[-1] ^ 1])).decode()
    forged = signed.replace(PETER_SIG, forged_sig)
    with pytest.raises(SignatureError, match="PeterNeumann\\+c74f20a3 does not verify") as info:
        note.open_note(forged, [PETER.verifier(), enoch.verifier()])
    assert type(info.value) is SignatureError
    # Same bytes, other text.
    other_text = signed.replace("answer", "Answer")
    with pytest.raises(SignatureError, match="does not verify"):
        note.open_note(other_text, [PETER.verifier()])
    # Known key signing twice: every line from it is checked.
    twice = signed + "— PeterNeumann " + forged_sig + "\n"
    with pytest.raises(SignatureError):
        note.open_note(twice, [PETER.verifier()])
    dup = signed + PETER_LINE
    assert note.open_note(dup, [PETER.verifier()]).signed_by == ("PeterNeumann",)


def test_verifiers_must_be_distinct() -> None:
    with pytest.raises(InvalidInputError, match="twice"):
        note.open_note(SIGNED, [PETER.verifier(), PETER.verifier()])


def test_sign_note_preconditions() -> None:
    with pytest.raises(InvalidInputError, match="end with a newline"):
        note.sign_note("no newline", [PETER])
    with pytest.raises(InvalidInputError, match="U\\+0009"):
        note.sign_note("a\tb\n", [PETER])
    with pytest.raises(InvalidInputError, match="at least one signer"):
        note.sign_note(TEXT, [])
    with pytest.raises(InvalidInputError, match="already signed"):
        note.sign_note(TEXT, [PETER, PETER])
    with pytest.raises(InvalidInputError, match="already signed"):
        note.add_signatures(SIGNED, [PETER])


# -- cosignatures at the note level --------------------------------------------------------


def test_cosignature_message_and_layout() -> None:
    witness = _seeded("witness.example/w1", b"w1", SignatureType.COSIGNATURE_V1)
    v = witness.verifier()
    digest = hashlib.sha256(b"witness.example/w1\n\x04" + v.public_key).digest()
    assert v.key_hash == digest[:4]
    assert NoteVerifier.from_vkey(witness.verifier_key()) == v
    with pytest.raises(InvalidInputError, match="needs the time"):
        note.sign_note(TEXT, [witness])
    signed = note.sign_note(TEXT, [witness], now=1679315147)
    raw = base64.b64decode(signed.rsplit(" ", 1)[1])
    assert raw[:4] == v.key_hash
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    message = b"cosignature/v1\ntime 1679315147\n" + TEXT.encode()
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    Ed25519PublicKey.from_public_bytes(v.public_key).verify(raw[12:], message)
    opened = note.open_note(signed, [v])
    assert opened.signatures[0].timestamp == 1679315147
    assert opened.signatures[0].sig_type is SignatureType.COSIGNATURE_V1
    for bad in (-1, 2**63):
        with pytest.raises(InvalidInputError, match="2\\^63-1"):
            note.sign_note(TEXT, [witness], now=bad)


def test_same_key_as_note_key_and_cosigner_gets_distinct_hashes() -> None:
    seed = hashlib.sha256(b"k").digest()
    plain = NoteSigner("w", SecretBytes(seed))
    cosigner = NoteSigner("w", SecretBytes(seed), SignatureType.COSIGNATURE_V1)
    assert plain.verifier().public_key == cosigner.verifier().public_key
    assert plain.verifier().key_hash != cosigner.verifier().key_hash
    # A plain signature cannot pass as a cosignature: other hash, unknown key.
    with pytest.raises(UnverifiedNoteError):
        note.open_note(note.sign_note(TEXT, [plain]), [cosigner.verifier()])


def test_cosignature_with_timestamp_beyond_2_63_is_refused() -> None:
    witness = _seeded("w", b"w", SignatureType.COSIGNATURE_V1)
    signed = note.sign_note(TEXT, [witness], now=5)
    head, b64 = signed.rsplit(" ", 1)
    raw = bytearray(base64.b64decode(b64))
    raw[4] = 0x80
    tampered = head + " " + base64.b64encode(bytes(raw)).decode() + "\n"
    with pytest.raises(SignatureError, match="2\\^63-1"):
        note.open_note(tampered, [witness.verifier()])
    raw[4] = 0
    raw[11] = 6  # another time: the signature covers it
    tampered = head + " " + base64.b64encode(bytes(raw)).decode() + "\n"
    with pytest.raises(SignatureError, match="does not verify"):
        note.open_note(tampered, [witness.verifier()])


# -- the signer stays opaque -----------------------------------------------------------------


def test_signer_is_opaque() -> None:
    assert repr(PETER) == "<NoteSigner PeterNeumann+c74f20a3>"
    assert str(PETER) == repr(PETER)
    with pytest.raises(TypeError):
        pickle.dumps(PETER)
    with pytest.raises(TypeError):
        copy.copy(PETER)
    with pytest.raises(TypeError):
        copy.deepcopy(PETER)
    assert not hasattr(PETER, "__dict__")
    seed = PETER.export_seed()
    assert isinstance(seed, SecretBytes)
    assert NoteSigner("PeterNeumann", seed).verifier() == PETER.verifier()
    seed.wipe()


def test_generate_uses_the_injected_randomness() -> None:
    calls: list[int] = []

    def rng(n: int) -> bytes:
        calls.append(n)
        return bytes(range(n))

    a = NoteSigner.generate("a", random_bytes=rng)
    assert calls == [32]
    assert a.verifier() == NoteSigner("a", SecretBytes(bytes(range(32)))).verifier()
    with pytest.raises(InvalidInputError, match="32 bytes"):
        NoteSigner("a", SecretBytes(bytes(31)))


# -- round trips ---------------------------------------------------------------------------------

note_text = st.lists(
    st.text(alphabet=st.characters(min_codepoint=0x20, codec="utf-8"), max_size=40),
    min_size=1,
    max_size=6,
).map(lambda lines: "\n".join(lines) + "\n")


@settings(max_examples=60, deadline=None)
@given(text=note_text, n=st.integers(1, 3), now=st.integers(0, 2**63 - 1))
def test_round_trip(text: str, n: int, now: int) -> None:
    signers = [_seeded(f"s{i}.example", bytes([i])) for i in range(n)]
    witness = _seeded("w.example", b"w", SignatureType.COSIGNATURE_V1)
    signed = note.add_signatures(note.sign_note(text, signers), [witness], now=now)
    opened = note.open_note(signed, [s.verifier() for s in signers] + [witness.verifier()])
    assert opened.text == text
    assert opened.signed_by == (*(s.name for s in signers), "w.example")
    assert opened.signatures[-1].timestamp == now
    # Trusting only the last signer still opens; the others are reported.
    opened = note.open_note(signed, [signers[-1].verifier()])
    assert opened.signed_by == (signers[-1].name,)
    assert len(opened.unknown_signers) == n
