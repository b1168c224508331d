"""Builds valid quorum logs with real credentials, for the log and replay tests.

`LogFactory` keeps the entries and a `Replayer` in step: every helper
builds the entry the daemon would append (genesis, confirm, unseal, seal,
proposal, approval, refusal, execution, shred, handover), applies it, and returns its
bytes. `make_*` helpers build payloads without appending, so tests can
alter them and check that replay refuses the result.

Credentials are generated once per process (`custodians(n)`), the
checkpoint key once too. The factory's own randomness (ids, master keys,
stand-in wrapped keys) is a seeded SHA-256 counter; HPKE and ML-DSA draw
their own, so two factories do not produce the same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from keyquorum.quorum import checkpoint, shamir
from keyquorum.quorum.credentials import CustodianCredential, PublicCredential
from keyquorum.quorum.log import (
    ApprovalPayload,
    ConfirmPayload,
    EncryptedShare,
    ExecutionPayload,
    GenesisPayload,
    HandoverPayload,
    Payload,
    Policy,
    ProposalPayload,
    RefusalPayload,
    SealPayload,
    ShredPayload,
    UnsealPayload,
    UnsealResetPayload,
    UnsealShare,
    next_entry,
    share_info,
)
from keyquorum.quorum.operations import (
    Activated,
    DestroyScheduled,
    GrantChanged,
    LogKeyRotated,
    NewVersion,
    ProposerAdded,
    ProposerRemoved,
    Result,
    Rewrapped,
    RosterChanged,
    TenantNamed,
    VersionDisabled,
    WitnessChanged,
    request_for,
)
from keyquorum.quorum.replay import LogState, Replayer
from keyquorum.quorum.secret import SecretBytes
from keyquorum.quorum.statements import (
    confirm_share_statement,
    proposal_statement,
    seal_statement,
    unseal_reset_statement,
    unseal_share_statement,
)

DEPLOYMENT = "acme-prod"
START = 1_795_600_000  # 2026-11-25T07:06:40Z
POLICY = Policy(
    activation_max_seconds=8 * 3600, destroy_wait_seconds=7 * 86400, proposal_ttl_seconds=86400
)


class Counter:
    """Deterministic `random_bytes`: SHA-256 of (seed, counter) blocks."""

    def __init__(self, seed: bytes) -> None:
        self.seed = seed
        self.n = 0

    def __call__(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            out += hashlib.sha256(self.seed + self.n.to_bytes(8, "big")).digest()
            self.n += 1
        return out[:size]


POOL = 9


@cache
def _pool() -> tuple[CustodianCredential, ...]:
    rng = Counter(b"custodians")
    return tuple(
        CustodianCredential.generate(f"custodian {i}", random_bytes=rng) for i in range(POOL)
    )


def custodians(n: int) -> tuple[CustodianCredential, ...]:
    """The first n of 9 credentials generated once per test process (deterministic keys)."""
    return _pool()[:n]


def by_fingerprint(fingerprint: str) -> CustodianCredential:
    for cred in (*_pool(), outsider()):
        if cred.fingerprint == fingerprint:
            return cred
    raise KeyError(fingerprint)


@cache
def outsider() -> CustodianCredential:
    """A valid credential that is on no roster."""
    return CustodianCredential.generate("mallory", random_bytes=Counter(b"outsider"))


@cache
def log_signer() -> checkpoint.NoteSigner:
    """The checkpoint signing key of every test log."""
    return checkpoint.NoteSigner.generate(DEPLOYMENT, random_bytes=Counter(b"log key"))


@cache
def next_log_signer(n: int = 1) -> checkpoint.NoteSigner:
    """The n-th key a test log may rotate to (`rotate-log-key`)."""
    return checkpoint.NoteSigner.generate(DEPLOYMENT, random_bytes=Counter(b"log key %d" % n))


def signer_for(vkey: str) -> checkpoint.NoteSigner:
    """The test log key whose verifier key is `vkey`."""
    for signer in (log_signer(), *(next_log_signer(n) for n in range(1, 4))):
        if signer.verifier_key() == vkey:
            return signer
    raise KeyError(vkey)


def resigned(raw: bytes, signer: checkpoint.NoteSigner | None = None) -> bytes:
    """`raw` with its log-key signature made again over its present bytes.

    What an attacker who holds the log key does after editing an entry the
    daemon writes (an execution, a shred, the daemon's seal); other entries
    come back unchanged.
    """
    from keyquorum.quorum.log import Entry, log_signature_message, needs_log_signature

    entry = Entry.from_bytes(raw)
    if not needs_log_signature(entry.payload):
        return raw
    key = signer or log_signer()
    unsigned = dataclasses.replace(entry.payload, log_signature=None)  # type: ignore[call-arg]
    entry = dataclasses.replace(entry, payload=unsigned)
    signature = key.sign_message(log_signature_message(entry))
    signed = dataclasses.replace(unsigned, log_signature=signature)  # type: ignore[call-arg]
    return dataclasses.replace(entry, payload=signed).to_bytes()


class LogFactory:
    """A growing, valid log and the replayed state that goes with it."""

    def __init__(
        self,
        n: int = 5,
        k: int = 3,
        *,
        seed: bytes = b"log",
        start: int = START,
        policy: Policy = POLICY,
    ) -> None:
        self.rng = Counter(seed)
        self.creds = custodians(n)[:n]
        self.k = k
        self.time = start
        self.policy = policy
        self.entries: list[bytes] = []
        self.replayer = Replayer()
        self.roster = list(self.creds)
        self.split_id = b""
        # Master keys, share plaintexts and shred salts made here, so tests
        # can check that none of them reaches the log.
        self.recorded_secrets: list[bytes] = []
        self.append(GenesisPayload.TYPE, self.make_genesis())

    # -- plumbing --------------------------------------------------------

    @property
    def state(self) -> LogState:
        return self.replayer.state

    def build(
        self, type_: str, payload: Payload, *, time: int | None = None, signed: bool = True
    ) -> bytes:
        """The next entry's bytes, not applied; signed by the log key in force where the
        daemon would sign it (unless `signed` is False)."""
        state = self.state if self.entries else None
        sign = signer_for(self.state.log_key).sign_message if signed and self.entries else None
        return next_entry(state, type_, payload, self.time if time is None else time, sign=sign)

    def append(self, type_: str, payload: Payload, *, time: int | None = None) -> bytes:
        raw = self.build(type_, payload, time=time)
        self.replayer.apply(raw)
        self.entries.append(raw)
        return raw

    def tick(self, seconds: int = 1) -> None:
        self.time += seconds

    # -- genesis and sharing --------------------------------------------

    def _sharing(
        self, roster: Sequence[CustodianCredential], k: int
    ) -> tuple[shamir.SplitCommitments, tuple[EncryptedShare, ...]]:
        master = SecretBytes(self.rng(32), label="test master")
        shares, split = shamir.split(master, k, len(roster), random_bytes=self.rng)
        self.recorded_secrets.append(master.reveal())
        self.recorded_secrets.extend(s.to_bytes().reveal() for s in shares)
        sealed = []
        for i, (cred, share) in enumerate(zip(roster, shares, strict=True)):
            info = share_info(DEPLOYMENT, split.split_id, cred.fingerprint, i + 1)
            plain = share.to_bytes()
            ciphertext = cred.public().sealing_key.seal(plain, info)
            sealed.append(EncryptedShare(cred.fingerprint, i + 1, ciphertext))
        return split, tuple(sealed)

    def make_genesis(self) -> GenesisPayload:
        split, shares = self._sharing(self.creds, self.k)
        self.split_id = split.split_id
        return GenesisPayload(
            deployment=DEPLOYMENT,
            threshold=self.k,
            roster=tuple(c.public() for c in self.creds),
            split=split,
            encrypted_shares=shares,
            log_key=log_signer().verifier_key(),
            policy=self.policy,
        )

    def index(self, cred: CustodianCredential) -> int:
        for i, c in enumerate(self.roster):
            if c.fingerprint == cred.fingerprint:
                return i + 1
        return 1

    # -- custodian entries ---------------------------------------------

    def make_confirm(self, cred: CustodianCredential) -> ConfirmPayload:
        index = self.index(cred)
        statement = confirm_share_statement(
            deployment=DEPLOYMENT, custodian=cred, split_id=self.split_id, index=index
        )
        signature = cred.sign(statement.domain, statement.message()).to_bytes()
        return ConfirmPayload(cred.fingerprint, self.split_id, index, signature)

    def confirm(self, cred: CustodianCredential) -> bytes:
        return self.append(ConfirmPayload.TYPE, self.make_confirm(cred))

    def make_unseal(
        self, replica: str, creds: Sequence[CustodianCredential], *, session: bytes | None = None
    ) -> UnsealPayload:
        session = self.rng(16) if session is None else session
        size = len(self.entries)
        parts = []
        for cred in creds:
            index = self.index(cred)
            digest = hashlib.sha256(self.rng(64)).digest()
            statement = unseal_share_statement(
                deployment=DEPLOYMENT,
                custodian=cred,
                replica=replica,
                session=session,
                session_log_size=size,
                split_id=self.split_id,
                index=index,
                ciphertext_sha256=digest,
            )
            signature = cred.sign(statement.domain, statement.message()).to_bytes()
            parts.append(UnsealShare(cred.fingerprint, index, digest, signature))
        return UnsealPayload(replica, session, size, self.split_id, tuple(parts))

    def unseal(self, replica: str, creds: Sequence[CustodianCredential]) -> bytes:
        return self.append(UnsealPayload.TYPE, self.make_unseal(replica, creds))

    def make_unseal_reset(
        self,
        replica: str,
        cred: CustodianCredential,
        discarded: Sequence[CustodianCredential] = (),
        *,
        session: bytes | None = None,
    ) -> UnsealResetPayload:
        session = self.rng(16) if session is None else session
        size = len(self.entries)
        statement = unseal_reset_statement(
            deployment=DEPLOYMENT,
            custodian=cred,
            replica=replica,
            session=session,
            session_log_size=size,
            requested_at=self.time,
        )
        signature = cred.sign(statement.domain, statement.message()).to_bytes()
        return UnsealResetPayload(
            replica,
            session,
            size,
            cred.fingerprint,
            self.time,
            signature,
            tuple(sorted(c.fingerprint for c in discarded)),
        )

    def unseal_reset(
        self,
        replica: str,
        cred: CustodianCredential,
        discarded: Sequence[CustodianCredential] = (),
    ) -> bytes:
        return self.append(
            UnsealResetPayload.TYPE, self.make_unseal_reset(replica, cred, discarded)
        )

    def make_seal(self, replica: str, cred: CustodianCredential | None) -> SealPayload:
        reason = "test seal"
        if cred is None:
            return SealPayload(replica, None, "shutdown", self.time, None)
        statement = seal_statement(
            deployment=DEPLOYMENT,
            custodian=cred,
            replica=replica,
            reason=reason,
            requested_at=self.time,
        )
        signature = cred.sign(statement.domain, statement.message()).to_bytes()
        return SealPayload(replica, cred.fingerprint, reason, self.time, signature)

    def seal(self, replica: str, cred: CustodianCredential | None = None) -> bytes:
        return self.append(SealPayload.TYPE, self.make_seal(replica, cred))

    # -- proposals --------------------------------------------------------

    def make_proposal(
        self,
        op: str,
        *,
        ttl: int = 3600,
        pid: bytes | None = None,
        by: CustodianCredential | None = None,
        **params: str | int,
    ) -> ProposalPayload:
        """A proposal signed by `by` (the roster's first custodian by default)."""
        signer = self.roster[0] if by is None else by
        pid = self.rng(16) if pid is None else pid
        parameters = tuple(sorted(params.items()))
        credentials: tuple[PublicCredential, ...] = ()
        if op == "change-roster":
            # The custodians the roster adds carry their public credentials.
            on_roster = {c.fingerprint for c in self.roster}
            credentials = tuple(
                by_fingerprint(f).public()
                for f in str(params["roster"]).split(",")
                if f not in on_roster
            )
        statement = proposal_statement(
            deployment=DEPLOYMENT,
            proposer=signer.public(),
            proposal_id=pid,
            operation=op,
            parameters=dict(parameters),
            expires_at=self.time + ttl,
        )
        return ProposalPayload(
            id=pid,
            operation=op,
            parameters=parameters,
            expires_at=self.time + ttl,
            proposer=signer.fingerprint,
            signature=signer.sign(statement.domain, statement.message()).to_bytes(),
            credentials=credentials,
        )

    def propose(
        self,
        op: str,
        *,
        ttl: int = 3600,
        by: CustodianCredential | None = None,
        **params: str | int,
    ) -> bytes:
        """Append a proposal; returns its id."""
        payload = self.make_proposal(op, ttl=ttl, by=by, **params)
        self.append(ProposalPayload.TYPE, payload)
        return payload.id

    def make_verdict(
        self,
        pid: bytes,
        cred: CustodianCredential,
        *,
        verdict: str = "approve",
        sign_for: bytes | None = None,
    ) -> ApprovalPayload | RefusalPayload:
        """A verdict on `pid`, signed over `sign_for`'s request when given (a misdirected one)."""
        target = self.state.proposals[sign_for if sign_for is not None else pid]
        statement = request_for(target, self.state).statement(verdict)
        signature = cred.sign(statement.domain, statement.message()).to_bytes()
        cls = ApprovalPayload if verdict == "approve" else RefusalPayload
        return cls(pid, cred.fingerprint, signature)

    def approve(self, pid: bytes, cred: CustodianCredential) -> bytes:
        return self.append(ApprovalPayload.TYPE, self.make_verdict(pid, cred))

    def refuse(self, pid: bytes, cred: CustodianCredential) -> bytes:
        return self.append(RefusalPayload.TYPE, self.make_verdict(pid, cred, verdict="refuse"))

    def make_result(self, pid: bytes) -> Result:
        """The result the daemon would log for executing `pid` now."""
        proposal = self.state.proposals[pid]
        params = dict(proposal.parameters)
        op = proposal.operation
        tenant = str(params.get("tenant", ""))
        if op in ("create-tenant", "rotate-tenant"):
            existing = self.state.tenants.get(tenant)
            version = 1 if existing is None else len(existing.versions) + 1
            salt = self.rng(32)
            self.recorded_secrets.append(salt)
            return NewVersion(tenant, version, self.rng(60), hashlib.sha256(salt).digest())
        if op == "activate-tenant":
            return Activated(tenant, self.time + int(params["duration_seconds"]))
        if op == "destroy-tenant":
            return DestroyScheduled(tenant, self.time + self.policy.destroy_wait_seconds)
        if op in ("grant", "revoke"):
            return GrantChanged(str(params["backend"]), tenant)
        if op in ("deactivate-tenant", "cancel-destroy"):
            return TenantNamed(tenant)
        if op == "disable-version":
            return VersionDisabled(tenant, int(params["version"]))
        if op == "add-proposer":
            return ProposerAdded(by_fingerprint(str(params["proposer"])).public())
        if op == "remove-proposer":
            return ProposerRemoved(str(params["proposer"]))
        if op in ("add-witness", "remove-witness"):
            return WitnessChanged(str(params["witness"]), int(params["witness_threshold"]))
        if op == "rotate-log-key":
            return LogKeyRotated(self.state.log_key, str(params["log_key"]))
        fingerprints = str(params["roster"]).split(",")
        new_roster = [by_fingerprint(f) for f in fingerprints]
        k = int(params["threshold"])
        split, shares = self._sharing(new_roster, k)
        rewrapped = tuple(
            Rewrapped(t.name, v.version, self.rng(60), self._fresh_salt_hash())
            for t in sorted(self.state.tenants.values(), key=lambda t: t.name)
            if not t.destroyed
            for v in t.versions
        )
        return RosterChanged(k, tuple(c.public() for c in new_roster), split, shares, rewrapped)

    def _fresh_salt_hash(self) -> bytes:
        salt = self.rng(32)
        self.recorded_secrets.append(salt)
        return hashlib.sha256(salt).digest()

    def execute(self, pid: bytes, result: Result | None = None) -> bytes:
        proposal = self.state.proposals[pid]
        result = self.make_result(pid) if result is None else result
        raw = self.append(ExecutionPayload.TYPE, ExecutionPayload(pid, proposal.operation, result))
        if isinstance(result, RosterChanged):
            self.roster = [by_fingerprint(c.fingerprint) for c in result.roster]
            self.k = result.threshold
            self.split_id = result.split.split_id
        return raw

    def run(
        self, op: str, approvers: Sequence[CustodianCredential] | None = None, **params: str | int
    ) -> bytes:
        """Propose, approve by the first k (or 1) custodians, execute; returns the id."""
        pid = self.propose(op, **params)
        if approvers is None:
            narrowing = op in (
                "deactivate-tenant",
                "disable-version",
                "cancel-destroy",
                "revoke",
                "remove-proposer",
            )
            approvers = self.roster[: 1 if narrowing else self.k]
        for cred in approvers:
            self.approve(pid, cred)
        self.execute(pid)
        return pid

    def shred(self, tenant: str) -> bytes:
        return self.append(ShredPayload.TYPE, ShredPayload(tenant))

    def handover(self, replica: str, from_pid: int = 4100, to_pid: int = 4242) -> bytes:
        """The daemon's record of passing `replica`'s unsealed state to a new process."""
        payload = HandoverPayload(replica, from_pid, "kq-host-1", to_pid, "kq-host-1")
        return self.append(HandoverPayload.TYPE, payload)

    def checkpoint(self, size: int | None = None) -> str:
        """A signed checkpoint of the first `size` entries (all by default)."""
        from keyquorum.quorum.merkle import CompactRange, leaf_hash

        size = len(self.entries) if size is None else size
        tree = CompactRange()
        for raw in self.entries[:size]:
            tree.append(leaf_hash(raw))
        return signer_for(self.state.key_at(size)).sign_checkpoint(size, tree.root())


def standard_log(n_tenants: int = 3) -> LogFactory:
    """A small log touching every entry type and operation."""
    f = LogFactory()
    for cred in f.creds:
        f.confirm(cred)
    f.tick()
    f.unseal("replica-a", f.creds[: f.k])
    for i in range(n_tenants):
        f.tick()
        f.run("create-tenant", tenant=f"tenant-{i}")
        f.run("activate-tenant", tenant=f"tenant-{i}", duration_seconds=3600)
        f.run("grant", backend="booking.example", tenant=f"tenant-{i}")
    f.tick()
    pid = f.propose("rotate-tenant", tenant="tenant-0")
    f.refuse(pid, f.creds[4])
    for cred in f.creds[: f.k]:
        f.approve(pid, cred)
    f.execute(pid)
    f.run("disable-version", tenant="tenant-0", version=1)
    f.run("revoke", backend="booking.example", tenant="tenant-1")
    f.run("deactivate-tenant", tenant="tenant-1")
    f.run("destroy-tenant", tenant="tenant-2")
    f.tick(f.policy.destroy_wait_seconds)
    f.shred("tenant-2")
    f.seal("replica-a", f.creds[1])
    f.unseal_reset("replica-a", f.creds[2], f.creds[:1])
    f.seal("*", None)
    return f


#: The golden export of the audit tests, signed by `log_signer()`; rebuilt by
#: tests/test_audit_cli.py when KEYQUORUM_UPDATE_GOLDEN=1.
GOLDEN_AUDIT = Path(__file__).parent / "golden" / "audit"
EXPORT = GOLDEN_AUDIT / "small.kqexport"
LOG_KEY = log_signer().verifier_key()
