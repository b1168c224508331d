"""The error tree: context is added to an error without rebuilding it from its text."""

from __future__ import annotations

from keyquorum.quorum.errors import LogIntegrityError, ShareError, StateError, with_context


def test_with_context_keeps_class_and_fields_and_leaves_the_original() -> None:
    original = ShareError("share 3 fails its commitment", index=3)
    told = with_context(original, "custodian bob (0a1b2c3d)")
    assert type(told) is ShareError
    assert told.index == 3
    assert str(told) == "custodian bob (0a1b2c3d): share 3 fails its commitment"
    assert str(original) == "share 3 fails its commitment"


def test_with_context_keeps_a_log_errors_entry_and_refusal() -> None:
    refusal = StateError("tenant 'x' was destroyed")
    error = LogIntegrityError("refused", seq=7, refusal=refusal)
    told = with_context(error, "checkpoint 2")
    assert (told.seq, told.refusal) == (7, refusal)
    assert str(told) == "checkpoint 2: entry 7: refused"
