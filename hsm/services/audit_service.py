"""AuditService: the auditors' read-only view of the log, and their cosignatures.

`AuditLog` is the core (no gRPC): it reads the `Store` the daemon writes,
keeps its own RFC 9162 `MerkleTree` built from the stored leaf hashes and
extended as the log grows, and merges auditors' cosignatures into stored
checkpoints. It touches no daemon state, so it cannot change what the
daemon decides; the store's own transaction rules make its reads safe next
to the daemon's appends.

`AuditServicer` is the thin gRPC layer. Every call first checks the caller:
a verified client certificate (the mTLS listener requires one) naming a
`keyquorum://auditor/<name>` identity (the listener's admission reads it
from a URI SAN only, hsm/services/admission.py); no identity is
UNAUTHENTICATED, another role PERMISSION_DENIED. The store is read on the
audit lane's threads (hsm/services/lanes.py), never on the serving loop;
an export streams in batches of `READ_BATCH` entries, one lane job each.

Cosigner keys. A cosignature is accepted only from a witness the quorum
put in the log (`add-witness`, k approvals; `remove-witness` takes it out):
the `LogPolicy` (the daemon) says which witnesses are in force and which log
key signed a checkpoint of a given size. Nothing the operator configures
adds a cosigner. After a merge the policy learns which checkpoint m
witnesses have now cosigned (hsm/daemon/witnessing.py), the one custodians
sign over and `GetCheckpoint(witnessed=true)` serves.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Protocol

import grpc

from keyquorum.hsm.services.admission import (
    Admission,
    Call,
    Method,
    ServerStream,
    Unary,
    parser,
    serialize,
    service,
)
from keyquorum.hsm.services.lanes import Lane
from keyquorum.hsm.services.server import Registration
from keyquorum.hsm.stores.base import READ_BATCH, Store, check_range
from keyquorum.quorum import merkle
from keyquorum.quorum.checkpoint import (
    NoteVerifier,
    parse_verifier_key,
    unverified_size,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    InvalidInputError,
    LimitExceededError,
    StateError,
    UnverifiedNoteError,
)
from keyquorum.quorum.export import MAX_NOTE
from keyquorum.quorum.log import Entry, GenesisPayload
from keyquorum.quorum.note import KEY_HASH_SIZE
from keyquorum.quorum.replay import WitnessPolicy
from keyquorum.v1 import audit_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "keyquorum.v1.AuditService"
AUDITOR_ROLE = "auditor"


class LogPolicy(Protocol):
    """What the audit service asks of the log's replayed state (the `Daemon` answers)."""

    def log_key_at(self, size: int) -> str:
        """The verifier key that signs the checkpoint of `size` entries."""
        ...

    def witness_policy(self) -> WitnessPolicy:
        """The witnesses in force and their threshold m."""
        ...

    def witnessed_checkpoint(self) -> str:
        """The latest checkpoint m witnesses in force cosigned, or ""."""
        ...

    def record_cosigned(self, size: int, note: str) -> None:
        """A cosignature was merged into the note of `size`."""
        ...


class AuditLog:
    """Proofs, checkpoints and cosignatures over one store (see the module docstring).

    Without a `policy` (a store read on its own) the log key is the
    genesis's and no cosignature is accepted.
    """

    def __init__(self, store: Store, policy: LogPolicy | None = None) -> None:
        self._store = store
        self._policy = policy
        self._lock = threading.Lock()
        self._tree = merkle.MerkleTree()
        self._log_key: NoteVerifier | None = None

    # -- reading -----------------------------------------------------------

    def tree(self) -> merkle.MerkleTree:
        """The Merkle tree of every stored entry, brought up to the store's size."""
        with self._lock:
            size = self._store.size()
            have = self._tree.size
            if size - have > READ_BATCH:
                hashes = self._store.leaf_hashes()[have:size]
            else:
                hashes = [merkle.leaf_hash(raw) for raw in self._store.read(have, size)]
            for h in hashes:
                self._tree.append(h)
            return self._tree

    def log_key(self, size: int | None = None) -> NoteVerifier:
        """The key that signs the checkpoint of `size` entries (the policy's), else the
        genesis's (the daemon checked the log against it at start)."""
        if self._policy is not None and size is not None:
            return parse_verifier_key(self._policy.log_key_at(size))
        if self._log_key is None:
            if self._store.size() == 0:
                raise StateError("no ceremony yet: the log is empty")
            genesis = Entry.from_bytes(self._store.read(0, 1)[0])
            if not isinstance(genesis.payload, GenesisPayload):
                raise StateError("entry 0 of the store is not a genesis")
            self._log_key = NoteVerifier.from_vkey(genesis.payload.log_key)
        return self._log_key

    def checkpoint(self, size: int = 0) -> tuple[int, str]:
        """The stored checkpoint of `size` (0: the latest)."""
        if size == 0:
            latest = self._store.latest_checkpoint()
            if latest is None:
                raise StateError("no checkpoint yet: the log is empty")
            return latest
        note = self._store.checkpoint_at(size)
        if note is None:
            raise StateError(f"no checkpoint of tree size {size} is stored")
        return size, note

    def witnessed(self) -> tuple[int, str]:
        """The latest checkpoint m witnesses in force cosigned."""
        note = "" if self._policy is None else self._policy.witnessed_checkpoint()
        if not note:
            raise StateError("no checkpoint is cosigned by the witnesses the log names yet")
        return unverified_size(note), note

    def checkpoints(self) -> list[tuple[int, str]]:
        return self._store.checkpoints()

    def entries(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(seq, bytes) for seq in [start, end), read in batches."""
        check_range(start, end, self._store.size())
        for lo in range(start, end, READ_BATCH):
            hi = min(lo + READ_BATCH, end)
            yield from zip(range(lo, hi), self._store.read(lo, hi), strict=True)

    def inclusion(self, index: int, tree_size: int) -> tuple[int, list[bytes], bytes, str]:
        """(tree size, proof, entry, checkpoint note) for entry `index`."""
        size, note = self.checkpoint(tree_size)
        if index >= size:
            raise InvalidInputError(f"index is beyond the tree size: {index} >= {size}")
        proof = self.tree().inclusion_proof(index, size)
        return size, proof, self._store.read(index, index + 1)[0], note

    def consistency(self, size1: int, size2: int) -> tuple[int, list[bytes], str]:
        """(size2, proof, checkpoint note of size2) from size1 to size2."""
        size, note = self.checkpoint(size2)
        if not 0 < size1 <= size:
            raise InvalidInputError(f"size1 must be in [1, {size}], got {size1}")
        proof = self.tree().consistency_proof(size1, size) if size1 < size else []
        return size, proof, note

    # -- cosigning -----------------------------------------------------------

    def add_cosignature(self, note: str, auditor: str) -> tuple[int, str]:
        """Merge the cosignatures of `note` into the stored checkpoint of its size.

        0. the log has witnesses, the note is bounded text;
        1. the note is a checkpoint signed by the log key in force at its
           size, and every line from a witness in force verifies
           (`verify_checkpoint`);
        2. at least one witness in force signed it;
        3. its body is the stored checkpoint's body (same size and root);
        4. the stored note plus the new cosignature lines still verifies.
        """
        # 0.
        witnesses = [] if self._policy is None else self._policy.witness_policy().verifiers()
        if not witnesses:
            raise StateError(
                "the log names no witness: a quorum adds witnesses (add-witness) first"
            )
        if not isinstance(note, str) or not note:
            raise InvalidInputError("the note is empty")
        if len(note) > MAX_NOTE:
            raise LimitExceededError(f"the note is longer than {MAX_NOTE} characters")
        log_key = self.log_key(unverified_size(note))
        # 1.
        submitted = verify_checkpoint(note, log_key, witnesses)
        # 2.
        if not submitted.cosigned_by:
            raise UnverifiedNoteError("the note carries no cosignature from a witness in the log")
        with self._lock:
            size = submitted.checkpoint.size
            # 3.
            _, stored = self.checkpoint(size) if size else (0, "")
            if not stored:
                raise StateError("the empty tree has no checkpoint to cosign")
            stored_cp = verify_checkpoint(stored, log_key, witnesses).checkpoint
            if stored_cp != submitted.checkpoint:
                raise InvalidInputError(
                    f"the cosigned checkpoint of size {size} is not the one this log signed"
                )
            # 4.
            merged = _merge(stored, note, witnesses)
            check = verify_checkpoint(merged, log_key, witnesses)
            if not set(submitted.cosigned_by) <= set(check.cosigned_by):
                raise StateError("merging the cosignature failed")
            self._store.put_checkpoint(size, merged)
        if self._policy is not None:
            self._policy.record_cosigned(size, merged)
        log.info(
            "checkpoint %d cosigned by %s (client %s)",
            size,
            ", ".join(sorted(submitted.cosigned_by)),
            auditor,
        )
        return size, merged


def _merge(stored: str, submitted: str, auditors: Sequence[NoteVerifier]) -> str:
    """`stored` with the signature lines of `submitted` from `auditors` it lacks."""
    known = {(a.name, a.key_hash) for a in auditors}
    stored_text, _, stored_sigs = stored.rpartition("\n\n")
    _, _, new_sigs = submitted.rpartition("\n\n")
    lines = stored_sigs.splitlines()
    for line in new_sigs.splitlines():
        if line in lines:
            continue
        if _signer(line) in known:
            lines.append(line)
    return stored_text + "\n\n" + "".join(line + "\n" for line in lines)


def _signer(line: str) -> tuple[str, bytes] | None:
    """(key name, key hash) of a signature line `— <name> <base64>` (C2SP signed-note).

    Lines reaching here were parsed by `verify_checkpoint` already; a line
    that does not parse names no signer.
    """
    prefix, _, rest = line.partition(" ")
    name, _, encoded = rest.partition(" ")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        return None
    if prefix != "\u2014" or len(raw) <= KEY_HASH_SIZE:
        return None
    return name, raw[:KEY_HASH_SIZE]


class AuditServicer:
    """Auditor-facing RPCs; every call requires an auditor's client certificate.

    With `max_streams`, at most that many streaming calls (`ListCheckpoints`,
    `GetEntries`: an export) run at once; a further one is refused at its
    start with RESOURCE_EXHAUSTED. The audit lane has `threads` more threads
    than that, so exports reading the store never take every thread from
    the short unary calls, which are not counted.
    """

    def __init__(
        self,
        audit_log: AuditLog,
        *,
        max_streams: int | None = None,
        threads: int = 2,
        waiting: int = 64,
    ) -> None:
        if max_streams is not None and max_streams < 1:
            raise InvalidInputError("max_streams must be at least 1")
        self._log = audit_log
        self._max_streams = max_streams
        self._streams = 0
        self._lane = Lane("audit", threads=threads + (max_streams or 0), waiting=waiting)

    def _stream_slot(self) -> None:
        if self._max_streams is not None and self._streams >= self._max_streams:
            raise LimitExceededError(
                f"this listener serves at most {self._max_streams} audit streams at once: "
                "retry when an export has finished"
            )
        self._streams += 1

    async def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, call: Call
    ) -> pb.SignedCheckpoint:
        call.peer.require(AUDITOR_ROLE)
        if request.witnessed:
            if request.size:
                raise InvalidInputError("witnessed asks for the latest: size 0")
            size, note = await self._lane.run(self._log.witnessed)
        else:
            size, note = await self._lane.run(lambda: self._log.checkpoint(request.size))
        return pb.SignedCheckpoint(size=size, note=note)

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, call: Call
    ) -> AsyncIterator[pb.SignedCheckpoint]:
        call.peer.require(AUDITOR_ROLE)
        self._stream_slot()
        try:
            for size, note in await self._lane.run(self._log.checkpoints):
                yield pb.SignedCheckpoint(size=size, note=note)
        finally:
            self._streams -= 1

    async def GetEntries(
        self, request: pb.GetEntriesRequest, call: Call
    ) -> AsyncIterator[pb.LogEntry]:
        call.peer.require(AUDITOR_ROLE)
        self._stream_slot()
        try:
            rows = self._log.entries(request.start, request.end)
            while True:
                batch = await self._lane.run(lambda: list(itertools.islice(rows, READ_BATCH)))
                if not batch:
                    return
                for seq, data in batch:
                    yield pb.LogEntry(seq=seq, data=data)
        finally:
            self._streams -= 1

    async def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, call: Call
    ) -> pb.InclusionProof:
        call.peer.require(AUDITOR_ROLE)
        size, proof, entry, note = await self._lane.run(
            lambda: self._log.inclusion(request.index, request.tree_size)
        )
        return pb.InclusionProof(
            index=request.index, tree_size=size, hashes=proof, entry=entry, checkpoint=note
        )

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, call: Call
    ) -> pb.ConsistencyProof:
        call.peer.require(AUDITOR_ROLE)
        size, proof, note = await self._lane.run(
            lambda: self._log.consistency(request.size1, request.size2)
        )
        return pb.ConsistencyProof(size1=request.size1, size2=size, hashes=proof, checkpoint=note)

    async def AddCosignature(
        self, request: pb.AddCosignatureRequest, call: Call
    ) -> pb.SignedCheckpoint:
        who = call.peer.require(AUDITOR_ROLE)
        size, note = await self._lane.run(lambda: self._log.add_cosignature(request.note, who))
        return pb.SignedCheckpoint(size=size, note=note)


def methods(servicer: AuditServicer) -> dict[str, Method]:
    """The six methods, their requests parsed with protobuf (malformed: INVALID_ARGUMENT)."""
    return {
        "GetCheckpoint": Unary(servicer.GetCheckpoint, parser(pb.GetCheckpointRequest), serialize),
        "ListCheckpoints": ServerStream(
            servicer.ListCheckpoints, parser(pb.ListCheckpointsRequest), serialize
        ),
        "GetEntries": ServerStream(servicer.GetEntries, parser(pb.GetEntriesRequest), serialize),
        "GetInclusionProof": Unary(
            servicer.GetInclusionProof, parser(pb.GetInclusionProofRequest), serialize
        ),
        "GetConsistencyProof": Unary(
            servicer.GetConsistencyProof, parser(pb.GetConsistencyProofRequest), serialize
        ),
        "AddCosignature": Unary(
            servicer.AddCosignature, parser(pb.AddCosignatureRequest), serialize
        ),
    }


def register(audit_log: AuditLog, *, max_streams: int | None = None) -> Registration:
    """The AuditService over `audit_log`, for `create_server`."""

    def build(admission: Admission) -> grpc.GenericRpcHandler[Any, Any]:
        servicer = AuditServicer(audit_log, max_streams=max_streams)
        return service(admission, SERVICE_NAME, methods(servicer))

    return Registration(build)
