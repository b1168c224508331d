"""CCTV Ed25519 edge cases: which ones `verify_ed25519` accepts, pinned.

The vectors (tests/vectors/cctv-ed25519) carry no verdicts: RFC 8032 and
FIPS 186-5 leave several of them open. We pin the exact set the project's
verifier accepts (cryptography 50 on OpenSSL), so a library upgrade that
changes the verification rules fails here instead of silently changing
which custodian signatures count, and we check that the set is the
"ref10" rule the CCTV README describes: reject a non-canonical R and a
low-order residue (cofactorless equation), accept everything else,
including low-order and non-canonical public keys. A custodian signature
also needs its ML-DSA-65 half, so a weak Ed25519 key alone forges nothing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from keyquorum.quorum.errors import SignatureError
from keyquorum.quorum.signatures import verify_ed25519

VECTORS = Path(__file__).parent / "vectors" / "cctv-ed25519" / "ed25519vectors.json"

ACCEPTED_COUNT = 208
REJECTED_COUNT = 706
#: sha256 of the accepted case numbers, sorted, in decimal, joined by ",".
ACCEPTED_SHA256 = "cd71d91c03ad2dd9116f674780c8368f4921cd0983301da9fd304bb6725a6e6a"


def _vectors() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(VECTORS.read_text())
    assert [c["number"] for c in cases] == list(range(len(cases)))
    return cases


def _accepts(case: dict[str, Any]) -> bool:
    try:
        verify_ed25519(bytes.fromhex(case["key"]), case["msg"].encode(), bytes.fromhex(case["sig"]))
    except SignatureError:
        return False
    return True


def test_accepted_set_is_pinned() -> None:
    cases = _vectors()
    accepted = sorted(c["number"] for c in cases if _accepts(c))
    digest = hashlib.sha256(",".join(map(str, accepted)).encode()).hexdigest()
    assert (len(accepted), len(cases) - len(accepted)) == (ACCEPTED_COUNT, REJECTED_COUNT)
    assert digest == ACCEPTED_SHA256


def test_accepted_set_is_the_ref10_rule() -> None:
    for case in _vectors():
        flags = set(case["flags"] or ())
        expected = not ({"non_canonical_R", "low_order_residue"} & flags)
        assert _accepts(case) == expected, f"case {case['number']} flags {sorted(flags)}"
