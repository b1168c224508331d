"""Shamir split/combine: round trips, secrecy, commitments and every refusal."""

from __future__ import annotations

import copy
import hashlib
import itertools
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import canonical, gf256, shamir
from keyquorum.quorum.errors import (
    CommitmentError,
    DeserializationError,
    InvalidInputError,
    ShareError,
    ThresholdError,
    UnsupportedVersionError,
)
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.shamir import Share, SplitCommitments
from tests.gf256_reference import ref_mul

MASTER = bytes(range(0x80, 0xA0))  # 32 bytes


def counter_random(seed: int = 0) -> Callable[[int], bytes]:
    """A deterministic random_bytes: SHA-256 in counter mode, for byte-exact tests."""
    state = {"n": 0}

    def draw(size: int) -> bytes:
        out = b""
        while len(out) < size:
            block = seed.to_bytes(4, "big") + state["n"].to_bytes(8, "big")
            out += hashlib.sha256(block).digest()
            state["n"] += 1
        return out[:size]

    return draw


def clone(share: Share, **changes: Any) -> Share:
    fields: dict[str, Any] = {
        "split_id": share.split_id,
        "index": share.index,
        "threshold": share.threshold,
        "value": SecretBytes(share.value.reveal()),
    }
    fields.update(changes)
    return Share(**fields)


def flipped(share: Share, bit: int) -> Share:
    value = bytearray(share.value.reveal())
    value[bit // 8] ^= 1 << (bit % 8)
    return clone(share, value=SecretBytes(value))


# --- round trips -----------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "threshold", "count"),
    [
        (b"\x00", 2, 2),
        (b"\xff", 2, 3),
        (MASTER, 5, 7),
        (bytes(100), 3, 5),
        (b"\x5a", 255, 255),
        (b"k" * 7, 2, 255),
    ],
    ids=[
        "1-byte zero secret, 2-of-2",
        "1-byte secret, 2-of-3",
        "master key, 5-of-7",
        "100 zero bytes, 3-of-5",
        "largest threshold, 255-of-255",
        "most shares, 2-of-255",
    ],
)
def test_split_then_combine_returns_the_secret(secret: bytes, threshold: int, count: int) -> None:
    shares, commitments = shamir.split(secret, threshold, count)
    assert [s.index for s in shares] == list(range(1, count + 1))
    assert {s.split_id for s in shares} == {commitments.split_id}
    assert commitments.threshold == threshold
    assert commitments.count == count
    assert commitments.secret_length == len(secret)
    for share in shares:
        shamir.verify_share(share, commitments)
    first = shamir.combine(shares[:threshold], commitments)
    last = shamir.combine(list(reversed(shares))[:threshold], commitments)
    assert first.equals(secret)
    assert last.equals(secret)


def test_secret_bytes_input_and_output() -> None:
    with SecretBytes(MASTER) as master:
        shares, commitments = shamir.split(master, 2, 3)
    result = shamir.combine(shares[1:], commitments)
    assert isinstance(result, SecretBytes)
    assert result.equals(MASTER)


def test_all_shares_can_be_given() -> None:
    shares, commitments = shamir.split(MASTER, 5, 7)
    assert shamir.combine(shares, commitments).equals(MASTER)


@settings(max_examples=25, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=24),
    shape=st.integers(min_value=2, max_value=6).flatmap(
        lambda n: st.tuples(st.integers(min_value=2, max_value=n), st.just(n))
    ),
)
def test_every_threshold_subset_reconstructs(secret: bytes, shape: tuple[int, int]) -> None:
    threshold, count = shape
    shares, commitments = shamir.split(secret, threshold, count)
    for subset in itertools.combinations(shares, threshold):
        assert shamir.combine(list(subset), commitments).equals(secret)
    for subset in itertools.combinations(shares, threshold - 1):
        with pytest.raises(ThresholdError):
            shamir.combine(list(subset), commitments)


def test_split_is_byte_exact_against_the_documented_construction() -> None:
    """Recompute a 2-of-3 split of one byte from its random draws by hand.

    Draw order: split id (16), salt (32), the x^1 coefficient (33). Share i
    is salted ^ c1 * i per byte; commitments per docs/shamir.md.
    """
    rng = counter_random(7)
    shares, commitments = shamir.split(b"\x42", 2, 3, random_bytes=counter_random(7))
    split_id, salt, c1 = rng(16), rng(32), rng(33)
    salted = salt + b"\x42"
    assert commitments.split_id == split_id
    for share in shares:
        i = share.index
        expected = bytes(s ^ ref_mul(c, i) for s, c in zip(salted, c1, strict=True))
        assert share.value.reveal() == expected
        assert (
            commitments.share_commitments[i - 1]
            == hashlib.sha256(
                b"keyquorum/v1/shamir/share\x00" + split_id + bytes([2, 3, i]) + expected
            ).digest()
        )
    assert (
        commitments.secret_commitment
        == hashlib.sha256(b"keyquorum/v1/shamir/secret\x00" + split_id + salt + b"\x42").digest()
    )


def test_splits_of_the_same_secret_share_nothing() -> None:
    a_shares, a = shamir.split(b"\x01", 2, 2)
    b_shares, b = shamir.split(b"\x01", 2, 2)
    assert a.split_id != b.split_id
    assert a.secret_commitment != b.secret_commitment  # salted: equal secrets do not show
    assert a_shares[0].value.reveal() != b_shares[0].value.reveal()


# --- secrecy ----------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    threshold=st.integers(min_value=2, max_value=6),
    secret=st.integers(min_value=0, max_value=255),
    data=st.data(),
)
def test_fewer_than_threshold_shares_fit_every_secret(
    threshold: int, secret: int, data: st.DataObject
) -> None:
    """k-1 shares of a 1-byte secret leave all 256 secrets possible, each exactly once.

    At the raw interpolation level (the commitments sit on top): take the
    secret byte's position of k-1 real shares; for each candidate s, the
    points (0, s) and the k-1 shares fix one polynomial of degree < k, so
    one completing k-th share. The map s -> completing share is a
    bijection, so the k-1 shares say nothing about s.
    """
    count = data.draw(st.integers(min_value=threshold, max_value=min(threshold + 3, 255)))
    shares, _ = shamir.split(bytes([secret]), threshold, count)
    held = data.draw(
        st.lists(
            st.sampled_from(shares), min_size=threshold - 1, max_size=threshold - 1, unique_by=id
        )
    )
    known = [(s.index, s.value.reveal()[shamir.SALT_SIZE :]) for s in held]
    unused = next(x for x in range(1, 256) if x not in {i for i, _ in known})
    completions = set()
    for candidate in range(256):
        completing = gf256.interpolate([*known, (0, bytes([candidate]))], unused)
        completed = [*known, (unused, bytes(completing))]
        assert gf256.interpolate(completed, 0) == bytes([candidate])
        for x, y in known:
            assert gf256.interpolate(completed, x) == y
        completions.add(bytes(completing))
    assert len(completions) == 256


# --- one bad share is named -----------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=40),
    which=st.integers(min_value=0, max_value=4),
    data=st.data(),
)
def test_one_flipped_bit_is_detected_and_named(
    secret: bytes, which: int, data: st.DataObject
) -> None:
    shares, commitments = shamir.split(secret, 3, 5)
    bit = data.draw(st.integers(min_value=0, max_value=len(shares[which].value) * 8 - 1))
    bad = flipped(shares[which], bit)
    with pytest.raises(ShareError) as alone:
        shamir.verify_share(bad, commitments)
    assert alone.value.index == which + 1
    others = [s for s in shares if s.index != which + 1][:2]
    with pytest.raises(ShareError) as combined:
        shamir.combine([*others, bad], commitments)
    assert combined.value.index == which + 1
    assert f"share {which + 1}" in str(combined.value)


def test_every_bit_flip_of_the_binary_form_is_refused() -> None:
    """Flip each bit of a serialised share: parsing or verification refuses it.

    Flips in the value, split id or threshold name the share's own index;
    a flip in the index byte names the index the bytes now claim.
    """
    shares, commitments = shamir.split(b"\x07", 2, 3)
    good = shares[1]
    data = good.to_bytes().reveal()
    index_offset = 1 + shamir.SPLIT_ID_SIZE + 1
    outcomes: dict[str, int] = {}
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            parsed = Share.from_bytes(bytes(mutated))
        except DeserializationError as e:
            outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
            continue
        with pytest.raises(ShareError) as raised:
            shamir.verify_share(parsed, commitments)
        if bit // 8 == index_offset:
            assert raised.value.index == parsed.index != good.index
        else:
            assert raised.value.index == good.index
        outcomes["ShareError"] = outcomes.get("ShareError", 0) + 1
    # version byte: 8 flips -> unknown version; length field and threshold-below-2
    # and index-0 flips fail to parse; all the others parse and are refused.
    assert outcomes["UnsupportedVersionError"] == 8
    assert sum(outcomes.values()) == len(data) * 8


# --- refusals ----------------------------------------------------------------


def _case_other_split(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    stranger = shamir.split(MASTER, 3, 5)[0][3]
    return [shares[0], shares[1], stranger], commitments


def _case_duplicate(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    return [shares[0], shares[1], clone(shares[1])], commitments


def _case_other_threshold(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    return [shares[0], shares[1], clone(shares[3], threshold=2)], commitments


def _case_other_length(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    longer = SecretBytes(shares[3].value.reveal() + b"\x00")
    return [shares[0], shares[1], clone(shares[3], value=longer)], commitments


def _case_beyond_count(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    return [shares[0], shares[1], clone(shares[3], index=6)], commitments


def _case_altered(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    return [shares[0], shares[1], flipped(shares[3], 100)], commitments


def _case_swapped_values(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    # a custodian presents another's share value under their own index
    return [shares[0], shares[1], clone(shares[4], index=4)], commitments


def _case_wiped(
    shares: list[Share], commitments: SplitCommitments
) -> tuple[list[Share], SplitCommitments]:
    dead = clone(shares[3])
    dead.wipe()
    return [shares[0], shares[1], dead], commitments


REFUSALS = [
    (_case_other_split, 4),
    (_case_duplicate, 2),
    (_case_other_threshold, 4),
    (_case_other_length, 4),
    (_case_beyond_count, 6),
    (_case_altered, 4),
    (_case_swapped_values, 4),
    (_case_wiped, 4),
]


@pytest.mark.parametrize(
    ("make", "index"),
    REFUSALS,
    ids=[
        "share of another split",
        "index given twice",
        "share claims another threshold",
        "share value of another length",
        "index beyond the share count",
        "share value altered",
        "another custodian's value under this index",
        "wiped share",
    ],
)
def test_combine_refuses_a_bad_share_and_names_it(
    make: Callable[[list[Share], SplitCommitments], tuple[list[Share], SplitCommitments]],
    index: int,
) -> None:
    shares, commitments = shamir.split(MASTER, 3, 5)
    bad_set, bad_commitments = make(shares, commitments)
    with pytest.raises(ShareError) as raised:
        shamir.combine(bad_set, bad_commitments)
    assert raised.value.index == index
    assert f"{index}" in str(raised.value)
    for share in shares:
        assert share.value.reveal().hex() not in str(raised.value)


@pytest.mark.parametrize(
    "given_count",
    [0, 1, 4],
    ids=["no shares", "one share", "threshold minus one"],
)
def test_combine_refuses_too_few_shares(given_count: int) -> None:
    shares, commitments = shamir.split(MASTER, 5, 7)
    with pytest.raises(ThresholdError, match=f"{given_count} distinct shares given, .* needs 5"):
        shamir.combine(shares[:given_count], commitments)


def test_duplicates_are_refused_before_they_could_fake_the_count() -> None:
    shares, commitments = shamir.split(MASTER, 3, 5)
    with pytest.raises(ShareError, match="given twice") as raised:
        shamir.combine([shares[0], shares[1], shares[1]], commitments)
    assert raised.value.index == 2


def test_a_wrong_secret_commitment_is_refused() -> None:
    shares, commitments = shamir.split(MASTER, 3, 5)
    forged = SplitCommitments(
        split_id=commitments.split_id,
        threshold=3,
        count=5,
        secret_length=32,
        share_commitments=commitments.share_commitments,
        secret_commitment=bytes(32),
    )
    with pytest.raises(CommitmentError, match="does not match the secret commitment"):
        shamir.combine(shares[:3], forged)


def test_commitments_relabelled_to_a_lower_threshold_are_caught() -> None:
    """An attacker who rewrites the record as 2-of-5 (and re-commits each share
    under threshold 2) gets two shares past the per-share check, but their
    line through x=0 is not the secret: the secret commitment refuses it."""
    shares, commitments = shamir.split(MASTER, 3, 5)
    relabelled = [clone(s, threshold=2) for s in shares]
    lowered = SplitCommitments(
        split_id=commitments.split_id,
        threshold=2,
        count=5,
        secret_length=32,
        share_commitments=tuple(
            hashlib.sha256(
                b"keyquorum/v1/shamir/share\x00"
                + s.split_id
                + bytes([2, 5, s.index])
                + s.value.reveal()
            ).digest()
            for s in relabelled
        ),
        secret_commitment=commitments.secret_commitment,
    )
    with pytest.raises(CommitmentError):
        shamir.combine(relabelled[:2], lowered)


@pytest.mark.parametrize(
    ("shares_arg", "commitments_arg", "message"),
    [
        (["not a share"], None, "item 0 of shares is not a Share"),
        ([], {"split_id": "x"}, "commitments must be SplitCommitments"),
    ],
    ids=["list holds a non-share", "commitments as a dict"],
)
def test_combine_refuses_wrong_argument_types(
    shares_arg: list[Any], commitments_arg: Any, message: str
) -> None:
    _, commitments = shamir.split(MASTER, 2, 2)
    with pytest.raises(InvalidInputError, match=message):
        shamir.combine(shares_arg, commitments_arg or commitments)


# --- split preconditions ---------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "threshold", "count", "message"),
    [
        (MASTER, 1, 3, "2 <= threshold <= count <= 255"),
        (MASTER, 4, 3, "2 <= threshold <= count <= 255"),
        (MASTER, 2, 256, "2 <= threshold <= count <= 255"),
        (MASTER, 0, 0, "2 <= threshold <= count <= 255"),
        (MASTER, True, 3, "must be integers"),
        (MASTER, 2.0, 3, "must be integers"),
        (b"", 2, 3, "1..65503 bytes, got 0"),
        (bytes(shamir.MAX_SECRET_LENGTH + 1), 2, 3, "1..65503 bytes, got 65504"),
        ("text", 2, 3, "SecretBytes, bytes or bytearray"),
    ],
    ids=[
        "threshold 1",
        "threshold above count",
        "256 shares",
        "zero",
        "bool threshold",
        "float threshold",
        "empty secret",
        "secret too long",
        "str secret",
    ],
)
def test_split_preconditions(secret: Any, threshold: Any, count: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        shamir.split(secret, threshold, count)


def test_split_refuses_a_short_random_source() -> None:
    with pytest.raises(InvalidInputError, match=r"random_bytes\(16\) did not return 16 bytes"):
        shamir.split(MASTER, 2, 3, random_bytes=lambda n: bytes(n - 1))


# --- Share objects and their binary form -------------------------------------


def test_share_is_opaque() -> None:
    shares, _ = shamir.split(MASTER, 2, 3)
    share = shares[0]
    value_hex = share.value.reveal().hex()
    for text in (repr(share), str(share), f"{share}", str([share])):
        assert value_hex not in text
        assert "index=1" in text
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            attempt(share)
    encoded = share.to_bytes()
    assert isinstance(encoded, SecretBytes)
    assert value_hex not in repr(encoded)


def test_wipe_zeroes_the_value() -> None:
    shares, _ = shamir.split(MASTER, 2, 3)
    buf = shares[0].value.buffer_for_test()
    shares[0].wipe()
    assert buf == bytearray(len(buf))
    assert "wiped" in repr(shares[0])


def test_binary_form_round_trips_and_is_versioned() -> None:
    shares, commitments = shamir.split(b"\x01\x02\x03", 2, 3)
    share = shares[2]
    encoded = share.to_bytes()
    raw = encoded.reveal()
    assert raw[0] == shamir.SHARE_FORMAT_VERSION
    assert raw[1:17] == share.split_id
    assert raw[17:21] == bytes([2, 3]) + (35).to_bytes(2, "big")
    assert raw[21:] == share.value.reveal()
    for form in (raw, bytearray(raw), memoryview(raw), encoded):
        back = Share.from_bytes(form)
        assert (back.split_id, back.index, back.threshold) == (share.split_id, 3, 2)
        assert back.value.equals(share.value)
        shamir.verify_share(back, commitments)


def _v1(
    *,
    threshold: int = 2,
    index: int = 1,
    value: bytes = bytes(33),
    declared: int | None = None,
    version: int = 1,
) -> bytes:
    length = len(value) if declared is None else declared
    return (
        bytes([version]) + bytes(16) + bytes([threshold, index]) + length.to_bytes(2, "big") + value
    )


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", DeserializationError, "empty input"),
        (_v1(version=0), UnsupportedVersionError, "version 0 is not supported"),
        (_v1(version=2), UnsupportedVersionError, "version 2 is not supported"),
        (_v1()[:20], DeserializationError, "shorter than the 21-byte header"),
        (_v1(threshold=0), DeserializationError, "threshold 0 is below 2"),
        (_v1(threshold=1), DeserializationError, "threshold 1 is below 2"),
        (_v1(index=0), DeserializationError, "index 0 is where the secret sits"),
        (_v1(declared=34), DeserializationError, "header says 34 value bytes, 33 follow"),
        (_v1(declared=32), DeserializationError, "header says 32 value bytes, 33 follow"),
        (_v1()[:-1], DeserializationError, "header says 33 value bytes, 32 follow"),
        (_v1(value=bytes(32)), DeserializationError, "value of 32 bytes is too short"),
        ("not bytes", DeserializationError, "expected bytes"),
    ],
    ids=[
        "empty",
        "version 0",
        "version 2",
        "truncated header",
        "threshold 0",
        "threshold 1",
        "index 0",
        "length field too long",
        "length field too short",
        "truncated value",
        "value without a secret byte",
        "str",
    ],
)
def test_from_bytes_refuses_malformed_input(
    data: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as raised:
        Share.from_bytes(data)
    assert type(raised.value) is error


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"index": 0}, "share index must be 1..255"),
        ({"index": 256}, "share index must be 1..255"),
        ({"index": True}, "share index must be 1..255"),
        ({"threshold": 1}, "threshold must be 2..255"),
        ({"split_id": bytes(15)}, "split id must be 16 bytes"),
        ({"value": SecretBytes(bytes(32))}, "value must be 33..65535 bytes"),
        ({"value": bytes(33)}, "value must be SecretBytes"),
    ],
    ids=[
        "index 0",
        "index 256",
        "bool index",
        "threshold 1",
        "short split id",
        "no secret byte",
        "plain bytes value",
    ],
)
def test_share_construction_checks_every_field(changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "split_id": bytes(16),
        "index": 1,
        "threshold": 2,
        "value": SecretBytes(bytes(33)),
    }
    fields.update(changes)
    with pytest.raises(InvalidInputError, match=message):
        Share(**fields)


# --- SplitCommitments JSON ---------------------------------------------------


def test_commitments_json_round_trips_through_canonical_encoding() -> None:
    _, commitments = shamir.split(MASTER, 5, 7)
    doc = commitments.to_json()
    assert set(doc) == {
        "version",
        "split_id",
        "threshold",
        "count",
        "secret_length",
        "share_commitments",
        "secret_commitment",
    }
    back = SplitCommitments.from_json(canonical.decode(canonical.encode(doc)))
    assert back == commitments


def _mutate(doc: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = dict(doc)
    if value is _DELETE:
        del out[key]
    else:
        out[key] = value
    return out


_DELETE = object()
_H = "ab" * 32

JSON_REFUSALS: list[tuple[str, Any, type[Exception], str]] = [
    ("version", 2, UnsupportedVersionError, "version 2 is not supported"),
    ("version", "1", DeserializationError, "version must be an integer"),
    ("version", _DELETE, DeserializationError, r"missing fields \['version'\]"),
    ("extra", 1, DeserializationError, r"unknown fields \['extra'\]"),
    ("split_id", "00" * 15, DeserializationError, "split_id: expected 16 bytes, got 15"),
    ("split_id", "AB" * 16, DeserializationError, "split_id: hex must be lowercase"),
    ("split_id", 5, DeserializationError, "split_id: expected a hex string"),
    ("threshold", 1, DeserializationError, "2 <= threshold <= count"),
    ("threshold", True, DeserializationError, "threshold must be an integer"),
    ("threshold", 2.0, DeserializationError, "threshold must be an integer"),
    ("count", 4, DeserializationError, "2 <= threshold <= count"),
    ("count", 6, DeserializationError, "5 share commitments for 6 shares"),
    ("secret_length", 0, DeserializationError, "secret length must be 1..65503"),
    ("secret_length", "32", DeserializationError, "secret_length must be an integer"),
    ("share_commitments", "ab", DeserializationError, "share_commitments must be a list"),
    ("share_commitments", [_H] * 4, DeserializationError, "4 share commitments for 5 shares"),
    ("share_commitments", [_H] * 256, DeserializationError, "256 share commitments, at most"),
    (
        "share_commitments",
        [_H, _H, _H, _H, "ab" * 31],
        DeserializationError,
        r"share_commitments\[4\]: expected 32 bytes",
    ),
    (
        "share_commitments",
        [_H, _H, _H, "xy" * 32, _H],
        DeserializationError,
        r"share_commitments\[3\]: not hex",
    ),
    ("secret_commitment", "ab" * 33, DeserializationError, "secret_commitment: expected 32"),
    ("secret_commitment", None, DeserializationError, "secret_commitment: expected a hex"),
]


@pytest.mark.parametrize(
    ("key", "value", "error", "message"),
    JSON_REFUSALS,
    ids=[
        "version 2",
        "version as string",
        "version missing",
        "unknown field",
        "short split id",
        "uppercase hex",
        "split id not a string",
        "threshold 1",
        "bool threshold",
        "float threshold",
        "count below threshold",
        "count disagrees with commitments",
        "zero secret length",
        "secret length as string",
        "commitments not a list",
        "too few commitments",
        "too many commitments",
        "short commitment",
        "commitment not hex",
        "long secret commitment",
        "null secret commitment",
    ],
)
def test_commitments_from_json_checks_every_field(
    key: str, value: Any, error: type[Exception], message: str
) -> None:
    _, commitments = shamir.split(MASTER, 5, 5)
    doc = _mutate(commitments.to_json(), key, value)
    with pytest.raises(error, match=message) as raised:
        SplitCommitments.from_json(doc)
    assert type(raised.value) is error


def test_commitments_from_json_refuses_a_non_object() -> None:
    with pytest.raises(DeserializationError, match="expected a JSON object"):
        SplitCommitments.from_json([1, 2])


def test_commitments_construction_checks_fields() -> None:
    _, good = shamir.split(MASTER, 2, 2)
    with pytest.raises(InvalidInputError, match="share commitment 2 must be 32 bytes"):
        SplitCommitments(
            split_id=good.split_id,
            threshold=2,
            count=2,
            secret_length=32,
            share_commitments=(bytes(32), bytes(31)),
            secret_commitment=bytes(32),
        )
    with pytest.raises(InvalidInputError, match="must be a tuple"):
        SplitCommitments(
            split_id=good.split_id,
            threshold=2,
            count=2,
            secret_length=32,
            share_commitments=[bytes(32), bytes(32)],  # type: ignore[arg-type]
            secret_commitment=bytes(32),
        )
