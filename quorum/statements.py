"""What a custodian signs: short statements in plain text, each a sentence to check.

A custodian approves, refuses, confirms a share, submits a share to unseal,
discards an unseal session's shares or seals the service, and a custodian
or a registered proposer proposes an operation, by signing a `Statement`:
a few lines of printable
ASCII that the CLI shows, byte for byte, before it asks for the passphrase
("what you see is what you sign"). The signature covers exactly the ASCII
bytes of `Statement.render()`, with the statement kind as the signature
domain (`HybridSigningKey.sign(kind, text)`), so an approval can never pass
as a refusal, a seal or a share confirmation; the kind is also the first
line of the text, so a person reading it sees the same.

Every statement opens with a `summary` line, one sentence in the first
person ("I approve: make tenant acme-health's key usable for 8 h"), then
the fields that sentence rests on. People are named in the one form of
`people.label`, "alice (FKAO-JAYM-D5SP-FPYZ)"; a roster change lists the
roster now and after, who is added and removed, and both thresholds; an
activation and a destruction give the window, in UTC, in which they end or
take effect. Times are UTC only, so the signed bytes do not depend on the
signer's time zone: the CLI shows local times beside the statement, never
in it.

Approval statements are rendered from an `ApprovalRequest`: the proposal's
own fields plus its `ApprovalContext` (the roster and threshold in force at
the proposal, the policy's destroy wait, and the custodians a roster change
adds), all of which the log holds, so the daemon, the log replay, the CLI
and the auditor's report render the same text from the same log. How each
operation reads is one row of `_OPERATION_TEXT`; a kind of operation with
no row is shown parameter by parameter.

The text is unambiguous by construction: the kind comes from a fixed set,
field names are lowercase words with no colon, and every value is
non-empty printable ASCII without control characters, newlines or leading
or trailing spaces. Each line is therefore exactly one field, split at its
first ": ", and `Statement.parse` inverts `render` (tests check this), so
no value can forge another line. ASCII only keeps homoglyphs, bidi
overrides and Unicode normalisation out of what a person is asked to read;
names outside ASCII are escaped (`people.display_name`).

`verify_approvals` is the one check of a quorum of approvals; the daemon
and the log replay both call it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from keyquorum.quorum import people
from keyquorum.quorum.canonical import hex_bytes
from keyquorum.quorum.credentials import CustodianCredential, PublicCredential, check_name
from keyquorum.quorum.errors import (
    DeserializationError,
    ExpiredError,
    InvalidInputError,
    NotOnRosterError,
    ReplayError,
    SignatureError,
    ThresholdError,
)
from keyquorum.quorum.signatures import HybridSignature, HybridVerifyKey

#: The largest rendered statement, in bytes. A protocol constant, not a
#: tunable: every verifier must accept exactly the statements every signer
#: can produce. It fits a change-roster that replaces 255 custodians by 255
#: others, every name 64 escaped characters (about 700 KB), with room left.
MAX_STATEMENT_BYTES = 1024 * 1024

#: The statement kinds; each is also the signature domain.
KINDS = (
    "approve",
    "refuse",
    "confirm-share",
    "unseal-share",
    "unseal-reset",
    "seal",
    "propose",
)
VERDICTS = ("approve", "refuse")

PROPOSAL_ID_SIZE = 16
#: 9999-12-31 23:59:59 UTC, the last second an ISO 8601 year of four digits shows.
MAX_TIMESTAMP = 253_402_300_799

HEADER = "keyquorum statement v2: "
_HEADER = HEADER
_INDENT = "  "
_FIELD_NAME = re.compile(r"(?:  )?[a-z0-9][a-z0-9_.-]*(?: [a-z0-9_.-]+)*")
_OPERATION = re.compile(r"[a-z][a-z0-9-]*")
_PARAMETER_KEY = re.compile(r"[a-z][a-z0-9_]*")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_RESERVED = ("deployment",)
#: How `render_time` writes a time; the CLI finds them in a statement by this.
TIME_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2} UTC")


def _check_value(what: str, value: object) -> str:
    """Return `value` if it may appear after "name: " on a statement line."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what}: expected a string, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what}: must not be empty")
    for i, ch in enumerate(value):
        if not " " <= ch <= "~":
            raise InvalidInputError(
                f"{what}: character U+{ord(ch):04X} at position {i} is not printable ASCII; "
                "statements hold printable ASCII only, so that what is shown is what is signed"
            )
    if value != value.strip(" "):
        raise InvalidInputError(f"{what}: leading or trailing spaces are not allowed")
    return value


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what}: expected an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidInputError(f"{what}: {value} is outside {low}..{high}")
    return value


def _fp(fingerprint: str) -> str:
    return people.display_fingerprint(fingerprint)


def _check_fingerprint(what: str, value: object) -> str:
    if not isinstance(value, str) or _FINGERPRINT.fullmatch(value) is None:
        raise InvalidInputError(f"{what}: expected a fingerprint of 64 lowercase hex digits")
    return value


def render_time(t: int) -> str:
    """Unix seconds as `2026-11-25 12:00:00 UTC`: one form, in UTC, for every time shown."""
    _check_int("time", t, 0, MAX_TIMESTAMP)
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _render_bound(t: int) -> str:
    """A computed time (a window's end), which may lie past the last one shown."""
    return render_time(t) if t <= MAX_TIMESTAMP else "after " + render_time(MAX_TIMESTAMP)


def render_duration(seconds: int) -> str:
    """`8 h`, `7 days`, `1 h 30 min`, `45 s`: whole units, largest first."""
    _check_int("duration", seconds, 0, MAX_TIMESTAMP)
    if seconds == 0:
        return "0 s"
    parts = []
    for size, one, many in ((86400, "day", "days"), (3600, "h", "h"), (60, "min", "min")):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {one if count == 1 else many}")
    if seconds:
        parts.append(f"{seconds} s")
    return " ".join(parts)


@dataclass(frozen=True)
class Statement:
    """One signable statement: a kind, the deployment, and ordered fields.

    A field name is lowercase words (``[a-z0-9_.-]``, single spaces), at
    most once per statement; a name indented by two spaces is a detail of
    the field above it (the parameters of an operation). The rendered text
    is at most `MAX_STATEMENT_BYTES`.
    """

    kind: str
    deployment: str
    fields: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(f"unknown statement kind {self.kind!r}; known: {KINDS}")
        _check_value("deployment", self.deployment)
        if not isinstance(self.fields, tuple) or not self.fields:
            raise InvalidInputError("a statement needs a non-empty tuple of fields")
        seen: set[str] = set()
        for n, pair in enumerate(self.fields):
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidInputError(f"field {n}: expected a (name, value) pair")
            name, value = pair
            if not isinstance(name, str) or _FIELD_NAME.fullmatch(name) is None:
                raise InvalidInputError(
                    f"field {n}: name {name!r} is not lowercase words (a-z 0-9 _ . -), "
                    "optionally indented by two spaces"
                )
            if n == 0 and name.startswith(_INDENT):
                raise InvalidInputError(f"field {n}: the first field cannot be indented")
            if name.strip() in _RESERVED:
                raise InvalidInputError(f"field {n}: name {name.strip()!r} is reserved")
            if name in seen:
                raise InvalidInputError(f"field {n}: name {name.strip()!r} appears twice")
            seen.add(name)
            _check_value(f"field {name.strip()!r}", value)
        size = len(self.render())
        if size > MAX_STATEMENT_BYTES:
            raise InvalidInputError(
                f"statement is {size} bytes, larger than the {MAX_STATEMENT_BYTES}-byte limit"
            )

    @property
    def domain(self) -> str:
        """The signature domain: the kind, so that kinds never stand in for each other."""
        return self.kind

    def render(self) -> str:
        """The exact text shown to the custodian and signed, ending in a newline."""
        lines = [_HEADER + self.kind.upper(), f"deployment: {self.deployment}"]
        lines.extend(f"{name}: {value}" for name, value in self.fields)
        return "\n".join(lines) + "\n"

    def message(self) -> bytes:
        """The signed bytes: `render()` encoded (ASCII, hence also UTF-8)."""
        return self.render().encode("ascii")

    def field(self, name: str) -> str | None:
        """The value of field `name` (indent included), or None."""
        return next((value for key, value in self.fields if key == name), None)

    @classmethod
    def parse(cls, text: str) -> Statement:
        """Read a rendered statement back; refuses any text `render` would not produce."""
        if not isinstance(text, str):
            raise DeserializationError("statement text must be a string")
        if len(text) > MAX_STATEMENT_BYTES:
            raise DeserializationError(f"statement text is longer than {MAX_STATEMENT_BYTES}")
        if not text.endswith("\n"):
            raise DeserializationError("statement text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise DeserializationError("statement text needs a header, a deployment and a field")
        if not lines[0].startswith(_HEADER):
            raise DeserializationError(f"statement text must start with {_HEADER!r}")
        kind = lines[0][len(_HEADER) :].lower()
        if not lines[1].startswith("deployment: "):
            raise DeserializationError("the second line must be the deployment")
        deployment = lines[1][len("deployment: ") :]
        fields: list[tuple[str, str]] = []
        for n, line in enumerate(lines[2:], start=3):
            name, sep, value = line.partition(": ")
            if not sep:
                raise DeserializationError(f"line {n} is not 'name: value'")
            fields.append((name, value))
        try:
            statement = cls(kind, deployment, tuple(fields))
        except InvalidInputError as e:
            raise DeserializationError(f"not a valid statement: {e}") from e
        if statement.render() != text:
            raise DeserializationError("statement text is not in its rendered form")
        return statement


# People ----------------------------------------------------------------------


class Named(Protocol):
    """Anything with a custodian's name and fingerprint (a `PublicCredential`, a `Person`)."""

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class Person:
    """A custodian as a statement names them: fingerprint (64 hex) and name."""

    fingerprint: str
    name: str

    def __post_init__(self) -> None:
        _check_fingerprint("custodian", self.fingerprint)
        check_name(self.name)

    @classmethod
    def of(cls, who: Named) -> Person:
        return cls(who.fingerprint, who.name)

    @property
    def label(self) -> str:
        """`alice (FKAO-JAYM-D5SP-FPYZ)` (`people.label`)."""
        return people.label(self.name, self.fingerprint)

    def to_json(self) -> dict[str, str]:
        return {"fingerprint": self.fingerprint, "name": self.name}

    @classmethod
    def from_json(cls, value: object, *, field: str = "person") -> Person:
        if not isinstance(value, dict) or set(value) != {"fingerprint", "name"}:
            raise DeserializationError(f"{field}: expected {{fingerprint, name}}")
        try:
            return cls(value["fingerprint"], value["name"])
        except InvalidInputError as e:
            raise DeserializationError(f"{field}: {e}") from e


def _labels(persons: Sequence[Person]) -> str:
    return ", ".join(p.label for p in persons) or "nobody"


# Approval requests -----------------------------------------------------------


@dataclass(frozen=True)
class ApprovalContext:
    """What the log says around a proposal that its statement shows.

    `roster` (share-index order) and `threshold` are the ones in force at
    the proposal's log position; `approvals_needed` is what its operation
    needs of them (k to widen exposure, 1 to narrow it); `newcomers` are
    the custodians a change-roster proposal adds, whose public credentials
    its log entry carries.
    """

    roster: tuple[Person, ...]
    threshold: int
    approvals_needed: int
    destroy_wait_seconds: int
    newcomers: tuple[Person, ...] = ()

    def __post_init__(self) -> None:
        for what, group in (("roster", self.roster), ("newcomers", self.newcomers)):
            if not isinstance(group, tuple) or not all(isinstance(p, Person) for p in group):
                raise InvalidInputError(f"context {what} must be a tuple of Person")
        if not self.roster:
            raise InvalidInputError("context roster is empty")
        everyone = [p.fingerprint for p in (*self.roster, *self.newcomers)]
        if len(set(everyone)) != len(everyone):
            raise InvalidInputError("a custodian appears twice in the context")
        _check_int("threshold", self.threshold, 1, len(self.roster))
        _check_int("approvals needed", self.approvals_needed, 1, self.threshold)
        _check_int("destroy wait", self.destroy_wait_seconds, 1, MAX_TIMESTAMP)

    def person(self, fingerprint: str) -> Person:
        """The custodian `fingerprint` names: on the roster, or added by this proposal."""
        for p in (*self.roster, *self.newcomers):
            if p.fingerprint == fingerprint:
                return p
        raise InvalidInputError(
            f"custodian {people.display_fingerprint(fingerprint)} is neither on the roster "
            "nor among the custodians the proposal adds"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "approvals_needed": self.approvals_needed,
            "destroy_wait_seconds": self.destroy_wait_seconds,
            "newcomers": [p.to_json() for p in self.newcomers],
            "roster": [p.to_json() for p in self.roster],
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, value: object) -> ApprovalContext:
        keys = {"approvals_needed", "destroy_wait_seconds", "newcomers", "roster", "threshold"}
        if not isinstance(value, dict) or set(value) != keys:
            raise DeserializationError(f"approval context: expected the fields {sorted(keys)}")
        groups = []
        for key in ("roster", "newcomers"):
            items = value[key]
            if not isinstance(items, list) or len(items) > 255:
                raise DeserializationError(f"approval context: {key} must be a list")
            groups.append(
                tuple(Person.from_json(v, field=f"{key}[{i}]") for i, v in enumerate(items))
            )
        try:
            return cls(
                roster=groups[0],
                threshold=value["threshold"],
                approvals_needed=value["approvals_needed"],
                destroy_wait_seconds=value["destroy_wait_seconds"],
                newcomers=groups[1],
            )
        except InvalidInputError as e:
            raise DeserializationError(f"approval context: {e}") from e


@dataclass(frozen=True)
class ApprovalRequest:
    """A proposal as custodians see it: what they approve or refuse.

    `parameters` are (key, value) pairs sorted by key, each value a string
    or an integer, as `operations.parse_parameters` returns them;
    `from_mapping` builds them from a JSON object. `log_position` is the
    proposal entry's seq, `proposed_at` its time.
    """

    deployment: str
    proposal_id: bytes
    operation: str
    parameters: tuple[tuple[str, str | int], ...]
    log_position: int
    proposed_at: int
    expires_at: int
    context: ApprovalContext

    def __post_init__(self) -> None:
        _check_value("deployment", self.deployment)
        if not isinstance(self.proposal_id, bytes) or len(self.proposal_id) != PROPOSAL_ID_SIZE:
            raise InvalidInputError(f"proposal id must be {PROPOSAL_ID_SIZE} bytes")
        if not isinstance(self.operation, str) or _OPERATION.fullmatch(self.operation) is None:
            raise InvalidInputError(f"operation {self.operation!r} is not a lowercase name")
        if not isinstance(self.parameters, tuple):
            raise InvalidInputError("parameters must be a tuple of (key, value) pairs")
        keys: list[str] = []
        for pair in self.parameters:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise InvalidInputError("parameters must be a tuple of (key, value) pairs")
            key, value = pair
            if not isinstance(key, str) or _PARAMETER_KEY.fullmatch(key) is None:
                raise InvalidInputError(f"parameter key {key!r} is not a lowercase identifier")
            _parameter_text(key, value)
            keys.append(key)
        if keys != sorted(set(keys)):
            raise InvalidInputError("parameter keys must be unique and sorted")
        _check_int("log position", self.log_position, 0, 2**53 - 1)
        _check_int("proposed_at", self.proposed_at, 0, MAX_TIMESTAMP)
        _check_int("expires_at", self.expires_at, self.proposed_at + 1, MAX_TIMESTAMP)
        if not isinstance(self.context, ApprovalContext):
            raise InvalidInputError("context must be an ApprovalContext")

    @classmethod
    def from_mapping(
        cls,
        *,
        deployment: str,
        proposal_id: bytes,
        operation: str,
        parameters: Mapping[str, str | int],
        log_position: int,
        proposed_at: int,
        expires_at: int,
        context: ApprovalContext,
    ) -> ApprovalRequest:
        """Build a request from a parameters object (as in a `proposal` log entry)."""
        return cls(
            deployment=deployment,
            proposal_id=proposal_id,
            operation=operation,
            parameters=tuple(sorted(parameters.items(), key=lambda pair: pair[0])),
            log_position=log_position,
            proposed_at=proposed_at,
            expires_at=expires_at,
            context=context,
        )

    def statement(self, verdict: str) -> Statement:
        """The statement a custodian signs to approve or refuse this request."""
        if verdict not in VERDICTS:
            raise InvalidInputError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        render = _OPERATION_TEXT.get(self.operation, _generic_text)
        summary, details = render(self, dict(self.parameters))
        context = self.context
        verb = "I approve" if verdict == "approve" else "I refuse"
        fields: list[tuple[str, str]] = [
            ("summary", f"{verb}: {summary}"),
            ("proposal", self.proposal_id.hex()),
            ("proposed", f"{render_time(self.proposed_at)}, at log position {self.log_position}"),
            ("expires", render_time(self.expires_at)),
            (
                "approvals needed",
                f"{context.approvals_needed} of the {len(context.roster)} custodians",
            ),
            ("operation", self.operation),
        ]
        fields.extend((_INDENT + name, value) for name, value in details)
        return Statement(verdict, self.deployment, tuple(fields))

    def window(self, duration: int) -> str:
        """When something `duration` after the quorum's last approval happens."""
        earliest = self.proposed_at + duration
        latest = self.expires_at - 1 + duration
        return f"between {_render_bound(earliest)} and {_render_bound(latest)}"


def _parameter_text(key: str, value: object) -> str:
    """A parameter value as shown: a checked string, or an integer in decimal."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(_check_int(f"parameter {key!r}", value, -(2**53) + 1, 2**53 - 1))
    if isinstance(value, str):
        return _check_value(f"parameter {key!r}", value)
    raise InvalidInputError(f"parameter {key!r}: expected a string or an integer")


# How each operation reads: (summary sentence, detail fields) from the request.

Params = Mapping[str, str | int]
OperationText = Callable[[ApprovalRequest, Params], tuple[str, list[tuple[str, str]]]]


def _text(params: Params, key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        raise InvalidInputError(f"parameter {key!r}: expected a string")
    return _check_value(f"parameter {key!r}", value)


def _number(params: Params, key: str) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"parameter {key!r}: expected an integer")
    return _check_int(f"parameter {key!r}", value, 0, MAX_TIMESTAMP)


def _generic_text(request: ApprovalRequest, params: Params) -> tuple[str, list[tuple[str, str]]]:
    return request.operation, [(k, _parameter_text(k, v)) for k, v in sorted(params.items())]


def _create(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t = _text(p, "tenant")
    summary = f"create tenant {t}: a new 256-bit key, made in the daemon and kept only wrapped"
    return summary, [("tenant", t)]


def _activate(r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t, d = _text(p, "tenant"), _number(p, "duration_seconds")
    return f"make tenant {t}'s key usable for {render_duration(d)}", [
        ("tenant", t),
        (
            "duration",
            f"{render_duration(d)} ({d} seconds), counted from the approval that "
            "completes the quorum",
        ),
        ("usable until", r.window(d)),
    ]


def _rotate(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t = _text(p, "tenant")
    summary = f"add a new key version to tenant {t}; older versions decrypt until disabled"
    return summary, [("tenant", t)]


def _destroy(r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t, wait = _text(p, "tenant"), r.context.destroy_wait_seconds
    return (
        f"destroy tenant {t}'s key: wiped from memory at once, shredded for good "
        f"{render_duration(wait)} later",
        [
            ("tenant", t),
            ("wiped from memory", "when the approval that completes the quorum is logged"),
            (
                "shredded for good",
                f"{r.window(wait)} ({render_duration(wait)} after that approval; until then "
                "cancel-destroy can call it off)",
            ),
        ],
    )


def _grant(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    b, t = _text(p, "backend"), _text(p, "tenant")
    return (
        f"let backend {b} wrap and unwrap with tenant {t}'s key until revoked",
        [("backend", f"keyquorum://backend/{b}"), ("tenant", t)],
    )


def _revoke(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    b, t = _text(p, "backend"), _text(p, "tenant")
    return (
        f"take tenant {t} away from backend {b}",
        [("backend", f"keyquorum://backend/{b}"), ("tenant", t)],
    )


def _deactivate(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t = _text(p, "tenant")
    return f"wipe tenant {t}'s key from memory now; it stays stored, wrapped", [("tenant", t)]


def _disable(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t, v = _text(p, "tenant"), _number(p, "version")
    return (
        f"disable key version {v} of tenant {t}: what it encrypted no longer decrypts",
        [("tenant", t), ("version", str(v))],
    )


def _cancel_destroy(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    t = _text(p, "tenant")
    return f"call off the scheduled destruction of tenant {t}", [("tenant", t)]


def _change_roster(r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    context = r.context
    now = list(context.roster)
    after = [context.person(fp) for fp in _text(p, "roster").split(",")]
    k_now, k_after = context.threshold, _number(p, "threshold")
    added = [x for x in after if x not in now]
    removed = [x for x in now if x not in after]
    fields = [
        ("threshold", f"{k_now} of {len(now)} now, {k_after} of {len(after)} after"),
        ("added", _labels(added)),
        ("removed", _labels(removed)),
    ]
    fields.extend((f"share {i} now", x.label) for i, x in enumerate(now, start=1))
    fields.extend((f"share {i} after", x.label) for i, x in enumerate(after, start=1))
    summary = (
        f"change the custodians from {k_now} of {len(now)} to {k_after} of {len(after)} "
        f"({len(added)} added, {len(removed)} removed): a new master key, every tenant key "
        "re-wrapped, the old shares worthless"
    )
    return summary, fields


def _add_proposer(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    who = Person(_check_fingerprint("parameter 'proposer'", p.get("proposer")), _text(p, "name"))
    return (
        f"let {who.label} propose operations; each still needs the custodians' approvals",
        [("proposer", who.label)],
    )


def _remove_proposer(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    who = Person(_check_fingerprint("parameter 'proposer'", p.get("proposer")), _text(p, "name"))
    return f"stop {who.label} from proposing", [("proposer", who.label)]


def _witness_change(r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    key, m = _text(p, "witness"), _number(p, "witness_threshold")
    name = key.split("+", 1)[0]
    verb = "count" if r.operation == "add-witness" else "stop counting"
    return (
        f"{verb} witness {name} among the log's cosigners; afterwards custodians need "
        f"{m} witness cosignature{'' if m == 1 else 's'} on a checkpoint",
        [("witness key", key), ("cosignatures needed after", str(m))],
    )


def _rotate_log_key(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    key = _text(p, "log_key")
    return (
        "sign the log's checkpoints with a new log key from this change on; the old key "
        "signs the change",
        [("new log key", key)],
    )


def _approve_restore(_r: ApprovalRequest, p: Params) -> tuple[str, list[tuple[str, str]]]:
    restored, abandoned = _number(p, "restored_size"), _number(p, "abandoned_size")
    root = _text(p, "abandoned_root")
    lost = abandoned - restored
    return (
        f"go on with the log restored to its first {restored} entries and abandon the "
        f"published checkpoint of {abandoned} entries: the {lost} "
        f"{'entry' if lost == 1 else 'entries'} after the restored ones "
        f"{'is' if lost == 1 else 'are'} gone for good",
        [
            ("restored to", f"{restored} entries"),
            ("abandoned checkpoint", f"{abandoned} entries, root {root}"),
            ("entries lost", str(lost)),
        ],
    )


_OPERATION_TEXT: Mapping[str, OperationText] = {
    "create-tenant": _create,
    "activate-tenant": _activate,
    "rotate-tenant": _rotate,
    "destroy-tenant": _destroy,
    "grant": _grant,
    "change-roster": _change_roster,
    "deactivate-tenant": _deactivate,
    "disable-version": _disable,
    "cancel-destroy": _cancel_destroy,
    "revoke": _revoke,
    "add-proposer": _add_proposer,
    "remove-proposer": _remove_proposer,
    "add-witness": _witness_change,
    "remove-witness": _witness_change,
    "rotate-log-key": _rotate_log_key,
    "approve-restore": _approve_restore,
}


# What a proposer signs ------------------------------------------------------------


def proposal_statement(
    *,
    deployment: str,
    proposer: Named,
    proposal_id: bytes,
    operation: str,
    parameters: Mapping[str, str | int],
    expires_at: int,
) -> Statement:
    """What a custodian or a registered proposer signs to propose an operation.

    The proposer picks the proposal's id and expiry and signs them with the
    operation and every parameter; the log takes an id once, and the
    statement only until it expires, so a signed proposal cannot be
    replayed. Its log position and the roster it will be judged by are not
    known yet, and not signed: the approvals that follow name them (and
    show the operation in full, `ApprovalRequest.statement`).
    """
    who = Person.of(proposer)
    if not isinstance(proposal_id, bytes) or len(proposal_id) != PROPOSAL_ID_SIZE:
        raise InvalidInputError(f"proposal id must be {PROPOSAL_ID_SIZE} bytes")
    if not isinstance(operation, str) or _OPERATION.fullmatch(operation) is None:
        raise InvalidInputError(f"operation {operation!r} is not a lowercase name")
    expires = render_time(expires_at)
    fields: list[tuple[str, str]] = [
        (
            "summary",
            f"I propose {operation} to the custodians, who approve or refuse it until {expires}",
        ),
        ("proposer", who.label),
        ("proposal", proposal_id.hex()),
        ("expires", expires),
        ("operation", operation),
    ]
    for key, value in sorted(parameters.items(), key=lambda pair: pair[0]):
        if not isinstance(key, str) or _PARAMETER_KEY.fullmatch(key) is None:
            raise InvalidInputError(f"parameter key {key!r} is not a lowercase identifier")
        fields.append((_INDENT + key, _parameter_text(key, value)))
    return Statement("propose", deployment, tuple(fields))


# What a custodian signs about themselves ----------------------------------------


def confirm_share_statement(
    *, deployment: str, custodian: Named, split_id: bytes, index: int
) -> Statement:
    """What a custodian signs after checking their share at the ceremony (`confirm`)."""
    who = Person.of(custodian)
    index = _check_int("share index", index, 1, 255)
    split = _split_hex(split_id)
    return Statement(
        "confirm-share",
        deployment,
        (
            (
                "summary",
                f"I decrypted my share {index} of split {split[:8]} and checked it against "
                "its commitment in the log: it is correct",
            ),
            ("custodian", who.label),
            ("split", split),
            ("share index", str(index)),
        ),
    )


def unseal_share_statement(
    *,
    deployment: str,
    custodian: Named,
    replica: str,
    session: bytes,
    session_log_size: int,
    split_id: bytes,
    index: int,
    ciphertext_sha256: bytes,
) -> Statement:
    """What a custodian signs with a share sent to one unseal session (`unseal`).

    Binding the session, its log size and the ciphertext's hash makes the
    signed share useless for any other session or replica.
    """
    if not isinstance(session, bytes) or not 1 <= len(session) <= 64:
        raise InvalidInputError("session id must be 1 to 64 bytes")
    if not isinstance(ciphertext_sha256, bytes) or len(ciphertext_sha256) != 32:
        raise InvalidInputError("ciphertext_sha256 must be 32 bytes")
    who = Person.of(custodian)
    replica = _check_value("replica", replica)
    index = _check_int("share index", index, 1, 255)
    return Statement(
        "unseal-share",
        deployment,
        (
            (
                "summary",
                f"I give my share {index} to unseal replica {replica} in session "
                f"{session.hex()[:16]}, encrypted to that session's key",
            ),
            ("custodian", who.label),
            ("replica", replica),
            ("session", session.hex()),
            (
                "session log size",
                str(_check_int("session log size", session_log_size, 0, 2**53 - 1)),
            ),
            ("split", _split_hex(split_id)),
            ("share index", str(index)),
            ("ciphertext sha256", ciphertext_sha256.hex()),
        ),
    )


def unseal_reset_statement(
    *,
    deployment: str,
    custodian: Named,
    replica: str,
    session: bytes,
    session_log_size: int,
    requested_at: int,
) -> Statement:
    """What a custodian signs to discard the shares of one unseal session (`unseal-reset`).

    It names the one session it ends, so it cannot end a later one.
    """
    if not isinstance(session, bytes) or not 1 <= len(session) <= 64:
        raise InvalidInputError("session id must be 1 to 64 bytes")
    who = Person.of(custodian)
    replica = _check_value("replica", replica)
    return Statement(
        "unseal-reset",
        deployment,
        (
            (
                "summary",
                f"I discard every share submitted so far in unseal session "
                f"{session.hex()[:16]} of replica {replica}; the custodians start a new session",
            ),
            ("custodian", who.label),
            ("replica", replica),
            ("session", session.hex()),
            (
                "session log size",
                str(_check_int("session log size", session_log_size, 0, 2**53 - 1)),
            ),
            ("requested at", render_time(requested_at)),
        ),
    )


def seal_statement(
    *, deployment: str, custodian: Named, replica: str, reason: str, requested_at: int
) -> Statement:
    """What a custodian signs to seal one replica (or `*`, every replica) at once."""
    who = Person.of(custodian)
    replica = _check_value("replica", replica)
    target = "every replica" if replica == "*" else f"replica {replica}"
    return Statement(
        "seal",
        deployment,
        (
            (
                "summary",
                f"I seal {target} now: the master key and every tenant key are wiped "
                "from memory until custodians unseal again",
            ),
            ("custodian", who.label),
            ("replica", replica),
            ("reason", _check_value("reason", reason)),
            ("requested at", render_time(requested_at)),
        ),
    )


def _split_hex(split_id: bytes) -> str:
    if not isinstance(split_id, bytes) or len(split_id) != 16:
        raise InvalidInputError("split id must be 16 bytes")
    return split_id.hex()


@dataclass(frozen=True)
class SignedStatement:
    """A custodian's signature on a statement, named by the custodian's fingerprint.

    The statement itself is not carried: the verifier rebuilds it from what
    it already trusts (the proposal in the log), so a signature can only
    ever count for the text the verifier means.
    """

    signer: str
    signature: HybridSignature

    def __post_init__(self) -> None:
        _check_fingerprint("signer", self.signer)
        if not isinstance(self.signature, HybridSignature):
            raise InvalidInputError("signature must be a HybridSignature")

    def to_json(self) -> dict[str, str]:
        return {"signer": self.signer, "signature": self.signature.to_hex()}

    @classmethod
    def from_json(cls, data: Any) -> SignedStatement:
        """Parse `{"signer": hex, "signature": hex}`; anything else is refused."""
        if not isinstance(data, dict) or set(data) != {"signer", "signature"}:
            raise DeserializationError("signed statement must be {signer, signature}")
        signer = data["signer"]
        if not isinstance(signer, str) or _FINGERPRINT.fullmatch(signer) is None:
            raise DeserializationError("signer: expected 64 lowercase hex digits")
        raw = hex_bytes(data["signature"], field="signature")
        return cls(signer, HybridSignature.from_bytes(raw))


def sign_statement(statement: Statement, credential: CustodianCredential) -> SignedStatement:
    """Sign `statement` with a custodian's credential (the CLI does this after showing it)."""
    signature = credential.sign(statement.domain, statement.message())
    return SignedStatement(credential.public().fingerprint, signature)


VerifyKey = HybridVerifyKey | PublicCredential


def _verify_key(signer: str, key: VerifyKey) -> HybridVerifyKey:
    """The hybrid key of a roster entry; a credential must be the one its id names."""
    if isinstance(key, PublicCredential):
        if key.fingerprint != signer:
            raise InvalidInputError(
                f"roster entry {_fp(signer)} holds the credential of {_fp(key.fingerprint)}"
            )
        return key.verify_key
    if isinstance(key, HybridVerifyKey):
        return key
    raise InvalidInputError(f"roster entry {_fp(signer)}: not a verify key or a credential")


def verify_statement(statement: Statement, signed: SignedStatement, verify_key: VerifyKey) -> None:
    """Check one signature on one statement; raises `SignatureError` if it does not verify.

    With a `PublicCredential`, the signature must also name that credential
    as its signer.
    """
    if isinstance(verify_key, PublicCredential) and verify_key.fingerprint != signed.signer:
        raise SignatureError(
            f"statement is signed by {_fp(signed.signer)}, not by {_fp(verify_key.fingerprint)}"
        )
    key = _verify_key(signed.signer, verify_key)
    try:
        key.verify(statement.domain, statement.message(), signed.signature)
    except SignatureError as e:
        raise SignatureError(
            f"{statement.kind} signature of custodian {_fp(signed.signer)} does not verify: {e}"
        ) from e


@dataclass(frozen=True)
class ApprovalResult:
    """Which custodians of the roster validly approved one request.

    As tuf's `VerificationResult`: `approved` tells whether the threshold is
    met, `verify()` raises `ThresholdError` when it is not.
    """

    proposal_id: bytes
    threshold: int
    signed_by: tuple[str, ...]
    unsigned: tuple[str, ...]

    @property
    def approved(self) -> bool:
        return len(self.signed_by) >= self.threshold

    def verify(self) -> None:
        """Raise `ThresholdError` unless at least `threshold` custodians approved."""
        if not self.approved:
            raise ThresholdError(
                f"proposal {self.proposal_id.hex()}: approved by {len(self.signed_by)} "
                f"of {self.threshold} required custodians"
            )


def verify_approvals(
    request: ApprovalRequest,
    approvals: Sequence[SignedStatement],
    roster: Mapping[str, VerifyKey],
    threshold: int,
    now: int,
) -> ApprovalResult:
    """Check every approval of `request` and count the distinct custodians.

    Any single bad approval raises at once with its own error class; a set
    of good approvals that is too small does not raise here but in
    `ApprovalResult.verify()`, so callers can show progress ("3 of 5").

    Steps:
    0. Preconditions: threshold in 1..len(roster), roster ids are
       fingerprints whose credentials match them, `now` an integer.
    1. Expiry: the request counts only while now < expires_at.
    2. The statement is rebuilt from the request, never taken from outside.
    3. For each approval, in order:
       3a. its signer is on the roster in force (NotOnRosterError);
       3b. neither the signature nor the signer was counted before
           (ReplayError);
       3c. the hybrid signature verifies over the approve statement, with
           domain "approve" (SignatureError: an altered text, another
           request's or a refusal's signature).
    4. Result: who signed, who did not, and the threshold.
    """
    # 0. Preconditions.
    if not isinstance(request, ApprovalRequest):
        raise InvalidInputError("request must be an ApprovalRequest")
    if not roster:
        raise InvalidInputError("the roster is empty")
    _check_int("threshold", threshold, 1, len(roster))
    _check_int("now", now, 0, MAX_TIMESTAMP)
    keys = {
        _check_fingerprint("roster id", signer): _verify_key(signer, key)
        for signer, key in roster.items()
    }

    # 1. Expiry.
    if now >= request.expires_at:
        raise ExpiredError(
            f"proposal {request.proposal_id.hex()} expired at "
            f"{render_time(request.expires_at)}; it is now {render_time(now)}"
        )

    # 2. The one statement every approval must sign.
    statement = request.statement("approve")
    message = statement.message()

    signed_by: list[str] = []
    seen_signatures: set[bytes] = set()
    for n, approval in enumerate(approvals):
        if not isinstance(approval, SignedStatement):
            raise InvalidInputError(f"approval {n} is not a SignedStatement")
        who = _fp(approval.signer)
        # 3a. On the roster in force.
        key = keys.get(approval.signer)
        if key is None:
            raise NotOnRosterError(f"approval {n}: custodian {who} is not on the roster")
        # 3b. Counted once.
        raw = approval.signature.to_bytes()
        if raw in seen_signatures:
            raise ReplayError(f"approval {n}: the same signature of {who} is presented twice")
        if approval.signer in signed_by:
            raise ReplayError(f"approval {n}: custodian {who} approved more than once")
        # 3c. The signature over exactly this request's approve statement.
        try:
            key.verify(statement.domain, message, approval.signature)
        except SignatureError as e:
            raise SignatureError(
                f"approval {n}: signature of custodian {who} does not verify over the "
                f"approval of proposal {request.proposal_id.hex()}: {e}"
            ) from e
        seen_signatures.add(raw)
        signed_by.append(approval.signer)

    # 4. Result.
    return ApprovalResult(
        proposal_id=request.proposal_id,
        threshold=threshold,
        signed_by=tuple(signed_by),
        unsigned=tuple(sorted(set(keys) - set(signed_by))),
    )
