"""The keys one replica holds, the seal state, and the snapshot the data plane reads.

`KeyCustody` owns the master key (between an unseal and the next seal),
the tenant keyring (hsm/daemon/tenant_keys.py) and the seal generation,
and publishes the data plane's `DataPlaneSnapshot`
(hsm/dataplane/snapshot.py).

Contract:
- Its lock is short: held only for memory work (a key unwrapped under the
  master key, a keyring change, a snapshot built), never across store
  I/O, and never taken by the data plane, which reads the published
  snapshot reference. Governance may take it while holding the governance
  lock; the reverse never happens.
- `seal()` bumps the generation, publishes a sealed snapshot, then wipes
  every key (ciphers closed before their bytes are zeroed). It needs no
  store and no governance lock, so a seal is never stuck behind a write.
- Anything prepared before a seal cannot undo it: an unseal, an
  activation's unwrapped keys, a roster change's new master key each carry
  the generation they were prepared under, and take effect only if no
  seal came since; otherwise their secrets are wiped here.
- Every change republishes the snapshot from the log state as it is now
  (`log_state()`, the journal's immutable state) and the keyring, then,
  outside the lock, calls each publish listener (`add_publish_listener`:
  the worker processes of `server run --workers`, hsm/services/workers.py),
  which reads the latest snapshot itself, so listeners running late or out
  of order still hand on the newest. A seal returns only after its
  listeners returned.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from keyquorum.hsm.daemon.tenant_keys import TenantKey, TenantKeyring
from keyquorum.hsm.dataplane.snapshot import (
    EMPTY_SNAPSHOT,
    DataPlaneSnapshot,
    TenantAccess,
)
from keyquorum.quorum.errors import SealedError
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.replay import LogState
from keyquorum.quorum.secret import SecretBytes

log = logging.getLogger(__name__)


class KeyCustody:
    """Master key, tenant keyring and seal generation, behind one short lock."""

    def __init__(self, limits: Limits, log_state: Callable[[], LogState]) -> None:
        self._limits = limits
        self._log_state = log_state
        self._lock = threading.Lock()
        self._master: SecretBytes | None = None
        self._keyring = TenantKeyring()
        self._generation = 0
        self._snapshot = EMPTY_SNAPSHOT
        self._observers: list[Callable[[bool], None]] = []
        self._listeners: list[Callable[[], None]] = []

    # -- reading -----------------------------------------------------------------------

    @property
    def sealed(self) -> bool:
        return self._master is None

    @property
    def generation(self) -> int:
        """Increases at every seal."""
        return self._generation

    def data_plane_snapshot(self) -> DataPlaneSnapshot:
        """The snapshot published last (a reference read: no lock)."""
        return self._snapshot

    def unwrapped(self, now: int) -> dict[str, int]:
        """Tenant -> activation end, for the activations held here and open at `now`."""
        with self._lock:
            return self._keyring.active(now)

    def tenant_key(self, tenant: str, version: int, now: int) -> TenantKey:
        """A copy of one held version (the caller wipes it); StateError if not held."""
        with self._lock:
            return self._keyring.key(tenant, version, now)

    # -- the master key ----------------------------------------------------------------

    @contextmanager
    def master(self) -> Iterator[tuple[SecretBytes, int]]:
        """The master key and the generation, held under the lock for the block.

        For memory work only (deriving, wrapping, unwrapping): a seal waits
        until the block ends, so the key is never wiped under a user.
        SealedError when sealed.
        """
        with self._lock:
            if self._master is None:
                raise SealedError("the service is sealed")
            yield self._master, self._generation

    def install_master(self, master: SecretBytes, generation: int) -> None:
        """Hold `master` (an unseal prepared under `generation`); wiped if a seal came since."""
        with self._lock:
            if generation != self._generation or self._master is not None:
                master.wipe()
                raise SealedError("a seal came while the unseal was completing: still sealed")
            self._master = master
            self._publish_locked()
        self._published()
        self._notify()

    def replace_master(self, master: SecretBytes, generation: int) -> None:
        """A roster change's new master key replaces the old one, unless a seal came since."""
        with self._lock:
            if generation != self._generation or self._master is None:
                master.wipe()
                return
            self._master.wipe()
            self._master = master

    # -- the keyring -------------------------------------------------------------------

    def activate(
        self, tenant: str, until: int, keys: Mapping[int, SecretBytes], generation: int
    ) -> bool:
        """Hold `keys` for `tenant` until `until`, unless a seal came since (then wiped)."""
        with self._lock:
            if generation != self._generation or self._master is None:
                for key in keys.values():
                    key.wipe()
                return False
            self._keyring.activate(tenant, until, keys)
            self._publish_locked()
        self._published()
        return True

    def add_version(self, tenant: str, version: int, key: SecretBytes, generation: int) -> bool:
        """A new version of an active tenant (a rotation); otherwise `key` is wiped."""
        with self._lock:
            if generation != self._generation or self._master is None:
                key.wipe()
                return False
            kept = self._keyring.add_version(tenant, version, key)
            self._publish_locked()
        self._published()
        return kept

    def drop_version(self, tenant: str, version: int) -> None:
        with self._lock:
            self._keyring.drop_version(tenant, version)
            self._publish_locked()
        self._published()

    def deactivate(self, tenant: str) -> bool:
        with self._lock:
            held = self._keyring.deactivate(tenant)
            self._publish_locked()
        self._published()
        return held

    def expire(self, now: int) -> list[str]:
        """Wipe the activations that ended at `now`; the tenants wiped."""
        with self._lock:
            ended = self._keyring.expire(now)
            if ended:
                self._publish_locked()
        if ended:
            self._published()
        return ended

    # -- seal --------------------------------------------------------------------------

    def seal(self) -> bool:
        """Publish a sealed snapshot, then wipe every key; True if it was unsealed.

        Always bumps the generation, so an unseal or activation prepared
        before this call never takes effect.
        """
        with self._lock:
            was_unsealed = self._master is not None
            self._generation += 1
            self._snapshot = self._build(sealed=True)
            self._keyring.wipe_all()
            if self._master is not None:
                self._master.wipe()
                self._master = None
        self._published()
        if was_unsealed:
            self._notify()
        return was_unsealed

    def add_observer(self, observer: Callable[[bool], None]) -> None:
        """Call `observer(sealed)` now and after every unseal and seal (gRPC health).

        Observers run after the change, outside the lock; they must be quick.
        """
        self._observers.append(observer)
        observer(self.sealed)

    def _notify(self) -> None:
        sealed = self.sealed
        for observer in self._observers:
            try:
                observer(sealed)
            except Exception:
                log.exception("seal observer failed")

    # -- the snapshot ------------------------------------------------------------------

    def publish(self) -> None:
        """Rebuild the data plane's snapshot from the log state and the keyring."""
        with self._lock:
            self._publish_locked()
        self._published()

    def add_publish_listener(self, listener: Callable[[], None]) -> None:
        """Call `listener()` after every publication, outside the lock (see the module doc)."""
        self._listeners.append(listener)

    def _published(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("publish listener failed")

    def _publish_locked(self) -> None:
        self._snapshot = self._build(sealed=self._master is None)

    def _build(self, *, sealed: bool) -> DataPlaneSnapshot:
        state = self._log_state()
        tenants = {
            t.name: TenantAccess(
                versions=len(t.versions),
                current=t.current.version,
                active_until=t.active_until if t.destroy_at is None else None,
                destroyed=t.destroyed,
                disabled=frozenset(v.version for v in t.versions if v.disabled_seq is not None),
                held={} if sealed else self._keyring.held_versions(t.name),
                shredded_grants=frozenset(t.shredded_grants),
            )
            for t in state.tenants.values()
        }
        return DataPlaneSnapshot(
            generation=self._generation,
            sealed=sealed,
            log_size=state.size,
            grants=frozenset(state.grants),
            tenants=tenants,
            limits=self._limits,
        )

    # -- for tests ---------------------------------------------------------------------

    def master_key_buffer_for_test(self) -> bytearray | None:
        """The master key's buffer, so tests can check that seal zeroes it."""
        master = self._master
        return master.buffer_for_test() if master is not None else None

    def tenant_key_buffers_for_test(self, tenant: str) -> list[bytearray]:
        with self._lock:
            return self._keyring.buffers_for_test(tenant)

    def ciphers_for_test(self) -> list[object]:
        with self._lock:
            return list(self._keyring.ciphers_for_test())

    def __repr__(self) -> str:
        return f"<KeyCustody: {'sealed' if self.sealed else 'unsealed'}, gen {self._generation}>"
