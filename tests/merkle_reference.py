"""A naive recursive RFC 9162 Merkle tree, for tests only.

Written straight from the definitions in RFC 9162 section 2.1 (MTH, PATH,
PROOF/SUBPROOF) over a list of leaf inputs, with no caching: slow and
obviously right, so it can check the fast code in keyquorum.quorum.merkle.
"""

from __future__ import annotations

import hashlib


def _split(n: int) -> int:
    # The largest power of two strictly smaller than n (n > 1).
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 MTH(D[n]) over leaf *inputs*."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = _split(n)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 section 2.1.3.1 PATH(m, D[n])."""
    n = len(leaves)
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


def _subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if complete else [mth(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], complete), mth(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), mth(leaves[:k])]


def proof(m: int, leaves: list[bytes]) -> list[bytes]:
    """RFC 9162 section 2.1.4.1 PROOF(m, D[n]) for 0 < m <= n."""
    return _subproof(m, leaves, True)
