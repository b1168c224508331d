"""Quorum log entries: one canonical byte form, strict decoding, typed payloads.

An entry is the RFC 8785 JSON object

    {"payload":{...},"prev":"<hex>","seq":n,"time":s,"type":"<type>","v":1}

`seq` counts from 0 (genesis); `prev` is the RFC 9162 section 2.1.1 leaf
hash of the previous entry's exact bytes (32 zero bytes for genesis), so the
entries form a hash chain and are, unchanged, the leaves of the Merkle tree
that checkpoints sign; `time` is Unix seconds (UTC) and never decreases.
One entry has exactly one byte form: `Entry.to_bytes()` is canonical, and
`Entry.from_bytes()` refuses anything else (non-canonical JSON, an unknown
or missing field, a wrong type, a float, a boolean for an integer,
uppercase or odd-length hex, a wrong length, an unknown entry type or
version), always with `DeserializationError`.

Decoding checks the form of one entry; whether it fits the history before it
(chain, order, signatures, approvals) is `replay.py`'s job. No payload holds
a plaintext secret: shares are HPKE ciphertexts, tenant keys are wrapped,
shred salts appear only as their SHA-256, approvals are signatures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from keyquorum.quorum import canonical
from keyquorum.quorum.checkpoint import parse_verifier_key
from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    UnsupportedVersionError,
)
from keyquorum.quorum.merkle import leaf_hash
from keyquorum.quorum.note import SignatureType
from keyquorum.quorum.operations import (
    ID_LEN,
    MAX_ROSTER,
    NAME_RE,
    TENANT_RE,
    EncryptedShare,
    Parameters,
    Policy,
    Result,
    check_roster_shares,
    operation,
    parse_parameters,
    parse_result,
    read_credential,
    read_fingerprint,
    read_hex,
    read_int,
    read_list,
    read_object,
    read_shares,
    read_split,
    read_str,
)
from keyquorum.quorum.shamir import SplitCommitments
from keyquorum.quorum.signatures import HybridSignature
from keyquorum.quorum.statements import MAX_TIMESTAMP as MAX_TIME

VERSION = 1
MAX_SEQ = 2**53 - 1
GENESIS_PREV = bytes(32)
MAX_SIGNATURE = 8192
ED25519_SIGNATURE = 64
ENTRY_KEYS = ("payload", "prev", "seq", "time", "type", "v")
SHARE_INFO_PREFIX = b"keyquorum/v1/share-encryption\0"
#: Domain of the log key's signature over an entry the daemon writes on its own.
LOG_SIGNATURE_DOMAIN = b"keyquorum/v1/log-entry\0"

__all__ = [
    "ENTRY_TYPES",
    "GENESIS_PREV",
    "VERSION",
    "ApprovalPayload",
    "ConfirmPayload",
    "EncryptedShare",
    "Entry",
    "ExecutionPayload",
    "GenesisPayload",
    "LogHead",
    "Payload",
    "Policy",
    "ProposalPayload",
    "RefusalPayload",
    "SealPayload",
    "ShredPayload",
    "UnsealPayload",
    "UnsealResetPayload",
    "UnsealShare",
    "entry_hash",
    "log_signature_message",
    "needs_log_signature",
    "next_entry",
    "share_info",
]


def entry_hash(raw: bytes) -> bytes:
    """RFC 9162 section 2.1.1 leaf hash of an entry's bytes: SHA-256(0x00 || raw).

    The same value is the next entry's `prev` and the entry's Merkle leaf.
    """
    return leaf_hash(raw)


def share_info(deployment: str, split_id: bytes, fingerprint: str, index: int) -> bytes:
    """The HPKE `info` (RFC 9180 section 5.1) binding an encrypted share to its place.

    `b"keyquorum/v1/share-encryption\\0"` followed by the RFC 8785 JSON of
    `{"deployment", "fingerprint", "index", "split_id"}` (split id as hex).
    A ciphertext moved to another deployment, split, custodian or index no
    longer opens.
    """
    read_str(deployment, field="deployment", pattern=NAME_RE)
    if not isinstance(split_id, bytes) or len(split_id) != ID_LEN:
        raise InvalidInputError(f"split_id must be {ID_LEN} bytes")
    try:
        read_fingerprint(fingerprint, field="fingerprint")
        read_int(index, field="index", low=1, high=MAX_ROSTER)
    except DeserializationError as e:
        raise InvalidInputError(str(e)) from e
    body = {
        "deployment": deployment,
        "fingerprint": fingerprint,
        "index": index,
        "split_id": split_id.hex(),
    }
    return SHARE_INFO_PREFIX + canonical.encode(body)


def _signature(value: object, *, field: str) -> bytes:
    """A hybrid signature's bytes, checked to parse as one (not verified here)."""
    raw = read_hex(value, field=field, max_size=MAX_SIGNATURE)
    try:
        HybridSignature.from_bytes(raw)
    except KeyquorumError as e:
        raise DeserializationError(f"{field}: not a hybrid signature: {e}") from e
    return raw


def _log_signature(value: object, *, field: str) -> bytes | None:
    """The log key's Ed25519 signature over an entry, or None (replay refuses a missing one)."""
    if value is None:
        return None
    return read_hex(value, field=field, size=ED25519_SIGNATURE)


def _log_key(value: object, *, field: str) -> str:
    """A C2SP signed-note verifier key string `<name>+<hash>+<base64 key>` of type Ed25519."""
    text = read_str(value, field=field)
    try:
        verifier = parse_verifier_key(text)
    except KeyquorumError as e:
        raise DeserializationError(f"{field}: not a note verifier key: {e}") from e
    if verifier.sig_type is not SignatureType.ED25519:
        raise DeserializationError(f"{field}: the log signs checkpoints with an Ed25519 key")
    return text


# Payloads --------------------------------------------------------------------


@dataclass(frozen=True)
class GenesisPayload:
    """Seq 0: the deployment, its k-of-n roster and sharing, policy and log key.

    Custodian `roster[i]` holds share index i+1; the split's secret commitment
    is the master-key commitment the daemon checks at every unseal.
    """

    deployment: str
    threshold: int
    roster: tuple[PublicCredential, ...]
    split: SplitCommitments
    encrypted_shares: tuple[EncryptedShare, ...]
    log_key: str
    policy: Policy

    TYPE = "genesis"
    KEYS = (
        "deployment",
        "encrypted_shares",
        "log_key",
        "policy",
        "roster",
        "split",
        "threshold",
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "encrypted_shares": [s.to_json() for s in self.encrypted_shares],
            "log_key": self.log_key,
            "policy": self.policy.to_json(),
            "roster": [c.to_json() for c in self.roster],
            "split": self.split.to_json(),
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, value: object) -> GenesisPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        threshold = read_int(obj["threshold"], field="threshold", low=2, high=MAX_ROSTER)
        items = read_list(obj["roster"], field="roster", low=2, high=MAX_ROSTER)
        roster = tuple(read_credential(v, field=f"roster[{i}]") for i, v in enumerate(items))
        split = read_split(obj["split"], field="split")
        shares = read_shares(obj["encrypted_shares"], field="encrypted_shares", count=len(roster))
        check_roster_shares(roster, split, shares, threshold, field="genesis")
        return cls(
            deployment=read_str(obj["deployment"], field="deployment", pattern=NAME_RE),
            threshold=threshold,
            roster=roster,
            split=split,
            encrypted_shares=shares,
            log_key=_log_key(obj["log_key"], field="log_key"),
            policy=Policy.from_json(obj["policy"]),
        )


@dataclass(frozen=True)
class ConfirmPayload:
    """A custodian opened and checked their share (statement `confirm-share`)."""

    custodian: str
    split_id: bytes
    index: int
    signature: bytes

    TYPE = "confirm"
    KEYS = ("custodian", "index", "signature", "split_id")

    def to_json(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "index": self.index,
            "signature": self.signature.hex(),
            "split_id": self.split_id.hex(),
        }

    @classmethod
    def from_json(cls, value: object) -> ConfirmPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        return cls(
            custodian=read_fingerprint(obj["custodian"], field="custodian"),
            split_id=read_hex(obj["split_id"], field="split_id", size=ID_LEN),
            index=read_int(obj["index"], field="index", low=1, high=MAX_ROSTER),
            signature=_signature(obj["signature"], field="signature"),
        )


@dataclass(frozen=True)
class UnsealShare:
    """One custodian's part in an unseal: which share, the hash of its ciphertext."""

    custodian: str
    index: int
    ciphertext_sha256: bytes
    signature: bytes

    KEYS = ("ciphertext_sha256", "custodian", "index", "signature")

    def to_json(self) -> dict[str, Any]:
        return {
            "ciphertext_sha256": self.ciphertext_sha256.hex(),
            "custodian": self.custodian,
            "index": self.index,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, value: object, field: str) -> UnsealShare:
        obj = read_object(value, field=field, keys=cls.KEYS)
        return cls(
            custodian=read_fingerprint(obj["custodian"], field=f"{field}.custodian"),
            index=read_int(obj["index"], field=f"{field}.index", low=1, high=MAX_ROSTER),
            ciphertext_sha256=read_hex(
                obj["ciphertext_sha256"], field=f"{field}.ciphertext_sha256", size=32
            ),
            signature=_signature(obj["signature"], field=f"{field}.signature"),
        )


@dataclass(frozen=True)
class UnsealPayload:
    """A replica rebuilt the master key from these custodians' shares.

    `session` is the daemon's unseal session (its HPKE key lived only for
    it); `session_log_size` is the log size when the session opened, which
    each custodian's `unseal-share` statement names.
    """

    replica: str
    session: bytes
    session_log_size: int
    split_id: bytes
    shares: tuple[UnsealShare, ...]

    TYPE = "unseal"
    KEYS = ("replica", "session", "session_log_size", "shares", "split_id")

    def to_json(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "session": self.session.hex(),
            "session_log_size": self.session_log_size,
            "shares": [s.to_json() for s in self.shares],
            "split_id": self.split_id.hex(),
        }

    @classmethod
    def from_json(cls, value: object) -> UnsealPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        items = read_list(obj["shares"], field="shares", low=1, high=MAX_ROSTER)
        return cls(
            replica=read_str(obj["replica"], field="replica", pattern=NAME_RE),
            session=read_hex(obj["session"], field="session", size=ID_LEN),
            session_log_size=read_int(
                obj["session_log_size"], field="session_log_size", low=1, high=MAX_SEQ
            ),
            split_id=read_hex(obj["split_id"], field="split_id", size=ID_LEN),
            shares=tuple(UnsealShare.from_json(v, f"shares[{i}]") for i, v in enumerate(items)),
        )


@dataclass(frozen=True)
class UnsealResetPayload:
    """A custodian discarded the shares of one open unseal session of `replica`.

    `signature` is the custodian's over the `unseal-reset` statement naming
    the session and its log size; `discarded` lists (in fingerprint order)
    the custodians whose shares the daemon had received in that session and
    wiped, possibly none. A session that ended this way never unseals.
    """

    replica: str
    session: bytes
    session_log_size: int
    custodian: str
    requested_at: int
    signature: bytes
    discarded: tuple[str, ...]

    TYPE = "unseal-reset"
    KEYS = (
        "custodian",
        "discarded",
        "replica",
        "requested_at",
        "session",
        "session_log_size",
        "signature",
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "discarded": list(self.discarded),
            "replica": self.replica,
            "requested_at": self.requested_at,
            "session": self.session.hex(),
            "session_log_size": self.session_log_size,
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_json(cls, value: object) -> UnsealResetPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        items = read_list(obj["discarded"], field="discarded", low=0, high=MAX_ROSTER)
        discarded = tuple(read_fingerprint(v, field=f"discarded[{i}]") for i, v in enumerate(items))
        if list(discarded) != sorted(set(discarded)):
            raise DeserializationError("discarded: fingerprints must be sorted and distinct")
        return cls(
            replica=read_str(obj["replica"], field="replica", pattern=NAME_RE),
            session=read_hex(obj["session"], field="session", size=ID_LEN),
            session_log_size=read_int(
                obj["session_log_size"], field="session_log_size", low=1, high=MAX_SEQ
            ),
            custodian=read_fingerprint(obj["custodian"], field="custodian"),
            requested_at=read_int(obj["requested_at"], field="requested_at"),
            signature=_signature(obj["signature"], field="signature"),
            discarded=discarded,
        )


@dataclass(frozen=True)
class SealPayload:
    """A replica (or `"*"`, all) dropped the master key.

    Either a custodian asked (their signature over statement `seal`), or the
    daemon sealed itself at shutdown (`custodian` and `signature` null, and
    `log_signature` the log key's signature over the entry).
    """

    replica: str
    custodian: str | None
    reason: str
    requested_at: int
    signature: bytes | None
    log_signature: bytes | None = None

    TYPE = "seal"
    KEYS = ("custodian", "log_signature", "reason", "replica", "requested_at", "signature")
    ALL_REPLICAS = "*"

    def __post_init__(self) -> None:
        if (self.custodian is None) != (self.signature is None):
            raise InvalidInputError("a seal has a signature exactly when it names a custodian")
        if self.custodian is not None and self.log_signature is not None:
            raise InvalidInputError("a custodian's seal is signed by the custodian, not the log")

    def to_json(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "log_signature": None if self.log_signature is None else self.log_signature.hex(),
            "reason": self.reason,
            "replica": self.replica,
            "requested_at": self.requested_at,
            "signature": None if self.signature is None else self.signature.hex(),
        }

    @classmethod
    def from_json(cls, value: object) -> SealPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        custodian = obj["custodian"]
        signature = obj["signature"]
        if (custodian is None) != (signature is None):
            raise DeserializationError("seal: signature must be null exactly when custodian is")
        if custodian is not None and obj["log_signature"] is not None:
            raise DeserializationError("seal: a custodian's seal carries no log_signature")
        replica = obj["replica"]
        if replica != cls.ALL_REPLICAS:
            replica = read_str(replica, field="replica", pattern=NAME_RE)
        return cls(
            replica=replica,
            custodian=None if custodian is None else read_fingerprint(custodian, field="custodian"),
            reason=read_str(obj["reason"], field="reason"),
            requested_at=read_int(obj["requested_at"], field="requested_at"),
            signature=None if signature is None else _signature(signature, field="signature"),
            log_signature=_log_signature(obj["log_signature"], field="log_signature"),
        )


@dataclass(frozen=True)
class ProposalPayload:
    """A request for a quorum operation; its log position is its entry's seq.

    `proposer` is the fingerprint of a custodian on the roster in force or
    of a proposer the quorum registered (`add-proposer`); `signature` is
    theirs over the `propose` statement of exactly this id, operation,
    parameters and expiry (`statements.proposal_statement`). A
    `change-roster` proposal also carries `credentials`: the public
    credentials of the custodians its roster adds (those not on the roster
    in force), in roster order, so that the statement custodians sign can
    name them and the daemon knows them after a restart. Other operations
    carry no such field.
    """

    id: bytes
    operation: str
    parameters: Parameters
    expires_at: int
    proposer: str
    signature: bytes
    credentials: tuple[PublicCredential, ...] = ()

    TYPE = "proposal"
    KEYS = ("expires_at", "id", "operation", "parameters", "proposer", "signature")
    ROSTER_KEYS = (*KEYS, "credentials")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "expires_at": self.expires_at,
            "id": self.id.hex(),
            "operation": self.operation,
            "parameters": dict(self.parameters),
            "proposer": self.proposer,
            "signature": self.signature.hex(),
        }
        if self.operation == "change-roster":
            out["credentials"] = [c.to_json() for c in self.credentials]
        return out

    @classmethod
    def from_json(cls, value: object) -> ProposalPayload:
        if not isinstance(value, dict):
            raise DeserializationError("payload: expected an object")
        name = operation(value.get("operation")).name
        roster_change = name == "change-roster"
        obj = read_object(
            value, field="payload", keys=cls.ROSTER_KEYS if roster_change else cls.KEYS
        )
        credentials: tuple[PublicCredential, ...] = ()
        if roster_change:
            items = read_list(obj["credentials"], field="credentials", low=0, high=MAX_ROSTER)
            credentials = tuple(
                read_credential(v, field=f"credentials[{i}]") for i, v in enumerate(items)
            )
        return cls(
            id=read_hex(obj["id"], field="id", size=ID_LEN),
            operation=name,
            parameters=parse_parameters(name, obj["parameters"]),
            expires_at=read_int(obj["expires_at"], field="expires_at"),
            proposer=read_fingerprint(obj["proposer"], field="proposer"),
            signature=_signature(obj["signature"], field="signature"),
            credentials=credentials,
        )


@dataclass(frozen=True)
class _Verdict:
    """A custodian's signed verdict on a proposal."""

    proposal: bytes
    custodian: str
    signature: bytes

    KEYS = ("custodian", "proposal", "signature")

    def to_json(self) -> dict[str, Any]:
        return {
            "custodian": self.custodian,
            "proposal": self.proposal.hex(),
            "signature": self.signature.hex(),
        }

    @classmethod
    def _fields(cls, value: object) -> tuple[bytes, str, bytes]:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        return (
            read_hex(obj["proposal"], field="proposal", size=ID_LEN),
            read_fingerprint(obj["custodian"], field="custodian"),
            _signature(obj["signature"], field="signature"),
        )


@dataclass(frozen=True)
class ApprovalPayload(_Verdict):
    """Signature over the proposal's `ApprovalRequest.statement("approve")`."""

    TYPE = "approval"
    VERDICT = "approve"

    @classmethod
    def from_json(cls, value: object) -> ApprovalPayload:
        return cls(*cls._fields(value))


@dataclass(frozen=True)
class RefusalPayload(_Verdict):
    """Signature over the proposal's `ApprovalRequest.statement("refuse")`."""

    TYPE = "refusal"
    VERDICT = "refuse"

    @classmethod
    def from_json(cls, value: object) -> RefusalPayload:
        return cls(*cls._fields(value))


@dataclass(frozen=True)
class ExecutionPayload:
    """An approved operation took effect; `result` is its logged outcome.

    The daemon makes the result (wrapped keys, salts' hashes, shares), so it
    signs the entry with the log key in force before it (`log_signature`).
    """

    proposal: bytes
    operation: str
    result: Result
    log_signature: bytes | None = None

    TYPE = "execution"
    KEYS = ("log_signature", "operation", "proposal", "result")

    def to_json(self) -> dict[str, Any]:
        return {
            "log_signature": None if self.log_signature is None else self.log_signature.hex(),
            "operation": self.operation,
            "proposal": self.proposal.hex(),
            "result": self.result.to_json(),
        }

    @classmethod
    def from_json(cls, value: object) -> ExecutionPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        name = operation(obj["operation"]).name
        return cls(
            proposal=read_hex(obj["proposal"], field="proposal", size=ID_LEN),
            operation=name,
            result=parse_result(name, obj["result"]),
            log_signature=_log_signature(obj["log_signature"], field="log_signature"),
        )


@dataclass(frozen=True)
class ShredPayload:
    """The destroy wait of `tenant` ended: its shred salts are erased for good.

    Written by the daemon on its own, so signed with the log key (`log_signature`).
    """

    tenant: str
    log_signature: bytes | None = None

    TYPE = "shred"
    KEYS = ("log_signature", "tenant")

    def to_json(self) -> dict[str, Any]:
        return {
            "log_signature": None if self.log_signature is None else self.log_signature.hex(),
            "tenant": self.tenant,
        }

    @classmethod
    def from_json(cls, value: object) -> ShredPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        return cls(
            tenant=read_str(obj["tenant"], field="tenant", pattern=TENANT_RE),
            log_signature=_log_signature(obj["log_signature"], field="log_signature"),
        )


@dataclass(frozen=True)
class HandoverPayload:
    """A replica's unsealed state passed from one process to its successor (an upgrade).

    `server run` on SIGUSR2 starts its successor, which checks it serves the
    same deployment and log head, takes the master key over a private
    descriptor, serves, and then logs this once the old process wiped its
    keys and exited. Written by the daemon on its own, so signed with the
    log key (`log_signature`). Hosts are names as the processes gave them.
    """

    replica: str
    from_pid: int
    from_host: str
    to_pid: int
    to_host: str
    log_signature: bytes | None = None

    TYPE = "handover"
    KEYS = ("from_host", "from_pid", "log_signature", "replica", "to_host", "to_pid")

    def to_json(self) -> dict[str, Any]:
        return {
            "from_host": self.from_host,
            "from_pid": self.from_pid,
            "log_signature": None if self.log_signature is None else self.log_signature.hex(),
            "replica": self.replica,
            "to_host": self.to_host,
            "to_pid": self.to_pid,
        }

    @classmethod
    def from_json(cls, value: object) -> HandoverPayload:
        obj = read_object(value, field="payload", keys=cls.KEYS)
        return cls(
            replica=read_str(obj["replica"], field="replica", pattern=NAME_RE),
            from_pid=read_int(obj["from_pid"], field="from_pid", low=1, high=2**31),
            from_host=read_str(obj["from_host"], field="from_host"),
            to_pid=read_int(obj["to_pid"], field="to_pid", low=1, high=2**31),
            to_host=read_str(obj["to_host"], field="to_host"),
            log_signature=_log_signature(obj["log_signature"], field="log_signature"),
        )


Payload = (
    GenesisPayload
    | ConfirmPayload
    | UnsealPayload
    | UnsealResetPayload
    | SealPayload
    | ProposalPayload
    | ApprovalPayload
    | RefusalPayload
    | ExecutionPayload
    | ShredPayload
    | HandoverPayload
)

_PAYLOADS: Mapping[str, Callable[[object], Payload]] = {
    cls.TYPE: cls.from_json
    for cls in (
        GenesisPayload,
        ConfirmPayload,
        UnsealPayload,
        UnsealResetPayload,
        SealPayload,
        ProposalPayload,
        ApprovalPayload,
        RefusalPayload,
        ExecutionPayload,
        ShredPayload,
        HandoverPayload,
    )
}
ENTRY_TYPES = tuple(_PAYLOADS)


# Entries ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One decoded log entry. `to_bytes()` is its one canonical form."""

    seq: int
    prev: bytes
    type: str
    time: int
    payload: Payload

    def __post_init__(self) -> None:
        if self.type not in _PAYLOADS or self.type != self.payload.TYPE:
            raise InvalidInputError(f"payload {type(self.payload).__name__} is not a {self.type}")
        if isinstance(self.seq, bool) or not 0 <= self.seq <= MAX_SEQ:
            raise InvalidInputError(f"seq {self.seq} outside [0, {MAX_SEQ}]")
        if isinstance(self.time, bool) or not 0 <= self.time <= MAX_TIME:
            raise InvalidInputError(f"time {self.time} outside [0, {MAX_TIME}]")
        if len(self.prev) != 32:
            raise InvalidInputError("prev must be a 32-byte hash")

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": self.payload.to_json(),
            "prev": self.prev.hex(),
            "seq": self.seq,
            "time": self.time,
            "type": self.type,
            "v": VERSION,
        }

    def to_bytes(self) -> bytes:
        """RFC 8785 bytes: what is hashed, chained, logged and put in the Merkle tree."""
        return canonical.encode(self.to_json())

    @classmethod
    def from_bytes(cls, raw: bytes) -> Entry:
        """Decode and check the form of one entry; DeserializationError says what is wrong."""
        if not isinstance(raw, bytes):
            raise DeserializationError("an entry must be bytes")
        value = canonical.decode(raw)
        if isinstance(value, dict) and "v" in value and value["v"] != VERSION:
            raise UnsupportedVersionError(f"entry version {str(value['v'])[:20]}, expected 1")
        obj = read_object(value, field="entry", keys=ENTRY_KEYS)
        kind = obj["type"]
        if not isinstance(kind, str) or kind not in _PAYLOADS:
            raise DeserializationError(f"unknown entry type {str(kind)[:40]!r}")
        return cls(
            seq=read_int(obj["seq"], field="seq", high=MAX_SEQ),
            prev=read_hex(obj["prev"], field="prev", size=32),
            type=kind,
            time=read_int(obj["time"], field="time"),
            payload=_PAYLOADS[kind](obj["payload"]),
        )


class LogHead(Protocol):
    """Where the log ends: what `next_entry` needs (replay's `LogState` is one)."""

    @property
    def size(self) -> int: ...

    @property
    def head(self) -> bytes: ...

    @property
    def time(self) -> int: ...


def needs_log_signature(payload: Payload) -> bool:
    """Whether the daemon writes this entry on its own, so the log key signs it.

    Executions (the daemon makes their results), shreds, handovers, and
    seals that name no custodian (the daemon sealing itself at shutdown).
    """
    if isinstance(payload, ExecutionPayload | ShredPayload | HandoverPayload):
        return True
    return isinstance(payload, SealPayload) and payload.custodian is None


def log_signature_message(entry: Entry) -> bytes:
    """What the log key signs for a daemon-written entry (`needs_log_signature`).

    `LOG_SIGNATURE_DOMAIN` (it ends in NUL, so it is never a note text), then
    the RFC 8785 bytes of the whole entry with `log_signature` null: its seq,
    prev and time bind the signature to this one place in this one log.
    """
    if not needs_log_signature(entry.payload):
        raise InvalidInputError(f"a {entry.type} entry is not signed by the log key")
    obj = entry.to_json()
    obj["payload"]["log_signature"] = None
    return LOG_SIGNATURE_DOMAIN + canonical.encode(obj)


def next_entry(
    state: LogHead | None,
    type: str,
    payload: Payload,
    time: int,
    *,
    sign: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """The bytes of the entry that would follow `state` (None: the genesis).

    Only the form, the chain link and, for an entry the daemon writes on its
    own, the log key's signature (`sign`, over `log_signature_message`) are
    made here; the daemon passes the result to `Replayer.apply` on a copy
    of its state before storing it, so that it never appends what replay
    would refuse.
    """
    if state is None:
        seq, prev, last = 0, GENESIS_PREV, 0
    else:
        seq, prev, last = state.size, state.head, state.time
    if time < last:
        raise InvalidInputError(f"time {time} is before the last entry's time {last}")
    if (type == GenesisPayload.TYPE) != (seq == 0):
        raise InvalidInputError("the genesis is entry 0 and only entry 0")
    entry = Entry(seq=seq, prev=prev, type=type, time=time, payload=payload)
    if sign is not None and needs_log_signature(payload):
        assert isinstance(payload, ExecutionPayload | ShredPayload | SealPayload | HandoverPayload)
        signature = sign(log_signature_message(entry))
        entry = dataclasses.replace(
            entry, payload=dataclasses.replace(payload, log_signature=signature)
        )
    return entry.to_bytes()
