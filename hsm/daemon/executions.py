"""Planning what an approved operation does, before anything is logged.

Contract: `plan` prepares the execution of a proposal at `now`: the result
the execution entry will carry, the shred salts it stores or replaces in
the same transaction, and what happens in memory once it is durable
(`on_commit`), or what is wiped if it is not (`on_abort`). Nothing is
logged or changed here. Operations that need the master key (create,
rotate and activate a tenant, change the roster) refuse while sealed; the
key is used under the custody lock, and what is prepared with it takes
effect only if no seal came before the commit (KeyCustody's generation).

A roster change leaves the old roster nothing to open: every tenant key
version is re-wrapped under the new master key AND a fresh shred salt, and
the old salts are erased in the same store transaction, so the wrappings
the log keeps from before the change open with nothing anyone holds (not
even the old master key the removed custodians could rebuild).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from keyquorum.hsm.daemon import restoring, tenant_keys
from keyquorum.hsm.daemon.ceremony import split_to
from keyquorum.hsm.daemon.context import Replica
from keyquorum.hsm.daemon.keys import TenantKeys
from keyquorum.hsm.daemon.tenant_keys import MASTER_KEY_SIZE
from keyquorum.hsm.stores.base import SALT_SIZE, ShredSalt
from keyquorum.quorum import aead
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import InvalidInputError, SealedError, StateError
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    GrantChanged,
    LogKeyRotated,
    NewVersion,
    Policy,
    ProposerAdded,
    ProposerRemoved,
    RestoreApproved,
    Result,
    Rewrapped,
    RosterChanged,
    TenantNamed,
    VersionDisabled,
    WitnessChanged,
)
from keyquorum.quorum.people import describe_fingerprint
from keyquorum.quorum.replay import LogState, Proposal, Tenant
from keyquorum.quorum.secret import SecretBytes

log = logging.getLogger(__name__)

#: Operations whose execution needs the master key in memory.
NEEDS_MASTER_KEY: Final = frozenset(
    {"create-tenant", "rotate-tenant", "activate-tenant", "change-roster"}
)


def _nothing() -> None:
    """No effect (the default commit/abort action of a plan)."""


@dataclass
class Plan:
    """An execution prepared before anything is logged.

    `on_commit` runs once the approval and the execution are durable;
    `on_abort` wipes whatever secret the plan made if they are not.
    """

    result: Result
    shred_salts: tuple[ShredSalt, ...] = ()
    #: Salts that replace the stored ones of the same versions (the old bytes erased).
    replace_salts: tuple[ShredSalt, ...] = ()
    on_commit: Callable[[], None] = field(default=_nothing)
    on_abort: Callable[[], None] = field(default=_nothing)


class Executions:
    """Plans for the ten operations (docs/approvals.md)."""

    def __init__(self, replica: Replica, keys: TenantKeys) -> None:
        self._r = replica
        self._keys = keys
        # Public credentials of custodians a change-roster proposal adds
        # (the log names them only by fingerprint until it executes).
        self._offered: dict[str, PublicCredential] = {}

    def plan(self, st: LogState, proposal: Proposal, now: int) -> Plan:
        """The execution of `proposal` at `now` (see the module docstring)."""
        custody = self._r.custody
        name = proposal.operation
        params = dict(proposal.parameters)
        tenant = str(params.get("tenant", ""))
        if name in NEEDS_MASTER_KEY and custody.sealed:
            raise SealedError(
                f"{name} needs the master key: unseal the service first "
                "(this approval was not logged)"
            )
        if name in ("create-tenant", "rotate-tenant"):
            return self._new_version(st, name, tenant)
        if name == "activate-tenant":
            record = usable_tenant(st, tenant)
            salts = self._keys.salts(record, enabled_only=True)
            with custody.master() as (master, generation):
                keys = self._keys.unwrap_versions(record, master, salts)
            until = now + int(params["duration_seconds"])

            def wipe() -> None:
                for key in keys.values():
                    key.wipe()

            return Plan(
                Activated(tenant, until),
                on_commit=lambda: _ignore(custody.activate(tenant, until, keys, generation)),
                on_abort=wipe,
            )
        if name in ("deactivate-tenant", "destroy-tenant"):

            def deactivate() -> None:
                custody.deactivate(tenant)

            if name == "deactivate-tenant":
                return Plan(TenantNamed(tenant), on_commit=deactivate)
            destroy_at = now + policy_of(st).destroy_wait_seconds
            return Plan(DestroyScheduled(tenant, destroy_at), on_commit=deactivate)
        if name == "disable-version":
            version = int(params["version"])
            return Plan(
                VersionDisabled(tenant, version),
                on_commit=lambda: custody.drop_version(tenant, version),
            )
        if name == "cancel-destroy":
            return Plan(TenantNamed(tenant))
        if name in ("grant", "revoke"):
            return Plan(GrantChanged(str(params["backend"]), tenant))
        if name == "add-proposer":
            return Plan(ProposerAdded(self._credential(str(params["proposer"]))))
        if name == "remove-proposer":
            return Plan(ProposerRemoved(str(params["proposer"])))
        if name in ("add-witness", "remove-witness"):
            return Plan(WitnessChanged(str(params["witness"]), int(params["witness_threshold"])))
        if name == "approve-restore":
            approved = RestoreApproved(
                int(params["restored_size"]),
                int(params["abandoned_size"]),
                str(params["abandoned_root"]),
            )
            data_dir = self._r.data_dir

            def accept_restore() -> None:
                pending = restoring.load(data_dir)
                if pending is not None and pending.parameters() == approved.to_json():
                    restoring.clear(data_dir)
                    log.warning(
                        "approve-restore executed: the restore to %d entries is accepted; "
                        "the checkpoint of %d entries is abandoned",
                        approved.restored_size,
                        approved.abandoned_size,
                    )

            return Plan(approved, on_commit=accept_restore)
        if name == "rotate-log-key":
            new_key = str(params["log_key"])
            # The checkpoint after the rotation is the new key's: hold it first.
            self._r.journal.signer_for(new_key)
            return Plan(LogKeyRotated(st.log_key, new_key))
        return self._roster_change(st, int(params["threshold"]), str(params["roster"]))

    def _new_version(self, st: LogState, name: str, tenant: str) -> Plan:
        """create-tenant (version 1) or rotate-tenant (the next version).

        A fresh 256-bit key and a fresh 32-byte shred salt; the key is
        wrapped under the master key, the salt goes to the store's erasable
        table in the same transaction, its SHA-256 into the log.
        """
        r = self._r
        version = 1 if name == "create-tenant" else len(usable_tenant(st, tenant).versions) + 1
        salt = r.random(SALT_SIZE)
        key = SecretBytes(r.random(tenant_keys.TENANT_KEY_SIZE), label="new tenant key")
        try:
            with r.custody.master() as (master, generation):
                wrapped = tenant_keys.wrap(
                    master, salt, tenant, version, key, nonce=r.random(aead.NONCE_SIZE)
                )
        except BaseException:
            key.wipe()
            raise
        result = NewVersion(tenant, version, wrapped, tenant_keys.shred_salt_digest(salt))

        def keep_if_active() -> None:
            # A rotation of an active tenant: the new version is usable at once.
            r.custody.add_version(tenant, version, key, generation)

        return Plan(
            result,
            shred_salts=((tenant, version, salt),),
            on_commit=keep_if_active if name == "rotate-tenant" else key.wipe,
            on_abort=key.wipe,
        )

    def _roster_change(self, st: LogState, threshold: int, roster_param: str) -> Plan:
        """change-roster: a new master key, split to the new roster, every key re-wrapped.

        Every version of every tenant not destroyed is unwrapped under the
        current master key and wrapped again under the new one (a new KEK,
        the same shred salt, so the logged salt hash still binds it). After
        the commit the daemon holds the new master key; the old split's
        shares reconstruct only the old master key.
        """
        r = self._r
        roster = self.roster_credentials(st, roster_param)
        records = [t for t in sorted(st.tenants.values(), key=lambda t: t.name) if not t.destroyed]
        salts = {t.name: self._keys.salts(t, enabled_only=False) for t in records}
        new_master = SecretBytes(r.random(MASTER_KEY_SIZE), label="master key")
        try:
            commitments, encrypted = split_to(
                new_master, st.deployment, threshold, roster, r.random
            )
            rewrapped = []
            fresh: list[ShredSalt] = []
            with r.custody.master() as (old_master, generation):
                for record in records:
                    keys = self._keys.unwrap_versions(record, old_master, salts[record.name])
                    try:
                        for v in record.versions:
                            salt = r.random(SALT_SIZE)
                            wrapped = tenant_keys.wrap(
                                new_master,
                                salt,
                                record.name,
                                v.version,
                                keys[v.version],
                                nonce=r.random(aead.NONCE_SIZE),
                            )
                            digest = tenant_keys.shred_salt_digest(salt)
                            rewrapped.append(Rewrapped(record.name, v.version, wrapped, digest))
                            fresh.append((record.name, v.version, salt))
                    finally:
                        for key in keys.values():
                            key.wipe()
        except BaseException:
            new_master.wipe()
            raise
        result = RosterChanged(
            threshold, tuple(roster), commitments, tuple(encrypted), tuple(rewrapped)
        )

        def switch() -> None:
            r.custody.replace_master(new_master, generation)
            log.info(
                "roster changed: %d-of-%d, split %s; the master key is new",
                threshold,
                len(roster),
                commitments.split_id.hex()[:8],
            )

        return Plan(result, replace_salts=tuple(fresh), on_commit=switch, on_abort=new_master.wipe)

    def offer(
        self,
        st: LogState,
        name: str,
        params: dict[str, str | int],
        public_credentials: Sequence[bytes],
    ) -> None:
        """Remember the public credentials a change-roster or add-proposer names,
        and refuse the proposal if one it needs is still unknown.

        The log names them by fingerprint until the execution carries them
        whole; credentials given with any other operation are refused.
        """
        if name == "change-roster":
            roster = str(params.get("roster", ""))
            self.offer_credentials(public_credentials, set(roster.split(",")))
            self.roster_credentials(st, roster)
        elif name == "add-proposer":
            self.offer_credentials(public_credentials, {str(params.get("proposer", ""))})
            self._credential(str(params.get("proposer", "")))
        elif public_credentials:
            raise InvalidInputError(
                "public credentials belong to a change-roster or add-proposer proposal"
            )

    def _credential(self, fingerprint: str) -> PublicCredential:
        """The offered public credential of a proposer to register."""
        credential = self._offered.get(fingerprint)
        if credential is None:
            raise StateError(
                f"the public credential of proposer {describe_fingerprint(fingerprint)} is "
                "unknown: give its public file with the proposal or the approval"
            )
        return credential

    def offer_credentials(self, public_credentials: Sequence[bytes], listed: set[str]) -> None:
        """Remember public credentials that a proposal names (by fingerprint)."""
        for i, data in enumerate(public_credentials):
            if len(data) > self._r.limits.max_credential_bytes:
                raise InvalidInputError(f"public credential {i + 1} is too large")
            credential = PublicCredential.from_bytes(data)
            if credential.fingerprint not in listed:
                raise InvalidInputError(
                    f"public credential of {credential.label} is not one the proposal names"
                )
            self._offered[credential.fingerprint] = credential

    def roster_credentials(self, st: LogState, roster_param: str) -> list[PublicCredential]:
        """The credentials of a proposed roster, in share-index order.

        Custodians of any roster in the log are known; new ones must have
        been offered with the proposal (or with the executing approval,
        after a restart).
        """
        known = {c.fingerprint: c for epoch in st.rosters for c in epoch.roster}
        # Those a change-roster proposal added are in its log entry.
        known.update((c.fingerprint, c) for p in st.proposals.values() for c in p.credentials)
        known.update(self._offered)
        roster = []
        for fingerprint in roster_param.split(","):
            credential = known.get(fingerprint)
            if credential is None:
                raise StateError(
                    f"the public credential of custodian {describe_fingerprint(fingerprint)} "
                    "is unknown: give their public file with the proposal or the approval"
                )
            roster.append(credential)
        if len({c.name for c in roster}) != len(roster):
            raise InvalidInputError("two custodians of the proposed roster have the same name")
        return roster


def usable_tenant(st: LogState, name: str) -> Tenant:
    """A tenant that exists, is not destroyed and is not being destroyed."""
    record = st.tenants.get(name)
    if record is None:
        raise StateError(f"unknown tenant {name!r}")
    if record.destroyed:
        raise StateError(f"tenant {name!r} was destroyed")
    if record.destroy_at is not None:
        raise StateError(f"tenant {name!r} is scheduled for destruction")
    return record


def policy_of(st: LogState) -> Policy:
    """The log's policy (StateError before the genesis)."""
    if st.policy is None:
        raise StateError("no ceremony yet: the log has no policy")
    return st.policy


def _ignore(_value: object) -> None:
    """Drop a result (a lambda's bool) where the plan's action returns None."""
