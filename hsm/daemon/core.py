"""The daemon's core: seal state, the ceremony, unseal sessions and seal.

It knows nothing of gRPC (the servicers in `custodian_service.py` are thin
wrappers) and decides nothing about validity on its own: every governance
event is built as a log entry and run through the one replay path of
`keyquorum.quorum.replay` before it is appended, so the daemon's state is
always the replay of its log.

Contract:
- At start the whole log is replayed and checked against the latest signed
  checkpoint; any tampering stops the daemon, naming the first bad entry.
- It starts sealed. The master key exists in memory only between a
  successful unseal and the next seal (or exit), in a `SecretBytes` that is
  wiped on seal; shares are wiped as soon as they are combined.
- An append is durable before its effect is visible: the entries are
  checked by replay on a copy of the state, written in one store
  transaction (with any shred salts they bind or erase), and only then does
  the copy become the state and the daemon act on them. If the write
  fails, nothing changes (audit fails closed).
- Quorum operations (docs/ARCHITECTURE.md, "quorum/operations.py"): a
  proposal is logged; each custodian's verdict is checked here with the
  same functions replay uses, and the approval that reaches the number an
  operation needs is appended in ONE transaction with the execution it
  makes due. Operations that need the master key (create, rotate and
  activate a tenant, change the roster) are refused while sealed, and
  then the approval is not logged either.
- Tenant keys are unwrapped into a `TenantKeyring` only for a logged,
  unexpired activation: at its execution, or at unseal for an activation
  still valid in the log. Expiry (checked at every call and by a
  background sweeper), deactivation, destruction and seal wipe them. The
  sweeper also appends the `shred` entry, erasing the tenant's shred
  salts in the same transaction, once a destroy wait is over. A
  data-plane call sweeps too, but only when something is due: the
  keyring's earliest activation end or the log's earliest destroy
  deadline has come (`_sweep_due`), so its cost does not grow with the
  number of tenants.
- Replicas (docs/replicas.md): several daemons may share one store. Every
  request that decides something first reads the entries other replicas
  appended and applies them through the same replay (`catch_up`); a
  follower thread (hsm/follower.py) does the same as entries commit and
  carries out what they mean for the keys held here (a seal wipes them,
  an activation unwraps them). A write decided on a state another replica
  changed meanwhile fails the store's size check (`AppendConflictError`);
  the daemon re-reads and decides again, so two replicas racing the k-th
  approval produce one execution.
- Rollback: the last checkpoint this daemon signed is also kept outside
  the store (hsm/rollback.py); at start the log must extend it.
- A write that fails after its entries committed (the checkpoint outside
  the store could not be made durable) reports no success: the replica
  wipes its keys and refuses writes until it is restarted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time as _time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyquorum.hsm.daemon import follower, rollback, tenant_keys
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.daemon.tenant_keys import HeldKey, TenantKey, TenantKeyring
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.stores.base import ShredSalt, Store
from keyquorum.quorum import log as qlog
from keyquorum.quorum import merkle, shamir, statements
from keyquorum.quorum.checkpoint import parse_verifier_key
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    AccessDeniedError,
    AppendConflictError,
    DeserializationError,
    ExpiredError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    NotFoundError,
    NotOnRosterError,
    ReplayError,
    RollbackError,
    SealedError,
    ShareError,
    SignatureError,
    StateError,
    StorageError,
    VerificationError,
)
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.log import (
    ApprovalPayload,
    ConfirmPayload,
    ExecutionPayload,
    GenesisPayload,
    Payload,
    ProposalPayload,
    RefusalPayload,
    SealPayload,
    ShredPayload,
    UnsealPayload,
    UnsealShare,
)
from keyquorum.quorum.operations import (
    MAX_TEXT,
    Activated,
    DestroyScheduled,
    EncryptedShare,
    GrantChanged,
    NewVersion,
    Parameters,
    Policy,
    Result,
    Rewrapped,
    RosterChanged,
    TenantNamed,
    VersionDisabled,
    check_parameters,
    operation,
    request_for,
)
from keyquorum.quorum.replay import (
    LogState,
    Proposal,
    Replayer,
    Tenant,
    seal_request_digest,
    verify_log,
)
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.unseal import session_info

log = logging.getLogger(__name__)

Clock = Callable[[], int]
RandomBytes = Callable[[int], bytes]

MASTER_KEY_SIZE = 32
SESSION_ID_SIZE = 16
PROPOSAL_ID_SIZE = 16
NONCE_SIZE = 12
#: How often the background sweeper wipes ended activations and shreds.
SWEEP_SECONDS = 1.0
#: Parameters carried as integers; every other parameter is text.
INTEGER_PARAMETERS = frozenset({"duration_seconds", "threshold", "version"})
_DECIMAL = re.compile(r"[0-9]{1,16}")
#: Times a write decided on a state another replica changed first is
#: re-decided (after catching up) before the caller is told to retry
#: (UNAVAILABLE); between attempts a short random pause (at most
#: CONFLICT_PAUSE_SECONDS) keeps one replica from winning every race.
MAX_CONFLICT_RETRIES = 32
CONFLICT_PAUSE_SECONDS = 0.02
#: Operations whose execution needs the master key in memory.
NEEDS_MASTER_KEY = frozenset({"create-tenant", "rotate-tenant", "activate-tenant", "change-roster"})


@dataclass(frozen=True)
class CustodianView:
    fingerprint: str
    name: str
    share_index: int
    confirmed: bool


@dataclass(frozen=True)
class StatusView:
    initialized: bool
    sealed: bool
    deployment: str
    threshold: int
    roster: tuple[CustodianView, ...]
    unseal_progress: int
    log_size: int
    checkpoint: str
    replica: str
    log_key: str

    @property
    def confirmed_count(self) -> int:
        return sum(1 for c in self.roster if c.confirmed)


@dataclass(frozen=True)
class EncryptedShareView:
    deployment: str
    split_id: bytes
    index: int
    ciphertext: bytes
    commitments: shamir.SplitCommitments


@dataclass(frozen=True)
class SessionView:
    session_id: bytes
    public_key: bytes
    log_size: int
    expires_at: int
    deployment: str
    split_id: bytes
    replica: str
    threshold: int
    progress: int


@dataclass(frozen=True)
class Progress:
    have: int
    need: int
    sealed: bool
    log_size: int


@dataclass(frozen=True)
class ProposalView:
    """A proposal as custodians see it, with the exact texts they would sign.

    `status` is `pending`, `executed`, `cancelled` (by a roster change) or
    `expired` (pending in the log, but past its expiry now).
    """

    id: bytes
    deployment: str
    operation: str
    parameters: Parameters
    log_position: int
    proposed_at: int
    expires_at: int
    proposer: str
    status: str
    required: int
    approved_by: tuple[str, ...]
    refused_by: tuple[str, ...]
    approve_statement: str
    refuse_statement: str
    executed_seq: int | None
    result: dict[str, Any] | None


@dataclass(frozen=True)
class VerdictView:
    proposal: ProposalView
    executed: bool
    log_size: int


@dataclass(frozen=True)
class TenantView:
    """A tenant as the log says, plus whether its key is unwrapped in this replica."""

    name: str
    versions: int
    disabled_versions: tuple[int, ...]
    active_until: int | None
    unwrapped: bool
    destroy_at: int | None
    destroyed: bool
    backends: tuple[str, ...]


def _nothing() -> None:
    """No effect (the default commit/abort action of a plan)."""


@dataclass
class _Plan:
    """An execution prepared before anything is logged.

    `on_commit` runs once the approval and the execution are durable;
    `on_abort` wipes whatever secret the plan made if they are not.
    """

    result: Result
    shred_salts: tuple[ShredSalt, ...] = ()
    on_commit: Callable[[], None] = field(default=_nothing)
    on_abort: Callable[[], None] = field(default=_nothing)


class _UnsealSession:
    """One unseal session: a fresh HPKE key and the shares received so far."""

    __slots__ = ("expires_at", "key", "log_size", "public_key", "session_id", "shares")

    def __init__(
        self, session_id: bytes, key: SealingPrivateKey, log_size: int, expires_at: int
    ) -> None:
        self.session_id = session_id
        self.key: SealingPrivateKey | None = key
        self.log_size = log_size
        self.expires_at = expires_at
        self.public_key = key.public_key().to_bytes()
        self.shares: dict[str, tuple[shamir.Share, bytes, HybridSignature]] = {}

    def wipe(self) -> None:
        for share, _digest, _sig in self.shares.values():
            share.wipe()
        self.shares.clear()
        # The HPKE private key lives inside OpenSSL, which clears it when the
        # object is freed; dropping the last reference is all Python can do.
        self.key = None

    def __repr__(self) -> str:
        return f"<unseal session {self.session_id.hex()[:8]}: {len(self.shares)} shares>"


class Daemon:
    """One replica of the key-custody service over one store."""

    def __init__(
        self,
        store: Store,
        *,
        data_dir: Path,
        replica: str,
        limits: Limits,
        clock: Clock,
        random_bytes: RandomBytes = os.urandom,
        sweep_seconds: float | None = SWEEP_SECONDS,
        follow_seconds: float | None = follower.POLL_SECONDS,
    ) -> None:
        self._store = store
        self._data_dir = data_dir
        self._replica = replica
        self._limits = limits
        self._clock = clock
        self._random = random_bytes
        self._lock = threading.RLock()
        self._master: SecretBytes | None = None
        self._session: _UnsealSession | None = None
        self._log_key: LogKey | None = None
        self._keyring = TenantKeyring()
        # Public credentials of custodians a change-roster proposal adds
        # (the log names them only by fingerprint until it executes).
        self._offered: dict[str, PublicCredential] = {}
        self._seal_observers: list[Callable[[bool], None]] = []
        # Set when a write failed after its entries committed: the daemon
        # sealed itself and refuses writes until it is restarted.
        self._failed: str | None = None
        self._replayer, self._tree = self._load()
        # The earliest destroy deadline of a tenant not yet shredded, from
        # the log state; recomputed after every change of that state.
        self._next_shred: int | None = None
        self._track_destroy_deadlines()
        self._follower: follower.Follower | None = None
        if follow_seconds is not None:
            wait = getattr(store, "wait_for_append", None)
            self._follower = follower.Follower(
                self, wait_for_append=wait, size=store.size, poll_seconds=follow_seconds
            )
            self._follower.start()
        self._stop_sweeper = threading.Event()
        self._sweeper: threading.Thread | None = None
        if sweep_seconds is not None:
            self._sweeper = threading.Thread(
                target=self._sweep_loop, args=(sweep_seconds,), name="kq-sweeper", daemon=True
            )
            self._sweeper.start()

    # -- loading -------------------------------------------------------------

    def _load(self) -> tuple[Replayer, merkle.MerkleTree]:
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
            return Replayer(), tree
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
        return Replayer(state), tree

    def _check_not_rolled_back(self, tree: merkle.MerkleTree) -> None:
        """Refuse a log that does not extend the checkpoint kept outside the store.

        `verify_log` proves the store agrees with itself; a store restored
        from an older snapshot does too. The last checkpoint this daemon
        signed, in its data directory, is what such a store cannot match
        (`hsm/rollback.py`; RFC 9162 consistency proof).
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
            rollback.check_tree_extends(trusted, tree, current, verifier)
        rollback.save(self._data_dir, current)

    @property
    def log_size(self) -> int:
        """Entries applied so far (the follower compares it with the store's size)."""
        return self._tree.size

    @property
    def initialized(self) -> bool:
        return self._tree.size > 0

    @property
    def state(self) -> LogState:
        return self._replayer.state

    @property
    def sealed(self) -> bool:
        return self._master is None

    # -- appending -----------------------------------------------------------

    def _append(self, payload: Payload, *, not_before: int = 0) -> bytes:
        """Check, durably append and apply one entry; sign a new checkpoint."""
        return self._append_retrying([payload], time=max(self._now(), not_before))[0]

    def _append_retrying(
        self,
        payloads: Sequence[Payload],
        *,
        time: int,
        erase_tenants: Sequence[str] = (),
    ) -> list[bytes]:
        """`_append_all` for entries whose content does not depend on the state.

        A confirmation, an unseal, a seal, a proposal or a shred means the
        same whatever another replica appended first; after a conflict the
        daemon catches up, and replay checks the entries again against
        the new state (a shred already done, a confirmation already given,
        are then refused as they would be on a single replica).
        """
        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                return self._append_all(
                    payloads,
                    time=max(time, self._replayer.state.time),
                    erase_tenants=erase_tenants,
                )
            except AppendConflictError as e:
                _after_conflict(attempt, e)
                self._catch_up_locked()
        raise AssertionError("unreachable")  # pragma: no cover

    def _append_all(
        self,
        payloads: Sequence[Payload],
        *,
        time: int,
        shred_salts: Sequence[ShredSalt] = (),
        erase_tenants: Sequence[str] = (),
    ) -> list[bytes]:
        """Append several entries (and salt changes) as ONE store transaction.

        Every entry is replayed first on a copy of the state, each after the
        one before it; only when the store has committed them all does the
        copy become the daemon's state. A refusal (`LogIntegrityError`) or a
        failed write leaves the state, the tree and the store as they were.
        """
        if self._failed is not None:
            raise StorageError(
                f"this replica stopped writing after a failed write ({self._failed}); restart it"
            )
        scratch = Replayer(self._replayer.state.copy())
        raws: list[bytes] = []
        for payload in payloads:
            head = scratch.state if scratch.state.size > 0 else None
            raw = qlog.next_entry(head, payload.TYPE, payload, time)
            scratch.apply(raw)
            raws.append(raw)
        size = self._tree.size
        try:
            self._store.append(
                [(size + i, merkle.leaf_hash(raw), raw) for i, raw in enumerate(raws)],
                expected_size=size,
                shred_salts=shred_salts,
                erase_tenants=erase_tenants,
            )
        except AppendConflictError as e:
            # Another replica appended first: the caller re-reads the log
            # (`_catch_up_locked`) and decides again on the state as it is.
            log.info("another writer appended first (%s): re-reading the log", e)
            raise
        except StorageError as e:
            # Nothing of it is in force here; the caller is told it failed.
            log.error("append failed, nothing was applied: %s", e)
            raise
        self._replayer = scratch
        self._track_destroy_deadlines()
        for raw in raws:
            self._tree.append(merkle.leaf_hash(raw))
        try:
            self._publish_checkpoint()
        except StorageError as e:
            # The entries are committed, but what vouches for them is not
            # durable: report no success, seal, and stop writing (fail closed).
            self._fail(str(e))
            raise
        return raws

    def _publish_checkpoint(self) -> None:
        """Sign the tree head; store it, and keep it outside the store (rollback).

        In the store, a replica that lost a race to a later checkpoint
        (another replica's) leaves it be. The copy outside the store must be
        durable before the append counts as done.
        """
        assert self._log_key is not None
        note = self._log_key.sign_checkpoint(self._tree.size, self._tree.root())
        try:
            self._store.put_checkpoint(self._tree.size, note)
        except StateError as e:
            log.debug("a later checkpoint is already stored: %s", e)
        rollback.save(self._data_dir, note)

    def _fail(self, reason: str) -> None:
        """After a failed durable write: wipe every key and refuse further writes."""
        self._failed = reason
        self._wipe_keys()
        log.critical(
            "a write failed after its entries were committed (%s): this replica sealed itself "
            "and refuses writes until it is restarted",
            reason,
        )

    # -- following other replicas ---------------------------------------------

    def catch_up(self) -> int:
        """Apply entries other replicas appended; returns how many (see hsm/follower.py)."""
        with self._lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        """Read the store past our tree, replay each entry, act on it.

        The one replay path (`Replayer.apply`) checks every entry as at
        start. A refused entry, or a store shorter than what this replica
        already applied, is tampering or a rollback under a running daemon:
        it seals itself and stops writing (fail closed).
        """
        size = self._store.size()
        known = self._tree.size
        if size == known:
            return 0
        if size < known:
            reason = f"the store has {size} entries, this replica applied {known}: rolled back"
            self._fail(reason)
            raise RollbackError(reason)
        raws = self._store.read(known, size)
        try:
            for raw in raws:
                try:
                    entry = self._replayer.apply(raw)
                except LogIntegrityError as e:
                    self._fail(f"an entry another writer appended is refused by replay: {e}")
                    raise
                self._tree.append(merkle.leaf_hash(raw))
                if entry.seq == 0 and self._log_key is None:
                    self._log_key = LogKey.load(self._data_dir)
                for effect in follower.effects(entry, self._replica):
                    self._act(effect)
        finally:
            # Even when an entry was refused, the ones before it are applied.
            self._track_destroy_deadlines()
        if self._log_key is not None:
            note = self._log_key.sign_checkpoint(self._tree.size, self._tree.root())
            try:
                rollback.save(self._data_dir, note)
            except StorageError as e:
                self._fail(str(e))
                raise
        return len(raws)

    def _act(self, effect: follower.Effect) -> None:
        """Carry out what another replica's entry means for the keys held here."""
        if isinstance(effect, follower.WipeAll):
            was_unsealed = not self.sealed
            self._wipe_keys()
            if was_unsealed:
                log.warning("sealed: %s", effect.reason)
            return
        if isinstance(effect, follower.WipeTenant):
            if self._keyring.deactivate(effect.tenant):
                log.info("tenant %s: key wiped (logged through another replica)", effect.tenant)
            return
        if isinstance(effect, follower.DropVersion):
            self._keyring.drop_version(effect.tenant, effect.version)
            return
        master = self._master
        record = self._replayer.state.tenants.get(effect.tenant)
        if master is None or record is None:
            return
        try:
            if isinstance(effect, follower.Activate):
                keys = self._unwrap_versions(record, master, enabled_only=True)
                self._keyring.activate(effect.tenant, effect.until, keys)
                log.info(
                    "tenant %s activated through another replica, until %d",
                    effect.tenant,
                    effect.until,
                )
            elif effect.tenant in self._keyring.active(self._now()):
                version = record.versions[effect.version - 1]
                key = tenant_keys.unwrap(
                    master,
                    self._salt(record, effect.version),
                    record.name,
                    effect.version,
                    version.wrapped_key,
                )
                self._keyring.add_version(effect.tenant, effect.version, key)
        except KeyquorumError as e:
            log.error("tenant %s: key not unwrapped here: %s", effect.tenant, e)

    def _now(self) -> int:
        # Entry times never go backwards, even if the wall clock does.
        return max(self._clock(), self._replayer.state.time)

    # -- status --------------------------------------------------------------

    def status(self) -> StatusView:
        with self._lock:
            self._catch_up_locked()
            self._sweep_locked()
            st = self._replayer.state
            latest = self._store.latest_checkpoint()
            session = self._live_session()
            roster: tuple[CustodianView, ...] = ()
            if self.initialized:
                roster = tuple(
                    CustodianView(
                        fingerprint=c.fingerprint,
                        name=c.name,
                        share_index=i + 1,
                        confirmed=c.fingerprint in st.confirmations,
                    )
                    for i, c in enumerate(st.roster)
                )
            return StatusView(
                initialized=self.initialized,
                sealed=self.sealed,
                deployment=st.deployment,
                threshold=st.threshold if self.initialized else 0,
                roster=roster,
                unseal_progress=len(session.shares) if session else 0,
                log_size=self._tree.size,
                checkpoint=latest[1] if latest else "",
                replica=self._replica,
                log_key=st.log_key,
            )

    # -- the ceremony ----------------------------------------------------------

    def init_ceremony(
        self, deployment: str, threshold: int, public_credentials: Sequence[bytes]
    ) -> StatusView:
        """Create and split the master key, log the genesis, forget the key."""
        with self._lock:
            if self.initialized:
                raise StateError("this deployment is already initialised; a ceremony runs once")
            if len(public_credentials) > self._limits.max_custodians:
                raise InvalidInputError(
                    f"at most {self._limits.max_custodians} custodians, "
                    f"got {len(public_credentials)}"
                )
            for i, data in enumerate(public_credentials):
                if len(data) > self._limits.max_credential_bytes:
                    raise InvalidInputError(f"public credential {i + 1} is too large")
            roster = [PublicCredential.from_bytes(data) for data in public_credentials]
            if len({c.fingerprint for c in roster}) != len(roster):
                raise InvalidInputError("the same custodian credential is listed twice")
            if len({c.name for c in roster}) != len(roster):
                raise InvalidInputError("two custodians have the same name")
            if not 2 <= threshold <= len(roster):
                raise InvalidInputError(
                    f"threshold must be between 2 and the number of custodians "
                    f"({len(roster)}), got {threshold}"
                )
            log_key = LogKey.create(self._data_dir, origin=origin_for(deployment))
            with SecretBytes(self._random(MASTER_KEY_SIZE), label="master key") as master:
                commitments, encrypted = self._split_to(master, deployment, threshold, roster)
            payload = GenesisPayload(
                deployment=deployment,
                threshold=threshold,
                roster=tuple(roster),
                split=commitments,
                encrypted_shares=tuple(encrypted),
                log_key=log_key.vkey,
                policy=Policy(
                    activation_max_seconds=self._limits.activation_max_seconds,
                    destroy_wait_seconds=self._limits.destroy_wait_seconds,
                    proposal_ttl_seconds=self._limits.proposal_ttl_seconds,
                ),
            )
            self._log_key = log_key
            try:
                self._append_all([payload], time=self._now())
            except AppendConflictError:
                self._log_key = None
                log_key.remove()
                self._catch_up_locked()
                raise StateError(
                    "another replica ran the ceremony first: copy its log key file into this "
                    "replica's data directory and restart it (docs/replicas.md)"
                ) from None
            except KeyquorumError:
                self._log_key = None
                log_key.remove()
                raise
            log.info(
                "ceremony done: deployment %s, %d-of-%d, split %s",
                deployment,
                threshold,
                len(roster),
                commitments.split_id.hex()[:8],
            )
            return self.status()

    def _split_to(
        self,
        master: SecretBytes,
        deployment: str,
        threshold: int,
        roster: Sequence[PublicCredential],
    ) -> tuple[shamir.SplitCommitments, list[EncryptedShare]]:
        """Split `master` k-of-n and HPKE-encrypt share i to custodian i.

        Used by the ceremony and by a roster change; the plaintext shares are
        wiped before this returns, whatever happens.
        """
        shares, commitments = shamir.split(
            master, threshold, len(roster), random_bytes=self._random
        )
        try:
            encrypted = []
            for custodian, share in zip(roster, shares, strict=True):
                info = qlog.share_info(
                    deployment, commitments.split_id, custodian.fingerprint, share.index
                )
                with share.to_bytes() as plain:
                    ciphertext = custodian.sealing_key.seal(plain, info)
                encrypted.append(EncryptedShare(custodian.fingerprint, share.index, ciphertext))
        finally:
            for share in shares:
                share.wipe()
        return commitments, encrypted

    def encrypted_share(self, fingerprint: str) -> EncryptedShareView:
        with self._lock:
            st = self._require_initialized()
            for share in st.encrypted_shares:
                if share.custodian == fingerprint:
                    return EncryptedShareView(
                        st.deployment, st.split.split_id, share.index, share.ciphertext, st.split
                    )
            raise NotOnRosterError(f"custodian {fingerprint[:16]} is not on the roster")

    def confirm_share(
        self, fingerprint: str, split_id: bytes, index: int, signature: bytes
    ) -> StatusView:
        """Log a custodian's signed acknowledgement that their share checks out."""
        with self._lock:
            self._catch_up_locked()
            st = self._require_initialized()
            st.epoch.credential(fingerprint)
            HybridSignature.from_bytes(signature)
            try:
                self._append(ConfirmPayload(fingerprint, split_id, index, signature))
            except LogIntegrityError as e:
                raise _refusal(e) from None
            return self.status()

    # -- unseal --------------------------------------------------------------

    def _live_session(self) -> _UnsealSession | None:
        session = self._session
        if session is not None and self._clock() >= session.expires_at:
            session.wipe()
            self._session = None
            return None
        return session

    def open_unseal_session(self) -> SessionView:
        """The current unseal session, or a fresh one (a new HPKE key)."""
        with self._lock:
            self._catch_up_locked()
            st = self._require_initialized()
            if not self.sealed:
                raise StateError("already unsealed")
            session = self._live_session()
            if session is None:
                session = _UnsealSession(
                    self._random(SESSION_ID_SIZE),
                    SealingPrivateKey.generate(),
                    self._tree.size,
                    self._clock() + self._limits.unseal_session_seconds,
                )
                self._session = session
            return SessionView(
                session_id=session.session_id,
                public_key=session.public_key,
                log_size=session.log_size,
                expires_at=session.expires_at,
                deployment=st.deployment,
                split_id=st.split.split_id,
                replica=self._replica,
                threshold=st.threshold,
                progress=len(session.shares),
            )

    def submit_share(
        self,
        session_id: bytes,
        fingerprint: str,
        index: int,
        ciphertext: bytes,
        signature: bytes,
    ) -> Progress:
        """Check one custodian's share for the open session; unseal at the k-th.

        Checks, in order, each refusal naming the custodian:
        1. sealed, and the session is the open one and unexpired;
        2. the custodian is on the roster with this share index, and has not
           submitted in this session;
        3. the signature over the unseal-share statement verifies;
        4. the share decrypts under the session key (bound to this session,
           custodian and index);
        5. the share belongs to the current split (not a past roster or
           another deployment) and matches its commitment.
        At k valid shares: combine, check the master-key commitment, log who
        took part, and hold the key.
        """
        with self._lock:
            self._catch_up_locked()
            st = self._require_initialized()
            if not self.sealed:
                raise StateError("already unsealed")
            # 1. session
            session = self._live_session()
            if session is None:
                raise ExpiredError("no open unseal session (it expired); open a new one")
            if session_id != session.session_id:
                raise ReplayError("share is for another unseal session")
            # 2. custodian
            custodian = st.epoch.credential(fingerprint)
            name = f"custodian {custodian.name} ({fingerprint[:16]})"
            held = st.epoch.share_index(fingerprint)
            if held != index:
                raise ShareError(f"{name} holds share {held}, not {index}")
            if fingerprint in session.shares:
                raise ReplayError(f"{name} already submitted a share in this session")
            # 3. signature
            digest = hashlib.sha256(ciphertext).digest()
            statement = statements.unseal_share_statement(
                deployment=st.deployment,
                custodian=fingerprint,
                replica=self._replica,
                session=session.session_id,
                session_log_size=session.log_size,
                split_id=st.split.split_id,
                index=index,
                ciphertext_sha256=digest,
            )
            sig = HybridSignature.from_bytes(signature)
            statements.verify_statement(
                statement,
                statements.SignedStatement(fingerprint, sig),
                custodian.verify_key,
            )
            # 4. decrypt
            info = session_info(
                st.deployment, self._replica, session.session_id, fingerprint, index
            )
            try:
                assert session.key is not None  # a live session holds its key
                with session.key.open(ciphertext, info) as plain:
                    share = shamir.Share.from_bytes(plain.view())
            except KeyquorumError as e:
                raise type(e)(f"{name}: {e}") from None
            # 5. split and commitment
            try:
                if share.split_id != st.split.split_id:
                    raise ShareError(
                        "share belongs to another split (a past roster or another deployment)"
                    )
                if share.index != index:
                    raise ShareError(f"share carries index {share.index}, not {index}")
                shamir.verify_share(share, st.split)
            except ShareError as e:
                share.wipe()
                log.warning("unseal: refused share of %s: %s", name, e)
                raise ShareError(f"{name}: {e}", index=index) from None
            session.shares[fingerprint] = (share, digest, sig)
            log.info(
                "unseal: accepted share of %s (%d of %d)",
                name,
                len(session.shares),
                st.threshold,
            )
            if len(session.shares) < st.threshold:
                return Progress(len(session.shares), st.threshold, True, self._tree.size)
            return self._complete_unseal(session)

    def _complete_unseal(self, session: _UnsealSession) -> Progress:
        st = self._replayer.state
        shares = [s for s, _d, _g in session.shares.values()]
        master = shamir.combine(shares, st.split)
        try:
            self._append(
                UnsealPayload(
                    replica=self._replica,
                    session=session.session_id,
                    session_log_size=session.log_size,
                    split_id=st.split.split_id,
                    shares=tuple(
                        UnsealShare(fp, share.index, digest, sig.to_bytes())
                        for fp, (share, digest, sig) in sorted(session.shares.items())
                    ),
                )
            )
        except BaseException:
            master.wipe()
            raise
        finally:
            session.wipe()
            self._session = None
        self._master = master
        log.info("unsealed")
        self._notify_seal_state()
        self._restore_activations()
        return Progress(st.threshold, st.threshold, False, self._tree.size)

    # -- seal ----------------------------------------------------------------

    def seal(
        self,
        fingerprint: str,
        requested_at: int,
        reason: str,
        signature: bytes,
        *,
        replica: str | None = None,
    ) -> int:
        """Seal on one custodian's signed request: log it, then wipe every key.

        `replica` is the replica the request names: this one (the default),
        `"*"` for every replica of the deployment, or another replica's
        name. Other replicas wipe their keys when they follow the entry
        (hsm/follower.py, within its documented bound).
        """
        target = replica if replica else self._replica
        with self._lock:
            self._catch_up_locked()
            st = self._require_initialized()
            now = self._clock()
            if abs(now - requested_at) > self._limits.seal_request_skew_seconds:
                raise ExpiredError(
                    "seal request time is too far from the daemon's clock "
                    f"(more than {self._limits.seal_request_skew_seconds} s)"
                )
            sig = HybridSignature.from_bytes(signature)
            # Single use is a rule of the log (replay), so it holds across
            # restarts and replicas; checked here first for a clear answer.
            if seal_request_digest(sig.to_bytes()) in st.seal_requests:
                raise ReplayError("this seal request was already used")
            custodian = st.epoch.credential(fingerprint)
            statement = statements.seal_statement(
                deployment=st.deployment,
                custodian=fingerprint,
                replica=target,
                reason=reason,
                requested_at=requested_at,
            )
            statements.verify_statement(
                statement, statements.SignedStatement(fingerprint, sig), custodian.verify_key
            )
            # Wipe first: sealing must not depend on the store being writable.
            if target in (self._replica, SealPayload.ALL_REPLICAS):
                self._wipe_keys()
            self._append(
                SealPayload(
                    replica=target,
                    custodian=fingerprint,
                    reason=reason,
                    requested_at=requested_at,
                    signature=sig.to_bytes(),
                ),
                # A custodian's clock may run a little ahead of ours.
                not_before=requested_at,
            )
            log.info("sealed by custodian %s: %s", custodian.name, reason)
            return self._tree.size

    def seal_for_shutdown(self, reason: str = "daemon shutdown") -> None:
        """Stop the sweeper and follower, wipe keys and, if unsealed, log that the daemon
        sealed itself."""
        if self._follower is not None:
            self._follower.stop()
        self._stop_sweeper.set()
        sweeper = self._sweeper
        if sweeper is not None and sweeper is not threading.current_thread():
            sweeper.join(timeout=10)
        with self._lock:
            was_unsealed = not self.sealed
            self._wipe_keys()
            if was_unsealed:
                try:
                    self._append(
                        SealPayload(
                            replica=self._replica,
                            custodian=None,
                            reason=reason,
                            requested_at=self._now(),
                            signature=None,
                        )
                    )
                except KeyquorumError as e:
                    log.error("could not log the shutdown seal: %s", e)
                log.info("sealed: %s", reason)

    def _wipe_keys(self) -> None:
        self._keyring.wipe_all()
        if self._master is not None:
            self._master.wipe()
            self._master = None
            self._notify_seal_state()
        if self._session is not None:
            self._session.wipe()
            self._session = None

    def add_seal_observer(self, observer: Callable[[bool], None]) -> None:
        """Call `observer(sealed)` now and after every unseal and seal.

        For the edge (gRPC health, the data plane's seal epoch). Observers
        run under the daemon's lock, after the keys are wiped or the master
        key is in place, so they must be quick and must not call back in.
        """
        with self._lock:
            self._seal_observers.append(observer)
            observer(self.sealed)

    def _notify_seal_state(self) -> None:
        for observer in self._seal_observers:
            try:
                observer(self.sealed)
            except Exception:
                log.exception("seal observer failed")

    def master_key_buffer_for_test(self) -> bytearray | None:
        """The master key's buffer, so tests can check that seal zeroes it."""
        return self._master.buffer_for_test() if self._master is not None else None

    # -- proposals -------------------------------------------------------------

    def propose(
        self,
        operation_name: str,
        parameters: Sequence[tuple[str, str]],
        *,
        expires_in: int | None,
        proposer: str,
        public_credentials: Sequence[bytes] = (),
    ) -> ProposalView:
        """Log a proposal for a quorum operation; it gets a fresh random id.

        Parameters arrive as text; `duration_seconds`, `threshold` and
        `version` are decimal integers, and a grant's `backend` may be given
        as its certificate identity `keyquorum://backend/<name>` (the log
        holds the name). Proposing changes nothing but the log: the
        operation runs only when enough custodians approve it. For
        `change-roster`, `public_credentials` are the public files of the
        custodians the roster adds (the log names them by fingerprint).
        """
        with self._lock:
            self._catch_up_locked()
            self._sweep_locked()
            st = self._require_initialized()
            policy = self._policy(st)
            try:
                name = operation(operation_name).name
            except DeserializationError as e:
                raise InvalidInputError(str(e)) from None
            params = check_parameters(name, _typed_parameters(parameters), policy)
            ttl = policy.proposal_ttl_seconds if expires_in is None else expires_in
            if not 1 <= ttl <= policy.proposal_ttl_seconds:
                raise InvalidInputError(
                    f"a proposal expires 1 to {policy.proposal_ttl_seconds} s after it is "
                    f"made (the policy's proposal_ttl_seconds), got {ttl}"
                )
            if not proposer or len(proposer) > MAX_TEXT or not proposer.isprintable():
                raise InvalidInputError(f"proposer must be printable text of 1..{MAX_TEXT} chars")
            if name == "change-roster":
                self._offer_credentials(public_credentials, str(dict(params)["roster"]))
                self._roster_credentials(str(dict(params)["roster"]))
            elif public_credentials:
                raise InvalidInputError("public credentials belong to a change-roster proposal")
            now = self._now()
            payload = ProposalPayload(
                id=self._random(PROPOSAL_ID_SIZE),
                operation=name,
                parameters=params,
                expires_at=now + ttl,
                proposer=proposer,
            )
            try:
                self._append_retrying([payload], time=now)
            except LogIntegrityError as e:
                raise _refusal(e, StateError) from None
            log.info("proposal %s: %s %s", payload.id.hex(), name, dict(params))
            return self._proposal_view(self._replayer.state.proposals[payload.id], now)

    def list_proposals(self, *, include_closed: bool = False) -> list[ProposalView]:
        """Proposals open for verdicts (or every proposal), oldest first."""
        with self._lock:
            self._catch_up_locked()
            self._sweep_locked()
            st = self._require_initialized()
            now = self._now()
            return [
                self._proposal_view(p, now)
                for p in st.proposals.values()
                if include_closed or p.is_pending(now)
            ]

    def get_proposal(self, proposal_id: bytes) -> ProposalView:
        """One proposal, with the exact approve and refuse statements."""
        with self._lock:
            self._catch_up_locked()
            self._sweep_locked()
            st = self._require_initialized()
            return self._proposal_view(self._find_proposal(st, proposal_id), self._now())

    def approve(
        self,
        proposal_id: bytes,
        fingerprint: str,
        signature: bytes,
        *,
        public_credentials: Sequence[bytes] = (),
    ) -> VerdictView:
        """Count one custodian's signed approval; execute at the number needed.

        The approval that makes the operation due is appended in one store
        transaction with the execution (and any new shred salt), then the
        operation takes effect. Refused, with nothing logged: see `_check_verdict`;
        and, for an operation that needs the master key, a sealed daemon.
        """
        return self._redeciding(
            lambda: self._verdict(
                "approve", proposal_id, fingerprint, signature, public_credentials
            )
        )

    def refuse(self, proposal_id: bytes, fingerprint: str, signature: bytes) -> VerdictView:
        """Log one custodian's signed refusal (it counts against nothing, but is on record)."""
        return self._redeciding(
            lambda: self._verdict("refuse", proposal_id, fingerprint, signature, ())
        )

    @staticmethod
    def _redeciding(decide: Callable[[], VerdictView]) -> VerdictView:
        """Run a verdict; if another replica appended first, decide it again.

        Whether an approval executes depends on the approvals already in the
        log, so after a conflict the whole decision runs again, starting
        from the log as it now is: two replicas racing the k-th approval give one
        execution, and the loser answers as the log now stands (already
        executed, or this custodian's approval already counted).
        """
        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                return decide()
            except AppendConflictError as e:
                _after_conflict(attempt, e)
        raise AssertionError("unreachable")  # pragma: no cover

    def _verdict(
        self,
        verdict: str,
        proposal_id: bytes,
        fingerprint: str,
        signature: bytes,
        public_credentials: Sequence[bytes],
    ) -> VerdictView:
        with self._lock:
            self._catch_up_locked()
            self._sweep_locked()
            st = self._require_initialized()
            now = self._now()
            proposal, sig = self._check_verdict(
                st, verdict, proposal_id, fingerprint, signature, now
            )
            if verdict == "refuse":
                refusal = RefusalPayload(proposal.id, fingerprint, sig.to_bytes())
                self._append_verdict([refusal], now)
                log.info("proposal %s refused by %s", proposal.id.hex(), fingerprint[:16])
                return self._verdict_view(proposal.id, now, executed=False)
            approval = ApprovalPayload(proposal.id, fingerprint, sig.to_bytes())
            needed = operation(proposal.operation).required_approvals(st.threshold)
            if len(proposal.approvals) + 1 < needed:
                self._append_verdict([approval], now)
                log.info(
                    "proposal %s approved by %s (%d of %d)",
                    proposal.id.hex(),
                    fingerprint[:16],
                    len(proposal.approvals) + 1,
                    needed,
                )
                return self._verdict_view(proposal.id, now, executed=False)
            if proposal.operation == "change-roster":
                roster = str(dict(proposal.parameters)["roster"])
                self._offer_credentials(public_credentials, roster)
            plan = self._plan(st, proposal, now)
            execution = ExecutionPayload(proposal.id, proposal.operation, plan.result)
            try:
                self._append_verdict([approval, execution], now, plan.shred_salts)
            except BaseException:
                plan.on_abort()
                raise
            plan.on_commit()
            log.info("proposal %s executed: %s", proposal.id.hex(), proposal.operation)
            return self._verdict_view(proposal.id, now, executed=True)

    def _check_verdict(
        self,
        st: LogState,
        verdict: str,
        proposal_id: bytes,
        fingerprint: str,
        signature: bytes,
        now: int,
    ) -> tuple[Proposal, HybridSignature]:
        """The checks of one verdict, in order, before anything is logged.

        1. the proposal exists (InvalidInputError), is pending (StateError:
           executed, or cancelled by a roster change) and unexpired
           (ExpiredError);
        2. the signer is on the roster in force (NotOnRosterError: never a
           custodian, or removed by a roster change);
        3. the signer gave no verdict on it before (ReplayError);
        4. the signature verifies over this proposal's approve (or refuse)
           statement, rebuilt here from the log (SignatureError: forged, or
           made for another proposal, or for the other verdict).
        Replay repeats every one of these when the entry is appended.
        """
        # 1. The proposal.
        proposal = self._find_proposal(st, proposal_id)
        pid = proposal.id.hex()
        if proposal.status == "executed":
            raise StateError(f"proposal {pid} was already executed")
        if proposal.status == "cancelled":
            raise StateError(f"proposal {pid} was cancelled by a roster change")
        if now >= proposal.expires_at:
            raise ExpiredError(
                f"proposal {pid} expired at {statements.render_time(proposal.expires_at)}"
            )
        # 2. On the roster in force.
        credential = st.epoch.credential(fingerprint)
        who = f"custodian {credential.name} ({fingerprint[:16]})"
        # 3. Once per custodian.
        if fingerprint in proposal.approvals:
            raise ReplayError(f"{who} already approved proposal {pid}")
        if fingerprint in proposal.refusals:
            raise ReplayError(f"{who} already refused proposal {pid}")
        # 4. The signature over exactly this proposal's statement.
        sig = HybridSignature.from_bytes(signature)
        signed = statements.SignedStatement(fingerprint, sig)
        request = request_for(proposal, st.deployment)
        if verdict == "approve":
            statements.verify_approvals(request, [signed], {fingerprint: credential}, 1, now)
        else:
            statements.verify_statement(request.statement("refuse"), signed, credential)
        return proposal, sig

    def _append_verdict(
        self, payloads: Sequence[Payload], now: int, shred_salts: Sequence[ShredSalt] = ()
    ) -> None:
        try:
            self._append_all(payloads, time=now, shred_salts=shred_salts)
        except LogIntegrityError as e:
            raise _refusal(e, StateError) from None

    # -- executions ------------------------------------------------------------

    def _plan(self, st: LogState, proposal: Proposal, now: int) -> _Plan:
        """Prepare the execution of `proposal` at `now`: its result and effects.

        Nothing is logged or changed here; secrets made for the plan are
        wiped by `on_abort` if the append fails. Needs the master key for
        the operations in NEEDS_MASTER_KEY (SealedError otherwise).
        """
        name = proposal.operation
        params = dict(proposal.parameters)
        tenant = str(params.get("tenant", ""))
        if name in NEEDS_MASTER_KEY and self._master is None:
            raise SealedError(
                f"{name} needs the master key: unseal the service first "
                "(this approval was not logged)"
            )
        if name in ("create-tenant", "rotate-tenant"):
            return self._plan_new_version(st, name, tenant)
        if name == "activate-tenant":
            record = self._usable_tenant(st, tenant)
            keys = self._unwrap_versions(record, self._require_unsealed(), enabled_only=True)
            until = now + int(params["duration_seconds"])

            def activate() -> None:
                self._keyring.activate(tenant, until, keys)

            def wipe() -> None:
                for key in keys.values():
                    key.wipe()

            return _Plan(Activated(tenant, until), on_commit=activate, on_abort=wipe)
        if name in ("deactivate-tenant", "destroy-tenant"):

            def deactivate() -> None:
                self._keyring.deactivate(tenant)

            if name == "deactivate-tenant":
                return _Plan(TenantNamed(tenant), on_commit=deactivate)
            destroy_at = now + self._policy(st).destroy_wait_seconds
            return _Plan(DestroyScheduled(tenant, destroy_at), on_commit=deactivate)
        if name == "disable-version":
            version = int(params["version"])

            def drop() -> None:
                self._keyring.drop_version(tenant, version)

            return _Plan(VersionDisabled(tenant, version), on_commit=drop)
        if name == "cancel-destroy":
            return _Plan(TenantNamed(tenant))
        if name in ("grant", "revoke"):
            return _Plan(GrantChanged(str(params["backend"]), tenant))
        return self._plan_roster_change(st, int(params["threshold"]), str(params["roster"]))

    def _plan_new_version(self, st: LogState, name: str, tenant: str) -> _Plan:
        """create-tenant (version 1) or rotate-tenant (the next version).

        A fresh 256-bit key and a fresh 32-byte shred salt; the key is
        wrapped under the master key, the salt goes to the store's erasable
        table in the same transaction, its SHA-256 into the log.
        """
        master = self._require_unsealed()
        if name == "create-tenant":
            version = 1
        else:
            version = len(self._usable_tenant(st, tenant).versions) + 1
        salt = self._random(tenant_keys.SHRED_SALT_SIZE)
        key = SecretBytes(self._random(tenant_keys.TENANT_KEY_SIZE), label="new tenant key")
        try:
            wrapped = tenant_keys.wrap(
                master, salt, tenant, version, key, nonce=self._random(NONCE_SIZE)
            )
        except BaseException:
            key.wipe()
            raise
        result = NewVersion(tenant, version, wrapped, tenant_keys.shred_salt_digest(salt))

        def keep_if_active() -> None:
            # A rotation of an active tenant: the new version is usable at once.
            self._keyring.add_version(tenant, version, key)

        return _Plan(
            result,
            shred_salts=((tenant, version, salt),),
            on_commit=keep_if_active if name == "rotate-tenant" else key.wipe,
            on_abort=key.wipe,
        )

    def _plan_roster_change(self, st: LogState, threshold: int, roster_param: str) -> _Plan:
        """change-roster: a new master key, split to the new roster, every key re-wrapped.

        Every version of every tenant not destroyed is unwrapped under the
        current master key and wrapped again under the new one (a new KEK,
        the same shred salt, so the logged salt hash still binds it). After
        the commit the daemon holds the new master key; the old split's
        shares reconstruct only the old master key, which opens nothing the
        log holds any longer.
        """
        old_master = self._require_unsealed()
        roster = self._roster_credentials(roster_param)
        deployment = st.deployment
        new_master = SecretBytes(self._random(MASTER_KEY_SIZE), label="master key")
        try:
            commitments, encrypted = self._split_to(new_master, deployment, threshold, roster)
            rewrapped = []
            for record in sorted(st.tenants.values(), key=lambda t: t.name):
                if record.destroyed:
                    continue
                keys = self._unwrap_versions(record, old_master, enabled_only=False)
                try:
                    for v in record.versions:
                        salt = self._salt(record, v.version)
                        wrapped = tenant_keys.wrap(
                            new_master,
                            salt,
                            record.name,
                            v.version,
                            keys[v.version],
                            nonce=self._random(NONCE_SIZE),
                        )
                        rewrapped.append(Rewrapped(record.name, v.version, wrapped))
                finally:
                    for key in keys.values():
                        key.wipe()
        except BaseException:
            new_master.wipe()
            raise
        result = RosterChanged(
            threshold, tuple(roster), commitments, tuple(encrypted), tuple(rewrapped)
        )

        def switch() -> None:
            old_master.wipe()
            self._master = new_master
            log.info(
                "roster changed: %d-of-%d, split %s; the master key is new",
                threshold,
                len(roster),
                commitments.split_id.hex()[:8],
            )

        return _Plan(result, on_commit=switch, on_abort=new_master.wipe)

    def _offer_credentials(self, public_credentials: Sequence[bytes], roster_param: str) -> None:
        """Remember public credentials that a change-roster proposal names."""
        listed = set(roster_param.split(","))
        for i, data in enumerate(public_credentials):
            if len(data) > self._limits.max_credential_bytes:
                raise InvalidInputError(f"public credential {i + 1} is too large")
            credential = PublicCredential.from_bytes(data)
            if credential.fingerprint not in listed:
                raise InvalidInputError(
                    f"public credential of {credential.name} ({credential.fingerprint[:16]}) "
                    "is not on the proposed roster"
                )
            self._offered[credential.fingerprint] = credential

    def _roster_credentials(self, roster_param: str) -> list[PublicCredential]:
        """The credentials of a proposed roster, in share-index order.

        Custodians of any roster in the log are known; new ones must have
        been offered with the proposal (or with the executing approval,
        after a restart).
        """
        known = {c.fingerprint: c for epoch in self._replayer.state.rosters for c in epoch.roster}
        known.update(self._offered)
        roster = []
        for fingerprint in roster_param.split(","):
            credential = known.get(fingerprint)
            if credential is None:
                raise StateError(
                    f"the public credential of custodian {fingerprint[:16]} is unknown: "
                    "give their public file with the proposal or the approval"
                )
            roster.append(credential)
        if len({c.name for c in roster}) != len(roster):
            raise InvalidInputError("two custodians of the proposed roster have the same name")
        return roster

    # -- tenant keys -----------------------------------------------------------

    def _usable_tenant(self, st: LogState, name: str) -> Tenant:
        record = st.tenants.get(name)
        if record is None:
            raise StateError(f"unknown tenant {name!r}")
        if record.destroyed:
            raise StateError(f"tenant {name!r} was destroyed")
        if record.destroy_at is not None:
            raise StateError(f"tenant {name!r} is scheduled for destruction")
        return record

    def _salt(self, record: Tenant, version: int) -> bytes:
        logged = record.versions[version - 1].shred_salt_sha256
        stored = self._store.get_shred_salt(record.name, version)
        return tenant_keys.check_salt(stored, logged, record.name, version)

    def _unwrap_versions(
        self, record: Tenant, master: SecretBytes, *, enabled_only: bool
    ) -> dict[int, SecretBytes]:
        """Unwrap a tenant's versions (all, or those not disabled); all or none."""
        keys: dict[int, SecretBytes] = {}
        try:
            for v in record.versions:
                if enabled_only and v.disabled_seq is not None:
                    continue
                salt = self._salt(record, v.version)
                keys[v.version] = tenant_keys.unwrap(
                    master, salt, record.name, v.version, v.wrapped_key
                )
        except BaseException:
            for key in keys.values():
                key.wipe()
            raise
        return keys

    def _restore_activations(self) -> None:
        """At unseal: unwrap the tenants whose logged activation is still open."""
        master = self._master
        if master is None:
            return
        now = self._now()
        for record in self._replayer.state.tenants.values():
            if not record.is_active(now) or record.active_until is None:
                continue
            try:
                keys = self._unwrap_versions(record, master, enabled_only=True)
            except KeyquorumError as e:
                log.error("activation of tenant %s not restored: %s", record.name, e)
                continue
            self._keyring.activate(record.name, record.active_until, keys)
            log.info("activation of tenant %s restored until %d", record.name, record.active_until)

    def tenant_key(self, tenant: str, version: int | None = None) -> tuple[int, TenantKey]:
        """For the data plane: an active tenant's key (the current version by default).

        Returns (version, a copy of the key); the caller wipes the copy
        (`with` block) as soon as it is done. Raises SealedError when
        sealed, StateError when the tenant is unknown, destroyed, being
        destroyed, not active (never activated, expired, deactivated) or the
        version does not exist or is disabled.
        """
        with self._lock:
            number, now = self._usable_locked(tenant, version)
            return number, self._keyring.key(tenant, number, now)

    def data_key(
        self, backend: str, tenant: str, version: int | None = None
    ) -> tuple[int, HeldKey]:
        """For the data plane: `backend`'s grant of `tenant`, then its key, in one lock.

        `backend` is a backend's name, which the data plane read once from its
        verified certificate's URI. Refusals in the data plane's order
        (dataplane.py): not granted, AccessDeniedError (also for a tenant that
        does not exist, so names cannot be probed); a `version` the tenant
        never had, DeserializationError (only a forged ciphertext header names
        one); then `tenant_key`'s.
        Returns the version number and the keyring's held version, not a copy
        (`TenantKeyring.held`): its cipher refuses use once a seal or the
        activation's end wiped the version.
        """
        with self._lock:
            if not self._replayer.state.granted(backend, tenant):
                raise AccessDeniedError(f"backend {backend} is not granted tenant {tenant!r}")
            if version is not None:
                record = self._replayer.state.tenants.get(tenant)
                if record is not None and version > len(record.versions):
                    raise DeserializationError(
                        f"the ciphertext names key version {version} of tenant "
                        f"{tenant!r}, which has {len(record.versions)}"
                    )
            number, now = self._usable_locked(tenant, version)
            return number, self._keyring.held(tenant, number, now)

    def _usable_locked(self, tenant: str, version: int | None) -> tuple[int, int]:
        """The version number (the current one for None) if usable now, and now."""
        now = self._now()
        # Sweep only when an activation may have ended or a destroy wait be
        # over; the checks below refuse an ended activation either way.
        if self._sweep_due(now):
            self._sweep_locked()
            now = self._now()  # a shred appended an entry, which may move the log's time
        self._require_unsealed()
        record = self._replayer.state.tenants.get(tenant)
        if record is None:
            raise StateError(f"unknown tenant {tenant!r}")
        if record.destroyed:
            raise StateError(f"tenant {tenant!r} was destroyed")
        if not record.is_active(now):
            raise StateError(f"tenant {tenant!r} is not active")
        number = record.current.version if version is None else version
        held = record.version(number)
        if held is None:
            raise StateError(f"tenant {tenant!r} has no version {number}")
        if held.disabled_seq is not None:
            raise StateError(f"version {number} of tenant {tenant!r} is disabled")
        return number, now

    def tenants(self) -> list[TenantView]:
        """Every tenant the log knows, with whether its key is unwrapped here."""
        with self._lock:
            self._catch_up_locked()
            self._sweep_locked()
            st = self._require_initialized()
            now = self._now()
            unwrapped = self._keyring.active(now)
            return [
                TenantView(
                    name=t.name,
                    versions=len(t.versions),
                    disabled_versions=tuple(
                        v.version for v in t.versions if v.disabled_seq is not None
                    ),
                    active_until=t.active_until if t.is_active(now) else None,
                    unwrapped=t.name in unwrapped,
                    destroy_at=t.destroy_at,
                    destroyed=t.destroyed,
                    backends=tuple(sorted(b for b, name in st.grants if name == t.name)),
                )
                for t in sorted(st.tenants.values(), key=lambda t: t.name)
            ]

    def checkpoint_with_proof(self, first_size: int) -> tuple[str, list[bytes]]:
        """The signed checkpoint of the log as it is now, and a proof from `first_size`.

        For custodians' CLIs, which remember the last checkpoint they saw and
        refuse a log that does not extend it (cli/seen_checkpoints.py). The
        proof is RFC 9162 section 2.1.4's from `first_size` to the current
        size; it is empty when `first_size` is 0, equal to the size, or
        larger (the caller then sees a shorter log: a rollback). This
        replica catches up first, so a follower never looks rolled back.
        """
        if isinstance(first_size, bool) or not isinstance(first_size, int) or first_size < 0:
            raise InvalidInputError(f"first_size must be a non-negative int, got {first_size!r}")
        with self._lock:
            self._catch_up_locked()
            self._require_initialized()
            assert self._log_key is not None
            size = self._tree.size
            note = self._log_key.sign_checkpoint(size, self._tree.root())
            proof = self._tree.consistency_proof(first_size, size) if 0 < first_size < size else []
            return note, proof

    def tenant_key_buffers_for_test(self, tenant: str) -> list[bytearray]:
        """The buffers of a tenant's unwrapped keys, so tests can check wiping."""
        with self._lock:
            return self._keyring.buffers_for_test(tenant)

    def snapshot(self) -> tuple[LogState, list[bytes]]:
        """A copy of the state and every stored entry, read at one instant (for checks)."""
        with self._lock:
            return self._replayer.state.copy(), list(self._store.read_all())

    # -- the sweeper -----------------------------------------------------------

    def sweep(self) -> None:
        """Wipe ended activations and shred tenants whose destroy wait is over."""
        with self._lock:
            self._sweep_locked()

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop_sweeper.wait(interval):
            try:
                self.sweep()
            except Exception:
                log.exception("sweeper failed")

    def _track_destroy_deadlines(self) -> None:
        """Recompute `_next_shred`; called after every change of the log state."""
        self._next_shred = min(
            (
                t.destroy_at
                for t in self._replayer.state.tenants.values()
                if t.destroy_at is not None and not t.destroyed
            ),
            default=None,
        )

    def _sweep_due(self, now: int) -> bool:
        """Whether `_sweep_locked` could do anything at `now`.

        The keyring's `next_end` is never later than the earliest end of an
        activation it holds, and `_next_shred` is the earliest destroy
        deadline of the log state as it is now, so a sweep that would wipe
        or shred something is never skipped. A sweep run early (the bound
        of a tenant deactivated since) costs one walk and makes the bound
        exact again; a shred that failed stays due and is retried at the
        next call, as before.
        """
        for due in (self._keyring.next_end, self._next_shred):
            if due is not None and now >= due:
                return True
        return False

    def _sweep_locked(self) -> None:
        if not self.initialized:
            return
        now = self._now()
        for tenant in self._keyring.expire(now):
            log.info("activation of tenant %s ended: key wiped", tenant)
        for record in list(self._replayer.state.tenants.values()):
            if record.destroyed or record.destroy_at is None or now < record.destroy_at:
                continue
            try:
                self._append_all([ShredPayload(record.name)], time=now, erase_tenants=[record.name])
            except AppendConflictError:
                # Perhaps another replica shredded it: re-read, and the next
                # sweep decides again.
                self._catch_up_locked()
                continue
            except KeyquorumError as e:
                log.error("could not shred tenant %s: %s", record.name, e)
                continue
            self._keyring.deactivate(record.name)
            log.info("tenant %s shredded: its shred salts are erased", record.name)

    # -- views -----------------------------------------------------------------

    def _find_proposal(self, st: LogState, proposal_id: bytes) -> Proposal:
        if not isinstance(proposal_id, bytes) or len(proposal_id) != PROPOSAL_ID_SIZE:
            raise InvalidInputError(f"a proposal id is {PROPOSAL_ID_SIZE} bytes (32 hex digits)")
        proposal = st.proposals.get(proposal_id)
        if proposal is None:
            raise NotFoundError(f"unknown proposal {proposal_id.hex()}")
        return proposal

    def _proposal_view(self, p: Proposal, now: int) -> ProposalView:
        st = self._replayer.state
        request = request_for(p, st.deployment)
        status: str = p.status
        if status == "pending" and now >= p.expires_at:
            status = "expired"
        execution = next((e for e in st.executions if e.proposal == p.id), None)
        return ProposalView(
            id=p.id,
            deployment=st.deployment,
            operation=p.operation,
            parameters=p.parameters,
            log_position=p.log_position,
            proposed_at=p.time,
            expires_at=p.expires_at,
            proposer=p.proposer,
            status=status,
            required=operation(p.operation).required_approvals(st.threshold),
            approved_by=tuple(p.approvals),
            refused_by=tuple(p.refusals),
            approve_statement=request.statement("approve").render(),
            refuse_statement=request.statement("refuse").render(),
            executed_seq=None if execution is None else execution.seq,
            result=None if execution is None else execution.result.to_json(),
        )

    def _verdict_view(self, proposal_id: bytes, now: int, *, executed: bool) -> VerdictView:
        proposal = self._replayer.state.proposals[proposal_id]
        return VerdictView(self._proposal_view(proposal, now), executed, self._tree.size)

    @staticmethod
    def _policy(st: LogState) -> Policy:
        if st.policy is None:
            raise StateError("no ceremony yet: the log has no policy")
        return st.policy

    # -- helpers -------------------------------------------------------------

    def _require_initialized(self) -> LogState:
        st = self._replayer.state
        if not self.initialized:
            raise StateError("no ceremony yet: run `keyquorum ceremony init` first")
        return st

    def _require_unsealed(self) -> SecretBytes:
        if self._master is None:
            raise SealedError("the service is sealed")
        return self._master


def _after_conflict(attempt: int, error: AppendConflictError) -> None:
    """Between two decisions that lost the race for the log: pause, or give up.

    The pause is random and grows with the attempts, so two busy replicas
    do not keep colliding in step; the caller re-reads the log after it.
    After MAX_CONFLICT_RETRIES losses the caller gets UNAVAILABLE (a
    StorageError): transient, retry with a back-off, as gRPC means it.
    """
    if attempt + 1 >= MAX_CONFLICT_RETRIES:
        raise StorageError(
            f"the log is busy: {MAX_CONFLICT_RETRIES} appends by other replicas came first "
            f"({error}); try again"
        ) from error
    pause = min(CONFLICT_PAUSE_SECONDS, 0.0005 * 2**attempt)
    _time.sleep(random.uniform(0, pause))  # noqa: S311 (jitter, not a secret)


def origin_for(deployment: str) -> str:
    """The checkpoint origin (and log key name) of a deployment."""
    return f"keyquorum/{deployment}"


def _refusal(
    error: LogIntegrityError, default: type[KeyquorumError] = InvalidInputError
) -> KeyquorumError:
    """What replay said about a request the daemon was about to log.

    Replay speaks of log entries ("entry 7: ..."); to the caller it is a
    refused request, so the typed cause is returned when there is one, and
    `default` (InvalidInputError, or StateError where the request was well
    formed but the state does not allow it) when there is none.
    """
    cause = error.__cause__
    message = str(error).split(": ", 1)[-1]
    if isinstance(cause, KeyquorumError) and not isinstance(cause, LogIntegrityError):
        return type(cause)(message)
    return default(message)


def _typed_parameters(pairs: Sequence[tuple[str, str]]) -> Parameters:
    """Parameters as sent (text) to the types the log holds, sorted by key.

    The integer parameters must be plain decimal; a grant's backend may be
    its certificate identity `keyquorum://backend/<name>`, logged as <name>.
    Schema and policy checks follow in `operations.check_parameters`.
    """
    out: dict[str, str | int] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInputError(f"parameter {key!r} is given twice")
        if key in INTEGER_PARAMETERS:
            if not _DECIMAL.fullmatch(value):
                raise InvalidInputError(f"parameter {key!r} must be a decimal integer")
            out[key] = int(value)
        elif key == "backend" and value.startswith("keyquorum://"):
            identity = ClientIdentity.parse(value)
            if identity.role != "backend":
                raise InvalidInputError(f"{value} is not a backend identity")
            out[key] = identity.name
        else:
            out[key] = value
    return tuple(sorted(out.items()))
