"""Unseal sessions as custodians follow them: who submitted and when, how one ended.

`status` and `custodian unseal` both say it this way. A session "started
by" the first custodian whose share it accepted: opening a session is not
signed, so the daemon names no one for that. Custodians appear as
`people.label` shows them; times once, in UTC, in the form statements use
(`statements.render_time`), written here without importing the statement
code, so that `keyquorum status` stays light (tests/test_cli_startup.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from keyquorum.quorum import people

if TYPE_CHECKING:
    from keyquorum.v1 import custodian_pb2 as pb


def render_time(t: int) -> str:
    """Unix seconds as `2026-11-25 12:00:00 UTC` (the form of `statements.render_time`)."""
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _who(s: pb.SubmittedShare) -> str:
    return people.label(s.name, s.fingerprint)


def submitted_text(shares: Sequence[pb.SubmittedShare]) -> str:
    """`alice (FKAO-...) at 2026-11-25 12:00:00 UTC, bob (...) at ...`, or `nobody yet`."""
    return ", ".join(f"{_who(s)} at {render_time(s.submitted_at)}" for s in shares) or "nobody yet"


def ended_text(ended: pb.EndedUnsealSession) -> str:
    """One sentence on a session that ended without unsealing."""
    opened = render_time(ended.opened_at)
    first = f" by {_who(ended.submitted[0])}" if ended.submitted else ""
    head = f"the unseal session {ended.session_id[:16]} started at {opened}{first}"
    lost = ", ".join(_who(s) for s in ended.submitted)
    if len(ended.submitted) == 1:
        discarded = f"; the share of {lost} was discarded"
    else:
        discarded = f"; the {len(ended.submitted)} shares of {lost} were discarded" if lost else ""
    when = render_time(ended.ended_at)
    if ended.how == "reset":
        by = people.label(ended.reset_by_name, ended.reset_by)
        return f"{head} was reset by {by} at {when}{discarded}"
    if ended.how == "sealed":
        return f"{head} was ended by a seal at {when}{discarded}"
    return f"{head} expired at {when}{discarded}"


def session_lines(s: pb.Status) -> list[str]:
    """What `status` says of a sealed replica's unseal session, and of the one before."""
    lines = []
    if s.HasField("unseal_session"):
        u = s.unseal_session
        lines.append(
            f"unseal session {u.session_id[:16]}: {len(u.submitted)} of {s.threshold} shares, "
            f"opened at {render_time(u.opened_at)}, expires at {render_time(u.expires_at)}"
        )
        lines.append(f"  submitted: {submitted_text(u.submitted)}")
    else:
        lines.append("unseal session: none open")
    if s.HasField("previous_unseal_session"):
        lines.append(f"  before it: {ended_text(s.previous_unseal_session)}")
    return lines
