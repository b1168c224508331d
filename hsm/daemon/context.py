"""What every part of a replica's governance shares: one object, passed to each part.

The parts (ceremony, unseal, seal, governance, executions, keys, views)
each take a `Replica`: the journal (the log and its state), the key
custody, the store, the clock and randomness, the limits, this replica's
name, and the governance lock. Every part that reads the store, writes
the log or follows other replicas holds the governance lock for the whole
decision; none holds it across a call into another replica or the data
plane, and the data plane never takes it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keyquorum.hsm.daemon.custody import KeyCustody
from keyquorum.hsm.daemon.journal import Journal
from keyquorum.hsm.stores.base import Store
from keyquorum.quorum.errors import StateError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.replay import LogState

Clock = Callable[[], int]
RandomBytes = Callable[[int], bytes]


@dataclass
class Replica:
    """One replica's shared parts (see the module docstring)."""

    name: str
    store: Store
    data_dir: Path
    limits: Limits
    clock: Clock
    journal: Journal
    custody: KeyCustody
    random: RandomBytes = os.urandom
    lock: threading.RLock = field(default_factory=threading.RLock)

    def now(self) -> int:
        """The time of a new entry: the clock, never before the log's last entry."""
        return max(self.clock(), self.journal.state.time)

    def initialized_state(self) -> LogState:
        """The log state, or StateError before the ceremony."""
        if not self.journal.initialized:
            raise StateError("no ceremony yet: run `keyquorum ceremony init` first")
        return self.journal.state
