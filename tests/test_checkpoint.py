"""C2SP tlog-checkpoint bodies, signed checkpoints and tlog-cosignatures."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import merkle, note
from keyquorum.quorum.checkpoint import (
    Checkpoint,
    VerifiedCheckpoint,
    cosign_checkpoint,
    parse_verifier_key,
    sign_checkpoint,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    SignatureError,
    ThresholdError,
    UnverifiedNoteError,
    VerificationError,
)
from keyquorum.quorum.note import NoteSigner, SignatureType

ORIGIN = "keyquorum.example/acme-prod"
ROOT = merkle.leaf_hash(b"entry")
ROOT_B64 = base64.b64encode(ROOT).decode()
C2SP_EXAMPLE = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
)
LINE_CHARS = st.characters(min_codepoint=0x20, codec="utf-8")


def _signer(name: str, sig_type: SignatureType = SignatureType.ED25519) -> NoteSigner:
    seed = hashlib.sha256(name.encode() + bytes([sig_type])).digest()
    return NoteSigner.generate(name, sig_type=sig_type, random_bytes=lambda n: seed[:n])


LOG = _signer(ORIGIN)
W1 = _signer("witness.example/w1", SignatureType.COSIGNATURE_V1)
W2 = _signer("witness.example/w2", SignatureType.COSIGNATURE_V1)
W3 = _signer("witness.example/w3", SignatureType.COSIGNATURE_V1)


# -- bodies ----------------------------------------------------------------------------


def test_c2sp_example_body_round_trips() -> None:
    cp = Checkpoint.parse(C2SP_EXAMPLE)
    assert cp.origin == "example.com/behind-the-sofa"
    assert cp.size == 20852163
    assert cp.root == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert cp.extensions == ()
    assert cp.body() == C2SP_EXAMPLE


def test_extensions_and_empty_tree() -> None:
    cp = Checkpoint(ORIGIN, 5, ROOT, ("ext one", "— anything"))
    assert cp.body() == f"{ORIGIN}\n5\n{ROOT_B64}\next one\n— anything\n"
    assert Checkpoint.parse(cp.body()) == cp
    empty = Checkpoint(ORIGIN, 0, merkle.EMPTY_ROOT)
    assert empty.body().split("\n")[1] == "0"
    assert Checkpoint.parse(empty.body()) == empty


BAD_BODIES = [
    (f"{ORIGIN}\n5\n{ROOT_B64}", "end with a newline"),
    (f"{ORIGIN}\n5\n", "2 lines, at least 3"),
    (f"\n5\n{ROOT_B64}\n", "origin must not be empty"),
    (f"{ORIGIN}\n05\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n00\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n+5\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n 5\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n5_0\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n\u0665\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n-1\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n{2**64}\n{ROOT_B64}\n", "2\\^64-1"),
    (f"{ORIGIN}\n{10**20}\n{ROOT_B64}\n", "not canonical decimal"),
    (f"{ORIGIN}\n5\n{ROOT_B64[:-1]}\n", "not base64"),
    (f"{ORIGIN}\n5\n{base64.b64encode(ROOT[:31]).decode()}\n", "32 bytes, got 31"),
    (f"{ORIGIN}\n5\n{ROOT_B64[:-2]}B=\n", "not canonical base64"),
    (f"{ORIGIN}\n5\n{ROOT_B64.replace('=', '')}\n", "not base64"),
    (f"{ORIGIN}\n5\n{ROOT_B64}\n\n", "extension line 0 must not be empty"),
    (f"{ORIGIN}\n5\n{ROOT_B64}\next\n\nmore\n", "extension line 1 must not be empty"),
    (f"{ORIGIN}\n0\n{ROOT_B64}\n", "empty tree"),
    (f"{ORIGIN}\r\n5\n{ROOT_B64}\n", "control character U\\+000D"),
]


@pytest.mark.parametrize(
    ("body", "message"),
    BAD_BODIES,
    ids=[
        "no-final-newline",
        "two-lines",
        "empty-origin",
        "leading-zero",
        "double-zero",
        "plus-sign",
        "leading-space",
        "underscore",
        "arabic-digit",
        "negative",
        "beyond-uint64",
        "21-digits",
        "root-truncated-base64",
        "root-31-bytes",
        "root-non-canonical-base64",
        "root-unpadded",
        "empty-extension",
        "empty-extension-in-the-middle",
        "size-zero-with-non-empty-root",
        "carriage-return",
    ],
)
def test_bad_bodies(body: str, message: str) -> None:
    with pytest.raises(DeserializationError, match=message) as info:
        Checkpoint.parse(body)
    assert type(info.value) is DeserializationError


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, ROOT), "origin must not be empty"),
        (("a\nb", 1, ROOT), "U\\+000A"),
        ((ORIGIN, -1, ROOT), "2\\^64-1"),
        ((ORIGIN, True, ROOT), "2\\^64-1"),
        ((ORIGIN, 1, ROOT[:31]), "32 bytes"),
        ((ORIGIN, 0, ROOT), "empty tree"),
        ((ORIGIN, 1, ROOT, ("",)), "extension line 0"),
        ((ORIGIN, 1, ROOT, ("a\nb",)), "extension line 0"),
        (("\ud800", 1, ROOT), "UTF-8"),
    ],
    ids=[
        "empty-origin",
        "newline-in-origin",
        "negative-size",
        "bool-size",
        "short-root",
        "size-zero-wrong-root",
        "empty-extension",
        "newline-in-extension",
        "surrogate-origin",
    ],
)
def test_checkpoint_constructor_checks(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Checkpoint(*args)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(
    origin=st.text(alphabet=LINE_CHARS, min_size=1),
    size=st.integers(1, 2**64 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(
        st.text(alphabet=LINE_CHARS, min_size=1),
        max_size=3,
    ),
)
def test_body_round_trip(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(extensions))
    assert Checkpoint.parse(cp.body()) == cp


# -- signed checkpoints -----------------------------------------------------------------


def test_sign_and_verify() -> None:
    cp = Checkpoint(ORIGIN, 5, ROOT)
    signed = sign_checkpoint(cp, LOG)
    assert signed.startswith(cp.body() + "\n— " + ORIGIN + " ")
    verified = verify_checkpoint(signed, LOG.verifier())
    assert verified == VerifiedCheckpoint(cp, {}, ())
    assert dict(verified.cosigned_by) == {}
    # The convenience form names the origin after the key.
    assert LOG.sign_checkpoint(5, ROOT) == signed
    assert parse_verifier_key(LOG.verifier_key()) == LOG.verifier()


def test_cosigners_are_named_with_their_times() -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT, ("ext",)), LOG)
    signed = cosign_checkpoint(signed, LOG.verifier(), W1, 1_700_000_000)
    signed = cosign_checkpoint(signed, LOG.verifier(), W2, 1_700_000_100)
    verified = verify_checkpoint(
        signed, LOG.verifier(), [W1.verifier(), W2.verifier(), W3.verifier()]
    )
    assert dict(verified.cosigned_by) == {
        "witness.example/w1": 1_700_000_000,
        "witness.example/w2": 1_700_000_100,
    }
    verified.require_cosigners(2)
    with pytest.raises(ThresholdError, match="cosigned by 2 known cosigners, 3 required"):
        verified.require_cosigners(3)
    # Cosigners the caller does not configure are reported, not counted.
    only_w1 = verify_checkpoint(signed, LOG.verifier(), [W1.verifier()])
    assert dict(only_w1.cosigned_by) == {"witness.example/w1": 1_700_000_000}
    assert only_w1.unknown_signers == ("witness.example/w2",)
    with pytest.raises(TypeError):
        verified.cosigned_by["x"] = 1  # type: ignore[index]


def test_cosignature_covers_the_extension_lines() -> None:
    signed = cosign_checkpoint(
        sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT, ("ext",)), LOG), LOG.verifier(), W1, 7
    )
    w1_line = signed.rsplit("\n", 2)[1]
    other = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT, ("EXT",)), LOG) + w1_line + "\n"
    with pytest.raises(SignatureError, match=r"witness\.example/w1"):
        verify_checkpoint(other, LOG.verifier(), [W1.verifier()])


def test_checkpoint_signed_only_by_cosigners_is_refused() -> None:
    body = Checkpoint(ORIGIN, 5, ROOT).body()
    only_witness = note.sign_note(body, [W1], now=1)
    with pytest.raises(UnverifiedNoteError, match="not signed by the log key"):
        verify_checkpoint(only_witness, LOG.verifier(), [W1.verifier()])
    with pytest.raises(UnverifiedNoteError, match="no signature from a trusted key"):
        verify_checkpoint(only_witness, LOG.verifier())


def test_origin_must_match() -> None:
    other_log = sign_checkpoint(Checkpoint("other.example/log", 5, ROOT), LOG)
    with pytest.raises(VerificationError, match=r"origin 'other\.example/log'") as info:
        verify_checkpoint(other_log, LOG.verifier())
    assert type(info.value) is VerificationError
    assert (
        verify_checkpoint(other_log, LOG.verifier(), origin="other.example/log").checkpoint.size
        == 5
    )


def test_forged_and_malformed_checkpoints() -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT), LOG)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_checkpoint(signed.replace("\n5\n", "\n6\n"), LOG.verifier())
    not_a_checkpoint = note.sign_note("hello\n", [LOG])
    with pytest.raises(DeserializationError, match="1 lines"):
        verify_checkpoint(not_a_checkpoint, LOG.verifier())
    with pytest.raises(UnverifiedNoteError):
        verify_checkpoint(signed, _signer(ORIGIN + "x").verifier(), origin=ORIGIN)


def test_key_types_are_checked() -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT), LOG)
    with pytest.raises(InvalidInputError, match="log verifier"):
        verify_checkpoint(signed, W1.verifier())
    with pytest.raises(InvalidInputError, match="must be a cosignature"):
        verify_checkpoint(signed, LOG.verifier(), [_signer("w").verifier()])
    twin = NoteSigner.generate(W1.name, sig_type=SignatureType.COSIGNATURE_V1)
    with pytest.raises(InvalidInputError, match="two cosigners are named"):
        verify_checkpoint(signed, LOG.verifier(), [W1.verifier(), twin.verifier()])
    with pytest.raises(InvalidInputError, match="Ed25519 \\(0x01\\)"):
        sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT), W1)
    with pytest.raises(InvalidInputError, match="cosignature \\(0x04\\) key"):
        cosign_checkpoint(signed, LOG.verifier(), LOG, 1)


def test_cosigning_checks_the_log_signature_and_refuses_twice() -> None:
    signed = sign_checkpoint(Checkpoint(ORIGIN, 5, ROOT), LOG)
    forged = signed.replace("\n5\n", "\n6\n")
    with pytest.raises(SignatureError):
        cosign_checkpoint(forged, LOG.verifier(), W1, 1)
    once = cosign_checkpoint(signed, LOG.verifier(), W1, 1)
    with pytest.raises(InvalidInputError, match="already signed"):
        cosign_checkpoint(once, LOG.verifier(), W1, 2)
    with pytest.raises(InvalidInputError, match="2\\^63-1"):
        cosign_checkpoint(signed, LOG.verifier(), W1, -1)


def test_auditor_flow_consistency_between_two_checkpoints() -> None:
    # Yesterday's and today's checkpoints, cosigned after a consistency check.
    tree = merkle.MerkleTree()
    for i in range(13):
        tree.append(merkle.leaf_hash(f"entry {i}".encode()))
    old = verify_checkpoint(LOG.sign_checkpoint(8, tree.root(8)), LOG.verifier()).checkpoint
    new_note = LOG.sign_checkpoint(13, tree.root())
    new = verify_checkpoint(new_note, LOG.verifier()).checkpoint
    merkle.verify_consistency(
        old.size, new.size, tree.consistency_proof(old.size), old.root, new.root
    )
    cosigned = cosign_checkpoint(new_note, LOG.verifier(), W1, 1_700_000_000)
    assert verify_checkpoint(cosigned, LOG.verifier(), [W1.verifier()]).cosigned_by == {
        "witness.example/w1": 1_700_000_000
    }
    leaf = tree.leaf_hash(11)
    merkle.verify_inclusion(11, new.size, leaf, tree.inclusion_proof(11), new.root)
