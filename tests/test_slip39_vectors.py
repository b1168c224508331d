"""SLIP-0039 vectors as an outside check of gf256's field and interpolation.

SLIP-0039 shares over the same field (GF(2^8) mod x^8+x^4+x^3+x+1), with
the shared secret at x = 255 and a digest share at x = 254 whose first
four bytes are HMAC-SHA256(key=R, msg=S)[:4], R being the rest of it
(SLIP-0039, "Shamir's secret sharing" and "Digest"). The test-only
package shamir_mnemonic decodes the mnemonics (wordlist, RS1024 checksum,
metadata) into member indices and values; everything after that is ours:
interpolation at 255 and 254 with keyquorum.quorum.gf256, the digest check
here, and a comparison with the encrypted master secret that
shamir_mnemonic's own recovery gives. Every case of the file is classified
below, with the reason when it is not used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from shamir_mnemonic import (  # type: ignore[import-untyped]  # test only, untyped
    MnemonicError,
    Share,
    decode_mnemonics,
    recover_ems,
)

from keyquorum.quorum import gf256
from keyquorum.quorum.errors import InvalidInputError

HERE = Path(__file__).parent / "vectors" / "slip39"
VECTORS_SHA256 = "13ebecebdd869dd2bc2cdf69e7ce3a158cf106cac76c39d17682b1c6cdabbdc4"
PASSPHRASE = b"TREZOR"
SECRET_X = 255
DIGEST_X = 254
DIGEST_SIZE = 4

# Case numbers are the leading numbers of the descriptions (1-based).
SINGLE_GROUP = {4, 23, 41, 43, 45}
"""Valid, one group, member threshold >= 2: member shares -> EMS at x=255."""
TWO_LEVEL = {17, 18, 19, 36, 37, 38}
"""Valid, 2-of-4 groups: each group's members -> group share, then groups -> EMS."""
INVALID_DIGEST = {13, 32}
"""Must fail: our interpolation must find the digest wrong too."""
DUPLICATE_INDEX = {11, 30}
"""Must fail: our interpolation must refuse the repeated x-coordinate."""
SKIPPED = {
    **dict.fromkeys(
        (1, 20, 42, 44),
        "valid, but 1-of-1 without sharing: the share value is the secret, nothing to interpolate",
    ),
    **dict.fromkeys(
        (2, 3, 21, 22, 39, 40),
        "bad checksum, padding or length: the mnemonic does not decode, no field arithmetic",
    ),
    **dict.fromkeys(
        (10, 29),
        "group threshold above group count: refused while decoding the mnemonic",
    ),
    **dict.fromkeys(
        (5, 24, 14, 15, 16, 33, 34, 35),
        "too few members or groups: a count check (ours: ThresholdError in test_shamir.py), "
        "interpolation would run on too few points",
    ),
    **dict.fromkeys(
        (6, 7, 8, 9, 12, 25, 26, 27, 28, 31),
        "mismatched identifier, iteration exponent, group threshold/count or member "
        "threshold: SLIP-0039 metadata checks (ours: ShareError cases in test_shamir.py)",
    ),
}

Case = tuple[str, list[str], str, str]


def _load() -> list[Case]:
    data = (HERE / "vectors.json").read_bytes()
    assert hashlib.sha256(data).hexdigest() == VECTORS_SHA256, "vectors.json drifted"
    cases: list[Case] = json.loads(data)
    return cases


CASES = _load()


def _case(number: int) -> Case:
    case = CASES[number - 1]
    assert case[0].startswith(f"{number}. ")
    return case


def _ids(numbers: set[int]) -> list[str]:
    return [_case(n)[0] for n in sorted(numbers)]


def _checked_secret(points: list[tuple[int, bytes]]) -> bytes:
    """Interpolate S at 255 and D at 254 with gf256; check D's digest of S (SLIP-0039)."""
    secret = bytes(gf256.interpolate(points, SECRET_X))
    digest_share = bytes(gf256.interpolate(points, DIGEST_X))
    digest, random_part = digest_share[:DIGEST_SIZE], digest_share[DIGEST_SIZE:]
    expected = hmac.new(random_part, secret, hashlib.sha256).digest()[:DIGEST_SIZE]
    if not hmac.compare_digest(digest, expected):
        raise AssertionError("digest share does not match the interpolated secret")
    return secret


def _group_value(members: list[Any]) -> bytes:
    threshold = members[0].member_threshold
    if threshold == 1:
        return bytes(members[0].value)
    assert len(members) == threshold
    return _checked_secret([(m.index, bytes(m.value)) for m in members])


def _library_ems(mnemonics: list[str]) -> bytes:
    ciphertext: bytes = recover_ems(decode_mnemonics(mnemonics)).ciphertext
    return ciphertext


def test_every_case_is_classified_once() -> None:
    groups = [SINGLE_GROUP, TWO_LEVEL, INVALID_DIGEST, DUPLICATE_INDEX, set(SKIPPED)]
    every = [n for g in groups for n in g]
    assert sorted(every) == list(range(1, len(CASES) + 1))
    valid = {n for n in range(1, len(CASES) + 1) if _case(n)[2]}
    assert valid == SINGLE_GROUP | TWO_LEVEL | {1, 20, 42, 44}


@pytest.mark.parametrize("number", sorted(SINGLE_GROUP), ids=_ids(SINGLE_GROUP))
def test_single_group_member_shares_interpolate_to_the_ems(number: int) -> None:
    _, mnemonics, master_secret, _ = _case(number)
    shares = [Share.from_mnemonic(m) for m in mnemonics]
    assert {(s.group_threshold, s.group_count) for s in shares} == {(1, 1)}
    assert len(shares) == shares[0].member_threshold >= 2
    ours = _checked_secret([(s.index, bytes(s.value)) for s in shares])
    ems = recover_ems(decode_mnemonics(mnemonics))
    assert ours == ems.ciphertext
    # ties the EMS to the master secret published in the vector
    assert ems.decrypt(PASSPHRASE).hex() == master_secret


@pytest.mark.parametrize("number", sorted(TWO_LEVEL), ids=_ids(TWO_LEVEL))
def test_two_level_shares_interpolate_to_the_ems(number: int) -> None:
    _, mnemonics, master_secret, _ = _case(number)
    shares = [Share.from_mnemonic(m) for m in mnemonics]
    by_group: dict[int, list[Any]] = {}
    for s in shares:
        by_group.setdefault(s.group_index, []).append(s)
    assert len(by_group) == shares[0].group_threshold == 2
    group_points = [(g, _group_value(members)) for g, members in sorted(by_group.items())]
    ours = _checked_secret(group_points)
    assert ours == _library_ems(mnemonics)
    assert recover_ems(decode_mnemonics(mnemonics)).decrypt(PASSPHRASE).hex() == master_secret


@pytest.mark.parametrize("number", sorted(INVALID_DIGEST), ids=_ids(INVALID_DIGEST))
def test_invalid_digest_cases_fail_our_digest_check_too(number: int) -> None:
    _, mnemonics, master_secret, _ = _case(number)
    assert master_secret == ""
    shares = [Share.from_mnemonic(m) for m in mnemonics]
    with pytest.raises(AssertionError, match="digest share does not match"):
        _checked_secret([(s.index, bytes(s.value)) for s in shares])
    with pytest.raises(MnemonicError, match="Invalid digest"):
        _library_ems(mnemonics)


@pytest.mark.parametrize("number", sorted(DUPLICATE_INDEX), ids=_ids(DUPLICATE_INDEX))
def test_duplicate_member_indices_are_refused_by_interpolation(number: int) -> None:
    _, mnemonics, master_secret, _ = _case(number)
    assert master_secret == ""
    shares = [Share.from_mnemonic(m) for m in mnemonics]
    with pytest.raises(InvalidInputError, match="appears twice"):
        gf256.interpolate([(s.index, bytes(s.value)) for s in shares], SECRET_X)


@pytest.mark.parametrize("number", sorted(SKIPPED), ids=_ids(set(SKIPPED)))
def test_skipped_cases_fail_in_the_library_for_the_stated_reason(number: int) -> None:
    """A skipped case is either unshared and valid, or refused by the library
    before any interpolation we could compare with."""
    _, mnemonics, master_secret, _ = _case(number)
    reason = SKIPPED[number]
    if master_secret:
        assert reason.startswith("valid, but 1-of-1")
        share = Share.from_mnemonic(mnemonics[0])
        assert (share.member_threshold, share.group_threshold) == (1, 1)
        assert share.value == _library_ems(mnemonics)
        return
    with pytest.raises(MnemonicError):
        _library_ems(mnemonics)
