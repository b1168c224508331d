"""The quorum log as one replica holds it: load, check, append, follow, checkpoint.

Contract:
- At start the whole store is replayed and checked against its latest
  signed checkpoint (`verify_log`), and against the last checkpoint this
  daemon signed, kept outside the store (hsm/daemon/rollback.py): any
  tampering or rollback stops the daemon, naming the first bad entry.
- `state` is the replay of the log so far. It is never changed in place:
  every append or catch-up replays onto a copy and then swaps the
  reference, so anyone may read `state` without a lock and see one
  consistent point of the log.
- `check` is the one rule set for requests: it replays the entries a
  request would append onto a copy of the state and raises the refusal
  replay gives (its class and fields intact), changing nothing.
- `append` is durable before it is visible: entries are replayed onto a
  copy, written in one store transaction (with the shred salts they bind
  or erase), and only then does the copy become the state, the tree
  grows and a new checkpoint is signed. A failed write changes nothing.
  A write whose entries committed but whose checkpoint outside the store
  could not be made durable reports no success and calls `on_failure`
  (the replica seals itself and refuses further writes until restarted).
- `catch_up` applies what other replicas appended, through the same
  replay; a refused entry or a shorter store is tampering or a rollback
  under a running replica: it fails closed the same way.
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
from keyquorum.quorum.checkpoint import parse_verifier_key
from keyquorum.quorum.errors import (
    AppendConflictError,
    InvalidInputError,
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
        return self._tree.size

    @property
    def initialized(self) -> bool:
        return self._tree.size > 0

    @property
    def log_key(self) -> LogKey | None:
        return self._log_key

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def latest_checkpoint(self) -> str:
        latest = self._store.latest_checkpoint()
        return latest[1] if latest else ""

    def read_all(self) -> list[bytes]:
        return list(self._store.read_all())

    def checkpoint_with_proof(self, first_size: int) -> tuple[str, list[bytes]]:
        """A freshly signed checkpoint of the log now, and a proof from `first_size`.

        The proof is RFC 9162 section 2.1.4's from `first_size` to the current
        size; empty when `first_size` is 0, equal to the size or larger (the
        caller then sees a shorter log: a rollback).
        """
        if isinstance(first_size, bool) or not isinstance(first_size, int) or first_size < 0:
            raise InvalidInputError(f"first_size must be a non-negative int, got {first_size!r}")
        if self._log_key is None:
            raise StateError("no ceremony yet: run `keyquorum ceremony init` first")
        size = self._tree.size
        note = self._log_key.sign_checkpoint(size, self._tree.root())
        proof = self._tree.consistency_proof(first_size, size) if 0 < first_size < size else []
        return note, proof

    # -- loading -----------------------------------------------------------------------

    def _load(self) -> tuple[LogState, merkle.MerkleTree]:
        """Replay the whole store and check it against the latest checkpoint.

        The trust anchor is the log key file beside the store: the latest
        checkpoint must be signed by it, the genesis must name it, and the
        log must replay and reach the checkpoint's root (`verify_log`).
        """
        tree = merkle.MerkleTree()
        if self._store.size() == 0:
            if rollback.load(self._data_dir) is not None:
                raise RollbackError(
                    f"the store is empty, but this daemon published a checkpoint "
                    f"({rollback.path_in(self._data_dir)}): the store was replaced or rolled back"
                )
            return LogState(), tree
        entries = list(self._store.read_all())
        latest = self._store.latest_checkpoint()
        if latest is None:
            raise LogIntegrityError("the store holds entries but no signed checkpoint", seq=0)
        self._log_key = LogKey.load(self._data_dir)
        try:
            state = verify_log(entries, latest[1], self._log_key.vkey)
        except SignatureError as e:
            # The stored checkpoint is not signed by the key file beside the
            # store: one of the two was replaced.
            raise VerificationError(
                f"the latest stored checkpoint (size {latest[0]}) is not signed by the log key "
                f"in {self._log_key.path}: the key file or the store was replaced ({e})"
            ) from None
        for raw in entries:
            tree.append(merkle.leaf_hash(raw))
        self._check_not_rolled_back(tree)
        log.info("log verified: %d entries, checkpoint at %d", len(entries), latest[0])
        return state, tree

    def _check_not_rolled_back(self, tree: merkle.MerkleTree) -> None:
        """Refuse a log that does not extend the checkpoint kept outside the store.

        `verify_log` proves the store agrees with itself; a store restored
        from an older snapshot does too. The last checkpoint this daemon
        signed, in its data directory, is what such a store cannot match.
        """
        assert self._log_key is not None
        current = self._log_key.sign_checkpoint(tree.size, tree.root())
        trusted = rollback.load(self._data_dir)
        if trusted is None:
            log.warning(
                "no checkpoint outside the store yet (%s): trusting this log of %d entries "
                "on first use",
                rollback.path_in(self._data_dir),
                tree.size,
            )
        else:
            verifier = parse_verifier_key(self._log_key.vkey)
            evidence.require_tree_extends(trusted, tree, current, verifier)
        rollback.save(self._data_dir, current)

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
    ) -> list[bytes]:
        """Append several entries (and salt changes) as ONE store transaction.

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
            self._store.append(
                [(size + i, merkle.leaf_hash(raw), raw) for i, raw in enumerate(raws)],
                expected_size=size,
                shred_salts=shred_salts,
                erase_tenants=erase_tenants,
            )
        except AppendConflictError as e:
            log.info("another writer appended first (%s): re-reading the log", e)
            raise
        except StorageError as e:
            log.error("append failed, nothing was applied: %s", e)
            raise
        self._state = scratch
        for raw in raws:
            self._tree.append(merkle.leaf_hash(raw))
        try:
            self._publish_checkpoint()
        finally:
            # The entries are committed whatever happens to the checkpoint.
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
        """Payloads replayed as entries onto a copy of the state; the refusal raised as is."""
        scratch = Replayer(self._state.copy())
        raws: list[bytes] = []
        entries: list[Entry] = []
        for payload in payloads:
            head = scratch.state if scratch.state.size > 0 else None
            raw = qlog.next_entry(head, payload.TYPE, payload, time)
            try:
                entries.append(scratch.apply(raw))
            except LogIntegrityError as e:
                raise (e.refusal or e) from None
            raws.append(raw)
        return scratch.state, raws, entries

    def _publish_checkpoint(self) -> None:
        """Sign the tree head; store it, and keep it outside the store (rollback).

        In the store, a replica that lost a race to a later checkpoint
        (another replica's) leaves it be. The copy outside the store must be
        durable before the append counts as done.
        """
        assert self._log_key is not None
        note = self._log_key.sign_checkpoint(self._tree.size, self._tree.root())
        try:
            try:
                self._store.put_checkpoint(self._tree.size, note)
            except StateError as e:
                log.debug("a later checkpoint is already stored: %s", e)
            rollback.save(self._data_dir, note)
        except StorageError as e:
            # The entries are committed, but what vouches for them is not
            # durable: report no success, seal, stop writing (fail closed).
            self.fail(str(e))
            raise

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

        The one replay path checks every entry as at start. A refused entry,
        or a store shorter than what this replica applied, is tampering or
        a rollback under a running daemon: it fails closed. The entries
        before a refused one are applied.
        """
        size = self._store.size()
        known = self._tree.size
        if size == known:
            return 0
        if size < known:
            reason = f"the store has {size} entries, this replica applied {known}: rolled back"
            self.fail(reason)
            raise RollbackError(reason)
        raws = self._store.read(known, size)
        scratch = Replayer(self._state.copy())
        applied: list[Entry] = []
        refused: LogIntegrityError | None = None
        for raw in raws:
            try:
                applied.append(scratch.apply(raw))
            except LogIntegrityError as e:
                refused = e
                break
            self._tree.append(merkle.leaf_hash(raw))
        if applied:
            self._state = scratch.state
            if applied[0].seq == 0 and self._log_key is None:
                self._log_key = LogKey.load(self._data_dir)
            self._announce(applied, followed=True)
        if refused is not None:
            self.fail(f"an entry another writer appended is refused by replay: {refused}")
            raise refused
        if self._log_key is not None:
            note = self._log_key.sign_checkpoint(self._tree.size, self._tree.root())
            try:
                rollback.save(self._data_dir, note)
            except StorageError as e:
                self.fail(str(e))
                raise
        return len(applied)

    def _announce(self, entries: Sequence[Entry], *, followed: bool) -> None:
        for listener in self._listeners:
            listener(entries, followed)


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
