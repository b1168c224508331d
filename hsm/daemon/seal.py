"""Seal: one custodian's signed request, or the daemon's own at shutdown.

Contract: a seal never waits for governance to wipe the keys. A
custodian's request is checked first, without the governance lock, by
replay's own rules on the current state (signature by a custodian on the
roster in force, the request not used before, its time not after the
entry's) plus the daemon's clock-skew bound; a bad request changes
nothing. A valid one wipes the keys at once (`KeyCustody.seal`: the data
plane sees a sealed snapshot before anything else happens), then the seal
is logged under the governance lock; only then is it answered. A request
for another replica is only logged; that replica wipes its keys when it
follows the entry (hsm/daemon/follower.py).
"""

from __future__ import annotations

import logging

from keyquorum.hsm.daemon.context import Replica
from keyquorum.hsm.daemon.unseal import Unseal
from keyquorum.quorum.errors import ExpiredError, KeyquorumError
from keyquorum.quorum.log import SealPayload
from keyquorum.quorum.signatures import HybridSignature

log = logging.getLogger(__name__)


class Seal:
    """Sealing one replica (or all of them) and logging who did."""

    def __init__(self, replica: Replica, unseal: Unseal) -> None:
        self._r = replica
        self._unseal = unseal

    def by_custodian(
        self,
        fingerprint: str,
        requested_at: int,
        reason: str,
        signature: bytes,
        *,
        replica: str | None = None,
    ) -> int:
        """Seal on one custodian's signed request: check, wipe, log; the seal entry's seq.

        `replica` is the replica the request names: this one (the default),
        `"*"` for every replica of the deployment, or another replica's name.
        """
        r = self._r
        target = replica if replica else r.name
        st = r.initialized_state()
        skew = r.limits.seal_request_skew_seconds
        if abs(r.clock() - requested_at) > skew:
            raise ExpiredError(
                f"seal request time is too far from the daemon's clock (more than {skew} s)"
            )
        payload = SealPayload(
            replica=target,
            custodian=fingerprint,
            reason=reason,
            requested_at=requested_at,
            signature=HybridSignature.from_bytes(signature).to_bytes(),
        )
        # A custodian's clock may run a little ahead of ours.
        r.journal.check([payload], time=max(r.now(), requested_at))
        name = st.epoch.credential(fingerprint).label
        # Wipe first: sealing must not depend on the store or the governance lock.
        if target in (r.name, SealPayload.ALL_REPLICAS):
            r.custody.seal()
        with r.lock:
            self._unseal.discard()
            r.journal.catch_up()
            r.journal.append_retrying([payload], time=max(r.now(), requested_at))
            log.info("sealed by custodian %s: %s", name, reason)
            return r.journal.size - 1

    def for_shutdown(self, reason: str) -> None:
        """Wipe every key and, if it was unsealed, log that the daemon sealed itself."""
        r = self._r
        was_unsealed = r.custody.seal()
        with r.lock:
            self._unseal.discard()
            if not was_unsealed:
                return
            try:
                r.journal.append_retrying(
                    [
                        SealPayload(
                            replica=r.name,
                            custodian=None,
                            reason=reason,
                            requested_at=r.now(),
                            signature=None,
                        )
                    ],
                    time=r.now(),
                )
            except KeyquorumError as e:
                log.error("could not log the shutdown seal: %s", e)
            log.info("sealed: %s", reason)
