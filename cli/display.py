"""How the CLI shows things to people: statements before signing, times, custodians.

A statement is printed between two rules, byte for byte as it is signed,
with its size and SHA-256 so that two custodians can compare what they were
shown. Statements hold times in UTC only (the signed bytes must not depend
on the signer's time zone); below the second rule, outside the statement
and labelled so, the same times are repeated in this machine's local time.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from keyquorum.quorum.errors import DeserializationError
from keyquorum.quorum.statements import TIME_PATTERN, Statement

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
