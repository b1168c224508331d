"""The auditor's verification of an exported log, and the report it yields.

`audit` is what `keyquorum audit verify` runs, offline, over an export file
(`quorum.export`). It decides nothing on its own about entries: the entries
go through `replay.verify_log`, the same function the daemon runs at start,
so the auditor and the daemon cannot disagree about what a log means. What
`audit` adds are the checks that involve more than one checkpoint, and the
report a person reads.

Checks, in order; the first failure raises, naming what is wrong:

0. The export holds at least one entry, and some checkpoint (in the file or
   the one the auditor trusts) vouches for it (else `UnverifiableError`).
1. The log key: the one given (`log_key`, pinned by the auditor), else the
   one the genesis entry names; the report is then "not verified", since
   whoever wrote the file also chose that key.
2. Every checkpoint (each one in the file, and `trusted_checkpoint`) is a
   C2SP signed note signed by the log key, with the log key's name as
   origin (`checkpoint.verify_checkpoint`); cosignatures from the
   `cosigners` given are verified too, unknown ones are listed.
3. No fork: two checkpoints of the same size with different roots raise
   `ForkError` carrying both notes as evidence.
4. `verify_log(entries, latest checkpoint)`: every entry replays (chain,
   order, signatures, approvals, executions) and the first `size` entries
   have the checkpoint's root. When that fails, the bytes are examined
   before the meaning (`_damage`): the first entry whose bytes are not
   those the checkpoints and the next entry's hash link vouch for is named
   as damaged, rather than whatever its altered content means to replay
   (a flipped digit of a time is damage, not "proposal expired"). With a
   checkpoint per append (what the daemon writes) that is exactly the
   edited entry; entries missing, added or moved keep replay's message.
5. Every other checkpoint in the file matches the log at its size; one that
   does not, while the latest does, is a fork (`ForkError`): the log key
   signed two histories.
6. The trusted checkpoint: the log is not shorter than it (else truncated),
   and an RFC 9162 consistency proof, computed from the export's entries,
   proves that the newer of it and the latest checkpoint extends the older.
7. At least `min_cosigners` of the `cosigners` signed the latest checkpoint.
8. With `witnesses` m: some checkpoint of the export is cosigned by at least
   m of the witnesses the log itself names at its size (`add-witness`,
   C2SP tlog-cosignature), else `ThresholdError`; the report says how many
   entries those witnesses vouch for, and which entries no one has yet.

The log key (step 1) may be any key of the log's chain: the genesis's, or
one a `rotate-log-key` put in force; the report lists every key with the
entry that put it in force, as it lists the witnesses and the registered
proposers over time.

The report is a function of the file and the arguments alone (no clock, no
randomness), so the same file gives the same report on every machine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keyquorum.quorum import people
from keyquorum.quorum.checkpoint import (
    Checkpoint,
    NoteVerifier,
    VerifiedCheckpoint,
    parse_verifier_key,
    unverified_size,
    verify_checkpoint,
)
from keyquorum.quorum.errors import (
    DeserializationError,
    ForkError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    ProofError,
    RootMismatchError,
    ThresholdError,
    UnverifiableError,
    with_context,
)
from keyquorum.quorum.export import ExportedLog
from keyquorum.quorum.log import (
    ConfirmPayload,
    Entry,
    ExecutionPayload,
    GenesisPayload,
    HandoverPayload,
    SealPayload,
    ShredPayload,
    UnsealPayload,
    UnsealResetPayload,
)
from keyquorum.quorum.merkle import MerkleTree, leaf_hash, verify_consistency
from keyquorum.quorum.note import SignatureType
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    GrantChanged,
    LogKeyRotated,
    NewVersion,
    ProposerAdded,
    ProposerRemoved,
    TenantResult,
    VersionDisabled,
    WitnessChanged,
    operation,
    request_for,
)
from keyquorum.quorum.replay import LogState, verify_log
from keyquorum.quorum.statements import render_time

__all__ = [
    "PROGRESS_STEP",
    "CheckpointRecord",
    "Report",
    "audit",
    "build_report",
]

#: `progress` is called after every this many entries (and at the end).
PROGRESS_STEP = 1000

Progress = Callable[[int], None]


# The report ------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """A custodian as the report names them: name and fingerprint."""

    name: str
    fingerprint: str

    def label(self) -> str:
        """`alice (FKAO-JAYM-D5SP-FPYZ)`, the one form people see (`people.label`)."""
        return people.label(self.name, self.fingerprint)


@dataclass(frozen=True)
class RosterRecord:
    seq: int
    time: int
    threshold: int
    custodians: tuple[Person, ...]
    cause: str


@dataclass(frozen=True)
class Confirmation:
    seq: int
    time: int
    custodian: Person


@dataclass(frozen=True)
class UnsealRecord:
    seq: int
    time: int
    replica: str
    session: str
    custodians: tuple[Person, ...]


@dataclass(frozen=True)
class SealRecord:
    seq: int
    time: int
    replica: str
    by: Person | None
    reason: str


@dataclass(frozen=True)
class UnsealResetRecord:
    """A custodian's signed reset of an unseal session, and whose shares it discarded."""

    seq: int
    time: int
    replica: str
    session: str
    by: Person
    discarded: tuple[Person, ...]


@dataclass(frozen=True)
class HandoverRecord:
    """A replica's unsealed state passed to its successor process (SIGUSR2, an upgrade)."""

    seq: int
    time: int
    replica: str
    from_pid: int
    from_host: str
    to_pid: int
    to_host: str

    def statement(self) -> str:
        """The line people read: who handed what to whom, and who vouches for it."""
        return (
            f"replica {self.replica} handed its unsealed state from process {self.from_pid} "
            f"on {self.from_host} to process {self.to_pid} on {self.to_host}, which serves "
            "from here on; the old process wiped its keys and exited (written by the daemon, "
            "signed by the log key; no custodian took part)"
        )


@dataclass(frozen=True)
class Verdict:
    custodian: Person
    seq: int
    time: int


@dataclass(frozen=True)
class ProposalRecord:
    id: str
    seq: int
    time: int
    proposer: str
    operation: str
    parameters: tuple[tuple[str, str | int], ...]
    #: The parameters as people read them: custodians and proposers by name and
    #: base32 groups (`parameters` keeps the log's values, for machines).
    shown: str
    expires_at: int
    needed: int
    statement: str
    approvals: tuple[Verdict, ...]
    refusals: tuple[Verdict, ...]
    outcome: str
    outcome_seq: int | None


@dataclass(frozen=True)
class Event:
    seq: int
    time: int
    what: str


@dataclass(frozen=True)
class TenantRecord:
    name: str
    state: str
    versions: int
    events: tuple[Event, ...]


@dataclass(frozen=True)
class GrantRecord:
    backend: str
    tenant: str
    granted_seq: int
    ended_seq: int | None
    ended: str | None


@dataclass(frozen=True)
class CheckpointRecord:
    size: int
    root: str
    source: str
    cosigned_by: tuple[tuple[str, int], ...]
    unknown_signers: tuple[str, ...]


@dataclass(frozen=True)
class TrustedRecord:
    size: int
    root: str
    extended_by: int
    proof_hashes: int


@dataclass(frozen=True)
class Holder:
    """A custodian of the roster in force at the end of the log, and what they did."""

    custodian: Person
    share: int
    confirmed_seq: int | None
    approvals: int
    refusals: int
    unseals: int
    seals: int


@dataclass(frozen=True)
class TenantSummary:
    """A tenant at the end of the log: its state, activations and grants in force."""

    name: str
    state: str
    versions: int
    activations: int
    last_active_until: int | None
    backends: tuple[str, ...]


@dataclass(frozen=True)
class Anomaly:
    """Something an auditor should look at, with the entry that shows it."""

    seq: int | None
    what: str


@dataclass(frozen=True)
class Summary:
    """The whole log on one screen: who holds what, what happened, what stands out."""

    threshold: int
    holders: tuple[Holder, ...]
    former: tuple[Person, ...]
    roster_changes: int
    unseals: int
    last_unseal_seq: int | None
    seals: int
    seals_by_custodians: int
    proposals: int
    executed: int
    expired: int
    cancelled: int
    still_open: int
    approvals: int
    refusals: int
    tenants: tuple[TenantSummary, ...]
    anomalies: tuple[Anomaly, ...]


@dataclass(frozen=True)
class Filters:
    """What the detail sections of a report show (the summary is the whole log).

    `since` and `until` are Unix seconds (since inclusive, until exclusive);
    `sections` names detail sections (`SECTIONS`) or entry types
    (`ENTRY_SECTIONS` maps them); `tenant` keeps what concerns one tenant;
    `custodian` what one custodian did, named by name, by the base32 groups
    or by (a prefix of) the 64-hex fingerprint.
    """

    since: int | None = None
    until: int | None = None
    sections: frozenset[str] = frozenset()
    tenant: str | None = None
    custodian: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.sections) - set(SECTIONS) - set(ENTRY_SECTIONS)
        if unknown:
            raise InvalidInputError(
                f"unknown --type {', '.join(sorted(unknown))}; known: "
                f"{', '.join(SECTIONS)} (or an entry type: {', '.join(ENTRY_SECTIONS)})"
            )
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise InvalidInputError("--since must be before --until")

    @property
    def active(self) -> bool:
        return self != Filters()

    def shows(self, section: str) -> bool:
        wanted = {ENTRY_SECTIONS.get(s, s) for s in self.sections}
        if wanted and section not in wanted:
            return False
        if self.tenant is not None and section not in ("proposal", "tenant", "grant"):
            return False
        return not (self.custodian is not None and section in ("tenant", "grant", "checkpoint"))

    def when(self, t: int) -> bool:
        return (self.since is None or t >= self.since) and (self.until is None or t < self.until)

    def to_json(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "sections": sorted(self.sections),
            "since": self.since,
            "tenant": self.tenant,
            "until": self.until,
        }


#: The report's detail sections, in order; `--type` takes these or entry types.
SECTIONS = ("roster", "confirm", "unseal", "seal", "proposal", "tenant", "grant", "checkpoint")
ENTRY_SECTIONS = {
    "genesis": "roster",
    "confirm": "confirm",
    "unseal": "unseal",
    "unseal-reset": "unseal",
    "seal": "seal",
    "proposal": "proposal",
    "approval": "proposal",
    "refusal": "proposal",
    "execution": "proposal",
    "shred": "tenant",
}


@dataclass(frozen=True)
class KeyRecord:
    """A log key and the entry from which it signs (0: the genesis's)."""

    seq: int
    time: int
    log_key: str
    cause: str


@dataclass(frozen=True)
class WitnessRecord:
    """A witness added or removed, and the threshold m after it."""

    seq: int
    time: int
    operation: str
    witness: str
    threshold: int
    approvers: tuple[str, ...]


@dataclass(frozen=True)
class ProposerRecord:
    """A proposer credential registered or removed."""

    seq: int
    time: int
    operation: str
    proposer: Person
    approvers: tuple[str, ...]


@dataclass(frozen=True)
class WitnessedRecord:
    """The latest checkpoint m witnesses of the log cosigned (`--witnesses m`)."""

    size: int
    required: int
    cosigned_by: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Report:
    """Who authorised what, and when, according to a verified log."""

    verdict: str
    deployment: str
    log_key: str
    log_key_pinned: bool
    entries: int
    covered: int
    first_time: int
    last_time: int
    rosters: tuple[RosterRecord, ...]
    confirmations: tuple[Confirmation, ...]
    unseals: tuple[UnsealRecord, ...]
    seals: tuple[SealRecord, ...]
    proposals: tuple[ProposalRecord, ...]
    tenants: tuple[TenantRecord, ...]
    grants: tuple[GrantRecord, ...]
    checkpoints: tuple[CheckpointRecord, ...]
    trusted: TrustedRecord | None
    cosigners_required: int
    summary: Summary
    filters: Filters = Filters()
    log_keys: tuple[KeyRecord, ...] = ()
    witnesses: tuple[WitnessRecord, ...] = ()
    proposers: tuple[ProposerRecord, ...] = ()
    witnessed: WitnessedRecord | None = None
    unseal_resets: tuple[UnsealResetRecord, ...] = ()
    handovers: tuple[HandoverRecord, ...] = ()

    @property
    def verified(self) -> bool:
        """Only a log checked against a pinned key is verified."""
        return self.verdict == "verified"

    def to_json(self) -> dict[str, Any]:
        """The same report for machines (`audit verify --json`, docs/schemas/)."""
        body = dataclasses.asdict(self)
        body["filters"] = self.filters.to_json()
        return {"format": "keyquorum/audit-report", "version": 1, **body}

    def filtered(self, filters: Filters) -> Report:
        """The same report with its detail sections cut down to `filters`."""
        return _apply(self, filters)


# Verification ----------------------------------------------------------------


@dataclass(frozen=True)
class _Signed:
    note: str
    source: str
    verified: VerifiedCheckpoint

    @property
    def checkpoint(self) -> Checkpoint:
        return self.verified.checkpoint


def audit(
    exported: ExportedLog,
    *,
    log_key: str | None = None,
    trusted_checkpoint: str | None = None,
    cosigners: Sequence[str] = (),
    min_cosigners: int = 0,
    witnesses: int = 0,
    progress: Progress | None = None,
    pinned: bool | None = None,
) -> Report:
    """Verify an export completely (module docstring, steps 0-8) and report on it.

    `pinned` says whether `log_key` is one the auditor pinned (the verdict
    is "verified" only then); by default, whenever a key is given.
    """
    entries = exported.entries
    # 0. Something to verify, and something that vouches for it.
    if not entries:
        raise LogIntegrityError("the export holds no entries: it has no genesis", seq=0)
    if not exported.checkpoints and trusted_checkpoint is None:
        raise UnverifiableError(
            "the export holds no signed checkpoint and no trusted checkpoint was given: "
            "nothing vouches for these entries"
        )
    # 1. The log key.
    verifier = _log_verifier(entries[0], log_key)
    cosigning = _cosigners(cosigners)
    if not 0 <= min_cosigners <= len(cosigning):
        raise InvalidInputError(
            f"--min-cosigners {min_cosigners} needs at least that many --cosigner keys"
        )
    if isinstance(witnesses, bool) or not 0 <= witnesses <= 255:
        raise InvalidInputError(f"--witnesses must be 0 to 255, got {witnesses}")
    # The log's keys: replayed first (the checkpoints are checked against the
    # key in force at their size, which only the log says).
    keys = _log_keys(entries, verifier)
    # 2. Every checkpoint is the log key's.
    signed = [
        _verify_note(note, keys, cosigning, f"checkpoint {i + 1} of the export")
        for i, note in enumerate(exported.checkpoints)
    ]
    trusted = (
        None
        if trusted_checkpoint is None
        else _verify_note(trusted_checkpoint, keys, cosigning, "your trusted checkpoint")
    )
    # 3. No two roots for one size.
    _no_fork([*signed, *([trusted] if trusted else [])])
    candidates = signed if signed else [t for t in (trusted,) if t is not None]
    latest = max(candidates, key=lambda s: s.checkpoint.size)
    # 4. The one verifier, with the tree built on the side for 4-6.
    tree = MerkleTree()
    try:
        state = verify_log(_feed(entries, tree, progress), latest.note, verifier)
    except LogIntegrityError as e:
        damaged = _damage(entries, signed, e.seq)
        if damaged is not None:
            raise damaged from e
        if isinstance(e.__cause__, RootMismatchError):
            raise _first_changed(tree, signed, latest) from e
        raise
    # 5. Every checkpoint matches the log (the latest did, in verify_log).
    for s in sorted(signed, key=lambda s: s.checkpoint.size):
        _matches(tree, s, latest)
    # 6. The trusted checkpoint is extended.
    trusted_record = None if trusted is None else _extends(tree, trusted, latest)
    # 7. Enough cosigners on the latest checkpoint.
    latest.verified.require_cosigners(min_cosigners)
    # 8. Enough of the log's own witnesses on some checkpoint.
    witnessed = None if witnesses == 0 else _witnessed(signed, state, witnesses)
    return build_report(
        entries,
        state,
        checkpoints=[*signed, *([trusted] if trusted else [])],
        latest_size=latest.checkpoint.size,
        log_key_pinned=(log_key is not None) if pinned is None else pinned,
        trusted=trusted_record,
        cosigners_required=min_cosigners,
        witnessed=witnessed,
    )


def _log_keys(entries: Sequence[bytes], trusted: NoteVerifier) -> LogState:
    """The log's keys by first tree size, read from the genesis and the rotations
    without replaying: which key must have signed which checkpoint. Step 4
    replays every entry, these included, and checks that the key you trust
    is one of them."""
    keys: list[tuple[int, str]] = []
    for seq, raw in enumerate(entries):
        if seq > 0 and b'"operation":"rotate-log-key"' not in raw:
            continue
        try:
            entry = Entry.from_bytes(raw)
        except KeyquorumError:
            break  # step 4 names it
        payload = entry.payload
        if isinstance(payload, GenesisPayload) and seq == 0:
            keys.append((1, payload.log_key))
        elif isinstance(payload, ExecutionPayload) and isinstance(payload.result, LogKeyRotated):
            keys.append((seq + 1, payload.result.log_key))
    if not keys:
        keys.append((1, trusted.vkey()))
    return LogState(log_keys=keys)


def _witnessed(signed: Sequence[_Signed], state: LogState, required: int) -> WitnessedRecord:
    """Step 8: the latest checkpoint at least `required` witnesses of the log cosigned."""
    for s in sorted(signed, key=lambda s: s.checkpoint.size, reverse=True):
        size = s.checkpoint.size
        policy = state.witnesses_at(size)
        if len(policy.witnesses) < required:
            continue
        try:
            verified = verify_checkpoint(
                s.note, parse_verifier_key(state.key_at(size)), policy.verifiers()
            )
        except KeyquorumError:
            continue
        if len(verified.cosigned_by) >= required:
            return WitnessedRecord(size, required, tuple(sorted(verified.cosigned_by.items())))
    raise ThresholdError(
        f"no checkpoint of the export is cosigned by {required} of the witnesses the log names"
    )


def _log_verifier(genesis: bytes, log_key: str | None) -> NoteVerifier:
    if log_key is not None:
        verifier = parse_verifier_key(log_key)
    else:
        try:
            entry = Entry.from_bytes(genesis)
        except DeserializationError as e:
            raise LogIntegrityError(f"malformed entry: {e}", seq=0) from e
        if not isinstance(entry.payload, GenesisPayload):
            raise LogIntegrityError("the first entry is not a genesis", seq=0)
        verifier = parse_verifier_key(entry.payload.log_key)
    if verifier.sig_type is not SignatureType.ED25519:
        raise InvalidInputError("the log key must be an Ed25519 (0x01) note key")
    return verifier


def _cosigners(keys: Sequence[str]) -> list[NoteVerifier]:
    out = [parse_verifier_key(k) for k in keys]
    for v in out:
        if v.sig_type is not SignatureType.COSIGNATURE_V1:
            raise InvalidInputError(f"cosigner {v.name} must be a cosignature (0x04) key")
    return out


def _verify_note(
    note: str, keys: LogState, cosigners: Sequence[NoteVerifier], what: str
) -> _Signed:
    """`note` checked under the log key in force at the size it claims."""
    log = parse_verifier_key(keys.key_at(_claimed_size(note)))
    try:
        verified = verify_checkpoint(note, log, cosigners)
    except KeyquorumError as e:
        label = f"{log.name}+{log.key_hash.hex()}"
        raise with_context(e, f"{what} does not check under the log key {label}") from e
    return _Signed(note, what, verified)


def _claimed_size(note: str) -> int:
    try:
        return unverified_size(note)
    except DeserializationError:
        return 0  # the signature check then says what is wrong


def _no_fork(signed: Sequence[_Signed]) -> None:
    by_size: dict[int, _Signed] = {}
    for s in signed:
        seen = by_size.setdefault(s.checkpoint.size, s)
        if seen.checkpoint.root != s.checkpoint.root:
            size = s.checkpoint.size
            raise ForkError(
                f"fork: {seen.source} and {s.source} are both signed by the log key for "
                f"tree size {size} with different roots ({seen.checkpoint.root.hex()[:16]}... "
                f"and {s.checkpoint.root.hex()[:16]}...): the log showed two histories",
                size=size,
                evidence=(seen.note, s.note),
            )


def _feed(entries: Iterable[bytes], tree: MerkleTree, progress: Progress | None) -> Iterator[bytes]:
    """The entries for verify_log, growing the Merkle tree and reporting progress."""
    done = 0
    for raw in entries:
        tree.append(leaf_hash(raw))
        yield raw
        done += 1
        if progress is not None and done % PROGRESS_STEP == 0:
            progress(PROGRESS_STEP)
    if progress is not None and done % PROGRESS_STEP:
        progress(done % PROGRESS_STEP)


def _damage(
    entries: Sequence[bytes], signed: Sequence[_Signed], failed_at: int | None
) -> LogIntegrityError | None:
    """The first entry whose bytes are not the ones logged, described as damaged.

    Evidence, from the bytes alone: the smallest checkpoint whose root no
    longer matches (below it the largest one that does), narrowed by the
    hash link each entry holds to the one before it. An entry whose `seq`
    is not its position is not damage but a missing, added or moved entry:
    None then, and replay's own message stands. So is an entry after the
    one replay failed at (the failure is elsewhere).
    """
    leaves = [leaf_hash(raw) for raw in entries]
    tree = MerkleTree()
    for leaf in leaves:
        tree.append(leaf)
    good, bad = 0, None
    for s in sorted(signed, key=lambda s: s.checkpoint.size):
        size = s.checkpoint.size
        if size > tree.size:
            break
        if tree.root(size) == s.checkpoint.root:
            good = size
        else:
            bad = size
            break
    end = len(entries) if bad is None else bad
    damaged: int | None = None
    evidence: list[str] = []
    for i in range(good, end):
        link = _prev_of(entries[i + 1]) if i + 1 < len(entries) else None
        if link is not None and link != leaves[i]:
            damaged = i
            evidence.append(f"entry {i + 1} records another hash of it")
            break
    if damaged is None and bad is not None:
        damaged = bad - 1
    if damaged is None or (failed_at is not None and damaged > failed_at):
        return None
    if bad is not None and damaged == bad - 1:
        evidence.insert(0, f"the checkpoint of size {bad} signed by the log key has another root")
    try:
        entry = Entry.from_bytes(entries[damaged])
    except DeserializationError as e:
        reads = f"it no longer parses ({e})"
    else:
        if entry.seq != damaged:
            return None
        what = f"{_article(entry.type)} {entry.type}"
        reads = f"as it stands it reads: {what} at {render_time(entry.time)}"
    return LogIntegrityError(
        f"damaged: its bytes are not the ones that were logged ({'; '.join(evidence)}); {reads}",
        seq=damaged,
    )


def _prev_of(raw: bytes) -> bytes | None:
    """The hash link an entry holds, read without trusting anything else in it."""
    try:
        obj = json.loads(raw)
        return bytes.fromhex(obj["prev"]) if isinstance(obj, dict) else None
    except (ValueError, KeyError, TypeError):
        return None


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _first_changed(tree: MerkleTree, signed: Sequence[_Signed], latest: _Signed) -> Exception:
    """Name the first entry that changed, using every checkpoint that still matches.

    Only called after every entry replayed, so the tree holds the whole log.
    The bad entry lies after the largest matching checkpoint below the
    smallest mismatching one.
    """
    good = 0
    for s in sorted(signed, key=lambda s: s.checkpoint.size):
        size = s.checkpoint.size
        if size > tree.size:
            break
        if tree.root(size) == s.checkpoint.root:
            good = max(good, size)
            continue
        where = (
            f"entry {good} changed"
            if good == size - 1
            else f"an entry among {good}..{size - 1} changed"
        )
        return LogIntegrityError(
            f"{where} after it was checkpointed: the first {size} entries no longer have "
            f"the root the log key signed for size {size}",
            seq=good,
        )
    return LogIntegrityError(
        f"the first {latest.checkpoint.size} entries do not have the checkpoint's root",
        seq=max(latest.checkpoint.size - 1, 0),
    )


def _matches(tree: MerkleTree, s: _Signed, latest: _Signed) -> None:
    size = s.checkpoint.size
    if size > tree.size:
        raise LogIntegrityError(
            f"the export holds {tree.size} entries but {s.source} vouches for {size}: truncated",
            seq=tree.size,
        )
    if size and tree.root(size) != s.checkpoint.root:
        raise ForkError(
            f"{s.source} (size {size}) is signed by the log key but the later checkpoint of "
            f"size {latest.checkpoint.size} does not extend it: the log showed two histories",
            size=size,
            evidence=(s.note, latest.note),
        )


def _extends(tree: MerkleTree, trusted: _Signed, latest: _Signed) -> TrustedRecord:
    """Step 6: the log is not shorter than `trusted` and extends it (RFC 9162 2.1.4)."""
    old = trusted.checkpoint
    if old.size > tree.size:
        raise LogIntegrityError(
            f"the export holds {tree.size} entries, your trusted checkpoint vouches for "
            f"{old.size}: the log was truncated",
            seq=tree.size,
        )
    new = latest.checkpoint
    small, big = (old, new) if old.size <= new.size else (new, old)
    proof: list[bytes] = []
    if small.size > 0:
        proof = tree.consistency_proof(small.size, big.size) if small.size < big.size else []
        try:
            verify_consistency(small.size, big.size, proof, small.root, big.root)
        except ProofError as e:
            raise LogIntegrityError(
                f"the log does not extend your trusted checkpoint (size {old.size}): an entry "
                f"among 0..{old.size - 1} is not the one you saw then",
                seq=None,
            ) from e
    return TrustedRecord(old.size, old.root.hex(), new.size - old.size, len(proof))


# Building the report -------------------------------------------------------------


def build_report(
    entries: Sequence[bytes],
    state: LogState,
    *,
    checkpoints: Sequence[_Signed] = (),
    latest_size: int,
    log_key_pinned: bool,
    trusted: TrustedRecord | None = None,
    cosigners_required: int = 0,
    witnessed: WitnessedRecord | None = None,
) -> Report:
    """The report of a log `verify_log` accepted (`state` is its result)."""
    people: dict[str, Person] = {}
    for epoch in state.rosters:
        for c in epoch.roster:
            people.setdefault(c.fingerprint, Person(c.name, c.fingerprint))

    # Roster order (share index, first roster first), for listing people.
    rank = {p: i for i, p in enumerate(people.values())}

    def person(fingerprint: str) -> Person:
        found = people.get(fingerprint)
        if found is None:
            found = people[fingerprint] = Person("?", fingerprint)
            rank[found] = len(rank)
        return found

    times: list[int] = []
    confirmations: list[Confirmation] = []
    unseals: list[UnsealRecord] = []
    seals: list[SealRecord] = []
    resets: list[UnsealResetRecord] = []
    handovers: list[HandoverRecord] = []
    shreds: dict[str, int] = {}
    # The entries were checked completely by replay already; only the fields
    # the report shows are read again, without re-checking their encoding.
    for seq, raw in enumerate(entries):
        obj = json.loads(raw)
        time, kind = obj["time"], obj["type"]
        times.append(time)
        if kind == ConfirmPayload.TYPE:
            confirmed = ConfirmPayload.from_json(obj["payload"])
            confirmations.append(Confirmation(seq, time, person(confirmed.custodian)))
        elif kind == UnsealPayload.TYPE:
            u = UnsealPayload.from_json(obj["payload"])
            who = tuple(sorted((person(s.custodian) for s in u.shares), key=rank.__getitem__))
            unseals.append(UnsealRecord(seq, time, u.replica, u.session.hex(), who))
        elif kind == UnsealResetPayload.TYPE:
            reset = UnsealResetPayload.from_json(obj["payload"])
            gone = tuple(sorted((person(fp) for fp in reset.discarded), key=rank.__getitem__))
            resetter = person(reset.custodian)
            resets.append(
                UnsealResetRecord(seq, time, reset.replica, reset.session.hex(), resetter, gone)
            )
        elif kind == SealPayload.TYPE:
            z = SealPayload.from_json(obj["payload"])
            by = None if z.custodian is None else person(z.custodian)
            seals.append(SealRecord(seq, time, z.replica, by, z.reason))
        elif kind == ShredPayload.TYPE:
            shreds[ShredPayload.from_json(obj["payload"]).tenant] = seq
        elif kind == HandoverPayload.TYPE:
            h = HandoverPayload.from_json(obj["payload"])
            handovers.append(
                HandoverRecord(seq, time, h.replica, h.from_pid, h.from_host, h.to_pid, h.to_host)
            )

    executions = {x.proposal: x for x in state.executions}
    roster_changes = [x.seq for x in state.executions if x.operation == "change-roster"]
    rosters = tuple(
        RosterRecord(
            e.seq,
            times[e.seq],
            e.threshold,
            tuple(person(c.fingerprint) for c in e.roster),
            "genesis" if e.seq == 0 else f"change-roster, proposal {_proposal_of(state, e.seq)}",
        )
        for e in state.rosters
    )

    # Registered proposers by fingerprint, kept after a removal (their proposals stay).
    registered = {
        x.result.proposer.fingerprint: x.result.proposer.name
        for x in state.executions
        if isinstance(x.result, ProposerAdded)
    }

    def proposer_label(fingerprint: str) -> str:
        name = state.proposer_name(fingerprint) or registered.get(fingerprint, "?")
        return Person(name, fingerprint).label()

    def shown(params: Sequence[tuple[str, str | int]]) -> str:
        values = dict(params)
        out = []
        for key, value in params:
            if key == "roster":
                labels = ", ".join(person(fp).label() for fp in str(value).split(","))
                out.append(f"roster=[{labels}]")
            elif key == "proposer" and "name" in values:
                out.append(f"proposer={Person(str(values['name']), str(value)).label()}")
            elif key == "proposer":
                out.append(f"proposer={proposer_label(str(value))}")
            elif not (key == "name" and "proposer" in values):
                out.append(f"{key}={value}")
        return ", ".join(out)

    proposals = []
    last_time = times[-1]
    for prop in state.proposals.values():
        request = request_for(prop, state)
        executed = executions.get(prop.id)
        outcome_seq: int | None = None
        if executed is not None:
            outcome, outcome_seq = "executed", executed.seq
        elif prop.status == "cancelled":
            outcome_seq = next((s for s in roster_changes if s > prop.log_position), None)
            if outcome_seq is not None and times[outcome_seq] >= prop.expires_at:
                outcome, outcome_seq = "expired without enough approvals", None
            else:
                outcome = "cancelled by a roster change"
        elif last_time >= prop.expires_at:
            outcome = "expired without enough approvals"
        else:
            outcome = "still open at the end of the log"
        threshold = _threshold_at(state, prop.log_position)
        proposals.append(
            ProposalRecord(
                id=prop.id.hex(),
                seq=prop.log_position,
                time=prop.time,
                proposer=proposer_label(prop.proposer),
                operation=prop.operation,
                parameters=prop.parameters,
                shown=shown(prop.parameters),
                expires_at=prop.expires_at,
                needed=operation(prop.operation).required_approvals(threshold),
                statement=request.statement("approve").render(),
                approvals=tuple(
                    Verdict(person(fp), seq, times[seq]) for fp, seq in prop.approvals.items()
                ),
                refusals=tuple(
                    Verdict(person(fp), seq, times[seq]) for fp, seq in prop.refusals.items()
                ),
                outcome=outcome,
                outcome_seq=outcome_seq,
            )
        )

    tenant_events: dict[str, list[Event]] = {}
    grants: list[GrantRecord] = []
    for x in state.executions:
        r = x.result
        if not isinstance(r, TenantResult):
            continue
        approvers = ", ".join(person(fp).name for fp in x.approvers)
        carried = f" (proposal {x.proposal.hex()[:8]}, approved by {approvers})"
        what = _tenant_event(x.operation, r, dict(x.parameters))
        tenant_events.setdefault(r.tenant, []).append(Event(x.seq, x.time, what + carried))
        if isinstance(r, GrantChanged):
            if x.operation == "grant":
                grants.append(GrantRecord(r.backend, r.tenant, x.seq, None, None))
            else:
                grants = _end_grant(grants, r.backend, r.tenant, x.seq, "revoked")
    for tenant, seq in sorted(shreds.items(), key=lambda item: item[1]):
        tenant_events.setdefault(tenant, []).append(
            Event(seq, times[seq], "shredded: its key salts are erased, every version is gone")
        )
        for g in list(grants):
            if g.tenant == tenant and g.ended_seq is None:
                grants = _end_grant(grants, g.backend, tenant, seq, "tenant shredded")
    tenants = tuple(
        TenantRecord(
            name=t.name,
            state=_tenant_state(t.destroyed, t.destroy_at, t.active_until, last_time),
            versions=len(t.versions),
            events=tuple(sorted(tenant_events.get(t.name, []), key=lambda e: e.seq)),
        )
        for t in state.tenants.values()
    )

    log_keys = [KeyRecord(0, times[0], state.log_keys[0][1], "genesis")]
    witness_records: list[WitnessRecord] = []
    proposer_records: list[ProposerRecord] = []
    for x in state.executions:
        r = x.result
        signers = tuple(person(fp).label() for fp in x.approvers)
        carried = f"proposal {x.proposal.hex()[:8]}, approved by {', '.join(signers)}"
        if isinstance(r, LogKeyRotated):
            log_keys.append(KeyRecord(x.seq, x.time, r.log_key, f"rotate-log-key, {carried}"))
        elif isinstance(r, WitnessChanged):
            witness_records.append(
                WitnessRecord(x.seq, x.time, x.operation, r.witness, r.witness_threshold, signers)
            )
        elif isinstance(r, ProposerAdded):
            added = Person(r.proposer.name, r.proposer.fingerprint)
            proposer_records.append(ProposerRecord(x.seq, x.time, x.operation, added, signers))
        elif isinstance(r, ProposerRemoved):
            removed = next(
                (p.proposer for p in proposer_records if p.proposer.fingerprint == r.proposer),
                Person("?", r.proposer),
            )
            proposer_records.append(ProposerRecord(x.seq, x.time, x.operation, removed, signers))

    records = tuple(
        CheckpointRecord(
            size=s.checkpoint.size,
            root=s.checkpoint.root.hex(),
            source=s.source,
            cosigned_by=tuple(sorted(s.verified.cosigned_by.items())),
            unknown_signers=s.verified.unknown_signers,
        )
        for s in sorted(checkpoints, key=lambda s: (s.checkpoint.size, s.source))
    )
    summary = _summarize(
        state,
        rosters=rosters,
        confirmations=confirmations,
        unseals=unseals,
        seals=seals,
        proposals=proposals,
        tenants=tenants,
        grants=grants,
        log_key_pinned=log_key_pinned,
        uncovered=state.size - latest_size,
        checkpoints=records,
    )
    return Report(
        verdict="verified" if log_key_pinned else "unverified",
        deployment=state.deployment,
        log_key=state.log_key,
        log_key_pinned=log_key_pinned,
        entries=state.size,
        covered=latest_size,
        first_time=times[0],
        last_time=last_time,
        rosters=rosters,
        confirmations=tuple(confirmations),
        unseals=tuple(unseals),
        seals=tuple(seals),
        unseal_resets=tuple(resets),
        proposals=tuple(proposals),
        tenants=tenants,
        grants=tuple(grants),
        checkpoints=records,
        trusted=trusted,
        cosigners_required=cosigners_required,
        summary=summary,
        log_keys=tuple(log_keys),
        witnesses=tuple(witness_records),
        proposers=tuple(proposer_records),
        witnessed=witnessed,
        handovers=tuple(handovers),
    )


def _summarize(
    state: LogState,
    *,
    rosters: Sequence[RosterRecord],
    confirmations: Sequence[Confirmation],
    unseals: Sequence[UnsealRecord],
    seals: Sequence[SealRecord],
    proposals: Sequence[ProposalRecord],
    tenants: Sequence[TenantRecord],
    grants: Sequence[GrantRecord],
    log_key_pinned: bool,
    uncovered: int,
    checkpoints: Sequence[CheckpointRecord],
) -> Summary:
    """The summary section: counted from the records, nothing re-read from the log."""
    current = rosters[-1]
    # Confirmations are of the current split: those after the latest roster change.
    confirmed = {c.custodian.fingerprint: c.seq for c in confirmations if c.seq > current.seq}
    approved: dict[str, int] = {}
    refused: dict[str, int] = {}
    for p in proposals:
        for v in p.approvals:
            approved[v.custodian.fingerprint] = approved.get(v.custodian.fingerprint, 0) + 1
        for v in p.refusals:
            refused[v.custodian.fingerprint] = refused.get(v.custodian.fingerprint, 0) + 1
    unsealed: dict[str, int] = {}
    for u in unseals:
        for m in u.custodians:
            unsealed[m.fingerprint] = unsealed.get(m.fingerprint, 0) + 1
    sealed: dict[str, int] = {}
    for z in seals:
        if z.by is not None:
            sealed[z.by.fingerprint] = sealed.get(z.by.fingerprint, 0) + 1
    holders = tuple(
        Holder(
            custodian=m,
            share=i,
            confirmed_seq=confirmed.get(m.fingerprint),
            approvals=approved.get(m.fingerprint, 0),
            refusals=refused.get(m.fingerprint, 0),
            unseals=unsealed.get(m.fingerprint, 0),
            seals=sealed.get(m.fingerprint, 0),
        )
        for i, m in enumerate(current.custodians, start=1)
    )
    on_roster = {m.fingerprint for m in current.custodians}
    former: dict[str, Person] = {}
    for r in rosters:
        for m in r.custodians:
            if m.fingerprint not in on_roster:
                former.setdefault(m.fingerprint, m)
    in_force: dict[str, list[str]] = {}
    for g in grants:
        if g.ended_seq is None:
            in_force.setdefault(g.tenant, []).append(g.backend)
    tenant_summaries = []
    for t in tenants:
        record = state.tenants[t.name]
        activations = [e for e in t.events if e.what.startswith("activated")]
        tenant_summaries.append(
            TenantSummary(
                name=t.name,
                state=t.state,
                versions=t.versions,
                activations=len(activations),
                last_active_until=record.active_until,
                backends=tuple(in_force.get(t.name, ())),
            )
        )
    anomalies: list[Anomaly] = []
    if not log_key_pinned:
        anomalies.append(
            Anomaly(None, "the log key was not pinned: it was taken from the file itself")
        )
    if uncovered:
        anomalies.append(
            Anomaly(
                state.size - uncovered,
                f"the last {uncovered} entries are not covered by a checkpoint signed by the "
                "log key",
            )
        )
    unconfirmed = [m.label() for m in current.custodians if m.fingerprint not in confirmed]
    if unconfirmed:
        anomalies.append(
            Anomaly(
                None,
                f"{len(unconfirmed)} of {len(current.custodians)} custodians never confirmed "
                f"their current share: {', '.join(unconfirmed)}",
            )
        )
    for r in rosters[1:]:
        anomalies.append(
            Anomaly(r.seq, f"the roster changed: {r.threshold}-of-{len(r.custodians)}")
        )
    for z in seals:
        if z.by is not None:
            anomalies.append(
                Anomaly(z.seq, f"{z.by.label()} sealed {z.replica}: {z.reason!r} (signed)")
            )
    for p in proposals:
        for v in p.refusals:
            anomalies.append(
                Anomaly(v.seq, f"{v.custodian.label()} refused proposal {p.id[:8]} ({p.operation})")
            )
        if p.outcome.startswith("expired") or p.outcome.startswith("cancelled"):
            anomalies.append(
                Anomaly(
                    p.seq,
                    f"proposal {p.id[:8]} ({p.operation}) {p.outcome} "
                    f"({len(p.approvals)} of {p.needed} approvals)",
                )
            )
    for cp in checkpoints:
        if cp.unknown_signers:
            anomalies.append(
                Anomaly(
                    cp.size - 1,
                    f"the checkpoint of size {cp.size} carries signatures of keys you did not "
                    f"give: {', '.join(cp.unknown_signers)}",
                )
            )
    anomalies.sort(key=lambda a: -1 if a.seq is None else a.seq)
    return Summary(
        threshold=current.threshold,
        holders=holders,
        former=tuple(former.values()),
        roster_changes=len(rosters) - 1,
        unseals=len(unseals),
        last_unseal_seq=unseals[-1].seq if unseals else None,
        seals=len(seals),
        seals_by_custodians=sum(1 for z in seals if z.by is not None),
        proposals=len(proposals),
        executed=sum(1 for p in proposals if p.outcome == "executed"),
        expired=sum(1 for p in proposals if p.outcome.startswith("expired")),
        cancelled=sum(1 for p in proposals if p.outcome.startswith("cancelled")),
        still_open=sum(1 for p in proposals if p.outcome.startswith("still open")),
        approvals=sum(len(p.approvals) for p in proposals),
        refusals=sum(len(p.refusals) for p in proposals),
        tenants=tuple(tenant_summaries),
        anomalies=tuple(anomalies),
    )


def _matches_custodian(who: Person, wanted: str) -> bool:
    """A custodian named by name, base32 groups, or (a prefix of) the 64-hex fingerprint."""
    text = wanted.strip()
    if text.lower() == who.name.lower():
        return True
    groups = people.display_fingerprint(who.fingerprint)
    if text.upper().replace("-", "") == groups.replace("-", ""):
        return True
    return len(text) >= 8 and who.fingerprint.startswith(text.lower())


def _apply(report: Report, f: Filters) -> Report:
    """`Report.filtered`: each detail section cut down; the summary stays whole."""
    c = f.custodian

    def someone(persons: Iterable[Person]) -> bool:
        return c is None or any(_matches_custodian(p, c) for p in persons)

    def proposal_shown(p: ProposalRecord) -> bool:
        if f.tenant is not None and dict(p.parameters).get("tenant") != f.tenant:
            return False
        verdicts = (*p.approvals, *p.refusals)
        if c is not None and not someone(v.custodian for v in verdicts):
            return False
        return f.when(p.time) or any(f.when(v.time) for v in verdicts)

    tenants = tuple(
        dataclasses.replace(t, events=tuple(e for e in t.events if f.when(e.time)))
        for t in report.tenants
        if f.tenant is None or t.name == f.tenant
    )
    return dataclasses.replace(
        report,
        filters=f,
        rosters=tuple(
            r
            for r in report.rosters
            if f.shows("roster") and f.when(r.time) and someone(r.custodians)
        ),
        confirmations=tuple(
            x
            for x in report.confirmations
            if f.shows("confirm") and f.when(x.time) and someone([x.custodian])
        ),
        unseals=tuple(
            u
            for u in report.unseals
            if f.shows("unseal") and f.when(u.time) and someone(u.custodians)
        ),
        unseal_resets=tuple(
            x
            for x in report.unseal_resets
            if f.shows("unseal") and f.when(x.time) and someone([x.by, *x.discarded])
        ),
        seals=tuple(
            z
            for z in report.seals
            if f.shows("seal") and f.when(z.time) and (c is None or (z.by and someone([z.by])))
        ),
        handovers=tuple(
            h for h in report.handovers if f.shows("unseal") and f.when(h.time) and c is None
        ),
        proposals=tuple(p for p in report.proposals if f.shows("proposal") and proposal_shown(p)),
        tenants=tuple(t for t in tenants if f.shows("tenant") and (t.events or not f.active)),
        grants=tuple(
            g
            for g in report.grants
            if f.shows("grant") and (f.tenant is None or g.tenant == f.tenant)
        ),
        checkpoints=report.checkpoints if f.shows("checkpoint") else (),
    )


def _proposal_of(state: LogState, seq: int) -> str:
    for x in state.executions:
        if x.seq == seq:
            return x.proposal.hex()[:8]
    return "?"


def _threshold_at(state: LogState, seq: int) -> int:
    """The threshold in force at entry `seq`."""
    threshold = state.rosters[0].threshold
    for epoch in state.rosters:
        if epoch.seq <= seq:
            threshold = epoch.threshold
    return threshold


def _tenant_event(name: str, r: object, params: Mapping[str, str | int]) -> str:
    if isinstance(r, NewVersion):
        return "created, key version 1" if name == "create-tenant" else f"rotated to {r.version}"
    if isinstance(r, Activated):
        return f"activated until {render_time(r.active_until)}"
    if isinstance(r, DestroyScheduled):
        return f"destruction scheduled for {render_time(r.destroy_at)}"
    if isinstance(r, GrantChanged):
        return f"{'granted to' if name == 'grant' else 'revoked from'} backend {r.backend}"
    if isinstance(r, VersionDisabled):
        return f"key version {r.version} disabled"
    if name == "deactivate-tenant":
        return "deactivated"
    return f"{name} {', '.join(f'{k}={v}' for k, v in params.items())}".strip()


def _end_grant(
    grants: list[GrantRecord], backend: str, tenant: str, seq: int, why: str
) -> list[GrantRecord]:
    return [
        dataclasses.replace(g, ended_seq=seq, ended=why)
        if g.backend == backend and g.tenant == tenant and g.ended_seq is None
        else g
        for g in grants
    ]


def _tenant_state(destroyed: bool, destroy_at: int | None, until: int | None, now: int) -> str:
    if destroyed:
        return "destroyed (shredded)"
    if destroy_at is not None:
        return f"scheduled for destruction at {render_time(destroy_at)}"
    if until is not None and now < until:
        return f"active until {render_time(until)}"
    return "inactive"
