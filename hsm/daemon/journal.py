"""The quorum log as one replica holds it: load, check, append, follow, checkpoint.

Contract:
- Nothing enters the log unsigned. Every append stores its entries and the
  signed checkpoint that covers them in ONE store transaction, and the
  entries the daemon writes on its own (executions, shreds, its own seal)
  carry the log key's signature besides. So at start an entry beyond the
  last signed checkpoint cannot come from a crash: it is tampering, and
  the daemon refuses to start, naming the first such entry
  (`LogIntegrityError`, DATA_LOSS), as it refuses a checkpoint row whose
  note claims another size, is not signed by the log key in force at its
  size, or does not have the root of the entries it covers.
- At start the whole store is replayed and checked against its latest
  signed checkpoint (`verify_log`, the key file beside the store being
  one of the log's keys), and against the last checkpoint this daemon
  published, kept outside the store (hsm/daemon/rollback.py): any
  tampering or rollback stops the daemon, naming the first bad entry.
- `state` is the replay of the log so far. It is never changed in place:
  every append or catch-up replays onto a copy and then swaps the
  reference, so anyone may read `state` without a lock and see one
  consistent point of the log.
- `check` is the one rule set for requests: it replays the entries a
  request would append onto a copy of the state and raises the refusal
  replay gives (its class and fields intact), changing nothing.
- `append` is durable before it is visible: entries are replayed onto a
  copy (signed by the log key where the daemon writes them on its own),
  the new tree head is signed, and entries, checkpoint and the shred
  salts they bind, replace or erase are written in one store transaction;
  only then does the copy become the state. A failed write changes
  nothing (the tree is cut back). A write whose entries committed but
  whose checkpoint outside the store could not be made durable reports no
  success and calls `on_failure` (the replica seals itself and refuses
  further writes until restarted).
- `catch_up` applies what other replicas appended, through the same
  replay, only once the store's latest checkpoint, signed by the log key
  in force, covers exactly those entries; a refused entry, an entry
  beyond the last checkpoint or a shorter store is tampering or a
  rollback under a running replica: it fails closed the same way.
- The log key in force is the one the log names last (genesis or
  `rotate-log-key`); the journal signs with it, and switches to the next
  key (hsm/daemon/logkey.py) when a rotation it appends or follows
  commits. A replica without that key reads and follows, and refuses to
  write until the operator gives it the key.
- Every change of the state is announced to the listeners, with the
  entries and whether they came from another replica.
- The caller holds the governance lock around every method that writes or
  follows; the journal takes no lock of its own.
"""

from __future__ import annotations

import logging
import random
import time as _time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

from keyquorum.hsm.daemon import rollback
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.stores.base import ShredSalt, Store
from keyquorum.quorum import evidence, merkle
from keyquorum.quorum import log as qlog
from keyquorum.quorum.checkpoint import parse_verifier_key, unverified_size, verify_checkpoint
from keyquorum.quorum.errors import (
    AppendConflictError,
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    RollbackError,
    SignatureError,
    StateError,
    StorageError,
    VerificationError,
)
from keyquorum.quorum.log import Entry, Payload
from keyquorum.quorum.replay import LogState, Replayer, verify_log

log = logging.getLogger(__name__)

#: Times a write decided on a state another replica changed first is
#: re-decided (after catching up) before the caller is told to retry
#: (UNAVAILABLE); between attempts a short random pause (at most
#: CONFLICT_PAUSE_SECONDS) keeps one replica from winning every race.
MAX_CONFLICT_RETRIES: Final = 32
CONFLICT_PAUSE_SECONDS: Final = 0.02

#: Called after every change of the state: (entries applied, from another replica).
Listener = Callable[[Sequence[Entry], bool], None]
T = TypeVar("T")


class Journal:
    """The log of one replica: its replayed state, its Merkle tree, its checkpoints."""

    def __init__(self, store: Store, data_dir: Path, *, on_failure: Callable[[str], None]) -> None:
        self._store = store
        self._data_dir = data_dir
        self._on_failure = on_failure
        self._listeners: list[Listener] = []
        self._log_key: LogKey | None = None
        # Set when a write failed after its entries committed.
        self._failed: str | None = None
        self._state, self._tree = self._load()

    # -- reading -----------------------------------------------------------------------

    @property
    def state(self) -> LogState:
        """The replay of the log so far (replaced on every change, never changed in place)."""
        return self._state

    @property
    def size(self) -> int:
        """Entries applied (the tree may hold more while an append is being written)."""
        return self._state.size

    @property
    def initialized(self) -> bool:
        return self._state.size > 0

    @property
    def log_key(self) -> LogKey | None:
        """The log key in force, when this replica holds it."""
        return self._log_key

    @property
    def tree(self) -> merkle.MerkleTree:
        """The Merkle tree of the entries applied (read it, never append to it)."""
        return self._tree

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def latest_checkpoint(self) -> str:
        """The stored checkpoint of the log as this replica applied it ("" before genesis)."""
        size = self._state.size
        if size == 0:
            return ""
        return self._store.checkpoint_at(size) or ""

    def read_all(self) -> list[bytes]:
        return list(self._store.read(0, self._state.size))

    def checkpoint_with_proof(self, first_size: int) -> tuple[str, list[bytes]]:
        """The stored checkpoint of the log now, and a consistency proof from `first_size`.

        The proof is RFC 9162 section 2.1.4's from `first_size` to the current
        size; empty when `first_size` is 0, equal to the size or larger (the
        caller then sees a shorter log: a rollback).
        """
        if isinstance(first_size, bool) or not isinstance(first_size, int) or first_size < 0:
            raise InvalidInputError(f"first_size must be a non-negative int, got {first_size!r}")
        if self._tree.size == 0:
            raise StateError("no ceremony yet: run `keyquorum ceremony init` first")
        size = self._tree.size
        note = self.latest_checkpoint()
        if not note:
            raise LogIntegrityError(f"no checkpoint of size {size} is stored", seq=size - 1)
        proof = self._tree.consistency_proof(first_size, size) if 0 < first_size < size else []
        return note, proof

    # -- loading -----------------------------------------------------------------------

    def _load(self) -> tuple[LogState, merkle.MerkleTree]:
        """Replay the whole store and check it against its checkpoints (module contract).

        The trust anchor is the log key file beside the store: it must be
        one of the log's keys, every stored checkpoint must be signed by
        the key in force at its size and match the entries, and the entries
        must end exactly where the latest checkpoint does.
        """
        tree = merkle.MerkleTree()
        size, latest = self._store.head()
        if size == 0:
            if latest is not None:
                raise LogIntegrityError(
                    f"the store holds no entries but a checkpoint of size {latest[0]}: "
                    "the log was emptied",
                    seq=0,
                )
            if rollback.load(self._data_dir) is not None:
                raise RollbackError(
                    f"the store is empty, but this daemon published a checkpoint "
                    f"({rollback.path_in(self._data_dir)}): the store was replaced or rolled back"
                )
            return LogState(), tree
        covered = 0 if latest is None else latest[0]
        if covered < size:
            raise LogIntegrityError(
                f"entries {covered}..{size - 1} are beyond the last signed checkpoint "
                f"(size {covered}): every append stores its entries with the checkpoint that "
                "covers them, so these were written around the daemon (tampering)",
                seq=covered,
            )
        assert latest is not None
        if covered > size:
            raise LogIntegrityError(
                f"the store holds {size} entries, its latest checkpoint vouches for {covered}: "
                "truncated",
                seq=size,
            )
        entries = self._store.read(0, size)
        key = LogKey.load(self._data_dir)
        try:
            # The log's own chain of keys, from its genesis; the key file must
            # then be the key in force (`_current_key`).
            state = verify_log(entries, latest[1], _genesis_key(entries[0]))
        except SignatureError as e:
            raise VerificationError(
                f"the latest stored checkpoint (size {latest[0]}) is not signed by the log key "
                f"in force: the store was edited ({e})"
            ) from None
        for raw in entries:
            tree.append(merkle.leaf_hash(raw))
        self._check_checkpoint_rows(state, tree)
        self._log_key = self._current_key(state, key)
        self._check_not_rolled_back(state, tree, latest[1])
        log.info("log verified: %d entries, checkpoint at %d", len(entries), latest[0])
        return state, tree

    def _check_checkpoint_rows(self, state: LogState, tree: merkle.MerkleTree) -> None:
        """Every stored checkpoint of this log: its row's size is its note's, it is
        signed by the log key in force at that size, and it has that size's root."""
        for size, note in self._store.checkpoints():
            if size > tree.size:
                continue  # another replica appended meanwhile; catch_up checks it
            try:
                claimed = unverified_size(note)
            except DeserializationError as e:
                raise LogIntegrityError(
                    f"the checkpoint stored for size {size} is not a checkpoint note ({e})"
                ) from e
            if claimed != size:
                raise LogIntegrityError(
                    f"the checkpoint stored for size {size} holds a note of size {claimed}: "
                    "a checkpoint row was edited"
                )
            try:
                checkpoint = verify_checkpoint(note, parse_verifier_key(state.key_at(size)))
            except KeyquorumError as e:
                raise LogIntegrityError(
                    f"the checkpoint stored for size {size} is not signed by the log key in "
                    f"force at that size ({e})"
                ) from e
            if checkpoint.checkpoint.root != tree.root(size):
                raise LogIntegrityError(
                    f"the checkpoint stored for size {size} does not have the root of the first "
                    f"{size} entries: a checkpoint of another history",
                    seq=size - 1,
                )

    def _current_key(self, state: LogState, key: LogKey) -> LogKey:
        """The key file holds the log's key in force; finish a committed rotation."""
        if key.vkey == state.log_key:
            return key
        pending = LogKey.load_next(self._data_dir)
        if pending is not None and pending.vkey == state.log_key:
            LogKey.promote_next(self._data_dir)
            log.warning("finished the log key rotation the log records: the next key is in force")
            return LogKey.load(self._data_dir)
        raise VerificationError(
            f"the log's key in force is {state.log_key}, but {key.path} holds {key.vkey}: "
            "the key file or the store was replaced (or the key file predates a rotation: "
            "copy the key in force here)"
        )

    def _check_not_rolled_back(self, state: LogState, tree: merkle.MerkleTree, note: str) -> None:
        """Refuse a log that does not extend the checkpoint kept outside the store.

        `verify_log` proves the store agrees with itself; a store restored
        from an older snapshot does too. The last checkpoint this daemon
        published, in its data directory, is what such a store cannot match.
        """
        trusted = rollback.load(self._data_dir)
        if trusted is None:
            log.warning(
                "no checkpoint outside the store yet (%s): trusting this log of %d entries "
                "on first use",
                rollback.path_in(self._data_dir),
                tree.size,
            )
        else:
            seen = unverified_size(trusted)
            if seen > tree.size:
                raise RollbackError(
                    f"the store has {tree.size} entries, but this daemon published a checkpoint "
                    f"of {seen} ({rollback.path_in(self._data_dir)}): the store was rolled back",
                    evidence=(trusted, note),
                )
            evidence.require_tree_extends(
                trusted,
                tree,
                note,
                parse_verifier_key(state.key_at(seen)),
                parse_verifier_key(state.key_at(tree.size)),
            )
        rollback.save(self._data_dir, note)

    # -- the genesis's log key ---------------------------------------------------------

    def adopt_log_key(self, key: LogKey) -> None:
        """The checkpoint key a ceremony made, before its genesis is appended."""
        if self.initialized:
            raise StateError("this deployment is already initialised; a ceremony runs once")
        self._log_key = key

    def drop_log_key(self) -> None:
        """Forget a ceremony's key whose genesis was not appended."""
        if not self.initialized:
            self._log_key = None

    def signer_for(self, vkey: str) -> LogKey:
        """The key of this replica whose verifier key is `vkey`: the key in force,
        or the next one a rotation names; StateError when this replica lacks it."""
        if self._log_key is not None and self._log_key.vkey == vkey:
            return self._log_key
        pending = LogKey.load_next(self._data_dir)
        if pending is not None and pending.vkey == vkey:
            return pending
        raise StateError(
            f"this replica does not hold the log key {vkey}: it cannot sign for this log "
            f"(copy the key file into {self._data_dir}, docs/replicas.md)"
        )

    # -- checking and appending --------------------------------------------------------

    def check(self, payloads: Sequence[Payload], *, time: int) -> None:
        """Dry run: raise the refusal replay gives `payloads` appended now; change nothing."""
        self._replayed(payloads, time)

    def append(
        self,
        payloads: Sequence[Payload],
        *,
        time: int,
        shred_salts: Sequence[ShredSalt] = (),
        erase_tenants: Sequence[str] = (),
        replace_salts: Sequence[ShredSalt] = (),
    ) -> list[bytes]:
        """Append several entries, their checkpoint (and salt changes) as ONE store transaction.

        Replay refuses with its typed error (nothing written); a store error
        or `AppendConflictError` (another replica appended first: catch up
        and decide again) changes nothing either.
        """
        if self._failed is not None:
            raise StorageError(
                f"this replica stopped writing after a failed write ({self._failed}); restart it"
            )
        scratch, raws, entries = self._replayed(payloads, time)
        size = self._tree.size
        try:
            for raw in raws:
                self._tree.append(merkle.leaf_hash(raw))
            signer = self.signer_for(scratch.log_key)
            note = signer.sign_checkpoint(self._tree.size, self._tree.root())
            self._store.append(
                [(size + i, merkle.leaf_hash(raw), raw) for i, raw in enumerate(raws)],
                expected_size=size,
                checkpoint=note,
                shred_salts=shred_salts,
                erase_tenants=erase_tenants,
                replace_salts=replace_salts,
            )
        except AppendConflictError as e:
            self._tree.truncate(size)
            log.info("another writer appended first (%s): re-reading the log", e)
            raise
        except StorageError as e:
            self._tree.truncate(size)
            log.error("append failed, nothing was applied: %s", e)
            raise
        except BaseException:
            self._tree.truncate(size)
            raise
        rotated = scratch.log_key != self._state.log_key and self._state.initialized
        self._state = scratch
        try:
            if rotated:
                self._follow_rotation()
            self._remember(note)
        finally:
            # The entries are committed whatever happens to the copy outside the store.
            self._announce(entries, followed=False)
        return raws

    def append_retrying(
        self,
        payloads: Sequence[Payload],
        *,
        time: int,
        erase_tenants: Sequence[str] = (),
    ) -> list[bytes]:
        """`append` for entries whose content does not depend on the state.

        A confirmation, an unseal, a seal, a proposal or a shred means the
        same whatever another replica appended first: after a conflict the
        journal catches up and replay checks the entries again.
        """
        return redeciding(
            lambda: self.append(
                payloads, time=max(time, self._state.time), erase_tenants=erase_tenants
            ),
            catch_up=self.catch_up,
        )

    def _replayed(
        self, payloads: Sequence[Payload], time: int
    ) -> tuple[LogState, list[bytes], list[Entry]]:
        """Payloads replayed as entries onto a copy of the state; the refusal raised as is.

        An entry the daemon writes on its own is signed by the log key in
        force before it (the old key, for the execution of a rotation).
        """
        scratch = Replayer(self._state.copy())
        raws: list[bytes] = []
        entries: list[Entry] = []
        for payload in payloads:
            head = scratch.state if scratch.state.size > 0 else None
            sign = None
            if head is not None and qlog.needs_log_signature(payload):
                sign = self.signer_for(scratch.state.log_key).sign_message
            raw = qlog.next_entry(head, payload.TYPE, payload, time, sign=sign)
            try:
                entries.append(scratch.apply(raw))
            except LogIntegrityError as e:
                raise (e.refusal or e) from None
            raws.append(raw)
        return scratch.state, raws, entries

    def _remember(self, note: str) -> None:
        """Keep the checkpoint just committed outside the store too (rollback).

        It must be durable before the append counts as done; if it cannot
        be, the entries are committed but unreported: seal, stop writing.
        """
        try:
            rollback.save(self._data_dir, note)
        except StorageError as e:
            self.fail(str(e))
            raise

    def _follow_rotation(self) -> None:
        """The log's key in force changed: sign with the next key from now on."""
        vkey = self._state.log_key
        pending = LogKey.load_next(self._data_dir)
        if pending is None or pending.vkey != vkey:
            self._log_key = None
            log.critical(
                "the log key was rotated to %s, which this replica does not hold: it follows "
                "the log but cannot write until the key file is copied into %s",
                vkey,
                self._data_dir,
            )
            return
        LogKey.promote_next(self._data_dir)
        self._log_key = LogKey.load(self._data_dir)
        log.warning("log key rotated: checkpoints are signed by %s from now on", vkey)

    def fail(self, reason: str) -> None:
        """After a failed durable write: refuse further writes and tell the owner."""
        self._failed = reason
        log.critical(
            "a write failed after its entries were committed (%s): this replica sealed itself "
            "and refuses writes until it is restarted",
            reason,
        )
        self._on_failure(reason)

    # -- following other replicas ------------------------------------------------------

    def catch_up(self) -> int:
        """Apply the entries other replicas appended; how many.

        The store's size and latest checkpoint are read at one instant; the
        new entries are replayed, and applied only if that checkpoint covers
        exactly them, is signed by the log key in force at its size and has
        their root. A refused entry, an entry beyond the last checkpoint, a
        checkpoint that does not match, or a store shorter than what this
        replica applied is tampering or a rollback under a running daemon:
        it fails closed, applying nothing.
        """
        size, latest = self._store.head()
        known = self._tree.size
        if size == known:
            return 0
        if size < known:
            reason = f"the store has {size} entries, this replica applied {known}: rolled back"
            self.fail(reason)
            raise RollbackError(reason)
        if latest is None or latest[0] != size:
            covered = 0 if latest is None else latest[0]
            refused = LogIntegrityError(
                f"entries {max(covered, known)}..{size - 1} are beyond the last signed checkpoint "
                f"(size {covered}): written around the daemon (tampering)",
                seq=max(covered, known),
            )
            self.fail(str(refused))
            raise refused
        raws = self._store.read(known, size)
        scratch = Replayer(self._state.copy())
        applied: list[Entry] = []
        try:
            for raw in raws:
                applied.append(scratch.apply(raw))
                self._tree.append(merkle.leaf_hash(raw))
            cp = verify_checkpoint(latest[1], parse_verifier_key(scratch.state.key_at(size)))
            if cp.checkpoint.root != self._tree.root():
                raise LogIntegrityError(
                    f"the checkpoint of size {size} does not have the root of the entries "
                    "another writer appended",
                    seq=size - 1,
                )
        except KeyquorumError as e:
            self._tree.truncate(known)
            self.fail(f"entries another writer appended are refused: {e}")
            if isinstance(e, LogIntegrityError):
                raise
            raise LogIntegrityError(
                f"the checkpoint another writer stored does not check: {e}", seq=size - 1
            ) from e
        rotated = scratch.state.log_key != self._state.log_key and self._state.initialized
        self._state = scratch.state
        if applied[0].seq == 0 and self._log_key is None:
            self._adopt_followed_genesis()
        elif rotated:
            self._follow_rotation()
        self._announce(applied, followed=True)
        self._remember(latest[1])
        return len(applied)

    def _adopt_followed_genesis(self) -> None:
        """Another replica ran the ceremony: sign with the key file copied here."""
        try:
            self._log_key = self._current_key(self._state, LogKey.load(self._data_dir))
        except KeyquorumError as e:
            log.critical(
                "another replica ran the ceremony, but this one cannot sign for its log (%s): "
                "it follows the log and refuses to write until the key file is copied",
                e,
            )

    def _announce(self, entries: Sequence[Entry], *, followed: bool) -> None:
        for listener in self._listeners:
            listener(entries, followed)


def _genesis_key(raw: bytes) -> str:
    """The log key entry 0 names (replay checks that entry like every other)."""
    try:
        entry = Entry.from_bytes(raw)
    except DeserializationError as e:
        raise LogIntegrityError(f"malformed entry: {e}", seq=0) from e
    if not isinstance(entry.payload, qlog.GenesisPayload):
        raise LogIntegrityError(f"the first entry is a {entry.type}, not the genesis", seq=0)
    return entry.payload.log_key


def redeciding(decide: Callable[[], T], *, catch_up: Callable[[], object]) -> T:
    """Run a decision; if another replica appended first, catch up and decide again.

    Whether a write is right may depend on what is already in the log, so
    after a conflict the whole decision runs again from the log as it now
    is: two replicas racing the k-th approval give one execution.
    """
    for attempt in range(MAX_CONFLICT_RETRIES):
        try:
            return decide()
        except AppendConflictError as e:
            after_conflict(attempt, e)
            catch_up()
    raise AssertionError("unreachable")  # pragma: no cover


def after_conflict(attempt: int, error: AppendConflictError) -> None:
    """Between two decisions that lost the race for the log: pause, or give up.

    The pause is random and grows with the attempts, so two busy replicas
    do not keep colliding in step. After MAX_CONFLICT_RETRIES losses the
    caller gets UNAVAILABLE (a StorageError): transient, retry with a
    back-off, as gRPC means it.
    """
    if attempt + 1 >= MAX_CONFLICT_RETRIES:
        raise StorageError(
            f"the log is busy: {MAX_CONFLICT_RETRIES} appends by other replicas came first "
            f"({error}); try again"
        ) from error
    pause = min(CONFLICT_PAUSE_SECONDS, 0.0005 * 2**attempt)
    _time.sleep(random.uniform(0, pause))  # noqa: S311 (jitter, not a secret)
