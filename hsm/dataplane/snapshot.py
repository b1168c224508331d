"""What the data plane knows of governance: one immutable snapshot, published whole.

Governance (hsm/daemon) builds a new `DataPlaneSnapshot` after every log
entry it applies and every change of the keys it holds (activation,
expiry, deactivation, seal), and publishes it by replacing one reference
(`hsm/daemon/custody.py`). The data plane reads that reference once per
call: it never takes a governance lock, never waits on a store write and
never writes to the log.

A snapshot holds the seal generation and state, the grants, for each
tenant what the log says (versions, activation end, disabled versions,
destruction) with the key versions held in memory, and the limits.

A seal still wins: governance publishes the sealed snapshot first, then
closes every held key's cipher and zeroes its bytes, all before the seal
is answered. A call that started earlier and still holds the previous
snapshot finds the cipher closed (`StateError`) and its step 4 sees the
generation moved; a call that starts later sees the sealed snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from keyquorum.quorum import aead
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DeserializationError,
    SealedError,
    StateError,
)
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits


class HeldKey(Protocol):
    """A held tenant key version as a data-plane call uses it, without a copy.

    Only reading: the prepared cipher and a read-only view of the key bytes
    (for the C wire codec). It stays the keyring's: when the keyring wipes
    the version (seal, activation end, disable, destroy) the cipher is
    closed first and the bytes zeroed, so a use after that raises
    `StateError`, and a reader of the view sees `cipher.closed` afterwards.
    """

    @property
    def cipher(self) -> aead.Cipher: ...

    def view(self) -> memoryview: ...


@dataclass(frozen=True, slots=True)
class TenantAccess:
    """One tenant as the data plane may use it: the log's record and the keys held here."""

    #: Versions the tenant has (a ciphertext naming a higher one is forged).
    versions: int
    #: The version new ciphertexts are made with.
    current: int
    #: End of the logged activation; None when not activated, deactivated or being destroyed.
    active_until: int | None
    destroyed: bool
    disabled: frozenset[int]
    #: Unwrapped versions held in memory (none while sealed or not active here).
    held: Mapping[int, HeldKey] = field(repr=False)
    #: Backends granted the tenant when it was shredded: told "destroyed", not "not granted".
    shredded_grants: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class DataPlaneSnapshot:
    """Grants, activations, held key versions and limits at one point of the log."""

    #: Increases at every seal; step 4 of a call compares it before a key leaves.
    generation: int
    sealed: bool
    #: The log size this snapshot was built from.
    log_size: int
    grants: frozenset[tuple[str, str]]
    tenants: Mapping[str, TenantAccess]
    limits: Limits

    def decides_as(self, other: DataPlaneSnapshot) -> bool:
        """Whether every data-plane call would get the same answer from `other`.

        All that `key_for` and `usable` read, and the generation and limits,
        are equal, and each held version is the very same key object (not a
        copy with the same bytes: a wiped one would be closed). Only
        `log_size`, which no call reads, may differ. The worker pool sends a
        snapshot only when it does not decide as the last one sent.
        """
        if (self.generation, self.sealed, self.grants, self.limits) != (
            other.generation,
            other.sealed,
            other.grants,
            other.limits,
        ) or self.tenants.keys() != other.tenants.keys():
            return False
        for name, mine in self.tenants.items():
            theirs = other.tenants[name]
            if (
                mine.versions != theirs.versions
                or mine.current != theirs.current
                or mine.active_until != theirs.active_until
                or mine.destroyed != theirs.destroyed
                or mine.disabled != theirs.disabled
                or mine.shredded_grants != theirs.shredded_grants
                or mine.held.keys() != theirs.held.keys()
                or any(key is not theirs.held[v] for v, key in mine.held.items())
            ):
                return False
        return True

    def key_for(
        self, backend: str, tenant: str, version: int | None, now: int
    ) -> tuple[int, HeldKey]:
        """Steps 1 and 2 of a call: the grant, then the key version (None: the current one).

        Refusals, in order: not granted (`AccessDeniedError`, also for a
        tenant that does not exist, so names cannot be probed; a backend the
        tenant was granted to when it was shredded hears "destroyed",
        `StateError`); a `version` the tenant never had
        (`DeserializationError`: only a forged ciphertext header names one);
        then `usable`'s.
        """
        record = self.tenants.get(tenant)
        if (backend, tenant) not in self.grants or record is None:
            if record is not None and record.destroyed and backend in record.shredded_grants:
                raise StateError(f"tenant {tenant!r} was destroyed")
            raise AccessDeniedError(f"backend {backend} is not granted tenant {tenant!r}")
        if version is not None and version > record.versions:
            raise DeserializationError(
                f"the ciphertext names key version {version} of tenant {tenant!r}, "
                f"which has {record.versions}"
            )
        return self.usable(tenant, version, now)

    def usable(self, tenant: str, version: int | None, now: int) -> tuple[int, HeldKey]:
        """Step 2 alone: the key version (None: the current one) if usable at `now`.

        Refusals, in order: sealed (`SealedError`); unknown, destroyed, not
        active, no such version, version disabled, or not held here
        (`StateError`).
        """
        if self.sealed:
            raise SealedError("the service is sealed")
        record = self.tenants.get(tenant)
        if record is None:
            raise StateError(f"unknown tenant {tenant!r}")
        if record.destroyed:
            raise StateError(f"tenant {tenant!r} was destroyed")
        if record.active_until is None or now >= record.active_until:
            raise StateError(f"tenant {tenant!r} is not active")
        number = record.current if version is None else version
        if not 1 <= number <= record.versions:
            raise StateError(f"tenant {tenant!r} has no version {number}")
        if number in record.disabled:
            raise StateError(f"version {number} of tenant {tenant!r} is disabled")
        held = record.held.get(number)
        if held is None:
            raise StateError(f"version {number} of tenant {tenant!r} is not usable")
        return number, held


#: Before the first publication (no log yet): sealed, nothing granted.
EMPTY_SNAPSHOT: Final = DataPlaneSnapshot(
    generation=0,
    sealed=True,
    log_size=0,
    grants=frozenset(),
    tenants={},
    limits=DEFAULT_LIMITS,
)


class SnapshotSource(Protocol):
    """Where the data plane reads governance from (the daemon, or its key custody)."""

    def data_plane_snapshot(self) -> DataPlaneSnapshot:
        """The snapshot published last; a reference read, no lock."""
        ...

    def now(self) -> int:
        """The time activation ends are compared with (Unix seconds)."""
        ...
