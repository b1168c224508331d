"""Approval statements: exact text, unambiguous fields, quorum verification."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.quorum import statements
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
    ApprovalRequest,
    SignedStatement,
    Statement,
    sign_statement,
    verify_approvals,
    verify_statement,
)

EXPIRES = 1_795_608_000  # 2026-11-25T12:00:00Z
NOW = EXPIRES - 3600
PROPOSAL = bytes.fromhex("3f2a9c0e5d7b41a68c2e0f1b9d3a7c55")
OTHER_PROPOSAL = bytes.fromhex("00112233445566778899aabbccddeeff")


def _request(**changes: object) -> ApprovalRequest:
    fields: dict[str, object] = {
        "deployment": "acme-prod",
        "proposal_id": PROPOSAL,
        "operation": "activate-tenant",
        "parameters": {"tenant": "acme-health", "duration_seconds": 28800},
        "log_position": 42,
        "expires_at": EXPIRES,
    }
    fields.update(changes)
    return ApprovalRequest.from_mapping(**fields)  # type: ignore[arg-type]


REQUEST = _request()

GOLDEN_APPROVE = """\
keyquorum statement v1: APPROVE
deployment: acme-prod
proposal: 3f2a9c0e5d7b41a68c2e0f1b9d3a7c55
operation: activate-tenant
  duration_seconds: 28800
  tenant: acme-health
proposed at log position: 42
expires: 2026-11-25T12:00:00Z (1795608000)
"""


# --- rendering -----------------------------------------------------------------


def test_golden_approve_text() -> None:
    statement = REQUEST.statement("approve")
    assert statement.render() == GOLDEN_APPROVE
    assert statement.message() == GOLDEN_APPROVE.encode("ascii")
    assert statement.domain == "approve"


def test_refuse_differs_only_in_the_header() -> None:
    refuse = REQUEST.statement("refuse").render()
    assert refuse == GOLDEN_APPROVE.replace(": APPROVE\n", ": REFUSE\n", 1)


def test_parameter_order_does_not_change_the_text() -> None:
    swapped = ApprovalRequest.from_mapping(
        deployment="acme-prod",
        proposal_id=PROPOSAL,
        operation="activate-tenant",
        parameters={"duration_seconds": 28800, "tenant": "acme-health"},
        log_position=42,
        expires_at=EXPIRES,
    )
    assert swapped == REQUEST
    assert swapped.statement("approve").render() == GOLDEN_APPROVE


def test_golden_other_kinds() -> None:
    fp = "ab" * 32
    confirm = statements.confirm_share_statement(
        deployment="acme-prod", custodian=fp, split_id=bytes(range(16)), index=3
    )
    assert confirm.render() == (
        "keyquorum statement v1: CONFIRM-SHARE\n"
        "deployment: acme-prod\n"
        f"custodian: {fp}\n"
        "split: 000102030405060708090a0b0c0d0e0f\n"
        "share index: 3\n"
    )
    unseal = statements.unseal_share_statement(
        deployment="acme-prod",
        custodian=fp,
        replica="replica-1",
        session=bytes(16),
        session_log_size=7,
        split_id=bytes(range(16)),
        index=3,
        ciphertext_sha256=bytes(32),
    )
    assert unseal.render() == (
        "keyquorum statement v1: UNSEAL-SHARE\n"
        "deployment: acme-prod\n"
        f"custodian: {fp}\n"
        "replica: replica-1\n"
        f"session: {'00' * 16}\n"
        "session log size: 7\n"
        "split: 000102030405060708090a0b0c0d0e0f\n"
        "share index: 3\n"
        f"ciphertext sha256: {'00' * 32}\n"
    )
    seal = statements.seal_statement(
        deployment="acme-prod", custodian=fp, replica="*", reason="laptop stolen", requested_at=0
    )
    assert seal.render() == (
        "keyquorum statement v1: SEAL\n"
        "deployment: acme-prod\n"
        f"custodian: {fp}\n"
        "replica: *\n"
        "reason: laptop stolen\n"
        "requested at: 1970-01-01T00:00:00Z (0)\n"
    )


@pytest.mark.parametrize(
    ("t", "text"),
    [
        (0, "1970-01-01T00:00:00Z (0)"),
        (951_782_400, "2000-02-29T00:00:00Z (951782400)"),
        (statements.MAX_TIMESTAMP, "9999-12-31T23:59:59Z (253402300799)"),
    ],
    ids=["epoch", "leap-day", "last-second"],
)
def test_render_time(t: int, text: str) -> None:
    assert statements.render_time(t) == text


@pytest.mark.parametrize(
    "t", [-1, statements.MAX_TIMESTAMP + 1, True], ids=["negative", "year-10000", "bool"]
)
def test_render_time_refuses_out_of_range(t: int) -> None:
    with pytest.raises(InvalidInputError):
        statements.render_time(t)


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
        _request(parameters={"tenant": value})


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


def test_change_roster_of_255_custodians_fits() -> None:
    roster = ",".join(f"{i:064x}" for i in range(255))
    request = _request(operation="change-roster", parameters={"threshold": 128, "roster": roster})
    assert roster in request.statement("approve").render()


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
    "deployment-newline": {"deployment": "a\nb"},
}


@pytest.mark.parametrize("changes", list(REQUEST_ERRORS.values()), ids=list(REQUEST_ERRORS))
def test_bad_requests_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        _request(**changes)


@pytest.mark.parametrize(
    "parameters",
    [(("tenant", "a"), ("duration_seconds", 1)), (("tenant", "a"), ("tenant", "b"))],
    ids=["unsorted", "duplicate-key"],
)
def test_parameter_pairs_must_be_sorted_and_unique(
    parameters: tuple[tuple[str, str | int], ...],
) -> None:
    with pytest.raises(InvalidInputError, match="sorted"):
        ApprovalRequest("acme-prod", PROPOSAL, "activate-tenant", parameters, 42, EXPIRES)


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


@pytest.mark.parametrize(
    "text",
    [
        GOLDEN_APPROVE.rstrip("\n"),
        GOLDEN_APPROVE.replace("keyquorum statement v1", "keyquorum statement v2"),
        GOLDEN_APPROVE.replace("APPROVE", "approve"),
        GOLDEN_APPROVE.replace("deployment: ", "deployment:  "),
        GOLDEN_APPROVE.replace("proposal: ", "proposal:"),
        GOLDEN_APPROVE + "\n",
        GOLDEN_APPROVE.replace("\n", "\r\n"),
        "keyquorum statement v1: APPROVE\ndeployment: x\n",
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
    text[text.index(b"28800")] = ord("9")  # duration 98800 instead of 28800
    return [*_approvals(4), _forged(SEVEN[4], "approve", bytes(text))]


def _mixed_halves() -> list[SignedStatement]:
    good = SEVEN[4].sign(APPROVE).signature
    other = SEVEN[4].sign(_request(proposal_id=OTHER_PROPOSAL).statement("approve")).signature
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
            SEVEN[4].sign(_request(proposal_id=OTHER_PROPOSAL).statement("approve")),
        ],
        error=SignatureError,
    ),
    "same proposal id at another log position": Case(
        lambda: [*_approvals(4), SEVEN[4].sign(_request(log_position=43).statement("approve"))],
        error=SignatureError,
    ),
    "same proposal in another deployment": Case(
        lambda: [
            *_approvals(4),
            SEVEN[4].sign(_request(deployment="acme-staging").statement("approve")),
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
    with pytest.raises(ReplayError, match=f"custodian {SEVEN[0].id[:16]} approved more than once"):
        verify_approvals(REQUEST, [*_approvals(4), SEVEN[0].sign(APPROVE)], ROSTER, 5, NOW)
    with pytest.raises(NotOnRosterError, match=OUTSIDER.id[:16]):
        verify_approvals(REQUEST, [OUTSIDER.sign(APPROVE)], ROSTER, 5, NOW)
    with pytest.raises(SignatureError, match="ML-DSA-65 half"):
        verify_approvals(REQUEST, _mixed_halves(), ROSTER, 5, NOW)
    with pytest.raises(ExpiredError, match="2026-11-25T12:00:00Z"):
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
