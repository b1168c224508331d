"""AuditService: the auditors' read-only view of the log, and their cosignatures.

`AuditLog` is the core (no gRPC): it reads the `Store` the daemon writes,
keeps its own RFC 9162 `MerkleTree` built from the stored leaf hashes and
extended as the log grows, and merges auditors' cosignatures into stored
checkpoints. It touches no daemon state, so it cannot change what the
daemon decides; the store's own transaction rules make its reads safe next
to the daemon's appends.

`AuditServicer` is the thin gRPC layer. Every call first checks the caller:
a verified client certificate (the mTLS listener requires one) naming a
`keyquorum://auditor/<name>` identity; no identity is UNAUTHENTICATED,
another role PERMISSION_DENIED.

Cosigner keys. A cosignature is accepted only from a C2SP cosignature
(type 0x04) key in `auditor_keys`, which the operator passes at start
(`server run --auditor-key VKEY`). This list is operator-trusted
configuration, not yet a quorum decision in the log: an operator can add a
key the custodians never approved. Auditors reading a cosigned checkpoint
should therefore count only the cosigner keys they trust themselves
(`audit verify --cosigner`), which is what C2SP witnessing asks anyway.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc

from keyquorum.hsm import tls
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.services.status import abort_with
from keyquorum.hsm.stores.base import READ_BATCH, Store, check_range
from keyquorum.quorum import merkle
from keyquorum.quorum.checkpoint import NoteVerifier, verify_checkpoint
from keyquorum.quorum.errors import (
    AccessDeniedError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    StateError,
    UnverifiedNoteError,
)
from keyquorum.quorum.export import MAX_NOTE
from keyquorum.quorum.log import Entry, GenesisPayload
from keyquorum.quorum.note import KEY_HASH_SIZE, SignatureType
from keyquorum.v1 import audit_pb2 as pb
from keyquorum.v1 import audit_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = "keyquorum.v1.AuditService"
AUDITOR_ROLE = "auditor"


class AuditLog:
    """Proofs, checkpoints and cosignatures over one store (see the module docstring)."""

    def __init__(self, store: Store, auditor_keys: Sequence[NoteVerifier] = ()) -> None:
        for key in auditor_keys:
            if key.sig_type is not SignatureType.COSIGNATURE_V1:
                raise InvalidInputError(f"auditor key {key.name} must be a cosignature (0x04) key")
        if len({k.name for k in auditor_keys}) != len(auditor_keys):
            raise InvalidInputError("two auditor keys have the same name")
        self._store = store
        self._auditors = tuple(auditor_keys)
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

    def log_key(self) -> NoteVerifier:
        """The checkpoint key the genesis names (the daemon checked it at start)."""
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
        for stored, note in self._store.checkpoints():
            if stored == size:
                return stored, note
        raise StateError(f"no checkpoint of tree size {size} is stored")

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

        0. a cosigner key is configured, the note is bounded text;
        1. the note is a checkpoint signed by the log key, and every line from
           a configured cosigner verifies (`verify_checkpoint`);
        2. at least one configured cosigner signed it;
        3. its body is the stored checkpoint's body (same size and root);
        4. the stored note plus the new cosignature lines still verifies.
        """
        # 0.
        if not self._auditors:
            raise StateError("this daemon accepts no cosignatures: start it with --auditor-key")
        if not isinstance(note, str) or not note:
            raise InvalidInputError("the note is empty")
        if len(note) > MAX_NOTE:
            raise LimitExceededError(f"the note is longer than {MAX_NOTE} characters")
        log_key = self.log_key()
        # 1.
        submitted = verify_checkpoint(note, log_key, self._auditors)
        # 2.
        if not submitted.cosigned_by:
            raise UnverifiedNoteError(
                "the note carries no cosignature from a configured auditor key"
            )
        with self._lock:
            size = submitted.checkpoint.size
            # 3.
            _, stored = self.checkpoint(size) if size else (0, "")
            if not stored:
                raise StateError("the empty tree has no checkpoint to cosign")
            stored_cp = verify_checkpoint(stored, log_key, self._auditors).checkpoint
            if stored_cp != submitted.checkpoint:
                raise InvalidInputError(
                    f"the cosigned checkpoint of size {size} is not the one this log signed"
                )
            # 4.
            merged = _merge(stored, note, self._auditors)
            check = verify_checkpoint(merged, log_key, self._auditors)
            if not set(submitted.cosigned_by) <= set(check.cosigned_by):
                raise StateError("merging the cosignature failed")
            self._store.put_checkpoint(size, merged)
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


class AuditServicer(pb_grpc.AuditServiceServicer):
    """Auditor-facing RPCs; every call requires an auditor's client certificate.

    With `max_streams`, at most that many streaming calls (`ListCheckpoints`,
    `GetEntries`: an export) run at once; a further one is refused at its
    start with RESOURCE_EXHAUSTED. Each stream holds a worker thread of the
    gRPC server for as long as the auditor reads, so on a listener shared
    with KeyService (`keyquorum server run`) the cap keeps exports off the
    threads KeyService needs. The slot is given back when the stream's
    generator ends (finished, aborted, or dropped after the client left),
    i.e. when its thread is free. Unary calls are short and not counted.
    """

    def __init__(self, audit_log: AuditLog, *, max_streams: int | None = None) -> None:
        if max_streams is not None and max_streams < 1:
            raise InvalidInputError("max_streams must be at least 1")
        self._log = audit_log
        self._max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams) if max_streams else None

    def _capped(self, context: grpc.ServicerContext, stream: Iterator[T]) -> Iterator[T]:
        """`stream`, holding one of the `max_streams` slots while it runs."""
        if self._streams is None:
            yield from stream
            return
        if not self._streams.acquire(blocking=False):
            abort_with(
                context,
                LimitExceededError(
                    f"this listener serves at most {self._max_streams} audit streams at once: "
                    "retry when an export has finished"
                ),
            )
        try:
            yield from stream
        finally:
            self._streams.release()

    @staticmethod
    def _call(context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except KeyquorumError as e:
            abort_with(context, e)

    @staticmethod
    def _auditor(context: grpc.ServicerContext) -> str:
        """The caller's identity URI; aborts unless it is an auditor's."""
        try:
            uri = tls.identity_from_auth_context(context)
        except KeyquorumError as e:
            abort_with(context, e)
        if uri is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "an auditor client certificate (keyquorum://auditor/<name>) is required",
            )
            raise AssertionError("grpc context.abort returned")  # pragma: no cover
        identity = ClientIdentity.parse(uri)
        if identity.role != AUDITOR_ROLE:
            abort_with(context, AccessDeniedError(f"{uri} is not an auditor"))
        return uri

    def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.SignedCheckpoint:
        self._auditor(context)
        size, note = self._call(context, lambda: self._log.checkpoint(request.size))
        return pb.SignedCheckpoint(size=size, note=note)

    def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SignedCheckpoint]:
        return self._capped(context, self._list_checkpoints(context))

    def _list_checkpoints(self, context: grpc.ServicerContext) -> Iterator[pb.SignedCheckpoint]:
        self._auditor(context)
        for size, note in self._call(context, self._log.checkpoints):
            yield pb.SignedCheckpoint(size=size, note=note)

    def GetEntries(
        self, request: pb.GetEntriesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogEntry]:
        return self._capped(context, self._get_entries(request, context))

    def _get_entries(
        self, request: pb.GetEntriesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.LogEntry]:
        self._auditor(context)
        rows = self._call(context, lambda: self._log.entries(request.start, request.end))
        try:
            for seq, data in rows:
                yield pb.LogEntry(seq=seq, data=data)
        except KeyquorumError as e:
            abort_with(context, e)

    def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> pb.InclusionProof:
        self._auditor(context)
        size, proof, entry, note = self._call(
            context, lambda: self._log.inclusion(request.index, request.tree_size)
        )
        return pb.InclusionProof(
            index=request.index, tree_size=size, hashes=proof, entry=entry, checkpoint=note
        )

    def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: grpc.ServicerContext
    ) -> pb.ConsistencyProof:
        self._auditor(context)
        size, proof, note = self._call(
            context, lambda: self._log.consistency(request.size1, request.size2)
        )
        return pb.ConsistencyProof(size1=request.size1, size2=size, hashes=proof, checkpoint=note)

    def AddCosignature(
        self, request: pb.AddCosignatureRequest, context: grpc.ServicerContext
    ) -> pb.SignedCheckpoint:
        who = self._auditor(context)
        size, note = self._call(context, lambda: self._log.add_cosignature(request.note, who))
        return pb.SignedCheckpoint(size=size, note=note)


def register(audit_log: AuditLog) -> Callable[[grpc.Server], None]:
    """A `create_server` registration for the AuditService over `audit_log`."""

    def add(server: grpc.Server) -> None:
        pb_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_log), server)

    return add
