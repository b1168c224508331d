"""The audit report as a person reads it in a terminal (`audit verify`).

It opens with the verdict and a summary of the whole log (who holds what,
unseals, seals, approvals, tenants and their activations, anomalies), then
the detail sections, cut down by the report's `Filters`. Every time is
shown once, in UTC (`statements.render_time`). Text nobody signed is said
to be unsigned: a statement no custodian signed; what the daemon wrote on
its own (a seal at shutdown) is signed by the log key and says so. The log
keys, witnesses and registered proposers (each a quorum decision) follow
the roster. Custodians appear as `alice (FKAO-JAYM-D5SP-FPYZ)`.
The text is a function of the report alone: the same file and arguments
give the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from keyquorum.quorum.audit_report import ProposalRecord, Report, SealRecord
from keyquorum.quorum.log import SealPayload
from keyquorum.quorum.statements import render_time

__all__ = ["render_text", "verdict_line"]


def verdict_line(report: Report) -> str:
    """The first thing a reader sees: VERIFIED only with a pinned log key."""
    if report.verified:
        return "VERIFIED: every entry replayed and every checkpoint checked against your log key"
    return (
        "NOT VERIFIED: the entries are consistent with the log key the file itself names, "
        "but no log key was pinned (--log-key or --log-key-file), so whoever wrote the file "
        "could have chosen that key too"
    )


def render_text(report: Report) -> str:
    """The whole report, summary first (module docstring)."""
    out: list[str] = []
    w = out.append
    w("keyquorum audit report")
    w("=" * 22)
    w(f"Verdict:     {verdict_line(report)}")
    w(f"Deployment:  {report.deployment}")
    pinned = "pinned by you" if report.log_key_pinned else "NOT pinned: taken from the file"
    w(f"Log key:     {report.log_key} ({pinned})")
    w(
        f"Entries:     {report.entries} (0..{report.entries - 1}), "
        f"{render_time(report.first_time)} to {render_time(report.last_time)}"
    )
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
    if report.witnessed is not None:
        wd = report.witnessed
        names = ", ".join(f"{n} at {render_time(t)}" for n, t in wd.cosigned_by)
        not_yet = report.entries - wd.size
        w(
            f"Witnessed:   the first {wd.size} entries, by {len(wd.cosigned_by)} of the log's "
            f"witnesses ({wd.required} required): {names}"
            + (f"; {not_yet} later entries not witnessed yet" if not_yet else "")
        )
    w("")
    _summary(out, report)
    w("")
    if report.filters.active:
        w(f"Details, filtered: {_describe_filters(report)}")
    else:
        w("Details")
    w("=" * 7)
    _details(out, report)
    return "\n".join(out) + "\n"


def _summary(out: list[str], report: Report) -> None:
    s = report.summary
    w = out.append
    w("Summary of the whole log")
    w("-" * 24)
    w(f"Who holds a share: {s.threshold} of {len(s.holders)} unseal")
    for h in s.holders:
        confirmed = (
            f"confirmed at entry {h.confirmed_seq}"
            if h.confirmed_seq is not None
            else "not confirmed"
        )
        w(
            f"  share {h.share}: {h.custodian.label()}: {confirmed}; took part in "
            f"{h.unseals} unseal(s); {h.approvals} approval(s), {h.refusals} refusal(s), "
            f"{h.seals} seal(s)"
        )
    if s.former:
        w(f"  no longer on the roster: {', '.join(p.label() for p in s.former)}")
    if s.roster_changes:
        w(f"  the roster changed {s.roster_changes} time(s)")
    last = "" if s.last_unseal_seq is None else f" (last at entry {s.last_unseal_seq})"
    w(f"Unseals: {s.unseals}{last}")
    w(
        f"Seals: {s.seals} ({s.seals_by_custodians} by a custodian's signed request, "
        f"{s.seals - s.seals_by_custodians} by the daemon itself)"
    )
    w(
        f"Proposals: {s.proposals}: {s.executed} executed, {s.expired} expired, "
        f"{s.cancelled} cancelled, {s.still_open} still open; {s.approvals} approval(s), "
        f"{s.refusals} refusal(s)"
    )
    w(f"Tenants: {len(s.tenants)}")
    for t in s.tenants:
        backends = ", ".join(t.backends) or "none"
        w(
            f"  {t.name}: {t.state}; {t.versions} key version(s); activated "
            f"{t.activations} time(s); granted to: {backends}"
        )
    w(f"Anomalies: {len(s.anomalies) or 'none'}")
    for a in s.anomalies:
        where = "" if a.seq is None else f"entry {a.seq}: "
        w(f"  - {where}{a.what}")


def _describe_filters(report: Report) -> str:
    f = report.filters
    parts = []
    if f.since is not None:
        parts.append(f"from {render_time(f.since)}")
    if f.until is not None:
        parts.append(f"before {render_time(f.until)}")
    if f.sections:
        parts.append(f"type {', '.join(sorted(f.sections))}")
    if f.tenant is not None:
        parts.append(f"tenant {f.tenant}")
    if f.custodian is not None:
        parts.append(f"custodian {f.custodian}")
    return "; ".join(parts)


def _details(out: list[str], report: Report) -> None:
    w = out.append
    f = report.filters
    if f.shows("roster"):
        w("")
        w("Roster and threshold over time")
        for roster in report.rosters:
            rule = f"{roster.threshold}-of-{len(roster.custodians)}"
            w(f"  entry {roster.seq} at {render_time(roster.time)}: {rule} ({roster.cause})")
            for i, member in enumerate(roster.custodians, start=1):
                w(f"    share {i}: {member.label()}")
        _none(out, report.rosters)
        _trust(out, report)
    if f.shows("confirm"):
        w("")
        w("Share confirmations (each signed by its custodian)")
        for conf in report.confirmations:
            w(f"  entry {conf.seq} at {render_time(conf.time)}: {conf.custodian.label()}")
        _none(out, report.confirmations)
    if f.shows("unseal"):
        w("")
        w("Unseals (each share signed by its custodian)")
        for u in report.unseals:
            names = ", ".join(m.label() for m in u.custodians)
            w(
                f"  entry {u.seq} at {render_time(u.time)}: replica {u.replica} unsealed by "
                f"{len(u.custodians)}: {names}"
            )
        _none(out, report.unseals)
        for h in report.handovers:
            w(f"  entry {h.seq} at {render_time(h.time)}: {h.statement()}")
        if report.unseal_resets:
            w("")
            w("Unseal sessions reset (each reset signed by its custodian)")
            for x in report.unseal_resets:
                gone = ", ".join(m.label() for m in x.discarded) or "no share"
                w(
                    f"  entry {x.seq} at {render_time(x.time)}: replica {x.replica}, session "
                    f"{x.session[:16]} reset by {x.by.label()}; discarded: {gone}"
                )
    if f.shows("seal"):
        w("")
        w("Seals")
        for seal in report.seals:
            w(f"  {_seal(seal)}")
        _none(out, report.seals)
    if f.shows("proposal"):
        w("")
        w("Proposals")
        for p in report.proposals:
            _proposal(out, p)
        _none(out, report.proposals)
    if f.shows("tenant"):
        w("")
        w("Tenants")
        for tenant in report.tenants:
            w(f"  {tenant.name}: {tenant.state}, {tenant.versions} key version(s)")
            for e in tenant.events:
                w(f"    entry {e.seq} at {render_time(e.time)}: {e.what}")
        _none(out, report.tenants)
    if f.shows("grant"):
        w("")
        w("Grants")
        for g in report.grants:
            end = "in force" if g.ended_seq is None else f"{g.ended} at entry {g.ended_seq}"
            w(f"  {g.backend} -> {g.tenant}: granted at entry {g.granted_seq}, {end}")
        _none(out, report.grants)
    if f.shows("checkpoint"):
        w("")
        _checkpoints(out, report)


def _trust(out: list[str], report: Report) -> None:
    """What the log says signs it, cosigns it, and may propose: each a quorum decision."""
    w = out.append
    w("")
    w("Log keys (what signs the checkpoints, from which entry)")
    for k in report.log_keys:
        w(f"  entry {k.seq} at {render_time(k.time)}: {k.log_key} ({k.cause})")
    _none(out, report.log_keys)
    w("")
    w("Witnesses (cosigners the quorum put in the log)")
    for wr in report.witnesses:
        who = ", ".join(wr.approvers)
        w(
            f"  entry {wr.seq} at {render_time(wr.time)}: {wr.operation} {wr.witness}; "
            f"threshold m = {wr.threshold} (approved by {who})"
        )
    _none(out, report.witnesses)
    w("")
    w("Registered proposers")
    for pr in report.proposers:
        who = ", ".join(pr.approvers)
        w(
            f"  entry {pr.seq} at {render_time(pr.time)}: {pr.operation} {pr.proposer.label()} "
            f"(approved by {who})"
        )
    _none(out, report.proposers)


def _seal(seal: SealRecord) -> str:
    replica = "every replica" if seal.replica == SealPayload.ALL_REPLICAS else seal.replica
    when = f"entry {seal.seq} at {render_time(seal.time)}"
    if seal.by is None:
        return (
            f"{when}: {replica} sealed by the daemon itself; reason (written by the daemon, "
            f"signed by the log key): {seal.reason!r}"
        )
    return f"{when}: {replica} sealed by {seal.by.label()}; reason (signed): {seal.reason!r}"


def _proposal(out: list[str], p: ProposalRecord) -> None:
    w = out.append
    params = p.shown
    w(f"  proposal {p.id} at entry {p.seq} ({render_time(p.time)}):")
    expires = render_time(p.expires_at)
    w(f"    {p.operation} {params}; needs {p.needed} approval(s); expires {expires}")
    w(f"    proposed by {p.proposer} (signed by the proposer)")
    if p.approvals:
        w(f"    statement the {len(p.approvals)} approver(s) signed:")
    elif p.refusals:
        w("    statement offered (nobody approved it; refusals signed it as REFUSE):")
    else:
        w("    statement offered for signature (nobody signed it):")
    out.extend(f"      | {line}" for line in p.statement.splitlines())
    verdicts = [("approved", v) for v in p.approvals] + [("REFUSED", v) for v in p.refusals]
    for word, v in sorted(verdicts, key=lambda pair: pair[1].seq):
        w(f"    {word} by {v.custodian.label()} at entry {v.seq}, {render_time(v.time)}")
    at = "" if p.outcome_seq is None else f" at entry {p.outcome_seq}"
    w(f"    outcome: {p.outcome}{at}")


def _checkpoints(out: list[str], report: Report) -> None:
    w = out.append
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
