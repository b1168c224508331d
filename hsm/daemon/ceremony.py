"""The init ceremony and share confirmations.

Contract: the ceremony runs once per deployment, and only for whoever the
operator who started the daemon let run it (`CeremonyGate`): the holder of
the one-time code `server run` prints at start, or exactly the roster of
custodians it was started with. Anyone else who reaches a fresh daemon
first is refused (PERMISSION_DENIED) and changes nothing. The daemon makes
the master key, splits it k-of-n (`split_to`, also used by a roster
change), HPKE-encrypts share i to custodian i, logs the genesis (roster,
threshold, commitments, encrypted shares, the log's checkpoint key, the
policy) and forgets the key: it is never held after the ceremony, the
daemon stays sealed until custodians unseal it. A confirmation is a
custodian's signed statement that their share checks out, logged once.
"""

from __future__ import annotations

import base64
import hmac
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
    AccessDeniedError,
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


#: Random bytes in a one-time ceremony code: 120 bits, 24 base32 characters.
CODE_BYTES = 15


class CeremonyGate:
    """Who may run the ceremony: the one-time `code`, or exactly this `roster`.

    `code` is printed by `server run` at start (base32 in groups of four);
    `roster` is the custodians' fingerprints in share order, when the
    operator starts the daemon with them instead. Neither: nobody may. The
    code never appears in a repr.
    """

    __slots__ = ("code", "roster")

    def __init__(self, code: str | None = None, roster: Sequence[str] | None = None) -> None:
        self.code = code
        self.roster = None if roster is None else tuple(roster)

    @classmethod
    def with_new_code(cls, random_bytes: RandomBytes) -> CeremonyGate:
        """A gate with a fresh one-time code (`random_bytes` injectable for tests)."""
        text = base64.b32encode(random_bytes(CODE_BYTES)).decode("ascii")
        return cls(code="-".join(text[i : i + 4] for i in range(0, len(text), 4)))

    def check(self, given_code: str, fingerprints: Sequence[str]) -> None:
        """Raise AccessDeniedError unless the caller holds the code or brings the roster."""
        if self.roster is not None:
            if tuple(fingerprints) != self.roster:
                raise AccessDeniedError(
                    "this daemon runs the ceremony only for the roster it was started with "
                    "(server run --ceremony-roster), in that order"
                )
            return
        if self.code is None:
            raise AccessDeniedError(
                "this daemon was started without a ceremony code or roster: it runs no ceremony"
            )
        if not given_code:
            raise AccessDeniedError(
                "the ceremony needs the one-time code `keyquorum server run` printed at start "
                "(ceremony init --code ...)"
            )
        if not hmac.compare_digest(_normalised(given_code), _normalised(self.code)):
            raise AccessDeniedError("wrong ceremony code: nothing was changed")

    def __repr__(self) -> str:
        if self.roster is not None:
            return f"<CeremonyGate roster of {len(self.roster)}>"
        return "<CeremonyGate one-time code>" if self.code else "<CeremonyGate closed>"


def _normalised(code: str) -> bytes:
    """The code without group dashes or spaces, upper case (as printed, or as typed)."""
    kept = "".join(ch for ch in code if ch not in "- ").upper()
    return kept.encode("utf-8", errors="replace")


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

    def __init__(self, replica: Replica, gate: CeremonyGate | None) -> None:
        self._r = replica
        self._gate = gate

    def init(
        self,
        deployment: str,
        threshold: int,
        public_credentials: Sequence[bytes],
        *,
        code: str = "",
    ) -> None:
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
            gate = self._gate or CeremonyGate()
            try:
                gate.check(code, [c.fingerprint for c in roster])
            except AccessDeniedError as e:
                log.warning("ceremony refused: %s", e)
                raise
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

    def confirm(self, fingerprint: str, split_id: bytes, index: int, signature: bytes) -> int:
        """Log a custodian's signed acknowledgement that their share checks out; its seq."""
        r = self._r
        with r.lock:
            r.journal.catch_up()
            st = r.initialized_state()
            st.epoch.credential(fingerprint)
            HybridSignature.from_bytes(signature)
            r.journal.append_retrying(
                [ConfirmPayload(fingerprint, split_id, index, signature)], time=r.now()
            )
            return r.journal.size - 1
