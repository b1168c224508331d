"""RFC 9162 Merkle trees: hashes, proofs, a compact range and a full tree.

Contract:

* Hashing is RFC 9162 section 2.1.1 with SHA-256: a leaf is
  ``SHA-256(0x00 || data)``, an inner node ``SHA-256(0x01 || left || right)``
  and the empty tree ``SHA-256("")``.
* Verifiers come in pairs: ``root_from_*`` computes the root a proof leads
  to, ``verify_*`` compares it with the expected root and raises
  `RootMismatchError` carrying both. Nothing here returns a bare bool.
* Preconditions are checked before any hashing, each with its own message,
  so a malformed request is named instead of surfacing as a mismatch:
  inconsistent arguments (an index beyond the size, size1 > size2, a root or
  leaf hash that is not 32 bytes, a consistency proof from size 0) raise
  `InvalidInputError`; a proof of the wrong shape (wrong number of hashes, a
  hash that is not 32 bytes, a non-empty proof between equal sizes) raises
  `ProofError`; a well-formed proof that leads elsewhere raises
  `RootMismatchError`.
* Size 0: the only root of the empty tree is ``SHA-256("")``. No leaf is in
  it, and a consistency proof *from* it is refused (`InvalidInputError`):
  RFC 9162 section 2.1.4 defines proofs for 0 < size1 < size2 only, every
  tree trivially extends the empty one, so a caller that wants "anything
  extends nothing" must say so in its own code rather than get it from an
  empty proof. This is also what the transparency-dev/merkle vectors pin.
* Tree sizes and indices are unsigned 64-bit integers, as in RFC 9162.

`CompactRange` keeps only the O(log n) roots of the perfect subtrees that
make up a tree, for computing tree heads while appending. `MerkleTree`
keeps every leaf hash and every complete inner node (about 64 bytes per
leaf, in flat byte arrays rather than Python objects), so the root of any
past size and proofs between any past sizes cost O(log n) hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from keyquorum.quorum.errors import InvalidInputError, ProofError, RootMismatchError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
MAX_TREE_SIZE = 2**64 - 1

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 section 2.1.1: the hash of one leaf, ``SHA-256(0x00 || data)``."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 section 2.1.1: an inner node, ``SHA-256(0x01 || left || right)``."""
    _require_hash("left", left)
    _require_hash("right", right)
    return _node(left, right)


def _node(left: bytes, right: bytes) -> bytes:
    # Unchecked form for the loops below, whose inputs are already checked.
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


# -- preconditions ---------------------------------------------------------------


def _require_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise InvalidInputError(f"{name} must be {HASH_SIZE} bytes, got {len(value)}")


def _require_size(name: str, value: int) -> None:
    if not 0 <= value <= MAX_TREE_SIZE:
        raise InvalidInputError(f"{name} must be between 0 and 2^64-1, got {value}")


def _require_proof_hashes(proof: Sequence[bytes]) -> None:
    for i, h in enumerate(proof):
        if len(h) != HASH_SIZE:
            raise ProofError(f"proof[{i}] must be {HASH_SIZE} bytes, got {len(h)}")


def inclusion_proof_length(index: int, size: int) -> int:
    """Number of hashes in the inclusion proof of leaf `index` in a tree of `size`.

    Below the level where the paths to leaf `index` and to the last leaf
    (``size - 1``) meet, every level has a sibling: ``bit_length(index ^
    (size - 1))`` hashes. Above it the path runs along the right border,
    which has a left sibling exactly where `index` has a one bit.
    Requires 0 <= index < size.
    """
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def consistency_proof_length(size1: int, size2: int) -> int:
    """Number of hashes in the consistency proof between 0 < size1 < size2.

    RFC 9162 section 2.1.4.1: the proof is the inclusion path of leaf
    ``size1 - 1`` in the larger tree, starting above the largest perfect
    subtree that ends at `size1` (its height is the number of trailing zero
    bits of `size1`), plus that subtree's root unless it is the whole old
    tree (size1 a power of two), in which case the verifier uses root1.
    """
    shift = (size1 & -size1).bit_length() - 1
    seed = 0 if size1 == 1 << shift else 1
    return inclusion_proof_length(size1 - 1, size2) - shift + seed


# -- inclusion -------------------------------------------------------------------


def root_from_inclusion_proof(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes]
) -> bytes:
    """The root that `proof` leads to from leaf `index` of a tree of `size`.

    RFC 9162 section 2.1.3.2, after checking the preconditions. The result
    means nothing until compared with a trusted root: use `verify_inclusion`.
    """
    # 0. Preconditions, in the order a caller fixes them.
    _require_size("size", size)
    if index < 0:
        raise InvalidInputError(f"index must not be negative, got {index}")
    if index >= size:
        raise InvalidInputError(f"index is beyond size: {index} >= {size}")
    _require_hash("leaf_hash", leaf_hash)
    want = inclusion_proof_length(index, size)
    if len(proof) != want:
        raise ProofError(f"wrong proof size {len(proof)}, want {want}")
    _require_proof_hashes(proof)

    # 1. Chain the path (section 2.1.3.2 step 4): fn walks the leaf's
    #    position up the tree, sn the last leaf's.
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = _node(r, p)
        fn >>= 1
        sn >>= 1
    return r


def verify_inclusion(
    index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that the leaf `leaf_hash` is at `index` of the tree of `size` with `root`.

    Raises `InvalidInputError` or `ProofError` for malformed input and
    `RootMismatchError` when the proof leads to another root.
    """
    _require_hash("root", root)
    calculated = root_from_inclusion_proof(index, size, leaf_hash, proof)
    _match("root", root, calculated)


# -- consistency -----------------------------------------------------------------


def root_from_consistency_proof(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes
) -> bytes:
    """The root of the size2 tree that `proof` leads to from the size1 tree with `root1`.

    RFC 9162 section 2.1.4.2. Checks on the way that the proof also leads
    back to `root1` (`RootMismatchError` if not). Use `verify_consistency`
    to compare the result with a trusted root2.
    """
    # 0. Preconditions.
    _require_size("size1", size1)
    _require_size("size2", size2)
    if size2 < size1:
        raise InvalidInputError(f"size2 ({size2}) < size1 ({size1})")
    _require_hash("root1", root1)

    # 1. Edge cases, one branch each.
    if size1 == size2:
        if proof:
            raise ProofError(f"size1 == size2 ({size1}) but the proof has {len(proof)} hashes")
        if size1 == 0:
            _match("root1 of the empty tree", EMPTY_ROOT, root1)
        return root1
    if size1 == 0:
        raise InvalidInputError(
            "consistency proof from an empty tree is meaningless (RFC 9162 2.1.4 needs size1 > 0)"
        )
    if not proof:
        raise ProofError(f"empty consistency proof between sizes {size1} and {size2}")
    want = consistency_proof_length(size1, size2)
    if len(proof) != want:
        raise ProofError(f"wrong proof size {len(proof)}, want {want}")
    _require_proof_hashes(proof)

    # 2. Section 2.1.4.2 steps 2-6: when size1 is a power of two the old root
    #    is the seed; fr rebuilds the old root, sr the new one.
    path = [root1, *proof] if size1 & (size1 - 1) == 0 else list(proof)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if fn & 1 or fn == sn:
            fr = _node(c, fr)
            sr = _node(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = _node(sr, c)
        fn >>= 1
        sn >>= 1

    # 3. The proof must lead back to the old root before its new root counts.
    _match("root1", root1, fr)
    return sr


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of size2 with `root2` extends the tree of size1 with `root1`.

    Raises `InvalidInputError` or `ProofError` for malformed input and
    `RootMismatchError` (naming root1 or root2) when a root does not match.
    """
    _require_hash("root2", root2)
    calculated = root_from_consistency_proof(size1, size2, proof, root1)
    _match("root2", root2, calculated)


def _match(name: str, expected: bytes, calculated: bytes) -> None:
    # Roots are public; a plain comparison is fine.
    if calculated != expected:
        raise RootMismatchError(
            f"calculated {name} {calculated.hex()} does not match expected {expected.hex()}",
            expected=expected,
            calculated=calculated,
        )


# -- building trees --------------------------------------------------------------


class CompactRange:
    """The roots of the perfect subtrees of a tree, left to right: O(log n) state.

    Enough to compute the tree head while appending (RFC 9162 section 2.1.1
    splits a tree at the largest power of two below its size, so its root
    folds these subtree roots from the right), not to make proofs.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._hashes: list[bytes] = []
        self._size = 0

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Append one leaf hash: O(1) amortised, O(log n) at worst."""
        _require_hash("leaf_hash", leaf_hash)
        if self._size == MAX_TREE_SIZE:
            raise InvalidInputError("tree is full (2^64-1 leaves)")
        h = leaf_hash
        size = self._size
        hashes = self._hashes
        # Each trailing one bit of the old size is a perfect subtree of the
        # same height as the one being carried: merge them.
        while size & 1:
            h = _node(hashes.pop(), h)
            size >>= 1
        hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        """The RFC 9162 root of the leaves appended so far (EMPTY_ROOT for none)."""
        if not self._hashes:
            return EMPTY_ROOT
        h = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            h = _node(left, h)
        return h

    def __repr__(self) -> str:
        return f"<CompactRange size={self._size}>"


class MerkleTree:
    """Every leaf hash and every complete inner node of an append-only tree.

    Level 0 holds the leaf hashes; level k holds the roots of the perfect
    subtrees of 2^k leaves, each as 32 bytes in one flat bytearray per
    level (a million leaves take about 64 MB). A complete node never changes
    once appended, so the root of any past size and inclusion and
    consistency proofs between any past sizes are assembled from stored
    nodes with at most O(log n) hashes (RFC 9162 sections 2.1.3.1, 2.1.4.1).
    """

    __slots__ = ("_levels", "_size")

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0

    @property
    def size(self) -> int:
        """Number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash; returns its index. O(1) amortised."""
        _require_hash("leaf_hash", leaf_hash)
        if self._size == MAX_TREE_SIZE:
            raise InvalidInputError("tree is full (2^64-1 leaves)")
        index = self._size
        levels = self._levels
        levels[0] += leaf_hash
        h, level, i = leaf_hash, 0, index
        # A right child completes its parent: store the parent, go up.
        while i & 1:
            h = _node(self._node_at(level, i - 1), h)
            level += 1
            i >>= 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += h
        self._size = index + 1
        return index

    def truncate(self, size: int) -> None:
        """Forget every leaf from `size` on: the tree as it was at `size`.

        For an append that failed after its leaves were added (the daemon
        adds them first, to sign the new tree head it writes with them).
        """
        size = self._require_past_size("size", size)
        for level, nodes in enumerate(self._levels):
            del nodes[(size >> level) * HASH_SIZE :]
        while len(self._levels) > 1 and not self._levels[-1]:
            self._levels.pop()
        self._size = size

    def leaf_hash(self, index: int) -> bytes:
        """The hash of leaf `index`."""
        self._require_index(index, self._size)
        return self._node_at(0, index)

    def root(self, size: int | None = None) -> bytes:
        """The root of the first `size` leaves (default: all)."""
        size = self._require_past_size("size", size)
        return self._range_root(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 section 2.1.3.1 PATH(index, D[0:size]), from the leaf upwards."""
        size = self._require_past_size("size", size)
        self._require_index(index, size)
        # Walk down from the whole range, as the RFC's recursion does, and
        # collect the sibling of each subtree that holds the leaf.
        path: list[bytes] = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split_point(hi - lo)
            if index < lo + k:
                path.append(self._range_root(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._perfect_root(lo, k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        """RFC 9162 section 2.1.4.1 PROOF(size1, D[0:size2]).

        Empty for size1 == size2; refused for size1 == 0 < size2, like
        `root_from_consistency_proof` (see the module docstring).
        """
        size2 = self._require_past_size("size2", size2)
        _require_size("size1", size1)
        if size1 > size2:
            raise InvalidInputError(f"size2 ({size2}) < size1 ({size1})")
        if size1 == size2:
            return []
        if size1 == 0:
            raise InvalidInputError(
                "consistency proof from an empty tree is meaningless "
                "(RFC 9162 2.1.4 needs size1 > 0)"
            )
        # SUBPROOF(m, D[lo:hi], b), unrolled: `m` counts the old leaves inside
        # the current range, `complete` is the RFC's flag b.
        proof: list[bytes] = []
        lo, hi, m, complete = 0, size2, size1, True
        while m != hi - lo:
            k = _split_point(hi - lo)
            if m <= k:
                proof.append(self._range_root(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._perfect_root(lo, k))
                lo += k
                m -= k
                complete = False
        if not complete:
            proof.append(self._range_root(lo, hi))
        proof.reverse()
        return proof

    def _require_index(self, index: int, size: int) -> None:
        if index < 0:
            raise InvalidInputError(f"index must not be negative, got {index}")
        if index >= size:
            raise InvalidInputError(f"index is beyond size: {index} >= {size}")

    def _require_past_size(self, name: str, size: int | None) -> int:
        if size is None:
            return self._size
        if not 0 <= size <= self._size:
            raise InvalidInputError(f"{name} {size} is not a size this tree had (0..{self._size})")
        return size

    def _node_at(self, level: int, index: int) -> bytes:
        start = index * HASH_SIZE
        return bytes(self._levels[level][start : start + HASH_SIZE])

    def _perfect_root(self, lo: int, width: int) -> bytes:
        # The stored root of the perfect subtree D[lo:lo+width]; `width` is a
        # power of two and `lo` a multiple of it.
        level = width.bit_length() - 1
        return self._node_at(level, lo >> level)

    def _range_root(self, lo: int, hi: int) -> bytes:
        # MTH(D[lo:hi]) where `lo` is a multiple of a power of two >= hi - lo
        # (true of every range the RFC recursion visits). Such a range is
        # perfect subtrees of decreasing width from the left; MTH folds their
        # roots from the right.
        if lo == hi:
            return EMPTY_ROOT
        parts: list[bytes] = []
        while lo < hi:
            width = 1 << ((hi - lo).bit_length() - 1)
            parts.append(self._perfect_root(lo, width))
            lo += width
        h = parts.pop()
        while parts:
            h = _node(parts.pop(), h)
        return h

    def __repr__(self) -> str:
        return f"<MerkleTree size={self._size}>"


def _split_point(n: int) -> int:
    """RFC 9162 section 2.1.1: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)
