"""The quorum operations: names, parameter schemas, approvals needed, results.

Every governance change is a proposal naming one operation of the table
below with its parameters. DESIGN's quorum rule decides how many custodian
approvals it needs: an operation that widens exposure (a key becomes
usable, is destroyed, a backend gains access, the roster changes) needs the
threshold `k`; one that narrows exposure needs a single custodian.

| operation           | parameters               | approvals | result                       |
|---------------------|--------------------------|-----------|------------------------------|
| `create-tenant`     | tenant                   | k         | `NewVersion` (version 1)     |
| `activate-tenant`   | tenant, duration_seconds | k         | `Activated`                  |
| `rotate-tenant`     | tenant                   | k         | `NewVersion` (next version)  |
| `destroy-tenant`    | tenant                   | k         | `DestroyScheduled`           |
| `grant`             | backend, tenant          | k         | `GrantChanged`               |
| `change-roster`     | threshold, roster        | k         | `RosterChanged`              |
| `add-proposer`      | name, proposer           | k         | `ProposerAdded`              |
| `add-witness`       | witness, witness_threshold | k       | `WitnessChanged`             |
| `remove-witness`    | witness, witness_threshold | k       | `WitnessChanged`             |
| `rotate-log-key`    | log_key                  | k         | `LogKeyRotated`              |
| `approve-restore`   | restored_size, abandoned_size, abandoned_root | k | `RestoreApproved` |
| `deactivate-tenant` | tenant                   | 1         | `TenantNamed`                |
| `disable-version`   | tenant, version          | 1         | `VersionDisabled`            |
| `cancel-destroy`    | tenant                   | 1         | `TenantNamed`                |
| `revoke`            | backend, tenant          | 1         | `GrantChanged`               |
| `remove-proposer`   | name, proposer           | 1         | `ProposerRemoved`            |

`approve-restore` is the quorum's consent to a log restored from a snapshot
taken before a checkpoint that was published (docs/operations.md): it
names the size the log was restored to and the abandoned checkpoint (its
size and root hash); the entries between the two are gone for good. Until
it executes, a daemon on a restored store serves no key (`keyquorum admin
restore`).

Removing a witness needs k like adding one: fewer independent parties
watching the log widens what a dishonest daemon could get away with.

Parameters are a flat JSON object of strings and integers so that the
approval statement a custodian reads shows every one of them
(`statements.ApprovalRequest`). The `roster` parameter of `change-roster`
is the new custodians' fingerprints, comma-separated, in share-index order;
the proposal entry carries the public credentials of those not on the
roster in force (so that their names are in what custodians sign), and the
execution's result carries all of them, matching the list one for one.
`add-proposer` names a proposer credential by its fingerprint and name
(the credential itself is in the result); `remove-proposer` names it the
same way, the name the one the log registered, so that both statements
show the proposer as people read them. `witness` is a C2SP cosignature
(0x04) verifier key, `log_key` a C2SP Ed25519 (0x01) verifier key named as
the deployment's checkpoint origin.

This module also holds the strict JSON field readers used by `log.py`
(`read_object`, `read_int`, ...): every one raises `DeserializationError`
naming the field, never `KeyError` or `TypeError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from keyquorum.quorum.credentials import PublicCredential
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, KeyquorumError
from keyquorum.quorum.note import NoteVerifier, SignatureType
from keyquorum.quorum.shamir import SplitCommitments
from keyquorum.quorum.statements import MAX_TIMESTAMP as MAX_TIME
from keyquorum.quorum.statements import ApprovalContext, ApprovalRequest, Person

# Upper bound of every time and duration in the log: 9999-12-31T23:59:59Z.
# Keeps `time + duration` inside RFC 8785's exact integer range (section 3.2.2.3).
MAX_ROSTER = 255
MAX_TEXT = 200
MAX_WRAPPED_KEY = 1024

TENANT_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
BACKEND_RE = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?")
NAME_RE = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")
ROOT_HASH_RE = re.compile(r"[0-9a-f]{64}")
FINGERPRINT_LEN = 32
ID_LEN = 16

ParamValue = str | int
Parameters = tuple[tuple[str, ParamValue], ...]


# Strict JSON field readers -------------------------------------------------


def read_object(value: object, *, field: str, keys: Sequence[str]) -> dict[str, Any]:
    """A JSON object with exactly `keys`: a missing or an extra key is an error."""
    if not isinstance(value, dict):
        raise DeserializationError(f"{field}: expected an object")
    missing = sorted(set(keys) - value.keys())
    extra = sorted(value.keys() - set(keys))
    if missing:
        raise DeserializationError(f"{field}: missing {', '.join(missing)}")
    if extra:
        raise DeserializationError(f"{field}: unknown field {', '.join(extra)}")
    return value


def read_int(value: object, *, field: str, low: int = 0, high: int = MAX_TIME) -> int:
    """An integer in [low, high]; JSON booleans are not integers here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DeserializationError(f"{field}: expected an integer")
    if not low <= value <= high:
        raise DeserializationError(f"{field}: {value} is outside [{low}, {high}]")
    return value


def read_str(value: object, *, field: str, pattern: re.Pattern[str] | None = None) -> str:
    """A string matching `pattern`, or printable text of at most MAX_TEXT characters."""
    if not isinstance(value, str):
        raise DeserializationError(f"{field}: expected a string")
    if pattern is not None:
        if not pattern.fullmatch(value):
            raise DeserializationError(f"{field}: {value[:80]!r} is not a valid name")
    elif len(value) > MAX_TEXT or not value.isprintable():
        raise DeserializationError(f"{field}: text must be printable, at most {MAX_TEXT} chars")
    return value


def read_hex(
    value: object, *, field: str, size: int | None = None, max_size: int | None = None
) -> bytes:
    """Lowercase hex of exactly `size` bytes, or of 1..`max_size` bytes."""
    if not isinstance(value, str):
        raise DeserializationError(f"{field}: expected a hex string")
    if max_size is not None and len(value) > 2 * max_size:
        raise DeserializationError(f"{field}: longer than {max_size} bytes")
    if len(value) % 2 or value != value.lower():
        raise DeserializationError(f"{field}: not lowercase hex of whole bytes")
    try:
        raw = bytes.fromhex(value)
    except ValueError as e:
        raise DeserializationError(f"{field}: not hex") from e
    if size is not None and len(raw) != size:
        raise DeserializationError(f"{field}: expected {size} bytes, got {len(raw)}")
    if size is None and not raw:
        raise DeserializationError(f"{field}: empty")
    return raw


def read_list(value: object, *, field: str, low: int, high: int) -> list[Any]:
    if not isinstance(value, list):
        raise DeserializationError(f"{field}: expected a list")
    if not low <= len(value) <= high:
        raise DeserializationError(f"{field}: {len(value)} items, expected {low}..{high}")
    return value


def read_fingerprint(value: object, *, field: str) -> str:
    """A custodian id: the hex SHA-256 fingerprint of a `PublicCredential`."""
    read_hex(value, field=field, size=FINGERPRINT_LEN)
    return str(value)


def read_credential(value: object, *, field: str) -> PublicCredential:
    """`PublicCredential.from_json`, its every failure as DeserializationError."""
    try:
        return PublicCredential.from_json(value)
    except DeserializationError:
        raise
    except (KeyquorumError, TypeError, ValueError, KeyError) as e:
        raise DeserializationError(f"{field}: not a public credential: {e}") from e


def read_split(value: object, *, field: str) -> SplitCommitments:
    """`SplitCommitments.from_json`, its every failure as DeserializationError."""
    try:
        return SplitCommitments.from_json(value)
    except DeserializationError:
        raise
    except (KeyquorumError, TypeError, ValueError, KeyError) as e:
        raise DeserializationError(f"{field}: not split commitments: {e}") from e


# Policy and shares that genesis and change-roster both carry ---------------


@dataclass(frozen=True)
class Policy:
    """Deployment limits fixed at genesis.

    `activation_max_seconds` bounds `activate-tenant`'s duration,
    `destroy_wait_seconds` is the delay between `destroy-tenant` and the
    shred (during which `cancel-destroy` still works), `proposal_ttl_seconds`
    bounds how far in the future a proposal may expire.
    """

    activation_max_seconds: int
    destroy_wait_seconds: int
    proposal_ttl_seconds: int

    KEYS = ("activation_max_seconds", "destroy_wait_seconds", "proposal_ttl_seconds")

    def __post_init__(self) -> None:
        for name in self.KEYS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_TIME:
                raise InvalidInputError(f"policy {name} must be an integer in [1, {MAX_TIME}]")

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.KEYS}

    @classmethod
    def from_json(cls, value: object) -> Policy:
        obj = read_object(value, field="policy", keys=cls.KEYS)
        return cls(*(read_int(obj[k], field=f"policy.{k}", low=1) for k in cls.KEYS))


@dataclass(frozen=True)
class EncryptedShare:
    """One custodian's share, HPKE-sealed to their key (`log.share_info` is the info)."""

    custodian: str
    index: int
    ciphertext: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "ciphertext": self.ciphertext.hex(),
            "custodian": self.custodian,
            "index": self.index,
        }

    @classmethod
    def from_json(cls, value: object, *, field: str = "encrypted_share") -> EncryptedShare:
        obj = read_object(value, field=field, keys=("ciphertext", "custodian", "index"))
        return cls(
            custodian=read_fingerprint(obj["custodian"], field=f"{field}.custodian"),
            index=read_int(obj["index"], field=f"{field}.index", low=1, high=MAX_ROSTER),
            ciphertext=read_hex(obj["ciphertext"], field=f"{field}.ciphertext", max_size=4096),
        )


def read_shares(value: object, *, field: str, count: int) -> tuple[EncryptedShare, ...]:
    """Exactly `count` encrypted shares, share i (1-based) at position i-1."""
    items = read_list(value, field=field, low=count, high=count)
    shares = tuple(EncryptedShare.from_json(v, field=f"{field}[{i}]") for i, v in enumerate(items))
    for i, share in enumerate(shares):
        if share.index != i + 1:
            raise DeserializationError(f"{field}[{i}]: index {share.index}, expected {i + 1}")
    return shares


def check_roster_shares(
    roster: Sequence[PublicCredential],
    split: SplitCommitments,
    shares: Sequence[EncryptedShare],
    threshold: int,
    *,
    field: str,
) -> None:
    """Roster, split and encrypted shares describe the same k-of-n sharing.

    Custodian i (0-based) holds share index i+1; the split's threshold and
    count are the roster's; nobody appears twice.
    """
    fingerprints = [c.fingerprint for c in roster]
    if len(set(fingerprints)) != len(fingerprints):
        raise DeserializationError(f"{field}: a custodian appears twice in the roster")
    if not 2 <= threshold <= len(roster):
        raise DeserializationError(
            f"{field}: threshold {threshold} outside [2, {len(roster)}] custodians"
        )
    if split.threshold != threshold or split.count != len(roster):
        raise DeserializationError(
            f"{field}: split is {split.threshold}-of-{split.count}, "
            f"roster is {threshold}-of-{len(roster)}"
        )
    for i, share in enumerate(shares):
        if share.custodian != fingerprints[i]:
            raise DeserializationError(f"{field}: share {share.index} is not for custodian {i}")


# Parameters ----------------------------------------------------------------


def _tenant(value: object, field: str) -> str:
    return read_str(value, field=field, pattern=TENANT_RE)


def _backend(value: object, field: str) -> str:
    return read_str(value, field=field, pattern=BACKEND_RE)


def _duration(value: object, field: str) -> int:
    return read_int(value, field=field, low=1)


def _version(value: object, field: str) -> int:
    return read_int(value, field=field, low=1, high=2**31)


def _threshold(value: object, field: str) -> int:
    return read_int(value, field=field, low=2, high=MAX_ROSTER)


def read_vkey(value: object, *, field: str, sig_type: SignatureType) -> str:
    """A C2SP signed-note verifier key string of `sig_type`, as given (not re-encoded)."""
    text = read_str(value, field=field)
    try:
        verifier = NoteVerifier.from_vkey(text)
    except KeyquorumError as e:
        raise DeserializationError(f"{field}: not a note verifier key: {e}") from e
    if verifier.sig_type is not sig_type:
        raise DeserializationError(f"{field}: expected a key of type 0x{sig_type:02x}")
    return text


def _witness(value: object, field: str) -> str:
    return read_vkey(value, field=field, sig_type=SignatureType.COSIGNATURE_V1)


def _log_key_param(value: object, field: str) -> str:
    return read_vkey(value, field=field, sig_type=SignatureType.ED25519)


def _log_size(value: object, field: str) -> int:
    return read_int(value, field=field, low=1, high=2**53)


def _root_hash(value: object, field: str) -> str:
    return read_str(value, field=field, pattern=ROOT_HASH_RE)


def _witness_threshold(value: object, field: str) -> int:
    return read_int(value, field=field, low=0, high=MAX_ROSTER)


def _proposer(value: object, field: str) -> str:
    return read_fingerprint(value, field=field)


def _name(value: object, field: str) -> str:
    return read_str(value, field=field)


def _roster(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise DeserializationError(f"{field}: expected comma-separated fingerprints")
    parts = value.split(",")
    if not 2 <= len(parts) <= MAX_ROSTER:
        raise DeserializationError(f"{field}: {len(parts)} custodians, expected 2..{MAX_ROSTER}")
    for i, part in enumerate(parts):
        read_fingerprint(part, field=f"{field}[{i}]")
    if len(set(parts)) != len(parts):
        raise DeserializationError(f"{field}: a custodian appears twice")
    return value


_CHECKERS: Mapping[str, Callable[[object, str], ParamValue]] = {
    "tenant": _tenant,
    "backend": _backend,
    "duration_seconds": _duration,
    "version": _version,
    "threshold": _threshold,
    "roster": _roster,
    "proposer": _proposer,
    "name": _name,
    "witness": _witness,
    "witness_threshold": _witness_threshold,
    "log_key": _log_key_param,
    "restored_size": _log_size,
    "abandoned_size": _log_size,
    "abandoned_root": _root_hash,
}


@dataclass(frozen=True)
class Operation:
    """One row of the operations table."""

    name: str
    parameters: tuple[str, ...]
    widening: bool

    def required_approvals(self, threshold: int) -> int:
        """k for an operation that widens exposure, 1 for one that narrows it."""
        return threshold if self.widening else 1


OPERATIONS: Mapping[str, Operation] = {
    op.name: op
    for op in (
        Operation("create-tenant", ("tenant",), widening=True),
        Operation("activate-tenant", ("duration_seconds", "tenant"), widening=True),
        Operation("rotate-tenant", ("tenant",), widening=True),
        Operation("destroy-tenant", ("tenant",), widening=True),
        Operation("grant", ("backend", "tenant"), widening=True),
        Operation("change-roster", ("roster", "threshold"), widening=True),
        Operation("add-proposer", ("name", "proposer"), widening=True),
        Operation("add-witness", ("witness", "witness_threshold"), widening=True),
        Operation("remove-witness", ("witness", "witness_threshold"), widening=True),
        Operation("rotate-log-key", ("log_key",), widening=True),
        Operation(
            "approve-restore", ("abandoned_root", "abandoned_size", "restored_size"), widening=True
        ),
        Operation("deactivate-tenant", ("tenant",), widening=False),
        Operation("disable-version", ("tenant", "version"), widening=False),
        Operation("cancel-destroy", ("tenant",), widening=False),
        Operation("revoke", ("backend", "tenant"), widening=False),
        Operation("remove-proposer", ("name", "proposer"), widening=False),
    )
}


def operation(name: object) -> Operation:
    """The table row for `name`; DeserializationError for an unknown operation."""
    if not isinstance(name, str) or name not in OPERATIONS:
        raise DeserializationError(f"unknown operation {str(name)[:40]!r}")
    return OPERATIONS[name]


def parse_parameters(name: str, value: object, *, field: str = "parameters") -> Parameters:
    """Check a proposal's parameter object against the operation's schema.

    Returns the parameters as (key, value) pairs sorted by key, which is the
    order RFC 8785 gives them (ASCII keys sort the same in UTF-16).
    """
    op = operation(name)
    obj = read_object(value, field=field, keys=op.parameters)
    checked: list[tuple[str, ParamValue]] = []
    for key in sorted(obj):
        checked.append((key, _CHECKERS[key](obj[key], f"{field}.{key}")))
    return tuple(checked)


#: Parameters that are integers in the log and decimal text on the wire.
INTEGER_PARAMETERS = frozenset(
    {
        "duration_seconds",
        "threshold",
        "version",
        "witness_threshold",
        "restored_size",
        "abandoned_size",
    }
)
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,15}")


def parameters_from_text(name: str, pairs: Sequence[tuple[str, str]]) -> Parameters:
    """Parameters as the wire carries them (all text) read into their logged types.

    The integer ones must be plain decimal; then the operation's schema
    (`parse_parameters`). DeserializationError names what is wrong.
    """
    values: dict[str, str | int] = {}
    for key, value in pairs:
        if key in values:
            raise DeserializationError(f"parameter {key!r} is given twice")
        if key in INTEGER_PARAMETERS:
            if not isinstance(value, str) or not _DECIMAL.fullmatch(value):
                raise DeserializationError(f"parameter {key!r} must be a decimal integer")
            values[key] = int(value)
        else:
            values[key] = value
    return parse_parameters(name, values)


def check_parameters(name: str, parameters: Parameters, policy: Policy) -> Parameters:
    """Schema check plus the policy bounds: what a proposal must pass to be logged.

    Raises InvalidInputError (the daemon's caller sent it) with the reason.
    """
    try:
        params = parse_parameters(name, dict(parameters))
    except DeserializationError as e:
        raise InvalidInputError(str(e)) from e
    values = dict(params)
    if "duration_seconds" in values:
        duration = values["duration_seconds"]
        if not isinstance(duration, int) or duration > policy.activation_max_seconds:
            raise InvalidInputError(
                f"duration_seconds {duration} exceeds the policy's "
                f"activation_max_seconds {policy.activation_max_seconds}"
            )
    if name == "change-roster":
        count = len(str(values["roster"]).split(","))
        threshold = values["threshold"]
        if not isinstance(threshold, int) or threshold > count:
            raise InvalidInputError(f"threshold {threshold} exceeds the {count} custodians")
    return params


def parameters_to_json(parameters: Parameters) -> dict[str, ParamValue]:
    return dict(parameters)


_BACKEND_IDENTITY = "keyquorum://backend/"


def typed_parameters(pairs: Sequence[tuple[str, str]]) -> Parameters:
    """Parameters as a proposer types them (text) to the types the log holds.

    The integer parameters must be plain decimal; a grant's backend may be
    its certificate identity `keyquorum://backend/<name>`, logged as <name>.
    Sorted by key. The proposer's CLI and the daemon both call this, so the
    statement a proposer signs is the one replay rebuilds; schema and policy
    checks are `check_parameters`'s.
    """
    out: dict[str, ParamValue] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidInputError(f"parameter {key!r} is given twice")
        if key in INTEGER_PARAMETERS:
            if not _DECIMAL.fullmatch(value):
                raise InvalidInputError(f"parameter {key!r} must be a decimal integer")
            out[key] = int(value)
        elif key == "backend" and value.startswith("keyquorum://"):
            if not value.startswith(_BACKEND_IDENTITY):
                raise InvalidInputError(f"{value} is not a backend identity")
            out[key] = value[len(_BACKEND_IDENTITY) :]
        else:
            out[key] = value
    return tuple(sorted(out.items()))


# Results -------------------------------------------------------------------


@dataclass(frozen=True)
class NewVersion:
    """`create-tenant` (version 1) and `rotate-tenant` (the next version).

    The wrapped key is AEAD ciphertext under a KEK derived from the master
    key and a 32-byte shred salt; only the salt's SHA-256 is logged, the salt
    sits in the store's erasable table (crypto-shredding).
    """

    tenant: str
    version: int
    wrapped_key: bytes
    shred_salt_sha256: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "shred_salt_sha256": self.shred_salt_sha256.hex(),
            "tenant": self.tenant,
            "version": self.version,
            "wrapped_key": self.wrapped_key.hex(),
        }

    @classmethod
    def from_json(cls, value: object, field: str) -> NewVersion:
        keys = ("shred_salt_sha256", "tenant", "version", "wrapped_key")
        obj = read_object(value, field=field, keys=keys)
        return cls(
            tenant=_tenant(obj["tenant"], f"{field}.tenant"),
            version=_version(obj["version"], f"{field}.version"),
            wrapped_key=read_hex(
                obj["wrapped_key"], field=f"{field}.wrapped_key", max_size=MAX_WRAPPED_KEY
            ),
            shred_salt_sha256=read_hex(
                obj["shred_salt_sha256"], field=f"{field}.shred_salt_sha256", size=32
            ),
        )


@dataclass(frozen=True)
class Activated:
    """`activate-tenant`: usable until `active_until` = execution time + duration."""

    tenant: str
    active_until: int

    def to_json(self) -> dict[str, Any]:
        return {"active_until": self.active_until, "tenant": self.tenant}

    @classmethod
    def from_json(cls, value: object, field: str) -> Activated:
        obj = read_object(value, field=field, keys=("active_until", "tenant"))
        return cls(
            tenant=_tenant(obj["tenant"], f"{field}.tenant"),
            active_until=read_int(obj["active_until"], field=f"{field}.active_until"),
        )


@dataclass(frozen=True)
class DestroyScheduled:
    """`destroy-tenant`: shred due at `destroy_at` = execution time + destroy wait."""

    tenant: str
    destroy_at: int

    def to_json(self) -> dict[str, Any]:
        return {"destroy_at": self.destroy_at, "tenant": self.tenant}

    @classmethod
    def from_json(cls, value: object, field: str) -> DestroyScheduled:
        obj = read_object(value, field=field, keys=("destroy_at", "tenant"))
        return cls(
            tenant=_tenant(obj["tenant"], f"{field}.tenant"),
            destroy_at=read_int(obj["destroy_at"], field=f"{field}.destroy_at"),
        )


@dataclass(frozen=True)
class GrantChanged:
    """`grant` and `revoke`: the pair that gained or lost access."""

    backend: str
    tenant: str

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, "tenant": self.tenant}

    @classmethod
    def from_json(cls, value: object, field: str) -> GrantChanged:
        obj = read_object(value, field=field, keys=("backend", "tenant"))
        return cls(
            backend=_backend(obj["backend"], f"{field}.backend"),
            tenant=_tenant(obj["tenant"], f"{field}.tenant"),
        )


@dataclass(frozen=True)
class TenantNamed:
    """`deactivate-tenant` and `cancel-destroy`: the tenant concerned."""

    tenant: str

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant}

    @classmethod
    def from_json(cls, value: object, field: str) -> TenantNamed:
        obj = read_object(value, field=field, keys=("tenant",))
        return cls(tenant=_tenant(obj["tenant"], f"{field}.tenant"))


@dataclass(frozen=True)
class VersionDisabled:
    """`disable-version`: that version no longer unwraps anything."""

    tenant: str
    version: int

    def to_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "version": self.version}

    @classmethod
    def from_json(cls, value: object, field: str) -> VersionDisabled:
        obj = read_object(value, field=field, keys=("tenant", "version"))
        return cls(
            tenant=_tenant(obj["tenant"], f"{field}.tenant"),
            version=_version(obj["version"], f"{field}.version"),
        )


@dataclass(frozen=True)
class Rewrapped:
    """One tenant key version re-wrapped under the new master key of a roster change.

    Under a FRESH shred salt (its SHA-256 here): the old salt is erased in
    the same store transaction, so the wrapping the log still holds from
    before the change opens with nothing anyone holds, not even the old
    roster's master key.
    """

    tenant: str
    version: int
    wrapped_key: bytes
    shred_salt_sha256: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "shred_salt_sha256": self.shred_salt_sha256.hex(),
            "tenant": self.tenant,
            "version": self.version,
            "wrapped_key": self.wrapped_key.hex(),
        }

    @classmethod
    def from_json(cls, value: object, field: str) -> Rewrapped:
        keys = ("shred_salt_sha256", "tenant", "version", "wrapped_key")
        obj = read_object(value, field=field, keys=keys)
        return cls(
            tenant=_tenant(obj["tenant"], f"{field}.tenant"),
            version=_version(obj["version"], f"{field}.version"),
            wrapped_key=read_hex(
                obj["wrapped_key"], field=f"{field}.wrapped_key", max_size=MAX_WRAPPED_KEY
            ),
            shred_salt_sha256=read_hex(
                obj["shred_salt_sha256"], field=f"{field}.shred_salt_sha256", size=32
            ),
        )


@dataclass(frozen=True)
class RosterChanged:
    """`change-roster`: a new master key, split to the new roster, every key re-wrapped."""

    threshold: int
    roster: tuple[PublicCredential, ...]
    split: SplitCommitments
    encrypted_shares: tuple[EncryptedShare, ...]
    rewrapped: tuple[Rewrapped, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "encrypted_shares": [s.to_json() for s in self.encrypted_shares],
            "rewrapped": [r.to_json() for r in self.rewrapped],
            "roster": [c.to_json() for c in self.roster],
            "split": self.split.to_json(),
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, value: object, field: str) -> RosterChanged:
        keys = ("encrypted_shares", "rewrapped", "roster", "split", "threshold")
        obj = read_object(value, field=field, keys=keys)
        threshold = _threshold(obj["threshold"], f"{field}.threshold")
        items = read_list(obj["roster"], field=f"{field}.roster", low=2, high=MAX_ROSTER)
        roster = tuple(
            read_credential(v, field=f"{field}.roster[{i}]") for i, v in enumerate(items)
        )
        split = read_split(obj["split"], field=f"{field}.split")
        shares = read_shares(
            obj["encrypted_shares"], field=f"{field}.encrypted_shares", count=len(roster)
        )
        check_roster_shares(roster, split, shares, threshold, field=field)
        rewrapped_items = read_list(obj["rewrapped"], field=f"{field}.rewrapped", low=0, high=2**20)
        rewrapped = tuple(
            Rewrapped.from_json(v, f"{field}.rewrapped[{i}]") for i, v in enumerate(rewrapped_items)
        )
        return cls(threshold, roster, split, shares, rewrapped)


@dataclass(frozen=True)
class ProposerAdded:
    """`add-proposer`: the public credential whose signature may now propose."""

    proposer: PublicCredential

    def to_json(self) -> dict[str, Any]:
        return {"proposer": self.proposer.to_json()}

    @classmethod
    def from_json(cls, value: object, field: str) -> ProposerAdded:
        obj = read_object(value, field=field, keys=("proposer",))
        return cls(read_credential(obj["proposer"], field=f"{field}.proposer"))


@dataclass(frozen=True)
class ProposerRemoved:
    """`remove-proposer`: that credential's signature proposes nothing from now on."""

    proposer: str

    def to_json(self) -> dict[str, Any]:
        return {"proposer": self.proposer}

    @classmethod
    def from_json(cls, value: object, field: str) -> ProposerRemoved:
        obj = read_object(value, field=field, keys=("proposer",))
        return cls(_proposer(obj["proposer"], f"{field}.proposer"))


@dataclass(frozen=True)
class WitnessChanged:
    """`add-witness` / `remove-witness`: the witness key, and the threshold m after."""

    witness: str
    witness_threshold: int

    def to_json(self) -> dict[str, Any]:
        return {"witness": self.witness, "witness_threshold": self.witness_threshold}

    @classmethod
    def from_json(cls, value: object, field: str) -> WitnessChanged:
        obj = read_object(value, field=field, keys=("witness", "witness_threshold"))
        return cls(
            _witness(obj["witness"], f"{field}.witness"),
            _witness_threshold(obj["witness_threshold"], f"{field}.witness_threshold"),
        )


@dataclass(frozen=True)
class LogKeyRotated:
    """`rotate-log-key`: checkpoints after this entry are signed by `log_key`.

    The entry itself is signed by `previous_log_key` (the key in force before
    it), so anyone holding the old key can follow the chain to the new one.
    """

    previous_log_key: str
    log_key: str

    def to_json(self) -> dict[str, Any]:
        return {"log_key": self.log_key, "previous_log_key": self.previous_log_key}

    @classmethod
    def from_json(cls, value: object, field: str) -> LogKeyRotated:
        obj = read_object(value, field=field, keys=("log_key", "previous_log_key"))
        return cls(
            previous_log_key=_log_key_param(obj["previous_log_key"], f"{field}.previous_log_key"),
            log_key=_log_key_param(obj["log_key"], f"{field}.log_key"),
        )


@dataclass(frozen=True)
class RestoreApproved:
    """`approve-restore`: the log goes on from `restored_size`; the abandoned checkpoint
    (size and RFC 9162 root, lowercase hex) and every entry after the restored size
    that it covered are gone for good, with the quorum's consent."""

    restored_size: int
    abandoned_size: int
    abandoned_root: str

    def to_json(self) -> dict[str, Any]:
        return {
            "abandoned_root": self.abandoned_root,
            "abandoned_size": self.abandoned_size,
            "restored_size": self.restored_size,
        }

    @classmethod
    def from_json(cls, value: object, field: str) -> RestoreApproved:
        obj = read_object(
            value, field=field, keys=("abandoned_root", "abandoned_size", "restored_size")
        )
        return cls(
            restored_size=_log_size(obj["restored_size"], f"{field}.restored_size"),
            abandoned_size=_log_size(obj["abandoned_size"], f"{field}.abandoned_size"),
            abandoned_root=_root_hash(obj["abandoned_root"], f"{field}.abandoned_root"),
        )


Result = (
    NewVersion
    | Activated
    | DestroyScheduled
    | GrantChanged
    | TenantNamed
    | VersionDisabled
    | RosterChanged
    | ProposerAdded
    | ProposerRemoved
    | WitnessChanged
    | LogKeyRotated
    | RestoreApproved
)
#: Results that name a tenant (every other one is about the deployment itself).
TenantResult = (
    NewVersion | Activated | DestroyScheduled | GrantChanged | TenantNamed | VersionDisabled
)

_RESULTS: Mapping[str, Any] = {
    "create-tenant": NewVersion,
    "activate-tenant": Activated,
    "rotate-tenant": NewVersion,
    "destroy-tenant": DestroyScheduled,
    "grant": GrantChanged,
    "change-roster": RosterChanged,
    "deactivate-tenant": TenantNamed,
    "disable-version": VersionDisabled,
    "cancel-destroy": TenantNamed,
    "revoke": GrantChanged,
    "add-proposer": ProposerAdded,
    "remove-proposer": ProposerRemoved,
    "add-witness": WitnessChanged,
    "remove-witness": WitnessChanged,
    "rotate-log-key": LogKeyRotated,
    "approve-restore": RestoreApproved,
}


def result_type(name: str) -> type[Result]:
    """The result class an execution of operation `name` carries."""
    operation(name)
    result: type[Result] = _RESULTS[name]
    return result


def parse_result(name: str, value: object, *, field: str = "result") -> Result:
    """Check an execution's result object against the operation's result schema."""
    parsed: Result = result_type(name).from_json(value, field)
    return parsed


# Approval requests ---------------------------------------------------------


class ProposalLike(Protocol):
    """What `request_for` needs of a logged proposal (replay's `Proposal` is one)."""

    @property
    def id(self) -> bytes: ...

    @property
    def operation(self) -> str: ...

    @property
    def parameters(self) -> Parameters: ...

    @property
    def time(self) -> int: ...

    @property
    def expires_at(self) -> int: ...

    @property
    def log_position(self) -> int: ...

    @property
    def credentials(self) -> tuple[PublicCredential, ...]: ...


class EpochLike(Protocol):
    """A roster in force (replay's `RosterEpoch` is one)."""

    @property
    def threshold(self) -> int: ...

    @property
    def roster(self) -> tuple[PublicCredential, ...]: ...


class LogLike(Protocol):
    """What `request_for` needs of the replayed log (replay's `LogState` is one)."""

    @property
    def deployment(self) -> str: ...

    @property
    def policy(self) -> Policy | None: ...

    def roster_at(self, position: int) -> EpochLike: ...


def request_for(proposal: ProposalLike, log: LogLike) -> ApprovalRequest:
    """The request custodians sign for a logged proposal, with what the log says around it.

    Its log position is the proposal entry's sequence number, so a signature
    cannot be moved to an identical proposal made at another point of the
    log. The context is the roster and threshold in force at that position
    (a roster change cancels every other pending proposal, so it is also the
    one in force for every verdict), the policy's destroy wait, and the
    custodians the proposal adds (their credentials are in its entry).
    """
    if log.policy is None:
        raise InvalidInputError("the log has no genesis: no policy, no roster")
    epoch = log.roster_at(proposal.log_position)
    context = ApprovalContext(
        roster=tuple(Person.of(c) for c in epoch.roster),
        threshold=epoch.threshold,
        approvals_needed=operation(proposal.operation).required_approvals(epoch.threshold),
        destroy_wait_seconds=log.policy.destroy_wait_seconds,
        newcomers=tuple(Person.of(c) for c in proposal.credentials),
    )
    return ApprovalRequest.from_mapping(
        deployment=log.deployment,
        proposal_id=proposal.id,
        operation=proposal.operation,
        parameters=dict(proposal.parameters),
        log_position=proposal.log_position,
        proposed_at=proposal.time,
        expires_at=proposal.expires_at,
        context=context,
    )
