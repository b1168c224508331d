"""`Daemon`: one replica of the key-custody service over one store, from its parts.

It knows nothing of gRPC (hsm/services/ are thin wrappers) and decides
nothing about validity on its own: every governance event is an entry
checked by replay (quorum/replay.py), so its state is always the replay
of its log. The parts, each in its own module:

- journal.py: load, check, append, follow, checkpoint (the log);
- custody.py: the master key, the tenant keyring, the seal generation,
  and the snapshot the data plane reads;
- ceremony.py, unseal.py, seal.py: the key's life;
- governance.py, executions.py: proposals, verdicts, what executions do;
- keys.py: tenant keys unwrapped, restored, followed, swept;
- views.py: what callers are shown; follower.py: the replicas' follower.

Two planes: governance holds the governance lock (one RLock) for each
decision, across store I/O; the data plane (hsm/dataplane/) only reads
`data_plane_snapshot()`, a reference published after every applied entry
and every key change, so it never waits for governance.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from keyquorum.hsm.daemon import follower, restoring, witnessing
from keyquorum.hsm.daemon.ceremony import Ceremony, CeremonyGate, EncryptedShareView
from keyquorum.hsm.daemon.context import Clock, RandomBytes, Replica
from keyquorum.hsm.daemon.custody import KeyCustody
from keyquorum.hsm.daemon.executions import Executions
from keyquorum.hsm.daemon.governance import Governance
from keyquorum.hsm.daemon.journal import Journal
from keyquorum.hsm.daemon.keys import SWEEP_SECONDS, Sweeper, TenantKeys
from keyquorum.hsm.daemon.seal import Seal
from keyquorum.hsm.daemon.tenant_keys import TenantKey
from keyquorum.hsm.daemon.unseal import Progress, SessionView, Unseal
from keyquorum.hsm.daemon.views import (
    EndedSessionView,
    LogExtensionView,
    ProposalView,
    ProvenEntry,
    StatusView,
    TenantView,
    VerdictView,
    status_view,
    tenant_views,
)
from keyquorum.hsm.dataplane.snapshot import DataPlaneSnapshot, HeldKey
from keyquorum.hsm.stores.base import Store
from keyquorum.quorum.checkpoint import unverified_size
from keyquorum.quorum.errors import InvalidInputError, StateError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.log import Entry, HandoverPayload
from keyquorum.quorum.operations import typed_parameters
from keyquorum.quorum.replay import LogState, WitnessPolicy
from keyquorum.quorum.secret import SecretBytes

log = logging.getLogger(__name__)


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
        ceremony: CeremonyGate | None = None,
    ) -> None:
        custody = KeyCustody(limits, lambda: journal.state)
        journal = Journal(store, data_dir, on_failure=self._on_failure)
        self._r = r = Replica(
            name=replica,
            store=store,
            data_dir=data_dir,
            limits=limits,
            clock=clock,
            journal=journal,
            custody=custody,
            random=random_bytes,
        )
        self._keys = TenantKeys(r)
        self._ceremony = Ceremony(r, ceremony)
        self._unseal = Unseal(r, on_unsealed=self._keys.restore_activations)
        self._seal = Seal(r, self._unseal)
        self._executions = Executions(r, self._keys)
        self._governance = Governance(r, self._keys, self._executions)
        journal.add_listener(self._on_applied)
        custody.publish()
        self._follower: follower.Follower | None = None
        if follow_seconds is not None:
            self._follower = follower.Follower(
                self,
                wait_for_append=getattr(store, "wait_for_append", None),
                size=store.size,
                poll_seconds=follow_seconds,
            )
            self._follower.start()
        self._sweeper = Sweeper(self.sweep, sweep_seconds) if sweep_seconds is not None else None

    def _on_applied(self, entries: Sequence[Entry], followed: bool) -> None:
        """After every change of the log state: act on other replicas' entries, republish."""
        if followed:
            for entry in entries:
                self._keys.act(entry)
        self._r.custody.publish()

    def _on_failure(self, _reason: str) -> None:
        """A durable write failed after commit: this replica seals itself (fail closed)."""
        self._r.custody.seal()
        self._unseal.discard()

    # -- state -------------------------------------------------------------------------

    @property
    def log_size(self) -> int:
        """Entries applied so far (the follower compares it with the store's size)."""
        return self._r.journal.size

    @property
    def initialized(self) -> bool:
        return self._r.journal.initialized

    @property
    def state(self) -> LogState:
        return self._r.journal.state

    @property
    def sealed(self) -> bool:
        return self._r.custody.sealed

    @property
    def clock(self) -> Clock:
        return self._r.clock

    def now(self) -> int:
        """The daemon's time: its clock, never before the log's last entry."""
        return self._r.now()

    def data_plane_snapshot(self) -> DataPlaneSnapshot:
        """What the data plane reads (a reference; no lock)."""
        return self._r.custody.data_plane_snapshot()

    def catch_up(self) -> int:
        """Apply entries other replicas appended; how many (hsm/daemon/follower.py)."""
        with self._r.lock:
            return self._r.journal.catch_up()

    def status(self) -> StatusView:
        """Sealed or not, the roster, unseal progress, the log's size and checkpoint.

        Status never waits for governance: a custodian about to seal asks
        for it first. When the governance lock is free this replica first
        catches up and sweeps; when a decision holds it, status answers from
        the state published last (at most one decision old).
        """
        r = self._r
        if r.lock.acquire(blocking=False):
            try:
                r.journal.catch_up()
                self._keys.sweep()
            finally:
                r.lock.release()
        session, ended = self._unseal.sessions()
        return status_view(
            r.journal.state,
            sealed=r.custody.sealed,
            unseal_progress=0 if session is None else len(session.submitted),
            checkpoint=r.journal.latest_checkpoint(),
            replica=r.name,
            unseal_session=session,
            previous_unseal_session=ended,
        )

    # -- the key's life ----------------------------------------------------------------

    def init_ceremony(
        self,
        deployment: str,
        threshold: int,
        public_credentials: Sequence[bytes],
        *,
        code: str = "",
    ) -> StatusView:
        """Create and split the master key, log the genesis, forget the key.

        Only for the holder of the one-time `code` (or the roster the
        daemon was started with: hsm/daemon/ceremony.py's `CeremonyGate`).
        """
        self._ceremony.init(deployment, threshold, public_credentials, code=code)
        return self.status()

    def encrypted_share(self, fingerprint: str) -> EncryptedShareView:
        return self._ceremony.encrypted_share(fingerprint)

    def confirm_share(
        self, fingerprint: str, split_id: bytes, index: int, signature: bytes
    ) -> tuple[StatusView, int]:
        """Log a custodian's signed acknowledgement that their share checks out;
        the status after, and the seq of the confirmation."""
        seq = self._ceremony.confirm(fingerprint, split_id, index, signature)
        return self.status(), seq

    def open_unseal_session(self) -> SessionView:
        self._refuse_while_restore_pending()
        return self._unseal.open()

    def submit_share(
        self, session_id: bytes, fingerprint: str, index: int, ciphertext: bytes, signature: bytes
    ) -> Progress:
        self._refuse_while_restore_pending()
        return self._unseal.submit(session_id, fingerprint, index, ciphertext, signature)

    # -- handover (SIGUSR2, hsm/upgrade.py) ---------------------------------------------

    def custody_for_handover(self) -> KeyCustody:
        """The key custody, for the predecessor's side of a handover only."""
        return self._r.custody

    def governance_lock(self) -> object:
        """The governance lock: a predecessor holds it so that it appends nothing more."""
        return self._r.lock

    def adopt_master(self, master: SecretBytes) -> None:
        """Hold the master key a predecessor handed over; restore the activations in force.

        No unseal entry: the unseal that made this replica unsealed is in the
        log already, and `record_handover` logs the move.
        """
        custody = self._r.custody
        custody.install_master(master, custody.generation)
        self._keys.restore_activations()

    def record_handover(self, from_pid: int, from_host: str) -> int:
        """Log that this process took `from_pid`'s unsealed state; the entry's seq."""
        import socket

        r = self._r
        with r.lock:
            r.journal.append_retrying(
                [HandoverPayload(r.name, from_pid, from_host, os.getpid(), socket.gethostname())],
                time=r.now(),
            )
            return r.journal.size - 1

    def reset_unseal_session(
        self, session_id: bytes, fingerprint: str, requested_at: int, signature: bytes
    ) -> tuple[int, EndedSessionView]:
        """Discard the open session's shares on a custodian's signed request (unseal.py)."""
        return self._unseal.reset(session_id, fingerprint, requested_at, signature)

    def pending_restore(self) -> restoring.PendingRestore | None:
        """A restore behind a published checkpoint awaiting approve-restore (restoring.py)."""
        return restoring.load(self._r.data_dir)

    def _refuse_while_restore_pending(self) -> None:
        pending = self.pending_restore()
        if pending is not None:
            pending.require_approving("unseal", {})

    def seal(
        self,
        fingerprint: str,
        requested_at: int,
        reason: str,
        signature: bytes,
        *,
        replica: str | None = None,
    ) -> int:
        """Seal on one custodian's signed request (hsm/daemon/seal.py); the seal's seq."""
        return self._seal.by_custodian(
            fingerprint, requested_at, reason, signature, replica=replica
        )

    def seal_for_shutdown(self, reason: str = "daemon shutdown") -> None:
        """Stop the follower and the sweeper, wipe the keys, log the daemon's own seal."""
        if self._follower is not None:
            self._follower.stop()
        if self._sweeper is not None:
            self._sweeper.stop()
        self._seal.for_shutdown(reason)

    def add_publish_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every new data-plane snapshot (hsm/daemon/custody.py)."""
        self._r.custody.add_publish_listener(listener)

    def add_seal_observer(self, observer: Callable[[bool], None]) -> None:
        """Call `observer(sealed)` now and after every unseal and seal (gRPC health)."""
        self._r.custody.add_observer(observer)

    # -- proposals ---------------------------------------------------------------------

    def propose(
        self,
        operation_name: str,
        parameters: Sequence[tuple[str, str]],
        *,
        proposal_id: bytes,
        expires_at: int,
        proposer: str,
        signature: bytes,
        public_credentials: Sequence[bytes] = (),
    ) -> ProposalView:
        """Log a proposal signed by a custodian or a registered proposer (governance.py).

        While a restore awaits approval (restoring.py), only its approve-restore.
        """
        pending = self.pending_restore()
        if pending is not None or operation_name == "approve-restore":
            try:
                typed = dict(typed_parameters(list(parameters)))
            except InvalidInputError:
                typed = {}
            if pending is None:
                raise StateError(
                    "no restore awaits approval on this replica: approve-restore follows "
                    "`keyquorum admin restore --abandon-checkpoint` only"
                )
            pending.require_approving(operation_name, typed)
        return self._governance.propose(
            operation_name,
            parameters,
            proposal_id=proposal_id,
            expires_at=expires_at,
            proposer=proposer,
            signature=signature,
            public_credentials=public_credentials,
        )

    def list_proposals(self, *, include_closed: bool = False) -> list[ProposalView]:
        return self._governance.proposals(include_closed=include_closed)

    def get_proposal(self, proposal_id: bytes) -> ProposalView:
        return self._governance.proposal(proposal_id)

    def approve(
        self,
        proposal_id: bytes,
        fingerprint: str,
        signature: bytes,
        *,
        public_credentials: Sequence[bytes] = (),
    ) -> VerdictView:
        """Count one custodian's signed approval; execute at the number needed."""
        return self._governance.verdict(
            "approve", proposal_id, fingerprint, signature, public_credentials
        )

    def refuse(self, proposal_id: bytes, fingerprint: str, signature: bytes) -> VerdictView:
        """Log one custodian's signed refusal (it counts against nothing, but is on record)."""
        return self._governance.verdict("refuse", proposal_id, fingerprint, signature)

    # -- tenant keys -------------------------------------------------------------------

    def data_key(
        self, backend: str, tenant: str, version: int | None = None
    ) -> tuple[int, HeldKey]:
        """The data plane's steps 1 and 2 on the published snapshot (no lock)."""
        return self.data_plane_snapshot().key_for(backend, tenant, version, self.now())

    def tenant_key(self, tenant: str, version: int | None = None) -> tuple[int, TenantKey]:
        """An active tenant's key (the current version by default): a copy the caller wipes."""
        now = self.now()
        number, _held = self.data_plane_snapshot().usable(tenant, version, now)
        return number, self._r.custody.tenant_key(tenant, number, now)

    def tenants(self) -> list[TenantView]:
        """Every tenant the log knows, with whether its key is unwrapped here."""
        r = self._r
        with r.lock:
            r.journal.catch_up()
            self._keys.sweep()
            st = r.initialized_state()
            now = r.now()
            return tenant_views(st, r.custody.unwrapped(now), now)

    def sweep(self) -> None:
        """Wipe ended activations and shred tenants whose destroy wait is over."""
        with self._r.lock:
            self._keys.sweep()

    # -- the log -----------------------------------------------------------------------

    def checkpoint_with_proof(self, first_size: int) -> tuple[str, list[bytes]]:
        """A signed checkpoint of the log now and a consistency proof from `first_size`.

        For custodians' CLIs, which refuse a log that does not extend the
        last checkpoint they saw (cli/seen_checkpoints.py). This replica
        catches up first, so a follower never looks rolled back.
        """
        r = self._r
        with r.lock:
            r.journal.catch_up()
            r.initialized_state()
            return r.journal.checkpoint_with_proof(first_size)

    def log_extension(self, first_size: int, include_seq: int | None = None) -> LogExtensionView:
        """What a custodian's CLI checks before it signs, and after (cli/seen_checkpoints.py).

        Read at one instant under the governance lock (after catching up):
        the latest stored checkpoint and a consistency proof to it from
        `first_size`; the latest checkpoint the witnesses in force cosigned
        (hsm/daemon/witnessing.py) and a proof from it to the latest; the
        entry `include_seq` with its inclusion proof; and every
        `rotate-log-key` and `add-witness` / `remove-witness` execution with
        its inclusion proof, so the CLI follows the log key's chain and
        knows the witness policy without the whole log. Every proof is
        against the latest checkpoint.
        """
        r = self._r
        with r.lock:
            r.journal.catch_up()
            st = r.initialized_state()
            note, proof = r.journal.checkpoint_with_proof(first_size)
            tree = r.journal.tree
            size = st.size
            witnessed = witnessing.witnessed_checkpoint(r.store, st)
            witnessed_proof: list[bytes] = []
            if witnessed:
                w_size = unverified_size(witnessed)
                witnessed_proof = tree.consistency_proof(w_size, size) if w_size < size else []

            def proven(seq: int) -> ProvenEntry:
                entry = r.store.read(seq, seq + 1)[0]
                return ProvenEntry(seq, entry, tuple(tree.inclusion_proof(seq, size)))

            included = None
            if include_seq is not None:
                if not 0 <= include_seq < size:
                    raise InvalidInputError(f"entry {include_seq} is not in the log of {size}")
                included = proven(include_seq)
            rotations = tuple(
                proven(x.seq) for x in st.executions if x.operation == "rotate-log-key"
            )
            witness_changes = tuple(
                proven(x.seq)
                for x in st.executions
                if x.operation in ("add-witness", "remove-witness")
            )
            return LogExtensionView(
                checkpoint=note,
                proof=tuple(proof),
                witnessed=witnessed,
                witnessed_proof=tuple(witnessed_proof),
                included=included,
                rotations=rotations,
                witness_changes=witness_changes,
            )

    # -- what the audit service asks (hsm/services/audit_service.py's LogPolicy) ------

    def log_key_at(self, size: int) -> str:
        """The verifier key that signs the checkpoint of `size` entries."""
        return self._r.journal.state.key_at(size)

    def witness_policy(self) -> WitnessPolicy:
        """The witnesses in force and m."""
        return self._r.journal.state.witness_policy

    def witnessed_checkpoint(self) -> str:
        """The latest stored checkpoint m witnesses in force cosigned, or ""."""
        return witnessing.witnessed_checkpoint(self._r.store, self._r.journal.state)

    def record_cosigned(self, size: int, note: str) -> None:
        """After the audit service merged a cosignature into the note of `size`."""
        witnessing.record_cosigned(self._r.store, self._r.journal.state, size, note)

    def log_snapshot(self) -> tuple[LogState, list[bytes]]:
        """A copy of the state and every stored entry, read at one instant (for checks)."""
        r = self._r
        with r.lock:
            return r.journal.state.copy(), r.journal.read_all()

    # -- for tests ---------------------------------------------------------------------

    def master_key_buffer_for_test(self) -> bytearray | None:
        """The master key's buffer, so tests can check that seal zeroes it."""
        return self._r.custody.master_key_buffer_for_test()

    def tenant_key_buffers_for_test(self, tenant: str) -> list[bytearray]:
        """The buffers of a tenant's unwrapped keys, so tests can check wiping."""
        return self._r.custody.tenant_key_buffers_for_test(tenant)

    def governance_lock_for_test(self) -> object:
        """The governance lock, so tests can hold governance busy."""
        return self._r.lock
