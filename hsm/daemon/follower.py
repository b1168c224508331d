"""Following the log that other replicas write.

Several daemon replicas serve one deployment over one PostgreSQL database
(docs/replicas.md). Each keeps its state as the replay of the log; when
another replica appends, this one must apply the new entries through the
same replay path (`Daemon.catch_up`, which runs `Replayer.apply` on each)
and then act on what they mean for the keys it holds in memory:

- `seal` for this replica or `"*"`: wipe the master key, the tenant keys
  and any unseal session;
- execution of `activate-tenant`: unwrap the tenant's keys here, if this
  replica is unsealed;
- execution of `rotate-tenant`: unwrap the new version, if the tenant is
  active here;
- execution of `deactivate-tenant` or `destroy-tenant`, and `shred`: wipe
  the tenant's keys; `disable-version`: wipe that version;
- execution of `change-roster`: wipe every key, since the master key is
  new and this replica's is now useless; custodians unseal it again.

`effects` decides this from the entry alone (pure); `TenantKeys.act`
(hsm/daemon/keys.py) carries the effects out. Everything else (proposals,
approvals, grants, confirmations, other replicas' unseals) changes only
the replayed state, which the data plane's next snapshot carries.

`Follower` is the thread that notices new entries:

- PostgreSQL: `store.wait_for_append(size, timeout)` returns at the NOTIFY
  an append sends at COMMIT, or after the store's `poll_interval` (1 s by
  default) when a notification is lost or the listener reconnects.
- SQLite (one machine, one file): the size is polled every
  `poll_interval` seconds.

The bound: an entry committed by replica A is in force on replica B at
most `poll_interval` + one catch-up after the COMMIT (about one network
round trip plus the replay of the new entries when notifications flow).
A replica that is asked to write first catches up at once: a write
decided on an old state fails the store's size check
(`AppendConflictError`), the daemon re-reads, replays and decides again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.log import Entry, ExecutionPayload, SealPayload, ShredPayload
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    NewVersion,
    TenantNamed,
    VersionDisabled,
)

log = logging.getLogger(__name__)

#: Seconds between size checks without notifications (SQLite, or PostgreSQL
#: when a NOTIFY is lost); also how long `stop` may wait for the thread.
POLL_SECONDS: Final = 1.0


@dataclass(frozen=True)
class WipeAll:
    """Drop the master key and every tenant key (a seal, or a new master key)."""

    reason: str


@dataclass(frozen=True)
class Activate:
    """Unwrap a tenant's enabled versions until `until`, if this replica is unsealed."""

    tenant: str
    until: int


@dataclass(frozen=True)
class AddVersion:
    """Unwrap a rotated tenant's new version, if the tenant is active here."""

    tenant: str
    version: int


@dataclass(frozen=True)
class WipeTenant:
    """Wipe a tenant's unwrapped keys (deactivated, being destroyed, shredded)."""

    tenant: str


@dataclass(frozen=True)
class DropVersion:
    """Wipe one disabled version of a tenant."""

    tenant: str
    version: int


Effect = WipeAll | Activate | AddVersion | WipeTenant | DropVersion


def effects(entry: Entry, replica: str) -> tuple[Effect, ...]:
    """What an entry another replica appended means for `replica`'s memory."""
    payload = entry.payload
    if isinstance(payload, SealPayload):
        if payload.replica in (replica, SealPayload.ALL_REPLICAS):
            return (WipeAll(f"sealed through another replica (entry {entry.seq})"),)
        return ()
    if isinstance(payload, ShredPayload):
        return (WipeTenant(payload.tenant),)
    if not isinstance(payload, ExecutionPayload):
        return ()
    result = payload.result
    name = payload.operation
    if name == "activate-tenant" and isinstance(result, Activated):
        return (Activate(result.tenant, result.active_until),)
    if name == "rotate-tenant" and isinstance(result, NewVersion):
        return (AddVersion(result.tenant, result.version),)
    if name == "disable-version" and isinstance(result, VersionDisabled):
        return (DropVersion(result.tenant, result.version),)
    if name in ("deactivate-tenant", "destroy-tenant") and isinstance(
        result, TenantNamed | DestroyScheduled
    ):
        return (WipeTenant(result.tenant),)
    if name == "change-roster":
        return (
            WipeAll(
                f"the roster changed through another replica (entry {entry.seq}): the master "
                "key is new, custodians must unseal this replica again"
            ),
        )
    return ()


class Followed(Protocol):
    """What the follower needs from the daemon."""

    @property
    def log_size(self) -> int: ...

    def catch_up(self) -> int: ...


class Follower:
    """A daemon thread that applies other replicas' entries as they commit."""

    def __init__(
        self,
        daemon: Followed,
        *,
        wait_for_append: Callable[[int, float], int] | None,
        size: Callable[[], int],
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._daemon = daemon
        self._wait = wait_for_append
        self._size = size
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="kq-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end and wait for it (at most a few poll intervals)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self._poll + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                known = self._daemon.log_size
                if self._wait is not None:
                    size = self._wait(known, self._poll)
                else:
                    if self._stop.wait(self._poll):
                        return
                    size = self._size()
                if size != known and not self._stop.is_set():
                    applied = self._daemon.catch_up()
                    if applied:
                        log.info("followed %d new entries (log size %d)", applied, known + applied)
                if self._failing:
                    self._failing = False
                    log.warning("following the log again")
            except KeyquorumError as e:
                # One line per outage; the store logs its own, the daemon
                # fails closed on a bad entry (see Daemon.catch_up).
                if not self._failing:
                    self._failing = True
                    log.warning("cannot follow the log: %s", e)
                self._stop.wait(self._poll)
            except Exception:
                log.exception("follower failed; retrying")
                self._stop.wait(self._poll)
