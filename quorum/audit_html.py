"""The audit report as one self-contained HTML page (`audit verify --html FILE`).

For people who would rather look than read: the same report as
`audit_text`, summary first, in tables. The page is one file with its
style inline and no script, font, image or link to load: a Content
Security Policy of `default-src 'none'` says so to the browser, so the page
shows the same offline, in a mail client or on an air-gapped machine, and
cannot call anywhere. Everything from the log is HTML-escaped (a custodian
named `<script>` is shown, never run). Times are UTC, once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from keyquorum.quorum.audit_report import Person, ProposalRecord, Report
from keyquorum.quorum.audit_text import verdict_line
from keyquorum.quorum.log import SealPayload
from keyquorum.quorum.statements import render_time

__all__ = ["render_failure_html", "render_html"]

CSP = "default-src 'none'; style-src 'unsafe-inline'"

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em;
       padding: 0 1em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-bottom: .3em; }
.verdict { padding: .8em 1em; border-radius: 6px; font-weight: 600; font-size: 1.1em; }
.verified { background: #e3f4e1; border: 2px solid #2e7d32; }
.unverified { background: #fff4d6; border: 2px solid #b26a00; }
.failed { background: #fde4e1; border: 2px solid #c62828; }
table { border-collapse: collapse; width: 100%; margin: .5em 0 1em; }
th, td { text-align: left; vertical-align: top; padding: .3em .6em;
         border-bottom: 1px solid #e5e5e5; }
th { background: #f5f5f5; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dl.facts dt { font-weight: 600; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
pre { background: #f7f7f7; border: 1px solid #e0e0e0; padding: .6em; overflow-x: auto;
      font-size: 13px; }
.fp, code { font-family: ui-monospace, monospace; }
.anomalies li { margin: .2em 0; }
.unsigned { color: #8a5a00; font-style: italic; }
details { margin: .4em 0; }
summary { cursor: pointer; }
"""


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _person(p: Person) -> str:
    return f'<span class="person">{_e(p.label())}</span>'


def _page(title: str, body: list[str]) -> str:
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
    ]
    return "\n".join([*head, *body, "</body>", "</html>"]) + "\n"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table; cells are HTML already (callers escape what comes from the log)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Report) -> str:
    """The report as one self-contained page (module docstring)."""
    s = report.summary
    state = "verified" if report.verified else "unverified"
    body = [
        f"<h1>keyquorum audit report: {_e(report.deployment)}</h1>",
        f'<p id="verdict" class="verdict {state}" data-verdict="{state}">'
        f"{_e(verdict_line(report))}</p>",
        '<dl class="facts">',
        f"<dt>Deployment</dt><dd>{_e(report.deployment)}</dd>",
        f"<dt>Log key</dt><dd><code>{_e(report.log_key)}</code> ("
        f"{'pinned by you' if report.log_key_pinned else 'NOT pinned: taken from the file'})</dd>",
        f"<dt>Entries</dt><dd>{report.entries} (0..{report.entries - 1}), "
        f"{_e(render_time(report.first_time))} to {_e(render_time(report.last_time))}</dd>",
        f"<dt>Covered</dt><dd>the first {report.covered} by the latest signed checkpoint</dd>",
    ]
    if report.trusted is not None:
        t = report.trusted
        body.append(
            f"<dt>Trusted</dt><dd>your checkpoint of size {t.size} is extended by "
            f"{t.extended_by} entries (consistency proof verified)</dd>"
        )
    if report.witnessed is not None:
        wd = report.witnessed
        names = ", ".join(f"{n} at {render_time(t)}" for n, t in wd.cosigned_by)
        body.append(
            f"<dt>Witnessed</dt><dd>the first {wd.size} entries, by {len(wd.cosigned_by)} of "
            f"the log's witnesses ({wd.required} required): {_e(names)}</dd>"
        )
    body.append("</dl>")

    body.append('<h2 id="summary">Summary of the whole log</h2>')
    body.append(f"<h3>Who holds a share: {s.threshold} of {len(s.holders)} unseal</h3>")
    body.append(
        _table(
            ["share", "custodian", "confirmed", "unseals", "approvals", "refusals", "seals"],
            (
                [
                    str(h.share),
                    _person(h.custodian),
                    "no" if h.confirmed_seq is None else f"entry {h.confirmed_seq}",
                    str(h.unseals),
                    str(h.approvals),
                    str(h.refusals),
                    str(h.seals),
                ]
                for h in s.holders
            ),
            cls="holders",
        )
    )
    if s.former:
        body.append(
            "<p>No longer on the roster: " + ", ".join(_person(p) for p in s.former) + "</p>"
        )
    body.append(
        "<ul>"
        f"<li>Unseals: {s.unseals}</li>"
        f"<li>Seals: {s.seals} ({s.seals_by_custodians} by a custodian's signed request, "
        f"{s.seals - s.seals_by_custodians} by the daemon itself)</li>"
        f"<li>Proposals: {s.proposals}: {s.executed} executed, {s.expired} expired, "
        f"{s.cancelled} cancelled, {s.still_open} still open; {s.approvals} approvals, "
        f"{s.refusals} refusals</li>"
        f"<li>Roster changes: {s.roster_changes}</li>"
        "</ul>"
    )
    body.append(f"<h3>Tenants: {len(s.tenants)}</h3>")
    body.append(
        _table(
            ["tenant", "state", "key versions", "activations", "granted to"],
            (
                [
                    _e(t.name),
                    _e(t.state),
                    str(t.versions),
                    str(t.activations),
                    _e(", ".join(t.backends) or "none"),
                ]
                for t in s.tenants
            ),
            cls="tenants",
        )
    )
    body.append(f'<h3 id="anomalies">Anomalies: {len(s.anomalies) or "none"}</h3>')
    if s.anomalies:
        body.append('<ul class="anomalies">')
        for a in s.anomalies:
            where = "" if a.seq is None else f"entry {a.seq}: "
            body.append(f"<li>{_e(where + a.what)}</li>")
        body.append("</ul>")

    body.append('<h2 id="details">Details</h2>')
    f = report.filters
    if f.shows("roster"):
        body.append("<h3>Roster and threshold over time</h3>")
        for r in report.rosters:
            body.append(
                f"<p>entry {r.seq}, {_e(render_time(r.time))}: "
                f"{r.threshold}-of-{len(r.custodians)} ({_e(r.cause)})</p>"
            )
            body.append(
                _table(
                    ["share", "custodian"],
                    ([str(i), _person(m)] for i, m in enumerate(r.custodians, start=1)),
                )
            )
        body.append("<h3>Log keys (what signs the checkpoints, from which entry)</h3>")
        body.append(
            _table(
                ["entry", "time (UTC)", "log key", "how"],
                (
                    [
                        str(k.seq),
                        _e(render_time(k.time)),
                        f"<code>{_e(k.log_key)}</code>",
                        _e(k.cause),
                    ]
                    for k in report.log_keys
                ),
            )
        )
        body.append("<h3>Witnesses (cosigners the quorum put in the log)</h3>")
        body.append(
            _table(
                ["entry", "time (UTC)", "change", "witness key", "m after", "approved by"],
                (
                    [
                        str(x.seq),
                        _e(render_time(x.time)),
                        _e(x.operation),
                        f"<code>{_e(x.witness)}</code>",
                        str(x.threshold),
                        _e(", ".join(x.approvers)),
                    ]
                    for x in report.witnesses
                ),
            )
        )
        body.append("<h3>Registered proposers</h3>")
        body.append(
            _table(
                ["entry", "time (UTC)", "change", "proposer", "approved by"],
                (
                    [
                        str(x.seq),
                        _e(render_time(x.time)),
                        _e(x.operation),
                        _person(x.proposer),
                        _e(", ".join(x.approvers)),
                    ]
                    for x in report.proposers
                ),
            )
        )
    if f.shows("unseal"):
        body.append("<h3>Unseals</h3>")
        body.append(
            _table(
                ["entry", "time (UTC)", "replica", "custodians (each share signed)"],
                (
                    [
                        str(u.seq),
                        _e(render_time(u.time)),
                        _e(u.replica),
                        ", ".join(_person(m) for m in u.custodians),
                    ]
                    for u in report.unseals
                ),
            )
        )
        if report.handovers:
            body.append(
                "<ul>"
                + "".join(
                    f"<li>entry {h.seq} at {_e(render_time(h.time))}: {_e(h.statement())}</li>"
                    for h in report.handovers
                )
                + "</ul>"
            )
    if f.shows("unseal") and report.unseal_resets:
        body.append("<h3>Unseal sessions reset</h3>")
        body.append(
            _table(
                ["entry", "time (UTC)", "replica", "session", "reset by (signed)", "discarded"],
                (
                    [
                        str(x.seq),
                        _e(render_time(x.time)),
                        _e(x.replica),
                        _e(x.session[:16]),
                        _person(x.by),
                        ", ".join(_person(m) for m in x.discarded) or "no share",
                    ]
                    for x in report.unseal_resets
                ),
            )
        )
    if f.shows("seal"):
        body.append("<h3>Seals</h3>")
        rows = []
        for z in report.seals:
            replica = "every replica" if z.replica == SealPayload.ALL_REPLICAS else z.replica
            if z.by is None:
                who = "the daemon itself"
                reason = f"{_e(z.reason)} (written by the daemon, signed by the log key)"
            else:
                who = _person(z.by)
                reason = f"{_e(z.reason)} (signed)"
            rows.append([str(z.seq), _e(render_time(z.time)), _e(replica), who, reason])
        body.append(_table(["entry", "time (UTC)", "replica", "sealed by", "reason"], rows))
    if f.shows("proposal"):
        body.append("<h3>Proposals</h3>")
        body.extend(_proposal(p) for p in report.proposals)
    if f.shows("grant"):
        body.append("<h3>Grants</h3>")
        body.append(
            _table(
                ["backend", "tenant", "granted at", "ended"],
                (
                    [
                        _e(g.backend),
                        _e(g.tenant),
                        f"entry {g.granted_seq}",
                        "in force"
                        if g.ended_seq is None
                        else _e(f"{g.ended}, entry {g.ended_seq}"),
                    ]
                    for g in report.grants
                ),
            )
        )
    if f.shows("tenant"):
        body.append("<h3>Tenant events</h3>")
        for tenant in report.tenants:
            body.append(f"<p><strong>{_e(tenant.name)}</strong>: {_e(tenant.state)}</p>")
            body.append(
                _table(
                    ["entry", "time (UTC)", "what"],
                    ([str(e.seq), _e(render_time(e.time)), _e(e.what)] for e in tenant.events),
                )
            )
    return _page(f"keyquorum audit: {report.deployment}", body)


def _proposal(p: ProposalRecord) -> str:
    params = p.shown
    if p.approvals:
        signed = f"statement the {len(p.approvals)} approver(s) signed"
    else:
        signed = (
            '<span class="unsigned">statement offered for signature (nobody approved it)</span>'
        )
    verdicts = [("approved", v) for v in p.approvals] + [("REFUSED", v) for v in p.refusals]
    rows = (
        [_e(word), _person(v.custodian), f"entry {v.seq}", _e(render_time(v.time))]
        for word, v in sorted(verdicts, key=lambda pair: pair[1].seq)
    )
    return (
        f'<details class="proposal" id="proposal-{_e(p.id)}"><summary>'
        f"<code>{_e(p.id[:8])}</code> {_e(p.operation)} {_e(params)}: {_e(p.outcome)}"
        "</summary>"
        f"<p>entry {p.seq}, {_e(render_time(p.time))}; needs {p.needed}; expires "
        f"{_e(render_time(p.expires_at))}; proposed by "
        f"{_e(p.proposer)} (signed by the proposer)</p>"
        f"<p>{signed}:</p><pre>{_e(p.statement)}</pre>"
        + _table(["verdict", "custodian", "entry", "time (UTC)"], rows)
        + "</details>"
    )


def render_failure_html(message: str, seq: int | None, evidence: Sequence[str]) -> str:
    """A page for a log that did not verify: what failed, where, and the evidence."""
    body = [
        "<h1>keyquorum audit report</h1>",
        f'<p id="verdict" class="verdict failed" data-verdict="failed">'
        f"VERIFICATION FAILED: {_e(message)}</p>",
    ]
    if seq is not None:
        body.append(f"<p>First bad entry: {seq}</p>")
    for i, note in enumerate(evidence, start=1):
        body.append(f"<h2>Evidence {i} (a note signed by the log key)</h2><pre>{_e(note)}</pre>")
    return _page("keyquorum audit: verification failed", body)
