"""Tenant keys in memory: unwrapped for activations, wiped at their end, shredded.

Contract:
- A tenant key is unwrapped only for a logged, unexpired activation: at its
  execution (hsm/daemon/executions.py), at unseal for an activation still
  open in the log (`restore_activations`), or when another replica's
  activation is followed (`act`). The shred salts come from the store and
  are checked against their hashes in the log before any unwrapping; the
  unwrapping itself runs under the custody lock (memory work only).
- The sweeper (`Sweeper`, one thread) wipes ended activations every
  `SWEEP_SECONDS` and appends the `shred` entry, erasing the tenant's shred
  salts in the same transaction, once a destroy wait is over. The data
  plane never sweeps: it compares an activation's end with its own clock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final

from keyquorum.hsm.daemon import follower, tenant_keys
from keyquorum.hsm.daemon.context import Replica
from keyquorum.quorum.errors import AppendConflictError, KeyquorumError
from keyquorum.quorum.log import Entry, ShredPayload
from keyquorum.quorum.replay import Tenant
from keyquorum.quorum.secret import SecretBytes

log = logging.getLogger(__name__)

#: How often the background sweeper wipes ended activations and shreds.
SWEEP_SECONDS: Final = 1.0


class TenantKeys:
    """Unwrapping, restoring, following and sweeping tenant keys for one replica."""

    def __init__(self, replica: Replica) -> None:
        self._r = replica

    def salts(self, record: Tenant, *, enabled_only: bool) -> dict[int, bytes]:
        """The store's shred salts of a tenant's versions, each checked against the log."""
        store = self._r.store
        return {
            v.version: tenant_keys.check_salt(
                store.get_shred_salt(record.name, v.version),
                v.shred_salt_sha256,
                record.name,
                v.version,
            )
            for v in record.versions
            if not (enabled_only and v.disabled_seq is not None)
        }

    def unwrap_versions(
        self, record: Tenant, master: SecretBytes, salts: dict[int, bytes]
    ) -> dict[int, SecretBytes]:
        """Unwrap the versions `salts` names under `master`; all or none."""
        keys: dict[int, SecretBytes] = {}
        try:
            for number, salt in salts.items():
                wrapped = record.versions[number - 1].wrapped_key
                keys[number] = tenant_keys.unwrap(master, salt, record.name, number, wrapped)
        except BaseException:
            for key in keys.values():
                key.wipe()
            raise
        return keys

    def activate_from_log(self, record: Tenant, until: int) -> None:
        """Unwrap a tenant's enabled versions and hold them until `until` (if unsealed)."""
        custody = self._r.custody
        salts = self.salts(record, enabled_only=True)
        with custody.master() as (master, generation):
            keys = self.unwrap_versions(record, master, salts)
        custody.activate(record.name, until, keys, generation)

    def restore_activations(self) -> None:
        """At unseal: unwrap the tenants whose logged activation is still open."""
        now = self._r.now()
        for record in self._r.journal.state.tenants.values():
            if not record.is_active(now) or record.active_until is None:
                continue
            try:
                self.activate_from_log(record, record.active_until)
            except KeyquorumError as e:
                log.error("activation of tenant %s not restored: %s", record.name, e)
                continue
            log.info("activation of tenant %s restored until %d", record.name, record.active_until)

    # -- following other replicas ------------------------------------------------------

    def act(self, entry: Entry) -> None:
        """Carry out what another replica's entry means for the keys held here."""
        for effect in follower.effects(entry, self._r.name):
            try:
                self._act(effect)
            except KeyquorumError as e:
                log.error("entry %d: keys not updated here: %s", entry.seq, e)

    def _act(self, effect: follower.Effect) -> None:
        custody = self._r.custody
        if isinstance(effect, follower.WipeAll):
            if custody.seal():
                log.warning("sealed: %s", effect.reason)
            return
        if isinstance(effect, follower.WipeTenant):
            if custody.deactivate(effect.tenant):
                log.info("tenant %s: key wiped (logged through another replica)", effect.tenant)
            return
        if isinstance(effect, follower.DropVersion):
            custody.drop_version(effect.tenant, effect.version)
            return
        record = self._r.journal.state.tenants.get(effect.tenant)
        if custody.sealed or record is None:
            return
        if isinstance(effect, follower.Activate):
            self.activate_from_log(record, effect.until)
            log.info(
                "tenant %s activated through another replica, until %d",
                effect.tenant,
                effect.until,
            )
        elif effect.tenant in custody.unwrapped(self._r.now()):
            salts = self.salts(record, enabled_only=False)
            with custody.master() as (master, generation):
                key = self.unwrap_versions(record, master, {effect.version: salts[effect.version]})
            custody.add_version(effect.tenant, effect.version, key[effect.version], generation)

    # -- the sweep ---------------------------------------------------------------------

    def sweep(self) -> None:
        """Wipe ended activations and shred tenants whose destroy wait is over.

        The caller holds the governance lock.
        """
        if not self._r.journal.initialized:
            return
        now = self._r.now()
        for tenant in self._r.custody.expire(now):
            log.info("activation of tenant %s ended: key wiped", tenant)
        for record in list(self._r.journal.state.tenants.values()):
            if record.destroyed or record.destroy_at is None or now < record.destroy_at:
                continue
            try:
                self._r.journal.append(
                    [ShredPayload(record.name)], time=now, erase_tenants=[record.name]
                )
            except AppendConflictError:
                # Perhaps another replica shredded it: re-read; the next sweep decides again.
                self._r.journal.catch_up()
                continue
            except KeyquorumError as e:
                log.error("could not shred tenant %s: %s", record.name, e)
                continue
            self._r.custody.deactivate(record.name)
            log.info("tenant %s shredded: its shred salts are erased", record.name)


class Sweeper:
    """The thread that runs `sweep` every `interval` seconds until stopped."""

    def __init__(self, sweep: Callable[[], None], interval: float) -> None:
        self._sweep = sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(interval,), name="kq-sweeper", daemon=True
        )
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self._sweep()
            except Exception:
                log.exception("sweeper failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
