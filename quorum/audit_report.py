"""The auditor's verification of an exported log, and the report it yields.

`audit` is what `keyquorum audit verify` runs, offline, over an export file
(`quorum.export`). It decides nothing on its own about entries: the entries
go through `replay.verify_log`, the same function the daemon runs at start,
so the auditor and the daemon cannot disagree about what a log means. What
`audit` adds are the checks that involve more than one checkpoint, and the
report a person reads.

Checks, in order; the first failure raises, naming what is wrong:

0. The export holds at least one entry, and some checkpoint (in the file or
   the one the auditor trusts) vouches for it.
1. The log key: the one given (`log_key`, pinned by the auditor), else the
   one the genesis entry names (trust on first use: the report says so).
2. Every checkpoint (each one in the file, and `trusted_checkpoint`) is a
   C2SP signed note signed by the log key, with the log key's name as
   origin (`checkpoint.verify_checkpoint`); cosignatures from the
   `cosigners` given are verified too, unknown ones are listed.
3. No fork: two checkpoints of the same size with different roots raise
   `ForkError` carrying both notes as evidence.
4. `verify_log(entries, latest checkpoint)`: every entry replays (chain,
   order, signatures, approvals, executions) and the first `size` entries
   have the checkpoint's root. A root mismatch is narrowed down with the
   other checkpoints, to the first entry that changed after a checkpoint
   that still matches; with a checkpoint per append (what the daemon
   writes) that is exactly the edited entry.
5. Every other checkpoint in the file matches the log at its size; one that
   does not, while the latest does, is a fork (`ForkError`): the log key
   signed two histories.
6. The trusted checkpoint: the log is not shorter than it (else truncated),
   and an RFC 9162 consistency proof, computed from the export's entries,
   proves that the newer of it and the latest checkpoint extends the older.
7. At least `min_cosigners` of the `cosigners` signed the latest checkpoint.

The report is a function of the file and the arguments alone (no clock, no
randomness), so the same file gives the same report on every machine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keyquorum.quorum.checkpoint import (
    Checkpoint,
    NoteVerifier,
    VerifiedCheckpoint,
    parse_verifier_key,
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
    VerificationError,
    with_context,
)
from keyquorum.quorum.export import ExportedLog
from keyquorum.quorum.log import (
    ConfirmPayload,
    Entry,
    GenesisPayload,
    SealPayload,
    ShredPayload,
    UnsealPayload,
)
from keyquorum.quorum.merkle import MerkleTree, leaf_hash, verify_consistency
from keyquorum.quorum.note import SignatureType
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    GrantChanged,
    NewVersion,
    RosterChanged,
    VersionDisabled,
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
    "render_text",
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
        return f"{self.name} ({self.fingerprint[:16]})"


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

    def to_json(self) -> dict[str, Any]:
        """The same report for machines (`audit verify --json`)."""
        return dataclasses.asdict(self)


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
    progress: Progress | None = None,
) -> Report:
    """Verify an export completely (module docstring, steps 0-7) and report on it."""
    entries = exported.entries
    # 0. Something to verify, and something that vouches for it.
    if not entries:
        raise LogIntegrityError("the export holds no entries: it has no genesis", seq=0)
    if not exported.checkpoints and trusted_checkpoint is None:
        raise VerificationError(
            "the export holds no signed checkpoint and no trusted checkpoint was given: "
            "nothing vouches for these entries"
        )
    # 1. The log key.
    verifier = _log_verifier(entries[0], log_key)
    witnesses = _cosigners(cosigners)
    if not 0 <= min_cosigners <= len(witnesses):
        raise InvalidInputError(
            f"--min-cosigners {min_cosigners} needs at least that many --cosigner keys"
        )
    # 2. Every checkpoint is the log key's.
    signed = [
        _verify_note(note, verifier, witnesses, f"checkpoint {i + 1} of the export")
        for i, note in enumerate(exported.checkpoints)
    ]
    trusted = (
        None
        if trusted_checkpoint is None
        else _verify_note(trusted_checkpoint, verifier, witnesses, "your trusted checkpoint")
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
    return build_report(
        entries,
        state,
        checkpoints=[*signed, *([trusted] if trusted else [])],
        latest_size=latest.checkpoint.size,
        log_key_pinned=log_key is not None,
        trusted=trusted_record,
        cosigners_required=min_cosigners,
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
    note: str, log: NoteVerifier, cosigners: Sequence[NoteVerifier], what: str
) -> _Signed:
    try:
        verified = verify_checkpoint(note, log, cosigners)
    except KeyquorumError as e:
        label = f"{log.name}+{log.key_hash.hex()}"
        raise with_context(e, f"{what} does not check under the log key {label}") from e
    return _Signed(note, what, verified)


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
        elif kind == SealPayload.TYPE:
            z = SealPayload.from_json(obj["payload"])
            by = None if z.custodian is None else person(z.custodian)
            seals.append(SealRecord(seq, time, z.replica, by, z.reason))
        elif kind == ShredPayload.TYPE:
            shreds[ShredPayload.from_json(obj["payload"]).tenant] = seq

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
                proposer=prop.proposer,
                operation=prop.operation,
                parameters=prop.parameters,
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
        if isinstance(r, RosterChanged):
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
    return Report(
        verdict="verified",
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
        proposals=tuple(proposals),
        tenants=tenants,
        grants=tuple(grants),
        checkpoints=records,
        trusted=trusted,
        cosigners_required=cosigners_required,
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


# Rendering -------------------------------------------------------------------------


def render_text(report: Report) -> str:
    """The report as a person reads it (what `audit verify` prints)."""
    out: list[str] = []
    w = out.append
    w("keyquorum audit report")
    w("=" * 22)
    w(f"Verdict: {report.verdict.upper()}: every entry replayed and every checkpoint checked")
    w(f"Deployment:  {report.deployment}")
    pinned = (
        "pinned by you" if report.log_key_pinned else "taken from the genesis entry, NOT pinned"
    )
    w(f"Log key:     {report.log_key} ({pinned})")
    w(f"Entries:     {report.entries} (0..{report.entries - 1}), "
      f"{render_time(report.first_time)} to {render_time(report.last_time)}")  # fmt: skip
    uncovered = report.entries - report.covered
    w(
        f"Covered:     the first {report.covered} by the latest signed checkpoint"
        + (f"; {uncovered} later entries replayed but not yet checkpointed" if uncovered else "")
    )
    if report.trusted is not None:
        t = report.trusted
        w(
            f"Trusted:     your checkpoint of size {t.size} (root {t.root[:16]}...) is extended "
            f"by {t.extended_by} entries (consistency proof of {t.proof_hashes} hashes verified)"
        )
    w("")
    w("Roster and threshold over time")
    for roster in report.rosters:
        rule = f"{roster.threshold}-of-{len(roster.custodians)}"
        w(f"  entry {roster.seq} at {render_time(roster.time)}: {rule} ({roster.cause})")
        for i, member in enumerate(roster.custodians, start=1):
            w(f"    share {i}: {member.label()}")
    w("")
    w("Share confirmations")
    for conf in report.confirmations:
        w(f"  entry {conf.seq} at {render_time(conf.time)}: {conf.custodian.label()}")
    _none(out, report.confirmations)
    w("")
    w("Unseals (who took part)")
    for u in report.unseals:
        names = ", ".join(m.name for m in u.custodians)
        w(f"  entry {u.seq} at {render_time(u.time)}: replica {u.replica} unsealed by "
          f"{len(u.custodians)}: {names}")  # fmt: skip
    _none(out, report.unseals)
    w("")
    w("Seals")
    for seal in report.seals:
        who = seal.by.label() if seal.by else "the daemon itself"
        replica = "every replica" if seal.replica == SealPayload.ALL_REPLICAS else seal.replica
        when = f"entry {seal.seq} at {render_time(seal.time)}"
        w(f"  {when}: {replica} sealed by {who}: {seal.reason!r}")
    _none(out, report.seals)
    w("")
    w("Proposals")
    for p in report.proposals:
        params = ", ".join(f"{k}={v}" for k, v in p.parameters)
        w(f"  proposal {p.id} at entry {p.seq} ({render_time(p.time)}) by {p.proposer!r}:")
        w(f"    {p.operation} {params}; needs {p.needed} approval(s); "
          f"expires {render_time(p.expires_at)}")  # fmt: skip
        w("    statement the custodians signed:")
        out.extend(f"      | {line}" for line in p.statement.splitlines())
        verdicts = [("approved", v) for v in p.approvals] + [("REFUSED", v) for v in p.refusals]
        for word, v in sorted(verdicts, key=lambda pair: pair[1].seq):
            w(f"    {word} by {v.custodian.label()} at entry {v.seq}, {render_time(v.time)}")
        at = "" if p.outcome_seq is None else f" at entry {p.outcome_seq}"
        w(f"    outcome: {p.outcome}{at}")
    _none(out, report.proposals)
    w("")
    w("Tenants")
    for tenant in report.tenants:
        w(f"  {tenant.name}: {tenant.state}, {tenant.versions} key version(s)")
        for e in tenant.events:
            w(f"    entry {e.seq} at {render_time(e.time)}: {e.what}")
    _none(out, report.tenants)
    w("")
    w("Grants")
    for g in report.grants:
        end = "in force" if g.ended_seq is None else f"{g.ended} at entry {g.ended_seq}"
        w(f"  {g.backend} -> {g.tenant}: granted at entry {g.granted_seq}, {end}")
    _none(out, report.grants)
    w("")
    w("Checkpoints verified (signed by the log key, matching the entries)")
    sizes = sorted({cp.size for cp in report.checkpoints})
    w(f"  {len(report.checkpoints)} checkpoint(s), tree sizes {_ranges(sizes)}")
    latest = report.checkpoints[-1] if report.checkpoints else None
    for cp in report.checkpoints:
        if cp is not latest and not cp.cosigned_by and "export" in cp.source:
            continue  # listed in the count above; shown when cosigned, trusted or latest
        cos = ", ".join(f"{n} at {render_time(t)}" for n, t in cp.cosigned_by) or "none known"
        w(f"  size {cp.size}: root {cp.root[:16]}... ({cp.source}); cosigned by: {cos}")
        if cp.unknown_signers:
            w(f"    also signed by keys you did not give: {', '.join(cp.unknown_signers)}")
    if report.cosigners_required:
        w(f"  the latest is cosigned by at least {report.cosigners_required} of your cosigners")
    return "\n".join(out) + "\n"


def _ranges(sizes: Sequence[int]) -> str:
    """1, 2, 3, 7 -> "1..3, 7": every size without a line per checkpoint."""
    parts: list[str] = []
    start = prev = None
    for n in [*sizes, None]:
        if start is not None and prev is not None and (n is None or n != prev + 1):
            parts.append(str(start) if start == prev else f"{start}..{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(parts) or "none"


def _none(out: list[str], items: Sequence[object]) -> None:
    if not items:
        out.append("  (none)")
