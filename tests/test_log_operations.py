"""The operations table: approvals needed, parameter schemas, policy bounds, results."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyquorum.quorum.errors import DeserializationError, InvalidInputError
from keyquorum.quorum.operations import (
    OPERATIONS,
    Activated,
    DestroyScheduled,
    GrantChanged,
    NewVersion,
    Policy,
    Result,
    TenantNamed,
    VersionDisabled,
    check_parameters,
    operation,
    parse_parameters,
    parse_result,
    request_for,
    result_type,
)
from tests.logfactory import LogFactory, custodians

POLICY = Policy(activation_max_seconds=3600, destroy_wait_seconds=86400, proposal_ttl_seconds=600)
FP = [c.fingerprint for c in custodians(3)]

WIDENING = {
    "create-tenant", "activate-tenant", "rotate-tenant", "destroy-tenant", "grant",
    "change-roster", "add-proposer", "add-witness", "remove-witness", "rotate-log-key",
    "approve-restore",
}  # fmt: skip
NARROWING = {"deactivate-tenant", "disable-version", "cancel-destroy", "revoke", "remove-proposer"}


@pytest.mark.parametrize("name", sorted(OPERATIONS), ids=sorted(OPERATIONS))
def test_widening_needs_the_threshold_narrowing_one(name: str) -> None:
    op = operation(name)
    assert op.widening is (name in WIDENING)
    assert op.required_approvals(5) == (5 if name in WIDENING else 1)


def test_table_is_exactly_the_architecture_list() -> None:
    assert set(OPERATIONS) == WIDENING | NARROWING


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("create-tenant", {"tenant": "a"}),
        ("create-tenant", {"tenant": "acme-health-2"}),
        ("create-tenant", {"tenant": "a" * 63}),
        ("activate-tenant", {"tenant": "t", "duration_seconds": 3600}),
        ("activate-tenant", {"tenant": "t", "duration_seconds": 1}),
        ("grant", {"backend": "booking.prod.example", "tenant": "t"}),
        ("revoke", {"backend": "docs-1", "tenant": "t"}),
        ("disable-version", {"tenant": "t", "version": 2}),
        ("change-roster", {"threshold": 2, "roster": ",".join(FP[:2])}),
        ("change-roster", {"threshold": 3, "roster": ",".join(FP)}),
    ],
    ids=[
        "one-char-tenant", "tenant-with-hyphens", "tenant-63-chars", "activate-at-policy-max",
        "activate-1s", "grant-dotted-backend", "revoke", "disable-version", "roster-2-of-2",
        "roster-3-of-3",
    ],
)  # fmt: skip
def test_valid_parameters(name: str, params: dict[str, Any]) -> None:
    pairs = check_parameters(name, tuple(params.items()), POLICY)
    assert pairs == tuple(sorted(params.items()))
    assert parse_parameters(name, params) == pairs


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("create-tenant", {"tenant": "Acme"}, "not a valid name"),
        ("create-tenant", {"tenant": "-acme"}, "not a valid name"),
        ("create-tenant", {"tenant": "acme-"}, "not a valid name"),
        ("create-tenant", {"tenant": "a" * 64}, "not a valid name"),
        ("create-tenant", {"tenant": "acme_health"}, "not a valid name"),
        ("create-tenant", {"tenant": "acmé"}, "not a valid name"),
        ("create-tenant", {"tenant": ""}, "not a valid name"),
        ("create-tenant", {"tenant": 7}, "expected a string"),
        ("create-tenant", {}, "missing tenant"),
        ("create-tenant", {"tenant": "a", "force": "yes"}, "unknown field force"),
        ("activate-tenant", {"tenant": "t", "duration_seconds": 3601}, "exceeds"),
        ("activate-tenant", {"tenant": "t", "duration_seconds": 0}, "outside"),
        ("activate-tenant", {"tenant": "t", "duration_seconds": True}, "integer"),
        ("activate-tenant", {"tenant": "t", "duration_seconds": "60"}, "integer"),
        ("grant", {"backend": "Booking", "tenant": "t"}, "not a valid name"),
        ("grant", {"backend": "booking/../x", "tenant": "t"}, "not a valid name"),
        ("grant", {"backend": "b k", "tenant": "t"}, "not a valid name"),
        ("disable-version", {"tenant": "t", "version": 0}, "outside"),
        ("change-roster", {"threshold": 3, "roster": ",".join(FP[:2])}, "exceeds"),
        ("change-roster", {"threshold": 1, "roster": ",".join(FP[:2])}, "outside"),
        ("change-roster", {"threshold": 2, "roster": FP[0]}, "1 custodians"),
        ("change-roster", {"threshold": 2, "roster": f"{FP[0]},{FP[0]}"}, "twice"),
        ("change-roster", {"threshold": 2, "roster": f"{FP[0]},{FP[1].upper()}"}, "lowercase"),
        ("export-master", {"tenant": "t"}, "unknown operation"),
    ],
    ids=[
        "tenant-uppercase", "tenant-leading-hyphen", "tenant-trailing-hyphen", "tenant-64-chars",
        "tenant-underscore", "tenant-non-ascii", "tenant-empty", "tenant-int", "missing-param",
        "extra-param", "duration-above-policy", "duration-zero", "duration-bool",
        "duration-string", "backend-uppercase", "backend-path", "backend-space", "version-zero",
        "threshold-above-roster", "threshold-one", "roster-of-one", "roster-duplicate",
        "roster-uppercase-fingerprint", "unknown-operation",
    ],
)  # fmt: skip
def test_invalid_parameters_are_refused(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        check_parameters(name, tuple(params.items()), POLICY)


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=70))
def test_tenant_names_match_the_documented_rule(name: str) -> None:
    ok = len(name) <= 63 and not name.startswith("-") and not name.endswith("-")
    try:
        parse_parameters("create-tenant", {"tenant": name})
    except DeserializationError:
        assert not ok
    else:
        assert ok


RESULTS: list[tuple[str, Result]] = [
    ("create-tenant", NewVersion("t", 1, b"\x01" * 60, b"\x02" * 32)),
    ("rotate-tenant", NewVersion("t", 2, b"\x01" * 60, b"\x02" * 32)),
    ("activate-tenant", Activated("t", 1_800_000_000)),
    ("destroy-tenant", DestroyScheduled("t", 1_800_000_000)),
    ("grant", GrantChanged("docs.example", "t")),
    ("revoke", GrantChanged("docs.example", "t")),
    ("deactivate-tenant", TenantNamed("t")),
    ("cancel-destroy", TenantNamed("t")),
    ("disable-version", VersionDisabled("t", 1)),
]


@pytest.mark.parametrize(("name", "result"), RESULTS, ids=[r[0] for r in RESULTS])
def test_results_round_trip_and_are_checked_per_operation(name: str, result: Result) -> None:
    assert result_type(name) is type(result)
    assert parse_result(name, result.to_json()) == result
    extra = {**result.to_json(), "master_key": "00" * 32}
    with pytest.raises(DeserializationError, match="unknown field master_key"):
        parse_result(name, extra)


def test_result_of_another_operation_is_refused() -> None:
    with pytest.raises(DeserializationError):
        parse_result("activate-tenant", GrantChanged("docs.example", "t").to_json())


def test_policy_bounds_and_round_trip() -> None:
    assert Policy.from_json(POLICY.to_json()) == POLICY
    with pytest.raises(InvalidInputError):
        Policy(0, 1, 1)
    with pytest.raises(InvalidInputError):
        Policy(True, 1, 1)  # type: ignore[arg-type]
    with pytest.raises(DeserializationError, match="missing"):
        Policy.from_json({"activation_max_seconds": 1})


def test_request_for_binds_log_position_and_every_parameter() -> None:
    log = LogFactory()
    pid = log.propose("create-tenant", tenant="acme-health")
    log.approve(pid, log.creds[0])
    proposal = dataclasses.replace(
        log.state.proposals[pid],
        log_position=42,
        operation="activate-tenant",
        parameters=(("duration_seconds", 600), ("tenant", "acme-health")),
    )
    request = request_for(proposal, log.state)
    text = request.statement("approve").render()
    assert ", at log position 42\n" in text
    assert "  duration: 10 min (600 seconds), counted from the approval" in text
    assert "  tenant: acme-health\n" in text
    assert "operation: activate-tenant\n" in text
    # The roster in force at the position, and the threshold the operation needs.
    assert f"approvals needed: {log.k} of the {len(log.creds)} custodians\n" in text
    moved = request_for(dataclasses.replace(proposal, log_position=43), log.state)
    assert moved.statement("approve").render() != text
