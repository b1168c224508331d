"""The daemon's core: seal state, the ceremony, unseal sessions and seal.

It knows nothing of gRPC (the servicers in `custodian_service.py` are thin
wrappers) and decides nothing about validity on its own: every governance
event is built as a log entry and run through the one replay path of
`keyquorum.quorum.replay` before it is appended, so the daemon's state is
always the replay of its log.

Contract:
- At start the whole log is replayed and checked against the latest signed
  checkpoint; any tampering stops the daemon, naming the first bad entry.
- It starts sealed. The master key exists in memory only between a
  successful unseal and the next seal (or exit), in a `SecretBytes` that is
  wiped on seal; shares are wiped as soon as they are combined.
- An append is durable before its effect is visible: the entry is checked,
  written in one store transaction, and only then applied to the state and
  acted on. If the write fails, nothing changes (audit fails closed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from keyquorum.hsm.logkey import LogKey
from keyquorum.hsm.store import Store
from keyquorum.quorum import log as qlog
from keyquorum.quorum import merkle, shamir, statements
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    ExpiredError,
    InvalidInputError,
    KeyquorumError,
    LogIntegrityError,
    NotOnRosterError,
    ReplayError,
    SealedError,
    ShareError,
    StateError,
)
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.log import (
    ConfirmPayload,
    GenesisPayload,
    Payload,
    SealPayload,
    UnsealPayload,
    UnsealShare,
)
from keyquorum.quorum.operations import EncryptedShare, Policy
from keyquorum.quorum.replay import LogState, Replayer, verify_log
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.unseal import session_info

log = logging.getLogger(__name__)

Clock = Callable[[], int]
RandomBytes = Callable[[int], bytes]

MASTER_KEY_SIZE = 32
SESSION_ID_SIZE = 16


@dataclass(frozen=True)
class CustodianView:
    fingerprint: str
    name: str
    share_index: int
    confirmed: bool


@dataclass(frozen=True)
class StatusView:
    initialized: bool
    sealed: bool
    deployment: str
    threshold: int
    roster: tuple[CustodianView, ...]
    unseal_progress: int
    log_size: int
    checkpoint: str
    replica: str
    log_key: str

    @property
    def confirmed_count(self) -> int:
        return sum(1 for c in self.roster if c.confirmed)


@dataclass(frozen=True)
class EncryptedShareView:
    deployment: str
    split_id: bytes
    index: int
    ciphertext: bytes
    commitments: shamir.SplitCommitments


@dataclass(frozen=True)
class SessionView:
    session_id: bytes
    public_key: bytes
    log_size: int
    expires_at: int
    deployment: str
    split_id: bytes
    replica: str
    threshold: int
    progress: int


@dataclass(frozen=True)
class Progress:
    have: int
    need: int
    sealed: bool
    log_size: int


class _UnsealSession:
    """One unseal session: a fresh HPKE key and the shares received so far."""

    __slots__ = ("expires_at", "key", "log_size", "public_key", "session_id", "shares")

    def __init__(
        self, session_id: bytes, key: SealingPrivateKey, log_size: int, expires_at: int
    ) -> None:
        self.session_id = session_id
        self.key: SealingPrivateKey | None = key
        self.log_size = log_size
        self.expires_at = expires_at
        self.public_key = key.public_key().to_bytes()
        self.shares: dict[str, tuple[shamir.Share, bytes, HybridSignature]] = {}

    def wipe(self) -> None:
        for share, _digest, _sig in self.shares.values():
            share.wipe()
        self.shares.clear()
        # The HPKE private key lives inside OpenSSL, which clears it when the
        # object is freed; dropping the last reference is all Python can do.
        self.key = None

    def __repr__(self) -> str:
        return f"<unseal session {self.session_id.hex()[:8]}: {len(self.shares)} shares>"


class Daemon:
    """One replica of the key-custody service over one store."""

    def __init__(
        self,
        store: Store,
        *,
        data_dir: Path,
        replica: str,
        limits: Limits,
        clock: Clock,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self._store = store
        self._data_dir = data_dir
        self._replica = replica
        self._limits = limits
        self._clock = clock
        self._random = random_bytes
        self._lock = threading.RLock()
        self._master: SecretBytes | None = None
        self._session: _UnsealSession | None = None
        self._log_key: LogKey | None = None
        self._seal_requests_seen: set[bytes] = set()
        self._replayer, self._tree = self._load()

    # -- loading -------------------------------------------------------------

    def _load(self) -> tuple[Replayer, merkle.MerkleTree]:
        """Replay the whole store and check it against the latest checkpoint.

        The trust anchor is the log key file beside the store: the latest
        checkpoint must be signed by it, the genesis must name it, and the
        log must replay and reach the checkpoint's root (`verify_log`).
        """
        tree = merkle.MerkleTree()
        if self._store.size() == 0:
            return Replayer(), tree
        entries = list(self._store.read_all())
        latest = self._store.latest_checkpoint()
        if latest is None:
            raise LogIntegrityError("the store holds entries but no signed checkpoint", seq=0)
        self._log_key = LogKey.load(self._data_dir)
        state = verify_log(entries, latest[1], self._log_key.vkey)
        for raw in entries:
            tree.append(merkle.leaf_hash(raw))
        log.info("log verified: %d entries, checkpoint at %d", len(entries), latest[0])
        return Replayer(state), tree

    @property
    def initialized(self) -> bool:
        return self._tree.size > 0

    @property
    def state(self) -> LogState:
        return self._replayer.state

    @property
    def sealed(self) -> bool:
        return self._master is None

    # -- appending -----------------------------------------------------------

    def _append(self, payload: Payload, *, not_before: int = 0) -> bytes:
        """Check, durably append and apply one entry; sign a new checkpoint."""
        state = self._replayer.state if self.initialized else None
        time = max(self._now(), not_before)
        raw = qlog.next_entry(state, payload.TYPE, payload, time)
        self._replayer.check(raw)
        size = self._tree.size
        self._store.append([(size, merkle.leaf_hash(raw), raw)], expected_size=size)
        self._replayer.apply(raw)
        self._tree.append(merkle.leaf_hash(raw))
        self._publish_checkpoint()
        return raw

    def _publish_checkpoint(self) -> None:
        assert self._log_key is not None
        note = self._log_key.sign_checkpoint(self._tree.size, self._tree.root())
        self._store.put_checkpoint(self._tree.size, note)

    def _now(self) -> int:
        # Entry times never go backwards, even if the wall clock does.
        return max(self._clock(), self._replayer.state.time)

    # -- status --------------------------------------------------------------

    def status(self) -> StatusView:
        with self._lock:
            st = self._replayer.state
            latest = self._store.latest_checkpoint()
            session = self._live_session()
            roster: tuple[CustodianView, ...] = ()
            if self.initialized:
                roster = tuple(
                    CustodianView(
                        fingerprint=c.fingerprint,
                        name=c.name,
                        share_index=i + 1,
                        confirmed=c.fingerprint in st.confirmations,
                    )
                    for i, c in enumerate(st.roster)
                )
            return StatusView(
                initialized=self.initialized,
                sealed=self.sealed,
                deployment=st.deployment,
                threshold=st.threshold if self.initialized else 0,
                roster=roster,
                unseal_progress=len(session.shares) if session else 0,
                log_size=self._tree.size,
                checkpoint=latest[1] if latest else "",
                replica=self._replica,
                log_key=st.log_key,
            )

    # -- the ceremony ----------------------------------------------------------

    def init_ceremony(
        self, deployment: str, threshold: int, public_credentials: Sequence[bytes]
    ) -> StatusView:
        """Create and split the master key, log the genesis, forget the key."""
        with self._lock:
            if self.initialized:
                raise StateError("this deployment is already initialised; a ceremony runs once")
            if len(public_credentials) > self._limits.max_custodians:
                raise InvalidInputError(
                    f"at most {self._limits.max_custodians} custodians, "
                    f"got {len(public_credentials)}"
                )
            for i, data in enumerate(public_credentials):
                if len(data) > self._limits.max_credential_bytes:
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
            log_key = LogKey.create(self._data_dir, origin=origin_for(deployment))
            with SecretBytes(self._random(MASTER_KEY_SIZE), label="master key") as master:
                shares, commitments = shamir.split(
                    master, threshold, len(roster), random_bytes=self._random
                )
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
            payload = GenesisPayload(
                deployment=deployment,
                threshold=threshold,
                roster=tuple(roster),
                split=commitments,
                encrypted_shares=tuple(encrypted),
                log_key=log_key.vkey,
                policy=Policy(
                    activation_max_seconds=self._limits.activation_max_seconds,
                    destroy_wait_seconds=self._limits.destroy_wait_seconds,
                    proposal_ttl_seconds=self._limits.proposal_ttl_seconds,
                ),
            )
            self._log_key = log_key
            try:
                self._append(payload)
            except KeyquorumError:
                self._log_key = None
                log_key.remove()
                raise
            log.info(
                "ceremony done: deployment %s, %d-of-%d, split %s",
                deployment,
                threshold,
                len(roster),
                commitments.split_id.hex()[:8],
            )
            return self.status()

    def encrypted_share(self, fingerprint: str) -> EncryptedShareView:
        with self._lock:
            st = self._require_initialized()
            for share in st.encrypted_shares:
                if share.custodian == fingerprint:
                    return EncryptedShareView(
                        st.deployment, st.split.split_id, share.index, share.ciphertext, st.split
                    )
            raise NotOnRosterError(f"custodian {fingerprint[:16]} is not on the roster")

    def confirm_share(
        self, fingerprint: str, split_id: bytes, index: int, signature: bytes
    ) -> StatusView:
        """Log a custodian's signed acknowledgement that their share checks out."""
        with self._lock:
            st = self._require_initialized()
            st.epoch.credential(fingerprint)
            HybridSignature.from_bytes(signature)
            try:
                self._append(ConfirmPayload(fingerprint, split_id, index, signature))
            except LogIntegrityError as e:
                raise _refusal(e) from None
            return self.status()

    # -- unseal --------------------------------------------------------------

    def _live_session(self) -> _UnsealSession | None:
        session = self._session
        if session is not None and self._clock() >= session.expires_at:
            session.wipe()
            self._session = None
            return None
        return session

    def open_unseal_session(self) -> SessionView:
        """The current unseal session, or a fresh one (a new HPKE key)."""
        with self._lock:
            st = self._require_initialized()
            if not self.sealed:
                raise StateError("already unsealed")
            session = self._live_session()
            if session is None:
                session = _UnsealSession(
                    self._random(SESSION_ID_SIZE),
                    SealingPrivateKey.generate(),
                    self._tree.size,
                    self._clock() + self._limits.unseal_session_seconds,
                )
                self._session = session
            return SessionView(
                session_id=session.session_id,
                public_key=session.public_key,
                log_size=session.log_size,
                expires_at=session.expires_at,
                deployment=st.deployment,
                split_id=st.split.split_id,
                replica=self._replica,
                threshold=st.threshold,
                progress=len(session.shares),
            )

    def submit_share(
        self,
        session_id: bytes,
        fingerprint: str,
        index: int,
        ciphertext: bytes,
        signature: bytes,
    ) -> Progress:
        """Check one custodian's share for the open session; unseal at the k-th.

        Checks, in order, each refusal naming the custodian:
        1. sealed, and the session is the open one and unexpired;
        2. the custodian is on the roster with this share index, and has not
           submitted in this session;
        3. the signature over the unseal-share statement verifies;
        4. the share decrypts under the session key (bound to this session,
           custodian and index);
        5. the share belongs to the current split (not a past roster or
           another deployment) and matches its commitment.
        At k valid shares: combine, check the master-key commitment, log who
        took part, and hold the key.
        """
        with self._lock:
            st = self._require_initialized()
            if not self.sealed:
                raise StateError("already unsealed")
            # 1. session
            session = self._live_session()
            if session is None:
                raise ExpiredError("no open unseal session (it expired); open a new one")
            if session_id != session.session_id:
                raise ReplayError("share is for another unseal session")
            # 2. custodian
            custodian = st.epoch.credential(fingerprint)
            name = f"custodian {custodian.name} ({fingerprint[:16]})"
            held = st.epoch.share_index(fingerprint)
            if held != index:
                raise ShareError(f"{name} holds share {held}, not {index}")
            if fingerprint in session.shares:
                raise ReplayError(f"{name} already submitted a share in this session")
            # 3. signature
            digest = hashlib.sha256(ciphertext).digest()
            statement = statements.unseal_share_statement(
                deployment=st.deployment,
                custodian=fingerprint,
                replica=self._replica,
                session=session.session_id,
                session_log_size=session.log_size,
                split_id=st.split.split_id,
                index=index,
                ciphertext_sha256=digest,
            )
            sig = HybridSignature.from_bytes(signature)
            statements.verify_statement(
                statement,
                statements.SignedStatement(fingerprint, sig),
                custodian.verify_key,
            )
            # 4. decrypt
            info = session_info(
                st.deployment, self._replica, session.session_id, fingerprint, index
            )
            try:
                assert session.key is not None  # a live session holds its key
                with session.key.open(ciphertext, info) as plain:
                    share = shamir.Share.from_bytes(plain.view())
            except KeyquorumError as e:
                raise type(e)(f"{name}: {e}") from None
            # 5. split and commitment
            try:
                if share.split_id != st.split.split_id:
                    raise ShareError(
                        "share belongs to another split (a past roster or another deployment)"
                    )
                if share.index != index:
                    raise ShareError(f"share carries index {share.index}, not {index}")
                shamir.verify_share(share, st.split)
            except ShareError as e:
                share.wipe()
                log.warning("unseal: refused share of %s: %s", name, e)
                raise ShareError(f"{name}: {e}", index=index) from None
            session.shares[fingerprint] = (share, digest, sig)
            log.info(
                "unseal: accepted share of %s (%d of %d)",
                name,
                len(session.shares),
                st.threshold,
            )
            if len(session.shares) < st.threshold:
                return Progress(len(session.shares), st.threshold, True, self._tree.size)
            return self._complete_unseal(session)

    def _complete_unseal(self, session: _UnsealSession) -> Progress:
        st = self._replayer.state
        shares = [s for s, _d, _g in session.shares.values()]
        master = shamir.combine(shares, st.split)
        try:
            self._append(
                UnsealPayload(
                    replica=self._replica,
                    session=session.session_id,
                    session_log_size=session.log_size,
                    split_id=st.split.split_id,
                    shares=tuple(
                        UnsealShare(fp, share.index, digest, sig.to_bytes())
                        for fp, (share, digest, sig) in sorted(session.shares.items())
                    ),
                )
            )
        except BaseException:
            master.wipe()
            raise
        finally:
            session.wipe()
            self._session = None
        self._master = master
        log.info("unsealed")
        return Progress(st.threshold, st.threshold, False, self._tree.size)

    # -- seal ----------------------------------------------------------------

    def seal(self, fingerprint: str, requested_at: int, reason: str, signature: bytes) -> int:
        """Seal on one custodian's signed request: log it, then wipe every key."""
        with self._lock:
            st = self._require_initialized()
            now = self._clock()
            if abs(now - requested_at) > self._limits.seal_request_skew_seconds:
                raise ExpiredError(
                    "seal request time is too far from the daemon's clock "
                    f"(more than {self._limits.seal_request_skew_seconds} s)"
                )
            sig = HybridSignature.from_bytes(signature)
            digest = hashlib.sha256(sig.to_bytes()).digest()
            if digest in self._seal_requests_seen:
                raise ReplayError("this seal request was already used")
            custodian = st.epoch.credential(fingerprint)
            statement = statements.seal_statement(
                deployment=st.deployment,
                custodian=fingerprint,
                replica=self._replica,
                reason=reason,
                requested_at=requested_at,
            )
            statements.verify_statement(
                statement, statements.SignedStatement(fingerprint, sig), custodian.verify_key
            )
            self._seal_requests_seen.add(digest)
            # Wipe first: sealing must not depend on the store being writable.
            self._wipe_keys()
            self._append(
                SealPayload(
                    replica=self._replica,
                    custodian=fingerprint,
                    reason=reason,
                    requested_at=requested_at,
                    signature=sig.to_bytes(),
                ),
                # A custodian's clock may run a little ahead of ours.
                not_before=requested_at,
            )
            log.info("sealed by custodian %s: %s", custodian.name, reason)
            return self._tree.size

    def seal_for_shutdown(self, reason: str = "daemon shutdown") -> None:
        """Wipe keys and, if we were unsealed, log that the daemon sealed itself."""
        with self._lock:
            was_unsealed = not self.sealed
            self._wipe_keys()
            if was_unsealed:
                try:
                    self._append(
                        SealPayload(
                            replica=self._replica,
                            custodian=None,
                            reason=reason,
                            requested_at=self._now(),
                            signature=None,
                        )
                    )
                except KeyquorumError as e:
                    log.error("could not log the shutdown seal: %s", e)
                log.info("sealed: %s", reason)

    def _wipe_keys(self) -> None:
        if self._master is not None:
            self._master.wipe()
            self._master = None
        if self._session is not None:
            self._session.wipe()
            self._session = None

    def master_key_buffer_for_test(self) -> bytearray | None:
        """The master key's buffer, so tests can check that seal zeroes it."""
        return self._master.buffer_for_test() if self._master is not None else None

    # -- helpers -------------------------------------------------------------

    def _require_initialized(self) -> LogState:
        st = self._replayer.state
        if not self.initialized:
            raise StateError("no ceremony yet: run `keyquorum ceremony init` first")
        return st

    def _require_unsealed(self) -> SecretBytes:
        if self._master is None:
            raise SealedError("the service is sealed")
        return self._master


def origin_for(deployment: str) -> str:
    """The checkpoint origin (and log key name) of a deployment."""
    return f"keyquorum/{deployment}"


def _refusal(error: LogIntegrityError) -> KeyquorumError:
    """What replay said about a request the daemon was about to log.

    Replay speaks of log entries ("entry 7: ..."); to the caller it is a
    refused request, so the typed cause is returned when there is one.
    """
    cause = error.__cause__
    message = str(error).split(": ", 1)[-1]
    if isinstance(cause, KeyquorumError) and not isinstance(cause, LogIntegrityError):
        return type(cause)(message)
    return InvalidInputError(message)
