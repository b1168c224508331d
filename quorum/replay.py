"""Replay: the one verifier of the quorum log, and the state it yields.

The daemon at start and before each append, every replica, and the
auditor's offline `verify` all run this code over the same bytes; the
service's state is nothing but its result. `Replayer.apply(raw)` checks one
entry completely against the state so far and only then changes the state,
so a refused entry leaves the state exactly as it was. The error is a
`LogIntegrityError` whose `seq` names the entry and whose message says why;
its `refusal` is the typed error of the check that failed (a
`SignatureError`, `ExpiredError`, `NotOnRosterError`, `ReplayError`,
`ThresholdError`, `NotFoundError`, `DeserializationError`, else a
`StateError`), the very object the daemon raises to a caller whose request
replay refused on a dry run: one rule set, one wording.

Checks for each entry, in order (docs/log-format.md repeats them):

0. Form and chain: canonical encoding, `v` = 1, known type, payload schema
   (`log.Entry.from_bytes`); `seq` = previous + 1 (0 for the first);
   `prev` = RFC 9162 leaf hash of the previous entry (zeros for seq 0);
   `time` >= previous time; the genesis is entry 0 and only entry 0.
1. Signatures of `confirm`, `unseal` and `seal` verify over their
   statements against the roster in force at that entry, the signer's
   share index is the one the roster gives them, the split is the current
   one; an unseal has at least `threshold` distinct custodians and a
   session id never used before. An `unseal-reset` is signed by a
   custodian on the roster over the statement naming its session, which
   was never used before (no unseal or reset), was requested no later
   than the entry's time, and discards only shares of custodians on the
   roster.
2. `approval` / `refusal`: the proposal exists and is pending (not
   executed, not cancelled), the entry's time is before its expiry, the
   signer is on the roster, has given no verdict on it before, and the
   signature verifies over the proposal's approve (or refuse) statement.
3. `proposal`: signed by its proposer (a custodian on the roster in force
   or a proposer the quorum registered) over the `propose` statement, a
   fresh id, parameters valid for the operation and within the policy,
   expiry after the entry's time and within the policy's TTL, the
   operation possible in the current state. `execution`: the proposal
   is pending and unexpired, has the approvals its operation needs (k for
   widening, 1 for narrowing), and the result is the one the state and
   the parameters allow (tenant exists, is not destroyed, version numbers
   in order, `active_until` = time + duration, ...). `shred`: the tenant's
   destroy wait is over.
4. An executed roster change puts the new roster in force, resets share
   confirmations and cancels every other pending proposal; its re-wrapped
   keys carry fresh shred salts (no salt hash is reused).
5. Entries the daemon writes on its own (executions, shreds, the daemon's
   own seal) carry the log key's signature (`log.log_signature_message`),
   by the key in force before the entry; `rotate-log-key` changes that
   key, and every checkpoint after it.

Replay is deterministic: the state is a function of the bytes alone (no
clock, no randomness, dicts in insertion order), so every machine computes
the same state from the same log.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from keyquorum.quorum import people
from keyquorum.quorum.checkpoint import (
    NoteVerifier,
    parse_verifier_key,
    unverified_size,
    verify_checkpoint,
)
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    ExpiredError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    NotFoundError,
    NotOnRosterError,
    ReplayError,
    RootMismatchError,
    SignatureError,
    StateError,
    ThresholdError,
)
from keyquorum.quorum.log import (
    GENESIS_PREV,
    ApprovalPayload,
    ConfirmPayload,
    EncryptedShare,
    Entry,
    ExecutionPayload,
    GenesisPayload,
    HandoverPayload,
    Policy,
    ProposalPayload,
    RefusalPayload,
    SealPayload,
    ShredPayload,
    UnsealPayload,
    UnsealResetPayload,
    entry_hash,
    log_signature_message,
    needs_log_signature,
)
from keyquorum.quorum.merkle import EMPTY_ROOT, CompactRange, leaf_hash
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    GrantChanged,
    LogKeyRotated,
    NewVersion,
    Parameters,
    ProposerAdded,
    ProposerRemoved,
    RestoreApproved,
    Result,
    RosterChanged,
    TenantNamed,
    TenantResult,
    VersionDisabled,
    WitnessChanged,
    check_parameters,
    operation,
    request_for,
)
from keyquorum.quorum.shamir import SplitCommitments
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.statements import (
    SignedStatement,
    Statement,
    confirm_share_statement,
    proposal_statement,
    render_time,
    seal_statement,
    unseal_reset_statement,
    unseal_share_statement,
    verify_approvals,
    verify_statement,
)

__all__ = [
    "Execution",
    "LogState",
    "Proposal",
    "RegisteredProposer",
    "Replayer",
    "RosterEpoch",
    "Tenant",
    "TenantVersion",
    "Unsealed",
    "WitnessPolicy",
    "replay",
    "seal_request_digest",
    "verify_log",
]


def _fp(fingerprint: str) -> str:
    """The people's form of a fingerprint, for messages (`people.display_fingerprint`)."""
    return people.display_fingerprint(fingerprint)


class _RefusedError(Exception):
    """Internal: one check failed; `Replayer` turns it into LogIntegrityError(seq).

    `refusal` is the typed error a caller about to append this entry gets
    (the daemon's dry run): the check's own error when it has one (a
    `SignatureError` keeps its class and fields), else a `StateError` with
    the message. `context` prefixes the log-facing message only.
    """

    def __init__(self, refusal: KeyquorumError | str, *, context: str = "") -> None:
        self.refusal = StateError(refusal) if isinstance(refusal, str) else refusal
        super().__init__(f"{context}: {self.refusal}" if context else str(self.refusal))


# State -----------------------------------------------------------------------


@dataclass(frozen=True)
class RosterEpoch:
    """A roster in force from entry `seq` (0: genesis; else a change-roster execution)."""

    seq: int
    threshold: int
    roster: tuple[PublicCredential, ...]
    split: SplitCommitments
    encrypted_shares: tuple[EncryptedShare, ...]
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        index = {c.fingerprint: i + 1 for i, c in enumerate(self.roster)}
        object.__setattr__(self, "_index", index)

    def share_index(self, fingerprint: str) -> int | None:
        """The share index custodian `fingerprint` holds, or None when not on this roster."""
        return self._index.get(fingerprint)

    def credential(self, fingerprint: str) -> PublicCredential:
        index = self._index.get(fingerprint)
        if index is None:
            raise NotOnRosterError(f"custodian {_fp(fingerprint)} is not on the roster")
        return self.roster[index - 1]

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(c.fingerprint for c in self.roster)


@dataclass(frozen=True)
class TenantVersion:
    """One version of a tenant key as the log knows it: wrapped, never in clear."""

    version: int
    wrapped_key: bytes
    shred_salt_sha256: bytes
    created_seq: int
    disabled_seq: int | None = None

    @property
    def state(self) -> Literal["active", "disabled"]:
        return "active" if self.disabled_seq is None else "disabled"


@dataclass(frozen=True)
class Tenant:
    """A tenant: its key versions, activation window and destruction state."""

    name: str
    created_seq: int
    versions: tuple[TenantVersion, ...]
    active_until: int | None = None
    activated_seq: int | None = None
    destroy_at: int | None = None
    destroyed_seq: int | None = None
    #: The backends granted this tenant when it was shredded (its grants end then),
    #: so they can be told "destroyed" rather than "not granted".
    shredded_grants: tuple[str, ...] = ()

    @property
    def destroyed(self) -> bool:
        return self.destroyed_seq is not None

    @property
    def current(self) -> TenantVersion:
        """The newest version: the one new data keys are wrapped with."""
        return self.versions[-1]

    def version(self, number: int) -> TenantVersion | None:
        if 1 <= number <= len(self.versions):
            return self.versions[number - 1]
        return None

    def is_active(self, now: int) -> bool:
        """Usable at `now`: activated by a quorum, window open, not being destroyed."""
        return (
            not self.destroyed
            and self.destroy_at is None
            and self.active_until is not None
            and now < self.active_until
        )


@dataclass(frozen=True)
class Proposal:
    """A logged proposal with the verdicts counted so far.

    `approvals` and `refusals` map a custodian's fingerprint to the seq of
    their entry; each custodian gives at most one verdict.
    """

    id: bytes
    log_position: int
    time: int
    operation: str
    parameters: Parameters
    expires_at: int
    proposer: str
    approvals: Mapping[str, int] = field(default_factory=dict)
    refusals: Mapping[str, int] = field(default_factory=dict)
    status: Literal["pending", "executed", "cancelled"] = "pending"
    #: change-roster: the public credentials of the custodians it adds.
    credentials: tuple[PublicCredential, ...] = ()

    def is_pending(self, now: int) -> bool:
        return self.status == "pending" and now < self.expires_at


@dataclass(frozen=True)
class Execution:
    """An executed operation, with the custodians whose approvals carried it."""

    seq: int
    time: int
    proposal: bytes
    operation: str
    parameters: Parameters
    result: Result
    approvers: tuple[str, ...]


@dataclass(frozen=True)
class RegisteredProposer:
    """A proposer credential the quorum registered (`add-proposer` at entry `seq`)."""

    credential: PublicCredential
    seq: int


@dataclass(frozen=True)
class WitnessPolicy:
    """The witnesses whose cosignatures count, and how many are required (m),
    for every checkpoint of at least `from_size` entries (until the next policy)."""

    from_size: int
    witnesses: tuple[str, ...]
    threshold: int

    def verifiers(self) -> list[NoteVerifier]:
        """The witnesses' keys, to check cosignatures with."""
        return [_verifier(vkey) for vkey in self.witnesses]


NO_WITNESSES = WitnessPolicy(0, (), 0)


@functools.lru_cache(maxsize=64)
def _verifier(vkey: str) -> NoteVerifier:
    """A verifier key string parsed once (they were checked when the entry was decoded)."""
    return parse_verifier_key(vkey)


@dataclass(frozen=True)
class Unsealed:
    """A replica holding the master key since entry `seq`, and who unsealed it."""

    replica: str
    session: bytes
    seq: int
    time: int
    split_id: bytes
    custodians: tuple[str, ...]


@dataclass
class LogState:
    """Everything the log says, after the entries applied so far.

    Read it, never write it: only `Replayer` changes it, and only after an
    entry passed every check. Before the genesis only `size`, `head` and
    `time` are meaningful.
    """

    size: int = 0
    head: bytes = GENESIS_PREV
    time: int = 0
    deployment: str = ""
    log_key: str = ""
    policy: Policy | None = None
    rosters: list[RosterEpoch] = field(default_factory=list)
    confirmations: dict[str, int] = field(default_factory=dict)
    unsealed: dict[str, Unsealed] = field(default_factory=dict)
    sessions: set[bytes] = field(default_factory=set)
    #: SHA-256 of every custodian seal request's signature: each counts once.
    seal_requests: set[bytes] = field(default_factory=set)
    tenants: dict[str, Tenant] = field(default_factory=dict)
    grants: dict[tuple[str, str], int] = field(default_factory=dict)
    proposals: dict[bytes, Proposal] = field(default_factory=dict)
    executions: list[Execution] = field(default_factory=list)
    #: (first tree size it signs, verifier key): the genesis key, then each rotation's.
    log_keys: list[tuple[int, str]] = field(default_factory=list)
    #: Registered proposers by fingerprint (custodians on the roster may propose too).
    proposers: dict[str, RegisteredProposer] = field(default_factory=dict)
    #: The witness policy in force, and every earlier one (by first tree size).
    witness_policies: list[WitnessPolicy] = field(default_factory=list)
    #: Each executed `approve-restore`: (its execution's seq, what it approved).
    restores: list[tuple[int, RestoreApproved]] = field(default_factory=list)
    #: Each handover of a replica's unsealed state to a successor process: (seq, entry).
    handovers: list[tuple[int, HandoverPayload]] = field(default_factory=list)

    @property
    def initialized(self) -> bool:
        """Whether the genesis has been applied."""
        return bool(self.rosters)

    @property
    def epoch(self) -> RosterEpoch:
        """The roster in force."""
        if not self.rosters:
            raise StateError("the log has no genesis yet")
        return self.rosters[-1]

    def roster_at(self, position: int) -> RosterEpoch:
        """The roster in force at entry `position` (the last change at or before it)."""
        if not self.rosters:
            raise StateError("the log has no genesis yet")
        found = self.rosters[0]
        for epoch in self.rosters:
            if epoch.seq > position:
                break
            found = epoch
        return found

    @property
    def roster(self) -> tuple[PublicCredential, ...]:
        return self.epoch.roster

    @property
    def threshold(self) -> int:
        return self.epoch.threshold

    @property
    def split(self) -> SplitCommitments:
        return self.epoch.split

    @property
    def encrypted_shares(self) -> tuple[EncryptedShare, ...]:
        return self.epoch.encrypted_shares

    def custodian(self, fingerprint: str) -> PublicCredential | None:
        """The credential of `fingerprint` on the roster in force, or None."""
        index = self.share_index(fingerprint)
        return None if index is None else self.roster[index - 1]

    def share_index(self, fingerprint: str) -> int | None:
        """The share index `fingerprint` holds on the roster in force, or None."""
        return self.epoch.share_index(fingerprint) if self.rosters else None

    def tenant_active(self, tenant: str, now: int) -> bool:
        """Whether `tenant` may be used at `now` according to the log."""
        record = self.tenants.get(tenant)
        return record is not None and record.is_active(now)

    def granted(self, backend: str, tenant: str) -> bool:
        return (backend, tenant) in self.grants

    def pending(self, now: int) -> list[Proposal]:
        """Proposals still open for verdicts at `now`, oldest first."""
        return [p for p in self.proposals.values() if p.is_pending(now)]

    def key_at(self, size: int) -> str:
        """The log key that signs the checkpoint of `size` entries (and the entries
        the daemon writes as entry `size`); "" before the genesis."""
        key = self.log_keys[0][1] if self.log_keys else ""
        for first, vkey in self.log_keys:
            if first <= size:
                key = vkey
        return key

    @property
    def witness_policy(self) -> WitnessPolicy:
        """The witnesses and threshold m in force (none before the first add-witness)."""
        return self.witness_policies[-1] if self.witness_policies else NO_WITNESSES

    def witnesses_at(self, size: int) -> WitnessPolicy:
        """The witness policy that applies to the checkpoint of `size` entries."""
        policy = NO_WITNESSES
        for candidate in self.witness_policies:
            if candidate.from_size <= size:
                policy = candidate
        return policy

    def proposer_name(self, fingerprint: str) -> str | None:
        """The name of a custodian (any roster) or registered proposer, or None."""
        for epoch in reversed(self.rosters):
            index = epoch.share_index(fingerprint)
            if index is not None:
                return epoch.roster[index - 1].name
        registered = self.proposers.get(fingerprint)
        return None if registered is None else registered.credential.name

    def copy(self) -> LogState:
        """An independent copy (the records inside are immutable and shared)."""
        return dataclasses.replace(
            self,
            rosters=list(self.rosters),
            confirmations=dict(self.confirmations),
            unsealed=dict(self.unsealed),
            sessions=set(self.sessions),
            seal_requests=set(self.seal_requests),
            tenants=dict(self.tenants),
            grants=dict(self.grants),
            proposals=dict(self.proposals),
            executions=list(self.executions),
            log_keys=list(self.log_keys),
            proposers=dict(self.proposers),
            witness_policies=list(self.witness_policies),
            restores=list(self.restores),
            handovers=list(self.handovers),
        )


def seal_request_digest(signature: bytes) -> bytes:
    """What identifies a custodian's seal request: each is logged once, ever."""
    return hashlib.sha256(signature).digest()


# Replay ----------------------------------------------------------------------

Commit = Callable[[LogState], None]


class Replayer:
    """Applies entries one at a time, each checked before the state changes."""

    def __init__(self, state: LogState | None = None) -> None:
        self._state = LogState() if state is None else state

    @property
    def state(self) -> LogState:
        return self._state

    def check(self, raw: bytes) -> Entry:
        """Check that `raw` may be appended now; the state does not change."""
        entry, _ = self._check(raw)
        return entry

    def apply(self, raw: bytes) -> Entry:
        """Check `raw` completely, then apply it; LogIntegrityError(seq) if refused."""
        entry, commit = self._check(raw)
        state = self._state
        commit(state)
        state.size = entry.seq + 1
        state.head = entry_hash(raw)
        state.time = entry.time
        return entry

    def _check(self, raw: bytes) -> tuple[Entry, Commit]:
        seq = self._state.size
        try:
            entry = Entry.from_bytes(raw)
        except DeserializationError as e:
            raise LogIntegrityError(f"malformed entry: {e}", seq=seq, refusal=e) from e
        try:
            commit = _Check(self._state, entry).run()
        except _RefusedError as r:
            raise LogIntegrityError(str(r), seq=seq, refusal=r.refusal) from r.refusal
        return entry, commit


def replay(entries: Iterable[bytes]) -> LogState:
    """The state a whole log yields, or LogIntegrityError naming its first bad entry."""
    replayer = Replayer()
    for raw in entries:
        replayer.apply(raw)
    if replayer.state.size == 0:
        raise LogIntegrityError("the log is empty: it has no genesis", seq=0)
    return replayer.state


class _Check:
    """The checks of one entry against one state; `run` returns the state change."""

    def __init__(self, state: LogState, entry: Entry) -> None:
        self.state = state
        self.entry = entry

    def run(self) -> Commit:
        state, entry = self.state, self.entry
        # 0. Chain, order and time.
        if entry.seq != state.size:
            raise _RefusedError(f"sequence number {entry.seq}, expected {state.size}")
        if entry.prev != state.head:
            raise _RefusedError(
                "prev is not the hash of the previous entry: the hash chain is broken"
            )
        if entry.time < state.time:
            raise _RefusedError(f"time {entry.time} goes back before {state.time}")
        payload = entry.payload
        if isinstance(payload, GenesisPayload):
            if entry.seq != 0:
                raise _RefusedError("a second genesis")
            return self.genesis(payload)
        if entry.seq == 0:
            raise _RefusedError(f"the first entry is a {entry.type}, not the genesis")
        # 5. What the daemon writes on its own carries the log key's signature.
        if needs_log_signature(payload):
            self._log_signed()
        if isinstance(payload, ConfirmPayload):
            return self.confirm(payload)
        if isinstance(payload, UnsealPayload):
            return self.unseal(payload)
        if isinstance(payload, UnsealResetPayload):
            return self.unseal_reset(payload)
        if isinstance(payload, SealPayload):
            return self.seal(payload)
        if isinstance(payload, ProposalPayload):
            return self.proposal(payload)
        if isinstance(payload, ApprovalPayload | RefusalPayload):
            return self.verdict(payload)
        if isinstance(payload, ExecutionPayload):
            return self.execution(payload)
        if isinstance(payload, HandoverPayload):
            return self.handover(payload)
        return self.shred(payload)

    # -- helpers ---------------------------------------------------------

    @property
    def policy(self) -> Policy:
        policy = self.state.policy
        if policy is None:
            raise _RefusedError("no policy: the log has no genesis")
        return policy

    def _log_signed(self) -> None:
        """Step 5: the log key in force signed this entry (`log.log_signature_message`)."""
        entry = self.entry
        signature = getattr(entry.payload, "log_signature", None)
        key = self.state.log_key
        if signature is None:
            raise _RefusedError(
                SignatureError(
                    f"a {entry.type} is written by the daemon and signed by the log key; "
                    "this one is not signed"
                )
            )
        try:
            _verifier(key).verify_message(log_signature_message(entry), signature)
        except KeyquorumError as e:
            raise _RefusedError(
                SignatureError(f"the {entry.type} is not signed by the log key in force ({e})")
            ) from e

    def _member(self, custodian: str, what: str) -> PublicCredential:
        """Step 1: the custodian is on the roster in force; their credential."""
        try:
            return self.state.epoch.credential(custodian)
        except KeyquorumError as e:
            raise _RefusedError(e, context=f"{what} by {_fp(custodian)}") from e

    def _signed(self, statement: Statement, custodian: PublicCredential, signature: bytes) -> None:
        """Step 1: a custodian of the roster in force signed exactly `statement`."""
        try:
            signed = SignedStatement(custodian.fingerprint, HybridSignature.from_bytes(signature))
            verify_statement(statement, signed, custodian)
        except KeyquorumError as e:
            raise _RefusedError(e, context=f"{statement.kind} by {custodian.label}") from e

    def _who(self, fingerprint: str) -> str:
        """A custodian as people read them: `custodian alice (FKAO-JAYM-D5SP-FPYZ)`."""
        for epoch in reversed(self.state.rosters):
            index = epoch.share_index(fingerprint)
            if index is not None:
                return f"custodian {epoch.roster[index - 1].label}"
        return f"custodian {_fp(fingerprint)}"

    def _tenant(self, name: str, *, usable: bool = True) -> Tenant:
        """An existing, not destroyed tenant (and, if `usable`, not being destroyed)."""
        tenant = self.state.tenants.get(name)
        if tenant is None:
            raise _RefusedError(f"unknown tenant {name!r}")
        if tenant.destroyed:
            raise _RefusedError(f"tenant {name!r} was destroyed")
        if usable and tenant.destroy_at is not None:
            raise _RefusedError(f"tenant {name!r} is scheduled for destruction")
        return tenant

    def _possible(self, name: str, params: Mapping[str, str | int]) -> None:
        """Step 3: operation `name` with `params` is possible in the current state."""
        state = self.state
        if name == "create-tenant":
            tenant_name = str(params["tenant"])
            existing = state.tenants.get(tenant_name)
            if existing is not None:
                what = "was destroyed; a name is never reused" if existing.destroyed else "exists"
                raise _RefusedError(f"tenant {tenant_name!r} {what}")
        elif name in ("activate-tenant", "rotate-tenant", "destroy-tenant", "grant"):
            self._tenant(str(params["tenant"]))
            if name == "grant" and state.granted(str(params["backend"]), str(params["tenant"])):
                raise _RefusedError(f"{params['backend']} is already granted {params['tenant']!r}")
        elif name == "deactivate-tenant":
            self._tenant(str(params["tenant"]), usable=False)
        elif name == "disable-version":
            tenant = self._tenant(str(params["tenant"]), usable=False)
            number = int(params["version"])
            version = tenant.version(number)
            if version is None:
                raise _RefusedError(f"tenant {tenant.name!r} has no version {number}")
            if version.disabled_seq is not None:
                raise _RefusedError(f"version {number} of {tenant.name!r} is already disabled")
            if version is tenant.current:
                raise _RefusedError(
                    f"version {number} is {tenant.name!r}'s current one; rotate first"
                )
        elif name == "cancel-destroy":
            tenant = self._tenant(str(params["tenant"]), usable=False)
            if tenant.destroy_at is None:
                raise _RefusedError(f"tenant {tenant.name!r} is not scheduled for destruction")
            if self.entry.time >= tenant.destroy_at:
                raise _RefusedError(f"the destroy wait of {tenant.name!r} is over")
        elif name == "revoke" and not state.granted(str(params["backend"]), str(params["tenant"])):
            raise _RefusedError(f"{params['backend']} holds no grant on {params['tenant']!r}")
        elif name == "add-proposer":
            fingerprint = str(params["proposer"])
            if fingerprint in state.proposers:
                raise _RefusedError(f"proposer {_fp(fingerprint)} is already registered")
            if state.share_index(fingerprint) is not None:
                raise _RefusedError(
                    f"{_fp(fingerprint)} is a custodian on the roster: custodians propose anyway"
                )
        elif name == "remove-proposer":
            fingerprint = str(params["proposer"])
            registered = state.proposers.get(fingerprint)
            if registered is None:
                raise _RefusedError(f"{_fp(fingerprint)} is not a registered proposer")
            if registered.credential.name != params["name"]:
                raise _RefusedError(
                    f"proposer {_fp(fingerprint)} is registered as "
                    f"{people.display_name(registered.credential.name)!r}, not "
                    f"{people.display_name(str(params['name']))!r}"
                )
        elif name in ("add-witness", "remove-witness"):
            self._witness_change(name, str(params["witness"]), int(params["witness_threshold"]))
        elif name == "approve-restore":
            restored, abandoned = int(params["restored_size"]), int(params["abandoned_size"])
            if restored > state.size:
                raise _RefusedError(
                    f"the log was restored to {restored} entries, but it holds {state.size}"
                )
            if abandoned <= restored:
                raise _RefusedError(
                    f"the abandoned checkpoint ({abandoned} entries) is not beyond the restored "
                    f"log ({restored} entries): nothing to approve"
                )
        elif name == "rotate-log-key":
            new_key = str(params["log_key"])
            if any(vkey == new_key for _, vkey in state.log_keys):
                raise _RefusedError("the new log key was used by this log before")
            if _verifier(new_key).name != _verifier(state.log_key).name:
                raise _RefusedError(
                    f"the new log key is named {_verifier(new_key).name}, the log's checkpoints "
                    f"are {_verifier(state.log_key).name}'s"
                )

    def _witness_change(self, name: str, witness: str, threshold: int) -> tuple[str, ...]:
        """Step 3 for add-witness / remove-witness: the witness set and m after it."""
        current = self.state.witness_policy.witnesses
        key = _verifier(witness)
        if name == "add-witness":
            if any(_verifier(w).name == key.name for w in current):
                raise _RefusedError(f"a witness named {key.name} is already registered")
            after = (*current, witness)
        else:
            if witness not in current:
                raise _RefusedError(f"{key.name} is not a registered witness")
            after = tuple(w for w in current if w != witness)
        if threshold > len(after):
            raise _RefusedError(
                InvalidInputError(
                    f"witness threshold {threshold} exceeds the {len(after)} witness(es) after "
                    f"this {name}"
                )
            )
        return after

    # -- per type --------------------------------------------------------

    def genesis(self, p: GenesisPayload) -> Commit:
        epoch = RosterEpoch(0, p.threshold, p.roster, p.split, p.encrypted_shares)

        def commit(state: LogState) -> None:
            state.deployment = p.deployment
            state.log_key = p.log_key
            state.log_keys.append((1, p.log_key))
            state.policy = p.policy
            state.rosters.append(epoch)

        return commit

    def confirm(self, p: ConfirmPayload) -> Commit:
        state = self.state
        epoch = state.epoch
        # 1. The current split, the custodian's own index, once, signed.
        if p.split_id != epoch.split.split_id:
            raise _RefusedError(
                InvalidInputError("confirm names a split that is not the current one")
            )
        held = epoch.share_index(p.custodian)
        if held is not None and held != p.index:
            raise _RefusedError(
                InvalidInputError(f"custodian {_fp(p.custodian)} holds share {held}, not {p.index}")
            )
        if p.custodian in state.confirmations:
            raise _RefusedError(
                InvalidInputError(f"custodian {_fp(p.custodian)} already confirmed their share")
            )
        member = self._member(p.custodian, "confirm-share")
        statement = confirm_share_statement(
            deployment=state.deployment, custodian=member, split_id=p.split_id, index=p.index
        )
        self._signed(statement, member, p.signature)
        seq = self.entry.seq

        def commit(state: LogState) -> None:
            state.confirmations[p.custodian] = seq

        return commit

    def unseal(self, p: UnsealPayload) -> Commit:
        state, entry = self.state, self.entry
        epoch = state.epoch
        if p.split_id != epoch.split.split_id:
            raise _RefusedError("unseal uses a split that is not the current one")
        if p.session_log_size > entry.seq:
            raise _RefusedError(f"session log size {p.session_log_size} is beyond this entry")
        if p.session in state.sessions:
            raise _RefusedError(f"unseal session {p.session.hex()} was used before")
        seen: set[str] = set()
        for share in p.shares:
            who = _fp(share.custodian)
            if share.custodian in seen:
                raise _RefusedError(f"custodian {who} takes part twice")
            seen.add(share.custodian)
            index = epoch.share_index(share.custodian)
            if index is not None and index != share.index:
                raise _RefusedError(f"custodian {who} holds share {index}, not {share.index}")
            member = self._member(share.custodian, "unseal-share")
            statement = unseal_share_statement(
                deployment=state.deployment,
                custodian=member,
                replica=p.replica,
                session=p.session,
                session_log_size=p.session_log_size,
                split_id=p.split_id,
                index=share.index,
                ciphertext_sha256=share.ciphertext_sha256,
            )
            self._signed(statement, member, share.signature)
        if len(seen) < epoch.threshold:
            raise _RefusedError(
                f"unsealed with {len(seen)} custodians, the threshold is {epoch.threshold}"
            )
        record = Unsealed(
            p.replica, p.session, entry.seq, entry.time, p.split_id, tuple(sorted(seen))
        )

        def commit(state: LogState) -> None:
            state.unsealed[p.replica] = record
            state.sessions.add(p.session)

        return commit

    def unseal_reset(self, p: UnsealResetPayload) -> Commit:
        state, entry = self.state, self.entry
        if p.session_log_size > entry.seq:
            raise _RefusedError(f"session log size {p.session_log_size} is beyond this entry")
        if p.requested_at > entry.time:
            raise _RefusedError(f"reset requested at {p.requested_at}, after the entry's time")
        if p.session in state.sessions:
            raise _RefusedError(
                ReplayError(f"unseal session {p.session.hex()} was used or reset before")
            )
        for fingerprint in p.discarded:
            if state.epoch.share_index(fingerprint) is None:
                raise _RefusedError(
                    f"the reset discards a share of {_fp(fingerprint)}, who is not on the roster"
                )
        member = self._member(p.custodian, "unseal-reset")
        statement = unseal_reset_statement(
            deployment=state.deployment,
            custodian=member,
            replica=p.replica,
            session=p.session,
            session_log_size=p.session_log_size,
            requested_at=p.requested_at,
        )
        self._signed(statement, member, p.signature)

        def commit(state: LogState) -> None:
            state.sessions.add(p.session)

        return commit

    def seal(self, p: SealPayload) -> Commit:
        state = self.state
        if p.requested_at > self.entry.time:
            raise _RefusedError(f"seal requested at {p.requested_at}, after the entry's time")
        digest = None
        if p.custodian is not None and p.signature is not None:
            digest = seal_request_digest(p.signature)
            if digest in state.seal_requests:
                raise _RefusedError(
                    ReplayError(f"seal request by {_fp(p.custodian)} was already used")
                )
            member = self._member(p.custodian, "seal")
            statement = seal_statement(
                deployment=state.deployment,
                custodian=member,
                replica=p.replica,
                reason=p.reason,
                requested_at=p.requested_at,
            )
            self._signed(statement, member, p.signature)

        def commit(state: LogState) -> None:
            if digest is not None:
                state.seal_requests.add(digest)
            if p.replica == SealPayload.ALL_REPLICAS:
                state.unsealed.clear()
            else:
                state.unsealed.pop(p.replica, None)

        return commit

    def proposal(self, p: ProposalPayload) -> Commit:
        state, entry = self.state, self.entry
        policy = self.policy
        # 3. A custodian on the roster or a registered proposer signed exactly this.
        credential = state.custodian(p.proposer)
        if credential is None:
            registered = state.proposers.get(p.proposer)
            if registered is None:
                raise _RefusedError(
                    AccessDeniedError(
                        f"proposer {_fp(p.proposer)} is neither a custodian on the roster nor "
                        "a proposer the quorum registered (add-proposer)"
                    )
                )
            credential = registered.credential
        try:
            statement = proposal_statement(
                deployment=state.deployment,
                proposer=credential,
                proposal_id=p.id,
                operation=p.operation,
                parameters=dict(p.parameters),
                expires_at=p.expires_at,
            )
            signed = SignedStatement(p.proposer, HybridSignature.from_bytes(p.signature))
            verify_statement(statement, signed, credential)
        except KeyquorumError as e:
            raise _RefusedError(e, context=f"proposal by {credential.label}") from e
        if p.id in state.proposals:
            raise _RefusedError(f"proposal id {p.id.hex()} is already taken")
        if not 1 <= p.expires_at - entry.time <= policy.proposal_ttl_seconds:
            raise _RefusedError(
                InvalidInputError(
                    f"a proposal expires 1 to {policy.proposal_ttl_seconds} s after it is made "
                    f"(the policy's proposal_ttl_seconds), got {p.expires_at - entry.time}"
                )
            )
        try:
            check_parameters(p.operation, p.parameters, policy)
        except InvalidInputError as e:
            raise _RefusedError(e, context=p.operation) from e
        self._possible(p.operation, dict(p.parameters))
        self._newcomers(p)
        record = Proposal(
            id=p.id,
            log_position=entry.seq,
            time=entry.time,
            operation=p.operation,
            parameters=p.parameters,
            expires_at=p.expires_at,
            proposer=p.proposer,
            credentials=p.credentials,
        )

        def commit(state: LogState) -> None:
            state.proposals[p.id] = record

        return commit

    def _newcomers(self, p: ProposalPayload) -> None:
        """Step 3: a change-roster carries the credentials of exactly the custodians it adds.

        In the order of its roster, each the one its fingerprint names, so
        that the statement can name them; other operations carry none.
        """
        if p.operation != "change-roster":
            if p.credentials:
                raise _RefusedError(
                    InvalidInputError(f"a {p.operation} proposal carries public credentials")
                )
            return
        epoch = self.state.epoch
        listed = str(dict(p.parameters)["roster"]).split(",")
        expected = [f for f in listed if epoch.share_index(f) is None]
        got = [c.fingerprint for c in p.credentials]
        if got != expected:
            raise _RefusedError(
                InvalidInputError(
                    "the proposal must carry the public credentials of exactly the custodians "
                    f"it adds, in roster order: expected {len(expected)}, got {len(got)} "
                    "or others"
                )
            )

    def _open(self, proposal_id: bytes) -> Proposal:
        """Step 2: the proposal exists, is pending, and has not expired at this entry."""
        proposal = self.state.proposals.get(proposal_id)
        if proposal is None:
            raise _RefusedError(NotFoundError(f"unknown proposal {proposal_id.hex()}"))
        if proposal.status == "executed":
            raise _RefusedError(f"proposal {proposal_id.hex()} was already executed")
        if proposal.status == "cancelled":
            raise _RefusedError(f"proposal {proposal_id.hex()} was cancelled by a roster change")
        if self.entry.time >= proposal.expires_at:
            raise _RefusedError(
                ExpiredError(
                    f"proposal {proposal_id.hex()} expired at {render_time(proposal.expires_at)}, "
                    f"before this entry's time {render_time(self.entry.time)}"
                )
            )
        return proposal

    def verdict(self, p: ApprovalPayload | RefusalPayload) -> Commit:
        state, entry = self.state, self.entry
        # 2. Pending, unexpired, on the roster, one verdict per custodian, signed.
        proposal = self._open(p.proposal)
        epoch = state.epoch
        who = _fp(p.custodian)
        if epoch.share_index(p.custodian) is None:
            raise _RefusedError(
                NotOnRosterError(f"custodian {who} is not on the roster"), context=entry.type
            )
        who = self._who(p.custodian)
        if p.custodian in proposal.approvals:
            raise _RefusedError(ReplayError(f"{who} already approved proposal {p.proposal.hex()}"))
        if p.custodian in proposal.refusals:
            raise _RefusedError(ReplayError(f"{who} already refused proposal {p.proposal.hex()}"))
        try:
            request = request_for(proposal, state)
            signed = SignedStatement(p.custodian, HybridSignature.from_bytes(p.signature))
            if isinstance(p, ApprovalPayload):
                members = {c.fingerprint: c for c in epoch.roster}
                verify_approvals(request, [signed], members, 1, entry.time)
            else:
                verify_statement(request.statement("refuse"), signed, epoch.credential(p.custodian))
        except KeyquorumError as e:
            raise _RefusedError(e, context=f"{entry.type} by {who}") from e
        seq = entry.seq

        def commit(state: LogState) -> None:
            if isinstance(p, ApprovalPayload):
                updated = dataclasses.replace(
                    proposal, approvals={**proposal.approvals, p.custodian: seq}
                )
            else:
                updated = dataclasses.replace(
                    proposal, refusals={**proposal.refusals, p.custodian: seq}
                )
            state.proposals[p.proposal] = updated

        return commit

    def execution(self, p: ExecutionPayload) -> Commit:
        state, entry = self.state, self.entry
        proposal = self._open(p.proposal)
        if p.operation != proposal.operation:
            raise _RefusedError(f"execution of {p.operation} for a {proposal.operation} proposal")
        # 3. Enough distinct approvals for this operation.
        needed = operation(p.operation).required_approvals(state.threshold)
        if len(proposal.approvals) < needed:
            raise _RefusedError(
                ThresholdError(
                    f"{p.operation} executed with {len(proposal.approvals)} of {needed} approvals"
                )
            )
        params = dict(proposal.parameters)
        self._possible(p.operation, params)
        change = self._result(p.operation, params, p.result)
        record = Execution(
            seq=entry.seq,
            time=entry.time,
            proposal=p.proposal,
            operation=p.operation,
            parameters=proposal.parameters,
            result=p.result,
            approvers=tuple(proposal.approvals),
        )

        def commit(state: LogState) -> None:
            state.proposals[p.proposal] = dataclasses.replace(proposal, status="executed")
            state.executions.append(record)
            change(state)

        return commit

    def _result(self, name: str, params: Mapping[str, str | int], result: Result) -> Commit:
        """Step 3: the logged result is the one this state and these parameters allow."""
        state, entry = self.state, self.entry
        seq, time = entry.seq, entry.time
        policy = self.policy
        tenant_name = str(params.get("tenant", ""))
        if isinstance(result, TenantResult) and result.tenant != tenant_name:
            raise _RefusedError(
                f"result names tenant {result.tenant!r}, the proposal {tenant_name!r}"
            )
        if not isinstance(result, TenantResult | RosterChanged):
            return self._deployment_change(name, params, result)

        if isinstance(result, NewVersion):
            existing = state.tenants.get(tenant_name)
            expected = 1 if existing is None else len(existing.versions) + 1
            if result.version != expected:
                raise _RefusedError(f"new version {result.version}, expected {expected}")
            version = TenantVersion(
                result.version, result.wrapped_key, result.shred_salt_sha256, seq
            )

            def add_version(state: LogState) -> None:
                old = state.tenants.get(tenant_name)
                if old is None:
                    state.tenants[tenant_name] = Tenant(tenant_name, seq, (version,))
                else:
                    versions = (*old.versions, version)
                    state.tenants[tenant_name] = dataclasses.replace(old, versions=versions)

            return add_version

        if isinstance(result, Activated):
            until = time + int(params["duration_seconds"])
            if result.active_until != until:
                raise _RefusedError(f"active_until {result.active_until}, expected {until}")

            def activate(state: LogState) -> None:
                old = state.tenants[tenant_name]
                state.tenants[tenant_name] = dataclasses.replace(
                    old, active_until=until, activated_seq=seq
                )

            return activate

        if isinstance(result, DestroyScheduled):
            destroy_at = time + policy.destroy_wait_seconds
            if result.destroy_at != destroy_at:
                raise _RefusedError(f"destroy_at {result.destroy_at}, expected {destroy_at}")

            def schedule(state: LogState) -> None:
                old = state.tenants[tenant_name]
                state.tenants[tenant_name] = dataclasses.replace(
                    old, destroy_at=destroy_at, active_until=None
                )

            return schedule

        if isinstance(result, GrantChanged):
            pair = (str(params["backend"]), tenant_name)
            if result.backend != pair[0]:
                raise _RefusedError(
                    f"result names backend {result.backend}, the proposal {pair[0]}"
                )

            def change_grant(state: LogState) -> None:
                if name == "grant":
                    state.grants[pair] = seq
                else:
                    del state.grants[pair]

            return change_grant

        if isinstance(result, VersionDisabled):
            number = int(params["version"])
            if result.version != number:
                raise _RefusedError(
                    f"result disables version {result.version}, the proposal {number}"
                )

            def disable(state: LogState) -> None:
                old = state.tenants[tenant_name]
                versions = tuple(
                    dataclasses.replace(v, disabled_seq=seq) if v.version == number else v
                    for v in old.versions
                )
                state.tenants[tenant_name] = dataclasses.replace(old, versions=versions)

            return disable

        if isinstance(result, TenantNamed):

            def narrow(state: LogState) -> None:
                old = state.tenants[tenant_name]
                if name == "deactivate-tenant":
                    state.tenants[tenant_name] = dataclasses.replace(old, active_until=None)
                else:
                    state.tenants[tenant_name] = dataclasses.replace(old, destroy_at=None)

            return narrow

        return self._roster_change(params, result)

    def _deployment_change(
        self,
        name: str,
        params: Mapping[str, str | int],
        result: ProposerAdded | ProposerRemoved | WitnessChanged | LogKeyRotated | RestoreApproved,
    ) -> Commit:
        """Step 3 for proposers, witnesses and the log key: the result is the proposal's."""
        state, seq = self.state, self.entry.seq
        if isinstance(result, ProposerAdded):
            credential = result.proposer
            if credential.fingerprint != params["proposer"] or credential.name != params["name"]:
                raise _RefusedError(
                    f"the credential of {credential.label} is not the proposer the proposal names"
                )
            record = RegisteredProposer(credential, seq)

            def add_proposer(state: LogState) -> None:
                state.proposers[credential.fingerprint] = record

            return add_proposer
        if isinstance(result, ProposerRemoved):
            if result.proposer != params["proposer"]:
                raise _RefusedError("the result removes another proposer than the proposal")

            def remove_proposer(state: LogState) -> None:
                del state.proposers[result.proposer]

            return remove_proposer
        if isinstance(result, WitnessChanged):
            if (result.witness, result.witness_threshold) != (
                params["witness"],
                params["witness_threshold"],
            ):
                raise _RefusedError(
                    "the result names another witness or threshold than the proposal"
                )
            after = self._witness_change(name, result.witness, result.witness_threshold)
            policy = WitnessPolicy(seq + 1, after, result.witness_threshold)

            def change_witnesses(state: LogState) -> None:
                state.witness_policies.append(policy)

            return change_witnesses
        if isinstance(result, RestoreApproved):
            if result.to_json() != {k: params[k] for k in result.to_json()}:
                raise _RefusedError("the result names another restore than the proposal")
            approved = (seq, result)

            def approve_restore(state: LogState) -> None:
                state.restores.append(approved)

            return approve_restore
        if result.previous_log_key != state.log_key:
            raise _RefusedError("the rotation names another previous log key than the one in force")
        if result.log_key != params["log_key"]:
            raise _RefusedError("the rotation names another new log key than the proposal")

        def rotate(state: LogState) -> None:
            state.log_key = result.log_key
            state.log_keys.append((seq + 1, result.log_key))

        return rotate

    def _roster_change(self, params: Mapping[str, str | int], result: RosterChanged) -> Commit:
        state, entry = self.state, self.entry
        seq = entry.seq
        if result.threshold != params["threshold"]:
            raise _RefusedError(
                f"new threshold {result.threshold}, the proposal {params['threshold']}"
            )
        listed = str(params["roster"]).split(",")
        if [c.fingerprint for c in result.roster] != listed:
            raise _RefusedError("the new roster is not the one the proposal names")
        used = {epoch.split.split_id for epoch in state.rosters}
        if result.split.split_id in used:
            raise _RefusedError("the new split reuses an earlier split id")
        expected = [
            (t.name, v.version)
            for t in sorted(state.tenants.values(), key=lambda t: t.name)
            if not t.destroyed
            for v in t.versions
        ]
        got = [(r.tenant, r.version) for r in result.rewrapped]
        if got != expected:
            raise _RefusedError(
                "rewrapped keys must be every version of every tenant not destroyed, "
                f"sorted: expected {len(expected)}, got {len(got)} or in another order"
            )
        # Fresh salts: none of the new hashes was ever bound before, none twice.
        old_hashes = {v.shred_salt_sha256 for t in state.tenants.values() for v in t.versions}
        new_hashes = [r.shred_salt_sha256 for r in result.rewrapped]
        if len(set(new_hashes)) != len(new_hashes) or old_hashes & set(new_hashes):
            raise _RefusedError(
                "a roster change re-wraps every key under a fresh shred salt; this one reuses one"
            )
        epoch = RosterEpoch(
            seq, result.threshold, result.roster, result.split, result.encrypted_shares
        )
        rewrapped = {(r.tenant, r.version): r for r in result.rewrapped}
        executed = self.entry.payload
        this = executed.proposal if isinstance(executed, ExecutionPayload) else b""

        def change_roster(state: LogState) -> None:
            state.rosters.append(epoch)
            state.confirmations.clear()
            # 4. A roster change cancels every other pending proposal.
            for pid, other in list(state.proposals.items()):
                if other.status == "pending" and pid != this:
                    state.proposals[pid] = dataclasses.replace(other, status="cancelled")
            for name, tenant in list(state.tenants.items()):
                if tenant.destroyed:
                    continue
                versions = tuple(
                    dataclasses.replace(
                        v,
                        wrapped_key=rewrapped[(name, v.version)].wrapped_key,
                        shred_salt_sha256=rewrapped[(name, v.version)].shred_salt_sha256,
                    )
                    for v in tenant.versions
                )
                state.tenants[name] = dataclasses.replace(tenant, versions=versions)

        return change_roster

    def handover(self, p: HandoverPayload) -> Commit:
        """A replica's unsealed state moved to its successor process (an upgrade).

        Only an unsealed replica has a state to hand over; the replica stays
        unsealed by the unseal it had (no custodian took part in this).
        """
        if p.replica not in self.state.unsealed:
            raise _RefusedError(f"replica {p.replica!r} is not unsealed: nothing to hand over")
        if (p.from_pid, p.from_host) == (p.to_pid, p.to_host):
            raise _RefusedError("a handover from a process to itself")
        record = (self.entry.seq, p)

        def commit(state: LogState) -> None:
            state.handovers.append(record)

        return commit

    def shred(self, p: ShredPayload) -> Commit:
        tenant = self._tenant(p.tenant, usable=False)
        if tenant.destroy_at is None:
            raise _RefusedError(f"tenant {p.tenant!r} is not scheduled for destruction")
        if self.entry.time < tenant.destroy_at:
            raise _RefusedError(
                f"tenant {p.tenant!r} may not be shredded before {tenant.destroy_at}"
            )
        seq = self.entry.seq

        def commit(state: LogState) -> None:
            ended = [g for g in state.grants if g[1] == p.tenant]
            state.tenants[p.tenant] = dataclasses.replace(
                tenant,
                destroyed_seq=seq,
                active_until=None,
                shredded_grants=tuple(sorted(backend for backend, _ in ended)),
            )
            for pair in ended:
                del state.grants[pair]

        return commit


def verify_log(
    entries: Iterable[bytes],
    checkpoint_text: str | bytes,
    log_verifier: NoteVerifier | str,
) -> LogState:
    """Replay a whole log and check it against a signed checkpoint: the auditor's verify.

    The daemon at start and the auditor's offline `verify` call this.
    `log_verifier` is the log key the caller trusts: the genesis's, or one a
    `rotate-log-key` of this log put in force (a key pinned after following
    a rotation).

    0. The checkpoint note is read for its size (not yet trusted).
    1. Every entry replays (`Replayer.apply`: chain, order, signatures,
       approvals, executions, the log key's signatures).
    2. The key the caller trusts is one of the log's keys (the genesis's or
       a rotation's), so a log rebuilt under another key is refused; the
       chain of rotations after it is replay's (each signed by the key
       before it).
    3. The checkpoint is signed by the key in force at its size (C2SP signed
       note, `checkpoint.verify_checkpoint`; its errors pass through
       unchanged: `SignatureError`, `UnverifiedNoteError`,
       `DeserializationError`, `VerificationError` for another origin).
    4. The log holds at least the checkpoint's size: a log shorter than its
       latest checkpoint was truncated.
    5. The RFC 9162 root of the first `size` entries is the checkpoint's
       root (`RootMismatchError` as the cause), so an entry rewritten with a
       valid chain after it, or a rewritten last entry, is caught.

    Entries past the checkpoint are replayed (and so checked for chain and
    signatures) but not covered by it (the daemon refuses them at start).
    Every failure of the log itself is a `LogIntegrityError` naming the
    entry where it shows.
    """
    verifier = parse_verifier_key(log_verifier) if isinstance(log_verifier, str) else log_verifier
    # 0. The size the checkpoint claims.
    note = (
        checkpoint_text.decode("utf-8") if isinstance(checkpoint_text, bytes) else checkpoint_text
    )
    claimed = unverified_size(note)
    replayer = Replayer()
    tree = CompactRange()
    root_at_size = EMPTY_ROOT if claimed == 0 else None
    for raw in entries:
        # 1. Replay.
        replayer.apply(raw)
        tree.append(leaf_hash(raw))
        if tree.size == claimed:
            root_at_size = tree.root()
    state = replayer.state
    if state.size == 0:
        # No genesis names a key: the trusted one must have signed the checkpoint.
        verify_checkpoint(note, verifier)
        if claimed > 0:
            raise LogIntegrityError(
                f"the log has no entries, its checkpoint vouches for {claimed}: truncated", seq=0
            )
        raise LogIntegrityError("the log is empty: it has no genesis", seq=0)
    # 2. The trusted key is this log's.
    trusted = verifier.vkey()
    if all(vkey != trusted for _, vkey in state.log_keys):
        names = ", then ".join(vkey for _, vkey in state.log_keys)
        raise LogIntegrityError(
            f"the log key you trust ({trusted}) is not one this log names (genesis, then "
            f"rotations: {names}): a log rebuilt under another key",
            seq=0,
        )
    # 3. Signed by the key in force at its size.
    checkpoint = verify_checkpoint(note, _verifier(state.key_at(claimed))).checkpoint
    # 4. Not truncated.
    if state.size < checkpoint.size:
        raise LogIntegrityError(
            f"the log has {state.size} entries, its checkpoint vouches for {checkpoint.size}: "
            "truncated",
            seq=state.size,
        )
    # 5. Same tree (root_at_size was taken when the size was reached).
    if root_at_size is None or root_at_size != checkpoint.root:
        mismatch = RootMismatchError(
            f"root of the first {checkpoint.size} entries is not the checkpoint's",
            expected=checkpoint.root,
            calculated=root_at_size or b"",
        )
        raise LogIntegrityError(
            f"the first {checkpoint.size} entries do not have the checkpoint's root hash",
            seq=checkpoint.size - 1,
        ) from mismatch
    return state
