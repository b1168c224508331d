"""Properties of the RFC 9162 proofs: every honest proof verifies, and every
changed leaf, index, size, root or proof bit is refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import merkle
from keyquorum.quorum.errors import InvalidInputError, ProofError, RootMismatchError
from tests import merkle_reference as ref

MAX_SIZE = 300


def _leaves(n: int, salt: bytes = b"") -> list[bytes]:
    # Distinct leaf inputs: with duplicate leaves a proof for one position
    # can legitimately verify at another.
    return [salt + i.to_bytes(4, "big") for i in range(n)]


def _tree(leaves: list[bytes]) -> merkle.MerkleTree:
    tree = merkle.MerkleTree()
    for data in leaves:
        tree.append(merkle.leaf_hash(data))
    return tree


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


BIG_TREE = _tree(_leaves(MAX_SIZE))


@st.composite
def size_and_index(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(1, MAX_SIZE))
    return size, draw(st.integers(0, size - 1))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 120), salt=st.binary(max_size=8))
def test_every_inclusion_proof_of_every_leaf_verifies(n: int, salt: bytes) -> None:
    leaves = _leaves(n, salt)
    tree = _tree(leaves)
    root = tree.root()
    assert root == ref.mth(leaves)
    for i, data in enumerate(leaves):
        merkle.verify_inclusion(i, n, merkle.leaf_hash(data), tree.inclusion_proof(i), root)


@settings(max_examples=300, deadline=None)
@given(si=size_and_index(), other=st.binary(min_size=1, max_size=16))
def test_changed_leaf_never_verifies(si: tuple[int, int], other: bytes) -> None:
    size, index = si
    proof = BIG_TREE.inclusion_proof(index, size)
    wrong = merkle.leaf_hash(b"\xff" + other)  # never one of _leaves()
    with pytest.raises(RootMismatchError):
        merkle.verify_inclusion(index, size, wrong, proof, BIG_TREE.root(size))


@settings(max_examples=300, deadline=None)
@given(si=size_and_index(), data=st.data())
def test_changed_index_never_verifies(si: tuple[int, int], data: st.DataObject) -> None:
    size, index = si
    other = data.draw(st.integers(0, 2 * size).filter(lambda j: j != index))
    proof = BIG_TREE.inclusion_proof(index, size)
    with pytest.raises((InvalidInputError, ProofError)) as info:
        merkle.verify_inclusion(other, size, BIG_TREE.leaf_hash(index), proof, BIG_TREE.root(size))
    # The class says why: out of range, wrong shape, or wrong root.
    if other >= size:
        assert type(info.value) is InvalidInputError
    elif merkle.inclusion_proof_length(other, size) != len(proof):
        assert type(info.value) is ProofError
    else:
        assert type(info.value) is RootMismatchError


@settings(max_examples=300, deadline=None)
@given(si=size_and_index(), data=st.data())
def test_changed_size_never_verifies(si: tuple[int, int], data: st.DataObject) -> None:
    size, index = si
    other = data.draw(st.integers(1, MAX_SIZE).filter(lambda s: s != size))
    proof = BIG_TREE.inclusion_proof(index, size)
    # Checked against the root a verifier would trust for the claimed size.
    with pytest.raises((InvalidInputError, ProofError)):
        merkle.verify_inclusion(
            index, other, BIG_TREE.leaf_hash(index), proof, BIG_TREE.root(other)
        )


@settings(max_examples=300, deadline=None)
@given(si=size_and_index(), data=st.data())
def test_one_bit_change_in_an_inclusion_proof_fails(
    si: tuple[int, int], data: st.DataObject
) -> None:
    size, index = si
    proof = BIG_TREE.inclusion_proof(index, size)
    root = BIG_TREE.root(size)
    if not proof:
        # A one-leaf tree: flip the root instead.
        bit = data.draw(st.integers(0, 255))
        with pytest.raises(RootMismatchError):
            merkle.verify_inclusion(index, size, BIG_TREE.leaf_hash(index), proof, _flip(root, bit))
        return
    pos = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    proof[pos] = _flip(proof[pos], bit)
    with pytest.raises(RootMismatchError):
        merkle.verify_inclusion(index, size, BIG_TREE.leaf_hash(index), proof, root)


SMALL = _tree(_leaves(64))
PAIRS = [(m, n) for n in range(1, 65) for m in range(1, n + 1)]


def test_consistency_between_every_pair_of_sizes_up_to_64_verifies() -> None:
    leaves = _leaves(64)
    for m, n in PAIRS:
        proof = SMALL.consistency_proof(m, n)
        assert proof == ref.proof(m, leaves[:n])
        merkle.verify_consistency(m, n, proof, SMALL.root(m), SMALL.root(n))
        assert merkle.root_from_consistency_proof(m, n, proof, SMALL.root(m)) == SMALL.root(n)


def test_one_bit_change_in_any_consistency_proof_hash_fails() -> None:
    # Every hash of every proof between sizes up to 64, one bit each (the
    # bit moves with the case so that all 256 positions are exercised).
    checked = 0
    for m, n in PAIRS:
        proof = SMALL.consistency_proof(m, n)
        for pos in range(len(proof)):
            bad = list(proof)
            bad[pos] = _flip(bad[pos], (m * 67 + n * 13 + pos) % 256)
            with pytest.raises(RootMismatchError):
                merkle.verify_consistency(m, n, bad, SMALL.root(m), SMALL.root(n))
            checked += 1
    assert checked > 5000


@settings(max_examples=300, deadline=None)
@given(
    pair=st.sampled_from([p for p in PAIRS if p[0] < p[1]]),
    which=st.sampled_from(["proof", "root1", "root2"]),
    data=st.data(),
)
def test_one_bit_change_anywhere_in_a_consistency_check_fails(
    pair: tuple[int, int], which: str, data: st.DataObject
) -> None:
    m, n = pair
    proof, root1, root2 = SMALL.consistency_proof(m, n), SMALL.root(m), SMALL.root(n)
    bit = data.draw(st.integers(0, 255))
    if which == "proof":
        pos = data.draw(st.integers(0, len(proof) - 1))
        proof[pos] = _flip(proof[pos], bit)
    elif which == "root1":
        root1 = _flip(root1, bit)
    else:
        root2 = _flip(root2, bit)
    with pytest.raises(RootMismatchError):
        merkle.verify_consistency(m, n, proof, root1, root2)


@settings(max_examples=200, deadline=None)
@given(
    m=st.integers(1, 10**6),
    d=st.integers(1, 10**6),
)
def test_consistency_proof_length_matches_the_recursion(m: int, d: int) -> None:
    # RFC 9162 2.1.4.1 recursion, counting hashes only, for large sizes.
    def count(m: int, n: int, complete: bool) -> int:
        if m == n:
            return 0 if complete else 1
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return count(m, k, complete) + 1
        return count(m - k, n - k, False) + 1

    assert merkle.consistency_proof_length(m, m + d) == count(m, m + d, True)


@settings(max_examples=200, deadline=None)
@given(si=st.integers(1, 10**9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_inclusion_proof_length_matches_the_recursion(si: tuple[int, int]) -> None:
    size, index = si

    def count(m: int, n: int) -> int:
        if n == 1:
            return 0
        k = 1 << ((n - 1).bit_length() - 1)
        return 1 + (count(m, k) if m < k else count(m - k, n - k))

    assert merkle.inclusion_proof_length(index, size) == count(index, size)
