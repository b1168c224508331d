"""RFC 9162 Merkle tree heads and proofs against raw hashlib in the same run.

Tree head: every leaf through `leaf_hash` into a `CompactRange`, then
`root()`, against one `hashlib.sha256` per leaf over the same bytes (the
least any tree head costs). Proofs: generating and verifying inclusion
proofs in a 100,000-leaf `MerkleTree`, against ceil(log2 n) bare SHA-256
calls over 65-byte inputs (the hashing a proof needs and nothing else).
"""

from __future__ import annotations

import hashlib
import itertools
import math

from bench.harness import Row, items_per_second, ops_per_second
from keyquorum.quorum import merkle

PROOF_TREE_SIZE = 100_000


def _leaves(n: int) -> list[bytes]:
    # Log-entry sized leaves (about 150 bytes), distinct.
    pad = b"x" * 140
    return [i.to_bytes(8, "big") + pad for i in range(n)]


def _tree_head(leaves: list[bytes]) -> bytes:
    compact = merkle.CompactRange()
    leaf_hash = merkle.leaf_hash
    append = compact.append
    for data in leaves:
        append(leaf_hash(data))
    return compact.root()


def _hash_each(leaves: list[bytes]) -> None:
    sha256 = hashlib.sha256
    for data in leaves:
        sha256(data).digest()


def run(quick: bool) -> list[Row]:
    n = 100_000 if quick else 1_000_000
    rounds = 1 if quick else 3
    leaves = _leaves(n)
    head = items_per_second(lambda: _tree_head(leaves), n, rounds=rounds)
    base = items_per_second(lambda: _hash_each(leaves), n, rounds=rounds)
    rows = [
        Row(
            f"tree head of {n:,} leaves (CompactRange)",
            head,
            "hashlib.sha256 once per leaf",
            base,
            "leaves/s",
        )
    ]

    tree = merkle.MerkleTree()
    for data in leaves[:PROOF_TREE_SIZE]:
        tree.append(merkle.leaf_hash(data))
    root = tree.root()
    # A fixed walk over the leaves (stride coprime with the size).
    order = itertools.cycle([(i * 7919) % PROOF_TREE_SIZE for i in range(1000)])
    proofs = {i: tree.inclusion_proof(i) for i in range(0, PROOF_TREE_SIZE, 97)}
    verify_order = itertools.cycle(list(proofs))

    def generate() -> None:
        tree.inclusion_proof(next(order))

    def verify() -> None:
        i = next(verify_order)
        merkle.verify_inclusion(i, PROOF_TREE_SIZE, tree.leaf_hash(i), proofs[i], root)

    depth = math.ceil(math.log2(PROOF_TREE_SIZE))
    block = b"\x01" + bytes(64)

    def baseline() -> None:
        sha256 = hashlib.sha256
        for _ in range(depth):
            sha256(block).digest()

    min_time = 0.1 if quick else 0.3
    base_rate = ops_per_second(baseline, min_time=min_time)
    rows.append(
        Row(
            f"inclusion proof generation ({PROOF_TREE_SIZE:,}-leaf MerkleTree)",
            ops_per_second(generate, min_time=min_time),
            f"{depth} sha256 calls",
            base_rate,
            "proofs/s",
        )
    )
    rows.append(
        Row(
            f"inclusion proof verification ({PROOF_TREE_SIZE:,} leaves)",
            ops_per_second(verify, min_time=min_time),
            f"{depth} sha256 calls",
            base_rate,
            "proofs/s",
        )
    )
    return rows
