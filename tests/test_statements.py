"""Approval statements: exact text, unambiguous fields, quorum verification."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import people, statements
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import (
    DeserializationError,
    ExpiredError,
    InvalidInputError,
    NotOnRosterError,
    ReplayError,
    SignatureError,
    ThresholdError,
)
from keyquorum.quorum.signatures import HybridSignature, HybridSigningKey, HybridVerifyKey
from keyquorum.quorum.statements import (
    MAX_STATEMENT_BYTES,
    ApprovalContext,
    ApprovalRequest,
    Person,
    SignedStatement,
    Statement,
    sign_statement,
    verify_approvals,
    verify_statement,
)
from tests.statement_examples import (
    CONTEXT,
    EXPIRES,
    HENRY,
    NEW_ROSTER,
    NOW,
    OPERATION_REQUESTS,
    OTHER_PROPOSAL,
    OWN_STATEMENTS,
    PROPOSAL,
    PROPOSED,
    REQUEST,
    ROSTER_NOW,
    ZOE,
    approval_request,
    person,
)

GOLDEN = Path(__file__).parent / "golden" / "statements"
#: KEYQUORUM_UPDATE_GOLDEN=1 rewrites the golden files instead of comparing.
UPDATE = os.environ.get("KEYQUORUM_UPDATE_GOLDEN") == "1"


def _golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("ascii"))
    assert path.read_bytes().decode("ascii") == text, f"{path} differs from the rendering"


# --- rendering -----------------------------------------------------------------


@pytest.mark.parametrize("operation", list(OPERATION_REQUESTS))
@pytest.mark.parametrize("verdict", statements.VERDICTS)
def test_golden_approval_statements(operation: str, verdict: str) -> None:
    statement = OPERATION_REQUESTS[operation].statement(verdict)
    _golden(f"{verdict}-{operation}", statement.render())
    assert statement.message() == statement.render().encode("ascii")
    assert statement.domain == verdict
    assert Statement.parse(statement.render()) == statement


@pytest.mark.parametrize("name", list(OWN_STATEMENTS))
def test_golden_own_statements(name: str) -> None:
    statement = OWN_STATEMENTS[name]
    _golden(name, statement.render())
    assert Statement.parse(statement.render()) == statement


def test_every_operation_and_kind_has_a_golden_file() -> None:
    from keyquorum.quorum.operations import OPERATIONS

    assert set(OPERATION_REQUESTS) == set(OPERATIONS)
    kinds = {name.split("-every")[0] for name in OWN_STATEMENTS} | set(statements.VERDICTS)
    assert kinds == set(statements.KINDS)
    on_disk = {p.stem for p in GOLDEN.glob("*.txt")}
    expected = {f"{v}-{op}" for v in statements.VERDICTS for op in OPERATIONS}
    assert on_disk == expected | set(OWN_STATEMENTS)


def test_approve_statement_reads_as_a_sentence_with_its_window() -> None:
    text = REQUEST.statement("approve").render()
    assert text.splitlines()[:3] == [
        "keyquorum statement v2: APPROVE",
        "deployment: acme-prod",
        "summary: I approve: make tenant acme-health's key usable for 8 h",
    ]
    # The end of the activation: from the proposal time at the earliest to the
    # last second before expiry at the latest, plus the duration, in UTC only.
    assert "  usable until: between 2026-11-25 19:00:00 UTC and 2026-11-25 19:59:59 UTC\n" in text
    assert "expires: 2026-11-25 12:00:00 UTC\n" in text
    assert "approvals needed: 5 of the 7 custodians\n" in text


def test_refusal_says_so_in_its_summary_and_header() -> None:
    approve = REQUEST.statement("approve").render()
    refuse = REQUEST.statement("refuse").render()
    assert refuse == approve.replace(": APPROVE\n", ": REFUSE\n", 1).replace(
        "summary: I approve: ", "summary: I refuse: ", 1
    )


def test_destroy_shows_when_it_takes_effect() -> None:
    text = OPERATION_REQUESTS["destroy-tenant"].statement("approve").render()
    assert "shredded for good 7 days later" in text
    assert (
        "  shredded for good: between 2026-12-02 11:00:00 UTC and 2026-12-02 11:59:59 UTC" in text
    )


def test_change_roster_names_old_and_new_roster_added_and_removed() -> None:
    text = OPERATION_REQUESTS["change-roster"].statement("approve").render()
    lines = text.splitlines()
    assert "  threshold: 5 of 7 now, 4 of 7 after" in lines
    assert f"  added: {HENRY.label}, {ZOE.label}" in lines
    assert f"  removed: {ROSTER_NOW[2].label}, {ROSTER_NOW[3].label}" in lines
    assert f"  share 3 now: {ROSTER_NOW[2].label}" in lines
    assert f"  share 7 after: {ZOE.label}" in lines
    # A name outside ASCII is escaped, so it reads the same on every terminal.
    assert "Zo\\u00eb \\u00c5berg (" in text
    # The full fingerprints are not shown to people; the 80-bit groups are.
    assert NEW_ROSTER[0].fingerprint not in text
    assert people.display_fingerprint(NEW_ROSTER[0].fingerprint) in text


def test_change_roster_refuses_a_custodian_the_context_does_not_name() -> None:
    stranger = person("mallory")
    request = approval_request(
        operation="change-roster",
        parameters={
            "threshold": 2,
            "roster": f"{ROSTER_NOW[0].fingerprint},{stranger.fingerprint}",
        },
    )
    with pytest.raises(InvalidInputError, match="neither on the roster"):
        request.statement("approve")


def test_parameter_order_does_not_change_the_text() -> None:
    swapped = approval_request(parameters={"duration_seconds": 28800, "tenant": "acme-health"})
    assert swapped == REQUEST
    assert swapped.statement("approve").render() == REQUEST.statement("approve").render()


def test_an_operation_without_a_row_is_shown_parameter_by_parameter() -> None:
    text = approval_request(operation="future-op", parameters={"b": 2, "a": "x"}).statement(
        "approve"
    )
    assert text.fields[-3:] == (("operation", "future-op"), ("  a", "x"), ("  b", "2"))


@pytest.mark.parametrize(
    ("t", "text"),
    [
        (0, "1970-01-01 00:00:00 UTC"),
        (951_782_400, "2000-02-29 00:00:00 UTC"),
        (statements.MAX_TIMESTAMP, "9999-12-31 23:59:59 UTC"),
    ],
    ids=["epoch", "leap-day", "last-second"],
)
def test_render_time(t: int, text: str) -> None:
    assert statements.render_time(t) == text
    assert statements.TIME_PATTERN.fullmatch(text)


@pytest.mark.parametrize(
    "t", [-1, statements.MAX_TIMESTAMP + 1, True], ids=["negative", "year-10000", "bool"]
)
def test_render_time_refuses_out_of_range(t: int) -> None:
    with pytest.raises(InvalidInputError):
        statements.render_time(t)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (45, "45 s"), (600, "10 min"), (5400, "1 h 30 min"), (28800, "8 h"),
     (86400, "1 day"), (7 * 86400, "7 days"), (90061, "1 day 1 h 1 min 1 s")],
)  # fmt: skip
def test_render_duration(seconds: int, text: str) -> None:
    assert statements.render_duration(seconds) == text


def test_window_past_the_last_time_shown_does_not_fail() -> None:
    late = approval_request(
        proposed_at=statements.MAX_TIMESTAMP - 10,
        expires_at=statements.MAX_TIMESTAMP,
        parameters={"tenant": "acme-health", "duration_seconds": 3600},
    )
    assert "after 9999-12-31 23:59:59 UTC" in late.statement("approve").render()


NAME_ESCAPES = {
    "plain": ("alice", "alice"),
    "cyrillic-a": ("\u0430lice", "\\u0430lice"),
    "parenthesis": ("bob (AAAA-BBBB-CCCC-DDDD)", "bob \\u0028AAAA-BBBB-CCCC-DDDD\\u0029"),
    "comma": ("carol, dave", "carol\\u002c dave"),
    "backslash": ("a\\u0041", "a\\u005cu0041"),
    "astral": ("\U0001f600", "\\U0001f600"),
}


@pytest.mark.parametrize(("name", "shown"), list(NAME_ESCAPES.values()), ids=list(NAME_ESCAPES))
def test_names_are_shown_in_ascii_and_cannot_imitate_a_fingerprint_or_a_list(
    name: str, shown: str
) -> None:
    named = person(name)
    assert named.label == f"{shown} ({people.display_fingerprint(named.fingerprint)})"
    assert named.label.count("(") == 1
    assert "," not in named.label
    seal = statements.seal_statement(
        deployment="d", custodian=named, replica="r", reason="x", requested_at=0
    )
    assert Statement.parse(seal.render()) == seal


@settings(max_examples=300)
@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_name_escape_is_injective(a: str, b: str) -> None:
    assert (people.display_name(a) == people.display_name(b)) == (a == b)


# --- field checks ----------------------------------------------------------------

BAD_VALUES = {
    "newline": "acme\nexpires: 9999-12-31T23:59:59Z",
    "carriage-return": "acme\rx",
    "crlf": "acme\r\n",
    "tab": "acme\thealth",
    "nul": "acme\x00",
    "escape-sequence": "acme\x1b[2K",
    "delete": "acme\x7f",
    "unicode-line-separator": "acme\u2028x",
    "bidi-override": "acme\u202eyhtlaeh",
    "homoglyph": "\u0430cme-health",
    "non-ascii-letter": "z\u00fcrich",
    "leading-space": " acme",
    "trailing-space": "acme ",
    "empty": "",
}


@pytest.mark.parametrize("value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_field_values_are_refused(value: str) -> None:
    with pytest.raises(InvalidInputError):
        Statement("seal", "acme-prod", (("reason", value),))
    with pytest.raises(InvalidInputError):
        Statement("seal", value, (("reason", "ok"),))
    with pytest.raises(InvalidInputError):
        approval_request(parameters={"tenant": value})


def test_newline_message_names_the_field() -> None:
    with pytest.raises(InvalidInputError, match=r"'reason'.*U\+000A"):
        Statement("seal", "acme-prod", (("reason", "a\nb"),))


BAD_FIELDS = {
    "uppercase-name": (("Reason", "x"),),
    "colon-in-name": (("reason: x", "y"),),
    "empty-name": (("", "x"),),
    "double-space-in-name": (("a  b", "x"),),
    "trailing-space-in-name": (("reason ", "x"),),
    "newline-in-name": (("a\nb", "x"),),
    "first-field-indented": (("  tenant", "x"),),
    "three-space-indent": (("a", "x"), ("   b", "y")),
    "reserved-deployment": (("deployment", "other"),),
    "reserved-deployment-indented": (("a", "x"), ("  deployment", "other")),
    "duplicate-name": (("a", "x"), ("a", "y")),
    "not-a-pair": (("a", "x", "y"),),
    "no-fields": (),
}


@pytest.mark.parametrize("fields", list(BAD_FIELDS.values()), ids=list(BAD_FIELDS))
def test_bad_field_names_are_refused(fields: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(InvalidInputError):
        Statement("seal", "acme-prod", fields)


@pytest.mark.parametrize("kind", ["APPROVE", "unseal", "", "approve\n"], ids=repr)
def test_unknown_kinds_are_refused(kind: str) -> None:
    with pytest.raises(InvalidInputError, match="kind"):
        Statement(kind, "acme-prod", (("a", "b"),))


def test_size_limit() -> None:
    overhead = len(Statement("seal", "d", (("r", "x"),)).render()) - 1
    fits = Statement("seal", "d", (("r", "x" * (MAX_STATEMENT_BYTES - overhead)),))
    assert len(fits.message()) == MAX_STATEMENT_BYTES
    with pytest.raises(InvalidInputError, match="limit"):
        Statement("seal", "d", (("r", "x" * (MAX_STATEMENT_BYTES - overhead + 1)),))


def test_change_roster_of_255_custodians_by_255_others_fits() -> None:
    """The largest statement: every custodian replaced, every name 63 escaped astral characters."""
    longest = "\U0001f600" * 63  # 252 bytes of UTF-8, the most a name may have
    now = tuple(Person(f"{i:064x}", longest) for i in range(255))
    after = tuple(Person(f"{i + 255:064x}", longest) for i in range(255))
    context = ApprovalContext(
        roster=now, threshold=255, approvals_needed=255, destroy_wait_seconds=1, newcomers=after
    )
    roster = ",".join(p.fingerprint for p in after)
    request = approval_request(
        operation="change-roster", parameters={"threshold": 255, "roster": roster}, context=context
    )
    size = len(request.statement("approve").message())
    assert 600_000 < size < MAX_STATEMENT_BYTES


REQUEST_ERRORS = {
    "short-proposal-id": {"proposal_id": bytes(15)},
    "hex-proposal-id": {"proposal_id": PROPOSAL.hex()},
    "operation-uppercase": {"operation": "Activate"},
    "operation-with-space": {"operation": "activate tenant"},
    "parameter-key-with-colon": {"parameters": {"a:b": "x"}},
    "parameter-key-uppercase": {"parameters": {"Tenant": "x"}},
    "parameter-bool": {"parameters": {"flag": True}},
    "parameter-float": {"parameters": {"x": 1.5}},
    "negative-log-position": {"log_position": -1},
    "bool-log-position": {"log_position": True},
    "expiry-beyond-9999": {"expires_at": statements.MAX_TIMESTAMP + 1},
    "expiry-before-proposal": {"expires_at": PROPOSED},
    "context-not-a-context": {"context": {"roster": []}},
    "deployment-newline": {"deployment": "a\nb"},
}


@pytest.mark.parametrize("changes", list(REQUEST_ERRORS.values()), ids=list(REQUEST_ERRORS))
def test_bad_requests_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        approval_request(**changes)


@pytest.mark.parametrize(
    "parameters",
    [(("tenant", "a"), ("duration_seconds", 1)), (("tenant", "a"), ("tenant", "b"))],
    ids=["unsorted", "duplicate-key"],
)
def test_parameter_pairs_must_be_sorted_and_unique(
    parameters: tuple[tuple[str, str | int], ...],
) -> None:
    with pytest.raises(InvalidInputError, match="sorted"):
        ApprovalRequest(
            "acme-prod", PROPOSAL, "activate-tenant", parameters, 42, PROPOSED, EXPIRES, CONTEXT
        )


@pytest.mark.parametrize("verdict", ["seal", "APPROVE", "confirm-share"])
def test_statement_verdict_is_approve_or_refuse(verdict: str) -> None:
    with pytest.raises(InvalidInputError, match="verdict"):
        REQUEST.statement(verdict)


# --- unambiguity ----------------------------------------------------------------

names = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,8}( [a-z0-9_.-]{1,6}){0,2}", fullmatch=True).filter(
    lambda n: n != "deployment"
)
printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)
values = printable.filter(lambda v: v == v.strip(" "))


@st.composite
def statement_parts(draw: st.DrawFn) -> tuple[str, str, tuple[tuple[str, str], ...]]:
    kind = draw(st.sampled_from(statements.KINDS))
    deployment = draw(values)
    keys = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    indents = [False] + [draw(st.booleans()) for _ in keys[1:]]
    fields = tuple(
        (("  " if indent else "") + key, draw(values))
        for key, indent in zip(keys, indents, strict=True)
    )
    return kind, deployment, fields


@settings(max_examples=300)
@given(statement_parts())
def test_parse_inverts_render(parts: tuple[str, str, tuple[tuple[str, str], ...]]) -> None:
    statement = Statement(*parts)
    text = statement.render()
    assert Statement.parse(text) == statement
    assert text.count("\n") == 2 + len(statement.fields)


@settings(max_examples=300)
@given(statement_parts(), st.text(max_size=30))
def test_no_value_adds_a_line(
    parts: tuple[str, str, tuple[tuple[str, str], ...]], injected: str
) -> None:
    """Whatever a value holds, it is refused or stays on its own line."""
    kind, deployment, fields = parts
    name = fields[0][0]
    try:
        statement = Statement(kind, deployment, ((name, injected), *fields[1:]))
    except InvalidInputError:
        return
    text = statement.render()
    assert text.count("\n") == 2 + len(fields)
    assert f"\n{name}: {injected}\n" in text


GOLDEN_APPROVE = REQUEST.statement("approve").render()


@pytest.mark.parametrize(
    "text",
    [
        GOLDEN_APPROVE.rstrip("\n"),
        GOLDEN_APPROVE.replace("keyquorum statement v2", "keyquorum statement v1"),
        GOLDEN_APPROVE.replace("APPROVE", "approve"),
        GOLDEN_APPROVE.replace("deployment: ", "deployment:  "),
        GOLDEN_APPROVE.replace("proposal: ", "proposal:"),
        GOLDEN_APPROVE + "\n",
        GOLDEN_APPROVE.replace("\n", "\r\n"),
        "keyquorum statement v2: APPROVE\ndeployment: x\n",
    ],
    ids=[
        "no-final-newline",
        "other-version",
        "lowercase-kind",
        "double-space",
        "no-space-after-colon",
        "blank-line",
        "crlf",
        "no-fields",
    ],
)
def test_parse_refuses_what_render_would_not_produce(text: str) -> None:
    with pytest.raises(DeserializationError):
        Statement.parse(text)


# --- signing and verifying -------------------------------------------------------


@dataclass(frozen=True)
class Custodian:
    key: HybridSigningKey
    id: str

    @property
    def verify_key(self) -> HybridVerifyKey:
        return self.key.verify_key()

    def sign(self, statement: Statement) -> SignedStatement:
        return SignedStatement(self.id, self.key.sign(statement.domain, statement.message()))


def _custodian(n: int) -> Custodian:
    key = HybridSigningKey.from_seeds(bytes([n]) * 64)
    return Custodian(key, key.verify_key().fingerprint())


CUSTODIANS = [_custodian(n) for n in range(1, 9)]
SEVEN = CUSTODIANS[:7]
OUTSIDER = CUSTODIANS[7]
ROSTER = {c.id: c.verify_key for c in SEVEN}
APPROVE = REQUEST.statement("approve")


def _approvals(count: int) -> list[SignedStatement]:
    return [c.sign(APPROVE) for c in SEVEN[:count]]


def _forged(signer: Custodian, domain: str, message: bytes) -> SignedStatement:
    return SignedStatement(signer.id, signer.key.sign(domain, message))


def _altered_byte() -> list[SignedStatement]:
    text = bytearray(APPROVE.message())
    text[text.index(b"28800")] = ord("9")  # duration 98800 s instead of 28800
    return [*_approvals(4), _forged(SEVEN[4], "approve", bytes(text))]


def _mixed_halves() -> list[SignedStatement]:
    good = SEVEN[4].sign(APPROVE).signature
    other = (
        SEVEN[4].sign(approval_request(proposal_id=OTHER_PROPOSAL).statement("approve")).signature
    )
    return [
        *_approvals(4),
        SignedStatement(SEVEN[4].id, HybridSignature(good.ed25519, other.mldsa65)),
    ]


def _claimed_by_other() -> list[SignedStatement]:
    return [*_approvals(4), SignedStatement(SEVEN[5].id, SEVEN[4].sign(APPROVE).signature)]


@dataclass(frozen=True)
class Case:
    approvals: Callable[[], list[SignedStatement]]
    threshold: int = 5
    now: int = NOW
    roster: Callable[[], dict[str, HybridVerifyKey]] = lambda: ROSTER
    error: type[Exception] | None = None
    signed: int | None = None


CASES = {
    "5-of-7, 5 distinct valid: ok": Case(lambda: _approvals(5), signed=5),
    "5-of-7, all 7 valid: ok": Case(lambda: _approvals(7), signed=7),
    "5-of-7, 4 valid: ThresholdError": Case(lambda: _approvals(4), signed=4),
    "5-of-7, none: ThresholdError": Case(list, signed=0),
    "1-of-7 (narrowing), 1 valid: ok": Case(lambda: _approvals(1), threshold=1, signed=1),
    "7-of-7, 6 valid: ThresholdError": Case(lambda: _approvals(6), threshold=7, signed=6),
    "one second before expiry: ok": Case(lambda: _approvals(5), now=EXPIRES - 1, signed=5),
    "one custodian signed twice (two fresh signatures)": Case(
        lambda: [*_approvals(4), SEVEN[0].sign(APPROVE)], error=ReplayError
    ),
    "one signature counted twice": Case(lambda: [*(a := _approvals(4)), a[0]], error=ReplayError),
    "one signature presented under another custodian's name": Case(
        lambda: [*(a := _approvals(4)), SignedStatement(SEVEN[5].id, a[0].signature)],
        error=ReplayError,
    ),
    "signature from the other proposal": Case(
        lambda: [
            *_approvals(4),
            SEVEN[4].sign(approval_request(proposal_id=OTHER_PROPOSAL).statement("approve")),
        ],
        error=SignatureError,
    ),
    "same proposal id at another log position": Case(
        lambda: [
            *_approvals(4),
            SEVEN[4].sign(approval_request(log_position=43).statement("approve")),
        ],
        error=SignatureError,
    ),
    "same proposal in another deployment": Case(
        lambda: [
            *_approvals(4),
            SEVEN[4].sign(approval_request(deployment="acme-staging").statement("approve")),
        ],
        error=SignatureError,
    ),
    "signature made for refuse used as approve": Case(
        lambda: [*_approvals(4), SEVEN[4].sign(REQUEST.statement("refuse"))],
        error=SignatureError,
    ),
    "approve text signed in the seal domain": Case(
        lambda: [*_approvals(4), _forged(SEVEN[4], "seal", APPROVE.message())],
        error=SignatureError,
    ),
    "altered byte in the text": Case(_altered_byte, error=SignatureError),
    "Ed25519 half good, ML-DSA-65 half from another proposal": Case(
        _mixed_halves, error=SignatureError
    ),
    "custodian A's signature claimed by custodian B": Case(_claimed_by_other, error=SignatureError),
    "expired: now == expires_at": Case(lambda: _approvals(5), now=EXPIRES, error=ExpiredError),
    "expired: an hour late": Case(lambda: _approvals(5), now=EXPIRES + 3600, error=ExpiredError),
    "expired with no approvals": Case(list, now=EXPIRES, error=ExpiredError),
    "removed custodian": Case(
        lambda: _approvals(5),
        roster=lambda: {c.id: c.verify_key for c in SEVEN if c is not SEVEN[2]},
        error=NotOnRosterError,
    ),
    "signer never on the roster": Case(
        lambda: [*_approvals(4), OUTSIDER.sign(APPROVE)], error=NotOnRosterError
    ),
    "one bad approval among five good ones is not skipped": Case(
        lambda: [*_approvals(5), SEVEN[5].sign(REQUEST.statement("refuse"))],
        error=SignatureError,
    ),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_verify_approvals(case: Case) -> None:
    approvals = case.approvals()
    roster = case.roster()
    if case.error is not None:
        with pytest.raises(case.error):
            verify_approvals(REQUEST, approvals, roster, case.threshold, case.now)
        return
    result = verify_approvals(REQUEST, approvals, roster, case.threshold, case.now)
    assert case.signed is not None
    assert result.signed_by == tuple(a.signer for a in approvals)
    assert len(result.signed_by) == case.signed
    assert set(result.unsigned) == set(roster) - set(result.signed_by)
    assert result.threshold == case.threshold
    if case.signed >= case.threshold:
        assert result.approved
        result.verify()
    else:
        assert not result.approved
        message = f"approved by {case.signed} of {case.threshold} required"
        with pytest.raises(ThresholdError, match=message):
            result.verify()


def test_errors_name_the_custodian_and_the_reason() -> None:
    with pytest.raises(
        ReplayError, match=f"custodian {people.display_fingerprint(SEVEN[0].id)} approved more"
    ):
        verify_approvals(REQUEST, [*_approvals(4), SEVEN[0].sign(APPROVE)], ROSTER, 5, NOW)
    with pytest.raises(NotOnRosterError, match=people.display_fingerprint(OUTSIDER.id)):
        verify_approvals(REQUEST, [OUTSIDER.sign(APPROVE)], ROSTER, 5, NOW)
    with pytest.raises(SignatureError, match="ML-DSA-65 half"):
        verify_approvals(REQUEST, _mixed_halves(), ROSTER, 5, NOW)
    with pytest.raises(ExpiredError, match="2026-11-25 12:00:00 UTC"):
        verify_approvals(REQUEST, [], ROSTER, 5, EXPIRES)


PRECONDITIONS = {
    "threshold zero": (0, ROSTER, NOW),
    "threshold above roster size": (8, ROSTER, NOW),
    "threshold bool": (True, ROSTER, NOW),
    "empty roster": (1, {}, NOW),
    "roster id not a fingerprint": (1, {"custodian-1": SEVEN[0].verify_key}, NOW),
    "roster value not a key": (1, {SEVEN[0].id: b"key"}, NOW),
    "negative now": (5, ROSTER, -1),
}


@pytest.mark.parametrize(
    ("threshold", "roster", "now"), list(PRECONDITIONS.values()), ids=list(PRECONDITIONS)
)
def test_preconditions(threshold: int, roster: dict[str, HybridVerifyKey], now: int) -> None:
    with pytest.raises(InvalidInputError):
        verify_approvals(REQUEST, _approvals(5), roster, threshold, now)


def test_verify_statement_single() -> None:
    signed = SEVEN[0].sign(APPROVE)
    verify_statement(APPROVE, signed, SEVEN[0].verify_key)
    with pytest.raises(SignatureError):
        verify_statement(REQUEST.statement("refuse"), signed, SEVEN[0].verify_key)
    with pytest.raises(SignatureError):
        verify_statement(APPROVE, signed, SEVEN[1].verify_key)


# --- credentials and JSON ----------------------------------------------------------


@pytest.fixture(scope="module")
def credentials() -> list[CustodianCredential]:
    return [CustodianCredential.generate(f"custodian-{n}") for n in range(3)]


def test_with_public_credentials(credentials: list[CustodianCredential]) -> None:
    roster = {c.public().fingerprint: c.public() for c in credentials}
    approvals = [sign_statement(APPROVE, c) for c in credentials[:2]]
    result = verify_approvals(REQUEST, approvals, roster, 2, NOW)
    result.verify()
    assert result.unsigned == (credentials[2].public().fingerprint,)
    verify_statement(APPROVE, approvals[0], credentials[0].public())
    with pytest.raises(SignatureError, match="signed by"):
        verify_statement(APPROVE, approvals[0], credentials[1].public())


def test_roster_credential_must_match_its_id(credentials: list[CustodianCredential]) -> None:
    a, b = credentials[0].public(), credentials[1].public()
    with pytest.raises(InvalidInputError, match="holds the credential"):
        verify_approvals(REQUEST, [], {a.fingerprint: b}, 1, NOW)


def test_signed_statement_json_round_trip() -> None:
    signed = SEVEN[0].sign(APPROVE)
    data = signed.to_json()
    assert set(data) == {"signer", "signature"}
    assert SignedStatement.from_json(data) == signed


JSON_ERRORS = {
    "not-an-object": [],
    "extra-key": {"signer": "ab" * 32, "signature": "00", "statement": "x"},
    "missing-signature": {"signer": "ab" * 32},
    "uppercase-signer": {"signer": "AB" * 32, "signature": "00"},
    "short-signer": {"signer": "ab" * 31, "signature": "00"},
    "short-signature": {"signer": "ab" * 32, "signature": "00" * 100},
    "uppercase-signature": {"signer": "ab" * 32, "signature": "AB" * 3373},
    "signature-not-hex": {"signer": "ab" * 32, "signature": "zz"},
}


@pytest.mark.parametrize("data", list(JSON_ERRORS.values()), ids=list(JSON_ERRORS))
def test_signed_statement_json_errors(data: object) -> None:
    with pytest.raises(DeserializationError):
        SignedStatement.from_json(data)
