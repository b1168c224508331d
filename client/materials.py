"""Data keys for the envelope formats: from the cache, or fetched and kept.

The sync and async clients differ only in how they wait for the daemon;
what to look up, what to keep and what to wipe is decided here once:

- `encryption_plan`: a message of known length may take a cached key of
  its tenant and whole context; a message of unknown length, or one larger
  than `max_bytes`, never uses the cache (the ESDK's rule: a bound that
  cannot be checked is not applied by hope).
- `decryption_plan`: the key of one wrapped key and whole context; a
  message's bytes are counted once it is open (`charge_decryption`), and
  an entry that reached `max_bytes` then is wiped.
- `observe`: a refusal from the daemon wipes what it makes stale: every
  entry when it reports a seal, one tenant's entries when it refuses that
  tenant (keyquorum.client.cache has the list).
"""

from __future__ import annotations

from collections.abc import Sequence

from keyquorum.client import calls
from keyquorum.client.cache import ClientCaches, DecryptionKey, EncryptionKey, Lease
from keyquorum.client.calls import DataKey, KeyServiceError
from keyquorum.client.inputs import context_key
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.v1 import key_pb2 as pb


class EncryptionPlan:
    """A cached key (`lease`), or what to keep once GenerateDataKey answered."""

    __slots__ = ("_caches", "_epoch", "_key", "_nbytes", "lease")

    def __init__(
        self,
        caches: ClientCaches | None,
        key: EncryptionKey | None,
        nbytes: int,
        lease: Lease | None,
        epoch: int = 0,
    ) -> None:
        self._caches = caches
        self._key = key
        self._nbytes = nbytes
        self.lease = lease
        self._epoch = epoch

    def keep(self, fresh: DataKey) -> Lease:
        """Cache a copy of the fresh key (this message counted) and lend the original."""
        cached = False
        if self._caches is not None and self._key is not None:
            cached = self._caches.encryption.put(
                self._key,
                fresh.plaintext,
                fresh.ciphertext,
                fresh.key_version,
                self._key[0],
                self._nbytes,
                epoch=self._epoch,
            )
        return Lease(fresh.plaintext, fresh.ciphertext, fresh.key_version, cached=cached)


def encryption_plan(
    caches: ClientCaches | None, tenant: str, context: dict[str, str], nbytes: int | None
) -> EncryptionPlan:
    if caches is None or nbytes is None or not caches.encryption.cacheable(nbytes):
        return EncryptionPlan(None, None, 0, None)
    key = (tenant, context_key(context))
    epoch = caches.encryption.epoch
    return EncryptionPlan(caches, key, nbytes, caches.encryption.take(key, nbytes), epoch)


class DecryptionPlan:
    """A cached key (`lease`), or what to keep once Unwrap answered.

    A message's bytes are counted once it has been opened (`charge_decryption`):
    the plaintext's size is known only then.
    """

    __slots__ = ("_caches", "_epoch", "_key", "lease")

    def __init__(
        self,
        caches: ClientCaches | None,
        key: DecryptionKey,
        lease: Lease | None,
        epoch: int = 0,
    ) -> None:
        self._caches = caches
        self._key = key
        self.lease = lease
        self._epoch = epoch

    def keep_unwrapped(self, r: pb.UnwrapResponse, seal_to: SealingPrivateKey | None) -> Lease:
        wrapped = self._key[0]
        plain = calls.unwrapped(r, wrapped, seal_to)
        cached = self._caches is not None and self._caches.decryption.put(
            self._key, plain, wrapped, r.key_version, r.tenant, 0, epoch=self._epoch
        )
        return Lease(plain, wrapped, r.key_version, cached=cached)


def decryption_plan(
    caches: ClientCaches | None, wrapped: bytes, context: dict[str, str]
) -> DecryptionPlan:
    key = (wrapped, context_key(context))
    if caches is None:
        return DecryptionPlan(None, key, None)
    epoch = caches.decryption.epoch
    return DecryptionPlan(caches, key, caches.decryption.take(key, 0), epoch)


def charge_decryption(
    caches: ClientCaches | None, wrapped: bytes, context: dict[str, str], nbytes: int
) -> None:
    """Count a stream's bytes against its cached key once they are known."""
    if caches is not None:
        caches.decryption.charge((wrapped, context_key(context)), nbytes)


def observe(caches: ClientCaches | None, error: KeyServiceError, tenant: str | None) -> None:
    """Wipe what a refusal makes stale (see the module docstring)."""
    if caches is None:
        return
    if calls.reports_seal(error):
        caches.wipe_all()
    elif tenant is not None and calls.refuses_tenant(error):
        caches.wipe_tenant(tenant)


def observe_items(
    caches: ClientCaches | None,
    results: Sequence[object],
    tenants: Sequence[str | None],
) -> None:
    """`observe` for each failed item of a batch."""
    if caches is None:
        return
    for result, tenant in zip(results, tenants, strict=True):
        if isinstance(result, KeyServiceError):
            observe(caches, result, tenant)
