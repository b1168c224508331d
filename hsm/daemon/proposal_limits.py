"""How many proposals one proposer may make, and how many may be open at once.

Proposals are signed (by a custodian or a registered proposer), so a flood
has an author; each author gets a token bucket (`Limits.proposals_per_minute`,
burst `Limits.proposal_burst`) and at most
`Limits.max_open_proposals_per_proposer` proposals open for verdicts at a
time, and the whole deployment at most `Limits.max_open_proposals`. A
refusal is `LimitExceededError` (RESOURCE_EXHAUSTED) and logs nothing.

Only a proposal whose signature replay has already accepted is charged:
someone who sends garbage under a real proposer's fingerprint cannot spend
that proposer's tokens. The buckets live in this replica's memory (one per
registered proposer or custodian, so their number is bounded by the log);
the open counts come from the log, so every replica agrees on them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from keyquorum.quorum.errors import LimitExceededError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.people import describe_fingerprint
from keyquorum.quorum.replay import LogState


class ProposalLimits:
    """Per-proposer rate and open-proposal bounds (see the module docstring)."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._rate = limits.proposals_per_minute / 60.0
        self._burst = float(limits.proposal_burst)
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, st: LogState, proposer: str, now: int) -> None:
        """Charge one proposal to `proposer`, or raise LimitExceededError changing nothing.

        0. at most `max_open_proposals` open in the deployment;
        1. at most `max_open_proposals_per_proposer` open by this proposer;
        2. a token in this proposer's bucket.
        """
        limits = self._limits
        pending = st.pending(now)
        # 0. The deployment's bound.
        if len(pending) >= limits.max_open_proposals:
            raise LimitExceededError(
                f"{len(pending)} proposals are open, the most this deployment keeps open "
                f"({limits.max_open_proposals}): let some expire or decide them first"
            )
        # 1. This proposer's bound.
        mine = sum(1 for p in pending if p.proposer == proposer)
        if mine >= limits.max_open_proposals_per_proposer:
            raise LimitExceededError(
                f"proposer {describe_fingerprint(proposer)} has {mine} proposals open, the "
                f"most one proposer may ({limits.max_open_proposals_per_proposer})"
            )
        # 2. This proposer's rate.
        tick = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(proposer, (self._burst, tick))
            tokens = min(self._burst, tokens + (tick - then) * self._rate)
            if tokens < 1:
                self._buckets[proposer] = (tokens, tick)
                raise LimitExceededError(
                    f"proposer {describe_fingerprint(proposer)} is over the rate of "
                    f"{limits.proposals_per_minute} proposals per minute; retry later"
                )
            self._buckets[proposer] = (tokens - 1, tick)

    def refund(self, proposer: str) -> None:
        """Give back the token of a proposal that was charged and then not logged."""
        tick = self._clock()
        with self._lock:
            tokens, then = self._buckets.get(proposer, (self._burst, tick))
            tokens = min(self._burst, tokens + (tick - then) * self._rate + 1)
            self._buckets[proposer] = (tokens, tick)
