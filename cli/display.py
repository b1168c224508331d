"""How the CLI shows things to people: statements before signing, times, custodians.

A statement is printed between two rules, byte for byte as it is signed,
with its size and SHA-256 so that two custodians can compare what they were
shown. Unseal sessions are told as custodians follow them: who submitted
and when, when a session expires, and how the one before ended. Statements
hold times in UTC only (the signed bytes must not depend
on the signer's time zone); below the second rule, outside the statement
and labelled so, the same times are repeated in this machine's local time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from keyquorum.quorum import people
from keyquorum.quorum.errors import DeserializationError
from keyquorum.quorum.statements import TIME_PATTERN, Statement, render_time

if TYPE_CHECKING:
    from keyquorum.v1 import custodian_pb2 as pb

RULE = "-" * 72


def local_time(utc_text: str) -> str:
    """`2026-11-25 12:00:00 UTC` in this machine's zone, e.g. `2026-11-25 13:00:00 CET`."""
    moment = datetime.strptime(utc_text, "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _zone() -> str:
    now = datetime.now(UTC).astimezone()
    return now.strftime("%Z (UTC%z)")


def local_times(text: str) -> list[str]:
    """One line per statement field holding a UTC time, with the times converted."""
    lines: list[str] = []
    for line in text.splitlines():
        if TIME_PATTERN.search(line) is None:
            continue
        lines.append("  " + TIME_PATTERN.sub(lambda m: local_time(m.group(0)), line.strip()))
    return lines


def statement_block(text: str, *, heading: str) -> list[str]:
    """The lines that show a statement: heading, rules, exact text, local times."""
    data = text.encode("ascii")
    lines = [
        f"{heading} ({len(data)} bytes, SHA-256 {hashlib.sha256(data).hexdigest()[:16]}...):",
        RULE,
        *text.splitlines(),
        RULE,
    ]
    local = local_times(text)
    if local and local_time("2000-01-01 00:00:00 UTC") != "2000-01-01 00:00:00 UTC":
        lines.append(f"Not part of the statement: its times in your local time, {_zone()}:")
        lines.extend(local)
    return lines


def is_statement(text: str) -> bool:
    """Whether `text` is a whole rendered statement (what the unlock prompt shows)."""
    try:
        Statement.parse(text)
    except DeserializationError:
        return False
    return True


# Unseal sessions ------------------------------------------------------------


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
    shares = f"{len(ended.submitted)} share{'' if len(ended.submitted) == 1 else 's'}"
    discarded = f"; the {shares} of {lost} were discarded" if lost else ""
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
        lines.append(f"unseal session: none open (0 of {s.threshold} shares)")
    if s.HasField("previous_unseal_session"):
        lines.append(f"  before it: {ended_text(s.previous_unseal_session)}")
    return lines
