"""Waiting for a condition instead of for a time: tests wait on progress, never on a guess.

A sleep long enough on an idle machine is too short on a loaded one; `until`
polls the condition and fails with what it waited for once `within` seconds
pass, a guard against a hang rather than a timing assumption.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def until(check: Callable[[], bool], what: str, *, within: float = 60.0) -> None:
    """Return once `check()` is true; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {within:g} s for {what}")
        time.sleep(0.01)
