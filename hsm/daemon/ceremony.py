"""The init ceremony and share confirmations.

Contract: the ceremony runs once per deployment. The daemon makes the
master key, splits it k-of-n (`split_to`, also used by a roster change),
HPKE-encrypts share i to custodian i, logs the genesis (roster,
threshold, commitments, encrypted shares, the log's checkpoint key, the
policy) and forgets the key: it is never held after the ceremony, the
daemon stays sealed until custodians unseal it. A confirmation is a
custodian's signed statement that their share checks out, logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from keyquorum.hsm.daemon.context import RandomBytes, Replica
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.daemon.tenant_keys import MASTER_KEY_SIZE
from keyquorum.quorum import log as qlog
from keyquorum.quorum import shamir
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    AppendConflictError,
    InvalidInputError,
    KeyquorumError,
    NotOnRosterError,
    StateError,
)
from keyquorum.quorum.log import ConfirmPayload, GenesisPayload
from keyquorum.quorum.operations import EncryptedShare, Policy
from keyquorum.quorum.people import describe_fingerprint
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.signatures import HybridSignature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncryptedShareView:
    deployment: str
    split_id: bytes
    index: int
    ciphertext: bytes
    commitments: shamir.SplitCommitments


def origin_for(deployment: str) -> str:
    """The checkpoint origin (and log key name) of a deployment."""
    return f"keyquorum/{deployment}"


def split_to(
    master: SecretBytes,
    deployment: str,
    threshold: int,
    roster: Sequence[PublicCredential],
    random_bytes: RandomBytes,
) -> tuple[shamir.SplitCommitments, list[EncryptedShare]]:
    """Split `master` k-of-n and HPKE-encrypt share i to custodian i.

    The plaintext shares are wiped before this returns, whatever happens.
    """
    shares, commitments = shamir.split(master, threshold, len(roster), random_bytes=random_bytes)
    try:
        encrypted = []
        for custodian, share in zip(roster, shares, strict=True):
            info = qlog.share_info(
                deployment, commitments.split_id, custodian.fingerprint, share.index
            )
            with share.to_bytes() as plain:
                ciphertext = custodian.sealing_key.seal(plain, info)
            encrypted.append(EncryptedShare(custodian.fingerprint, share.index, ciphertext))
    finally:
        for share in shares:
            share.wipe()
    return commitments, encrypted


class Ceremony:
    """The genesis and the confirmations of one replica."""

    def __init__(self, replica: Replica) -> None:
        self._r = replica

    def init(self, deployment: str, threshold: int, public_credentials: Sequence[bytes]) -> None:
        """Create and split the master key, log the genesis, forget the key."""
        r = self._r
        limits = r.limits
        with r.lock:
            if r.journal.initialized:
                raise StateError("this deployment is already initialised; a ceremony runs once")
            if len(public_credentials) > limits.max_custodians:
                raise InvalidInputError(
                    f"at most {limits.max_custodians} custodians, got {len(public_credentials)}"
                )
            for i, data in enumerate(public_credentials):
                if len(data) > limits.max_credential_bytes:
                    raise InvalidInputError(f"public credential {i + 1} is too large")
            roster = [PublicCredential.from_bytes(data) for data in public_credentials]
            if len({c.fingerprint for c in roster}) != len(roster):
                raise InvalidInputError("the same custodian credential is listed twice")
            if len({c.name for c in roster}) != len(roster):
                raise InvalidInputError("two custodians have the same name")
            if not 2 <= threshold <= len(roster):
                raise InvalidInputError(
                    f"threshold must be between 2 and the number of custodians "
                    f"({len(roster)}), got {threshold}"
                )
            log_key = LogKey.create(r.data_dir, origin=origin_for(deployment))
            with SecretBytes(r.random(MASTER_KEY_SIZE), label="master key") as master:
                commitments, encrypted = split_to(master, deployment, threshold, roster, r.random)
            payload = GenesisPayload(
                deployment=deployment,
                threshold=threshold,
                roster=tuple(roster),
                split=commitments,
                encrypted_shares=tuple(encrypted),
                log_key=log_key.vkey,
                policy=Policy(
                    activation_max_seconds=limits.activation_max_seconds,
                    destroy_wait_seconds=limits.destroy_wait_seconds,
                    proposal_ttl_seconds=limits.proposal_ttl_seconds,
                ),
            )
            r.journal.adopt_log_key(log_key)
            try:
                r.journal.append([payload], time=r.now())
            except AppendConflictError:
                r.journal.drop_log_key()
                log_key.remove()
                r.journal.catch_up()
                raise StateError(
                    "another replica ran the ceremony first: copy its log key file into this "
                    "replica's data directory and restart it (docs/replicas.md)"
                ) from None
            except KeyquorumError:
                r.journal.drop_log_key()
                log_key.remove()
                raise
            log.info(
                "ceremony done: deployment %s, %d-of-%d, split %s",
                deployment,
                threshold,
                len(roster),
                commitments.split_id.hex()[:8],
            )

    def encrypted_share(self, fingerprint: str) -> EncryptedShareView:
        st = self._r.initialized_state()
        for share in st.encrypted_shares:
            if share.custodian == fingerprint:
                return EncryptedShareView(
                    st.deployment, st.split.split_id, share.index, share.ciphertext, st.split
                )
        raise NotOnRosterError(
            f"custodian {describe_fingerprint(fingerprint)} is not on the roster"
        )

    def confirm(self, fingerprint: str, split_id: bytes, index: int, signature: bytes) -> None:
        """Log a custodian's signed acknowledgement that their share checks out."""
        r = self._r
        with r.lock:
            r.journal.catch_up()
            st = r.initialized_state()
            st.epoch.credential(fingerprint)
            HybridSignature.from_bytes(signature)
            r.journal.append_retrying(
                [ConfirmPayload(fingerprint, split_id, index, signature)], time=r.now()
            )
