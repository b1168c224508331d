"""What the custodians' CLI pins and follows (cli/seen_checkpoints.py), in isolation.

The rules checked here on logs built by tests/logfactory.py; end to end, with
daemons, CLIs and both stores, they are in tests/test_deployment_attacks.py.
"""

from __future__ import annotations

import dataclasses

import pytest

from keyquorum.cli import seen_checkpoints as seen
from keyquorum.quorum import merkle
from keyquorum.quorum.checkpoint import Checkpoint, verify_checkpoint
from keyquorum.quorum.errors import (
    KeyquorumError,
    LogIntegrityError,
    RollbackError,
    SignatureError,
    ThresholdError,
    VerificationError,
)
from keyquorum.quorum.log import Entry, ExecutionPayload
from keyquorum.quorum.note import NoteSigner, SignatureType
from keyquorum.v1 import custodian_pb2 as pb
from tests.logfactory import Counter, LogFactory, log_signer, next_log_signer, resigned


def _tree(entries: list[bytes]) -> merkle.MerkleTree:
    tree = merkle.MerkleTree()
    for raw in entries:
        tree.append(merkle.leaf_hash(raw))
    return tree


def _proven(entries: list[bytes], seq: int, raw: bytes | None = None) -> pb.ProvenEntry:
    tree = _tree(entries)
    return pb.ProvenEntry(
        seq=seq, entry=entries[seq] if raw is None else raw, proof=tree.inclusion_proof(seq)
    )


def _checkpoint(entries: list[bytes]) -> Checkpoint:
    tree = _tree(entries)
    return Checkpoint(log_signer().name, tree.size, tree.root())


@pytest.fixture(scope="module")
def rotated() -> tuple[LogFactory, list[int]]:
    """A log rotated twice: genesis key, then next 1, then next 2."""
    f = LogFactory(seed=b"pins")
    f.run("create-tenant", tenant="t1")
    seqs = []
    for n in (1, 2):
        f.run("rotate-log-key", log_key=next_log_signer(n).verifier_key())
        seqs.append(f.state.size - 1)
    f.run("create-tenant", tenant="t2")
    return f, seqs


def test_a_chain_of_rotations_signed_key_by_key_is_followed(
    rotated: tuple[LogFactory, list[int]],
) -> None:
    f, seqs = rotated
    cp = _checkpoint(f.entries)
    items = [_proven(f.entries, s) for s in seqs]
    chain = seen.follow_rotations(
        log_signer().verifier_key(), next_log_signer(2).verifier_key(), items, cp, after=2
    )
    assert chain == [
        (0, log_signer().verifier_key()),
        (seqs[0] + 1, next_log_signer(1).verifier_key()),
        (seqs[1] + 1, next_log_signer(2).verifier_key()),
    ]
    # The checkpoint the daemon signs now verifies under the last key of the chain.
    verify_checkpoint(f.checkpoint(), next_log_signer(2).verifier())
    # Pinned after the first rotation: only the second is followed.
    later = seen.follow_rotations(
        next_log_signer(1).verifier_key(),
        next_log_signer(2).verifier_key(),
        items,
        cp,
        after=seqs[0] + 1,
    )
    assert [k for _, k in later] == [
        next_log_signer(1).verifier_key(),
        next_log_signer(2).verifier_key(),
    ]


def test_a_chain_that_does_not_start_at_the_pinned_key_is_refused(
    rotated: tuple[LogFactory, list[int]],
) -> None:
    f, seqs = rotated
    cp = _checkpoint(f.entries)
    items = [_proven(f.entries, s) for s in seqs]
    stranger = NoteSigner.generate(log_signer().name, random_bytes=Counter(b"stranger"))
    # Having seen a checkpoint under it, the first rotation after must start there.
    with pytest.raises(VerificationError, match="not from") as info:
        seen.follow_rotations(
            stranger.verifier_key(), next_log_signer(2).verifier_key(), items, cp, after=1
        )
    assert stranger.verifier_key() in str(info.value)
    # Pinned without a checkpoint: no rotation leads from it, refused naming both.
    with pytest.raises(VerificationError, match="lead to") as unseen:
        seen.follow_rotations(
            stranger.verifier_key(), next_log_signer(2).verifier_key(), items, cp, after=0
        )
    assert stranger.verifier_key() in str(unseen.value)
    assert next_log_signer(2).verifier_key() in str(unseen.value)
    # Or that leads somewhere else than the key the daemon answers with.
    with pytest.raises(VerificationError, match="lead to") as other:
        seen.follow_rotations(
            log_signer().verifier_key(), stranger.verifier_key(), items, cp, after=0
        )
    assert stranger.verifier_key() in str(other.value)
    assert log_signer().verifier_key() in str(other.value)


def test_a_rotation_not_signed_by_the_key_before_is_refused() -> None:
    """An operator holding only the data directory's NEW key forges the rotation entry."""
    f = LogFactory(seed=b"forged rotation")
    f.run("create-tenant", tenant="t1")
    f.run("rotate-log-key", log_key=next_log_signer(1).verifier_key())
    seq = f.state.size - 1
    forged = resigned(f.entries[seq], next_log_signer(1))  # signed by the new key, not the old
    entries = [*f.entries[:seq], forged]
    cp = _checkpoint(entries)
    with pytest.raises(SignatureError):
        seen.follow_rotations(
            log_signer().verifier_key(),
            next_log_signer(1).verifier_key(),
            [_proven(entries, seq)],
            cp,
            after=0,
        )


def test_a_rotation_not_in_the_checkpoints_tree_is_refused(
    rotated: tuple[LogFactory, list[int]],
) -> None:
    f, seqs = rotated
    cp = _checkpoint(f.entries[: seqs[0]])  # a tree from before the rotation
    with pytest.raises(LogIntegrityError):
        seen.follow_rotations(
            log_signer().verifier_key(),
            next_log_signer(1).verifier_key(),
            [_proven(f.entries, seqs[0])],
            cp,
            after=0,
        )


def _witness(n: int) -> str:
    return NoteSigner.generate(
        f"w{n}.example", sig_type=SignatureType.COSIGNATURE_V1, random_bytes=Counter(b"w%d" % n)
    ).verifier_key()


def test_the_witness_policy_is_learnt_from_proven_entries_and_never_weakens() -> None:
    f = LogFactory(seed=b"witness pins")
    f.run("add-witness", witness=_witness(1), witness_threshold=1)
    first = f.state.size - 1
    f.run("add-witness", witness=_witness(2), witness_threshold=2)
    second = f.state.size - 1
    cp = _checkpoint(f.entries)
    changes = [_proven(f.entries, first), _proven(f.entries, second)]
    witnesses, m, remembered = seen.witness_policy(changes, cp, ())
    assert witnesses == (_witness(1), _witness(2))
    assert m == 2
    # Shown again with a change left out: refused, this machine saw it.
    with pytest.raises(RollbackError, match=f"entry {second}"):
        seen.witness_policy(changes[:1], cp, remembered)
    # An entry that is no witness change is not taken for one.
    other = _proven(f.entries, first - 1)
    with pytest.raises(KeyquorumError):
        seen.witness_policy([other], cp, ())


def test_unwitnessed_positions_are_refused_before_signing() -> None:
    cp = Checkpoint("keyquorum/x", 10, bytes(32))
    witnessed = Checkpoint("keyquorum/x", 6, bytes(32))
    checked = seen.Checked("x", "k", cp, "", witnessed, ("w",), 1)
    checked.require_witnessed(6)  # entries 0..5 are witnessed
    with pytest.raises(ThresholdError, match="covers entry 6"):
        checked.require_witnessed(7)
    nobody = dataclasses.replace(checked, witnessed=None)
    with pytest.raises(ThresholdError, match="covers 0 entries"):
        nobody.require_witnessed(1)
    # No witness in the log (m = 0): nothing to wait for.
    dataclasses.replace(nobody, witness_threshold=0, witnesses=()).require_witnessed(10)


def test_decoding_a_rotation_entry_keeps_its_signature() -> None:
    """The CLI checks the very bytes the daemon sent: decoding keeps the log signature."""
    f = LogFactory(seed=b"decode")
    f.run("rotate-log-key", log_key=next_log_signer(1).verifier_key())
    entry = Entry.from_bytes(f.entries[-1])
    assert isinstance(entry.payload, ExecutionPayload)
    assert entry.payload.log_signature is not None
    assert entry.to_bytes() == f.entries[-1]


def test_a_key_pinned_mid_chain_without_a_checkpoint_follows_from_there(
    rotated: tuple[LogFactory, list[int]],
) -> None:
    """An auditor pinned the key a first rotation put in force; the CLI follows the
    second rotation only, and a key from before the pin is never reached again."""
    f, seqs = rotated
    cp = _checkpoint(f.entries)
    items = [_proven(f.entries, s) for s in seqs]
    chain = seen.follow_rotations(
        next_log_signer(1).verifier_key(), next_log_signer(2).verifier_key(), items, cp, after=0
    )
    assert [k for _, k in chain] == [
        next_log_signer(1).verifier_key(),
        next_log_signer(2).verifier_key(),
    ]
    with pytest.raises(VerificationError, match="lead to"):
        seen.follow_rotations(
            next_log_signer(2).verifier_key(), log_signer().verifier_key(), items, cp, after=0
        )
