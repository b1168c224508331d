"""Unseal sessions: shares submitted one custodian at a time, combined at the k-th.

Contract:
- A session is a fresh HPKE key of the daemon, an id, the log size it was
  opened at and an expiry (`Limits.unseal_session_seconds`). Shares arrive
  encrypted to that key and signed by their custodian; each is checked on
  its own (steps in `submit`) and refused with the custodian named.
- At k valid shares the master key is rebuilt in memory, checked against
  the genesis commitment, the unseal (who took part) is logged, and only
  then is the key held. Shares are wiped as soon as they are combined.
- A session belongs to the seal generation it was opened in: a seal during
  it ends it (its shares are wiped at the next use, or by the seal), and a
  completed combine after a seal is wiped rather than held.
- Custodians can follow a session: status shows who has submitted and
  when it expires, and the last session that ended without unsealing
  (expired with shares in it, reset, or ended by a seal) is kept, so the
  next custodian is told rather than silently starting over.
- A custodian on the roster can reset the open session by a signed
  request naming it (`reset`): the `unseal-reset` entry (who reset it,
  whose shares it discarded) is logged first, then the shares are wiped.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from keyquorum.hsm.daemon.context import Replica
from keyquorum.hsm.daemon.views import EndedSessionView, SubmittedShare, UnsealSessionView
from keyquorum.quorum import shamir, statements
from keyquorum.quorum.errors import (
    ExpiredError,
    KeyquorumError,
    NotFoundError,
    ReplayError,
    ShareError,
    StateError,
    with_context,
)
from keyquorum.quorum.log import UnsealPayload, UnsealResetPayload, UnsealShare
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.unseal import session_info

log = logging.getLogger(__name__)

SESSION_ID_SIZE = 16


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
    #: Whether this call opened the session; when it was opened; who submitted.
    created: bool = False
    opened_at: int = 0
    submitted: tuple[SubmittedShare, ...] = ()
    #: The session that ended before this one without unsealing, if any.
    previous: EndedSessionView | None = None


@dataclass(frozen=True)
class Progress:
    have: int
    need: int
    sealed: bool
    log_size: int
    #: The seq of the unseal entry, when this share completed the unseal.
    seq: int | None = None


class _Session:
    """One unseal session: a fresh HPKE key and the shares received so far."""

    __slots__ = (
        "expires_at",
        "generation",
        "key",
        "log_size",
        "opened_at",
        "public_key",
        "session_id",
        "shares",
        "submitted",
    )

    def __init__(
        self,
        session_id: bytes,
        key: SealingPrivateKey,
        log_size: int,
        opened_at: int,
        expires_at: int,
        generation: int,
    ) -> None:
        self.session_id = session_id
        self.key: SealingPrivateKey | None = key
        self.log_size = log_size
        self.opened_at = opened_at
        self.expires_at = expires_at
        self.generation = generation
        self.public_key = key.public_key().to_bytes()
        self.shares: dict[str, tuple[shamir.Share, bytes, HybridSignature]] = {}
        #: Who submitted, in arrival order (a tuple replaced whole: status
        #: reads it without the governance lock).
        self.submitted: tuple[SubmittedShare, ...] = ()

    def view(self) -> UnsealSessionView:
        return UnsealSessionView(
            self.session_id, self.opened_at, self.expires_at, self.log_size, self.submitted
        )

    def ended(self, how: str, at: int, reset_by: tuple[str, str] | None = None) -> EndedSessionView:
        return EndedSessionView(self.session_id, self.opened_at, at, how, self.submitted, reset_by)

    def wipe(self) -> None:
        for share, _digest, _sig in self.shares.values():
            share.wipe()
        self.shares.clear()
        # The HPKE private key lives inside OpenSSL, which clears it when the
        # object is freed; dropping the last reference is all Python can do.
        self.key = None

    def __repr__(self) -> str:
        return f"<unseal session {self.session_id.hex()[:8]}: {len(self.shares)} shares>"


class Unseal:
    """The unseal sessions of one replica (one open at a time)."""

    def __init__(self, replica: Replica, *, on_unsealed: Callable[[], None]) -> None:
        self._r = replica
        self._on_unsealed = on_unsealed
        self._session: _Session | None = None
        #: The last session that ended without unsealing (module docstring).
        self._ended: EndedSessionView | None = None

    def progress(self) -> int:
        """Shares accepted in the open session (0 without one); changes nothing."""
        session = self._session
        if session is None or not self._is_live(session):
            return 0
        return len(session.submitted)

    def sessions(self) -> tuple[UnsealSessionView | None, EndedSessionView | None]:
        """The open session and the last one ended without unsealing; changes nothing.

        Status calls this without the governance lock: it reads each
        attribute once, and a session found expired is shown as ended.
        """
        session, ended = self._session, self._ended
        if session is None:
            return None, ended
        if self._is_live(session):
            return session.view(), ended
        return None, self._end_record(session) or ended

    def _end_record(self, session: _Session) -> EndedSessionView | None:
        """How a session that is no longer live ended; None if nothing was lost."""
        if session.generation != self._r.custody.generation:
            return session.ended("sealed", session.expires_at) if session.submitted else None
        if not session.submitted:
            return None
        return session.ended("expired", session.expires_at)

    def _is_live(self, session: _Session) -> bool:
        return (
            self._r.clock() < session.expires_at
            and session.generation == self._r.custody.generation
        )

    def discard(self) -> None:
        """Wipe the open session (a seal; the caller holds the governance lock)."""
        session = self._session
        if session is not None:
            if session.submitted:
                if self._is_live(session):
                    self._ended = session.ended("sealed", self._r.clock())
                else:
                    self._ended = self._end_record(session) or self._ended
            session.wipe()
            self._session = None

    def _live(self) -> _Session | None:
        session = self._session
        if session is not None and not self._is_live(session):
            self._ended = self._end_record(session) or self._ended
            session.wipe()
            self._session = None
            return None
        return session

    def open(self) -> SessionView:
        """The current unseal session, or a fresh one (a new HPKE key)."""
        r = self._r
        with r.lock:
            r.journal.catch_up()
            st = r.initialized_state()
            if not r.custody.sealed:
                raise StateError("already unsealed")
            session = self._live()
            created = session is None
            if session is None:
                now = r.clock()
                session = _Session(
                    r.random(SESSION_ID_SIZE),
                    SealingPrivateKey.generate(),
                    r.journal.size,
                    now,
                    now + r.limits.unseal_session_seconds,
                    r.custody.generation,
                )
                self._session = session
                if self._ended is not None:
                    log.info(
                        "unseal: session %s opened after session %s %s",
                        session.session_id.hex()[:16],
                        self._ended.session_id.hex()[:16],
                        self._ended.how,
                    )
            return SessionView(
                session_id=session.session_id,
                public_key=session.public_key,
                log_size=session.log_size,
                expires_at=session.expires_at,
                deployment=st.deployment,
                split_id=st.split.split_id,
                replica=r.name,
                threshold=st.threshold,
                progress=len(session.shares),
                created=created,
                opened_at=session.opened_at,
                submitted=session.submitted,
                previous=self._ended,
            )

    def submit(
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
        """
        r = self._r
        with r.lock:
            r.journal.catch_up()
            st = r.initialized_state()
            if not r.custody.sealed:
                raise StateError("already unsealed")
            # 1. session
            session = self._live()
            if session is None:
                raise ExpiredError("no open unseal session (it expired); open a new one")
            if session_id != session.session_id:
                raise ReplayError("share is for another unseal session")
            # 2. custodian
            custodian = st.epoch.credential(fingerprint)
            name = f"custodian {custodian.label}"
            held = st.epoch.share_index(fingerprint)
            if held != index:
                raise ShareError(f"{name} holds share {held}, not {index}")
            if fingerprint in session.shares:
                raise ReplayError(f"{name} already submitted a share in this session")
            # 3. signature
            digest = hashlib.sha256(ciphertext).digest()
            statement = statements.unseal_share_statement(
                deployment=st.deployment,
                custodian=custodian,
                replica=r.name,
                session=session.session_id,
                session_log_size=session.log_size,
                split_id=st.split.split_id,
                index=index,
                ciphertext_sha256=digest,
            )
            sig = HybridSignature.from_bytes(signature)
            statements.verify_statement(
                statement, statements.SignedStatement(fingerprint, sig), custodian.verify_key
            )
            # 4. decrypt
            info = session_info(st.deployment, r.name, session.session_id, fingerprint, index)
            try:
                assert session.key is not None  # a live session holds its key
                with session.key.open(ciphertext, info) as plain:
                    share = shamir.Share.from_bytes(plain.view())
            except KeyquorumError as e:
                raise with_context(e, name) from None
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
            session.submitted = (
                *session.submitted,
                SubmittedShare(fingerprint, custodian.name, index, r.clock()),
            )
            log.info(
                "unseal: accepted share of %s (%d of %d)", name, len(session.shares), st.threshold
            )
            if len(session.shares) < st.threshold:
                return Progress(len(session.shares), st.threshold, True, r.journal.size)
            self._complete(session)
            return Progress(
                st.threshold, st.threshold, False, r.journal.size, seq=r.journal.size - 1
            )

    def _complete(self, session: _Session) -> None:
        """Combine, log who took part, then hold the key (unless a seal came meanwhile)."""
        r = self._r
        st = r.journal.state
        shares = [s for s, _d, _g in session.shares.values()]
        try:
            master = shamir.combine(shares, st.split)
            try:
                r.journal.append_retrying(
                    [
                        UnsealPayload(
                            replica=r.name,
                            session=session.session_id,
                            session_log_size=session.log_size,
                            split_id=st.split.split_id,
                            shares=tuple(
                                UnsealShare(fp, share.index, digest, sig.to_bytes())
                                for fp, (share, digest, sig) in sorted(session.shares.items())
                            ),
                        )
                    ],
                    time=r.now(),
                )
            except BaseException:
                master.wipe()
                raise
        finally:
            session.wipe()
            self._session = None
        self._ended = None
        r.custody.install_master(master, session.generation)
        log.info("unsealed")
        self._on_unsealed()

    def reset(
        self, session_id: bytes, fingerprint: str, requested_at: int, signature: bytes
    ) -> tuple[int, EndedSessionView]:
        """Discard the open session's shares on a custodian's signed request.

        Checks, in order: sealed; a live session, the one the request names;
        the request time within the seal-request skew of the daemon's clock;
        then replay's own rules on the entry (custodian on the roster,
        signature over the `unseal-reset` statement). The entry is logged
        first and only then are the shares wiped, so a refused or unlogged
        reset changes nothing. Returns the entry's seq and the ended session.
        """
        r = self._r
        with r.lock:
            r.journal.catch_up()
            st = r.initialized_state()
            if not r.custody.sealed:
                raise StateError("already unsealed: there is no unseal session to reset")
            session = self._live()
            if session is None:
                raise NotFoundError(f"replica {r.name} has no open unseal session to reset")
            if session_id != session.session_id:
                raise ReplayError(
                    "the reset names another unseal session than the open one "
                    f"({session.session_id.hex()[:16]})"
                )
            skew = r.limits.seal_request_skew_seconds
            if abs(r.clock() - requested_at) > skew:
                raise ExpiredError(
                    f"reset request time is too far from the daemon's clock (more than {skew} s)"
                )
            payload = UnsealResetPayload(
                replica=r.name,
                session=session.session_id,
                session_log_size=session.log_size,
                custodian=fingerprint,
                requested_at=requested_at,
                signature=HybridSignature.from_bytes(signature).to_bytes(),
                discarded=tuple(sorted(session.shares)),
            )
            r.journal.append_retrying([payload], time=max(r.now(), requested_at))
            custodian = st.epoch.credential(fingerprint)
            ended = session.ended("reset", r.clock(), (fingerprint, custodian.name))
            session.wipe()
            self._session = None
            self._ended = ended
            log.info(
                "unseal: session %s reset by custodian %s, %d share(s) discarded",
                session.session_id.hex()[:16],
                custodian.label,
                len(ended.submitted),
            )
            return r.journal.size - 1, ended
