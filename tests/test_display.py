"""What the CLI shows around a statement: the exact bytes, then local times outside it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator

import pytest

from keyquorum.cli import display
from tests.statement_examples import OPERATION_REQUESTS, OWN_STATEMENTS


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_the_block_between_the_rules_is_exactly_the_signed_bytes(berlin: None) -> None:
    statement = OPERATION_REQUESTS["activate-tenant"].statement("approve")
    text = statement.render()
    lines = display.statement_block(text, heading="You are about to sign exactly this statement")
    first, second = (i for i, line in enumerate(lines) if line == display.RULE)
    shown = "\n".join(lines[first + 1 : second]) + "\n"
    assert shown.encode("ascii") == statement.message()
    digest = hashlib.sha256(statement.message()).hexdigest()[:16]
    assert lines[0] == (
        f"You are about to sign exactly this statement ({len(statement.message())} bytes, "
        f"SHA-256 {digest}...):"
    )


def test_local_times_are_shown_outside_the_statement_and_never_change_it(berlin: None) -> None:
    statement = OPERATION_REQUESTS["activate-tenant"].statement("approve")
    text = statement.render()
    lines = display.statement_block(text, heading="h")
    after = lines[[i for i, line in enumerate(lines) if line == display.RULE][1] + 1 :]
    assert after[0].startswith("Not part of the statement: its times in your local time, CET")
    assert "  expires: 2026-11-25 13:00:00 CET" in after
    assert "  usable until: between 2026-11-25 20:00:00 CET and 2026-11-25 20:59:59 CET" in after
    # The statement itself is the same whatever the zone.
    assert statement.render() == text
    assert "CET" not in text


def test_in_utc_no_local_block_is_added(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        lines = display.statement_block(OWN_STATEMENTS["seal"].render(), heading="h")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert lines[-1] == display.RULE


def test_is_statement() -> None:
    assert display.is_statement(OWN_STATEMENTS["seal"].render())
    assert not display.is_statement("(unseal) deployment d, replica r: your share ...")
