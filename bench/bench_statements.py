"""Approval checking: what verify_approvals costs over the raw hybrid verifies."""

from __future__ import annotations

from bench.harness import Row, ops_per_second
from keyquorum.quorum.signatures import HybridSigningKey
from keyquorum.quorum.statements import (
    ApprovalContext,
    ApprovalRequest,
    Person,
    SignedStatement,
    verify_approvals,
)

EXPIRES = 1_795_608_000


def run(quick: bool) -> list[Row]:
    min_time = 0.1 if quick else 0.3
    keys = [HybridSigningKey.from_seeds(bytes([n]) * 64) for n in range(1, 8)]
    roster = {k.verify_key().fingerprint(): k.verify_key() for k in keys}
    request = ApprovalRequest.from_mapping(
        deployment="acme-prod",
        proposal_id=bytes(16),
        operation="activate-tenant",
        parameters={"tenant": "acme-health", "duration_seconds": 28800},
        log_position=42,
        proposed_at=EXPIRES - 3600,
        expires_at=EXPIRES,
        context=ApprovalContext(
            roster=tuple(Person(fp, f"custodian {i}") for i, fp in enumerate(roster)),
            threshold=5,
            approvals_needed=5,
            destroy_wait_seconds=7 * 86400,
        ),
    )
    statement = request.statement("approve")
    message = statement.message()
    approvals = [
        SignedStatement(k.verify_key().fingerprint(), k.sign("approve", message)) for k in keys[:5]
    ]
    pairs = [(roster[a.signer], a.signature) for a in approvals]

    def raw() -> None:
        for key, signature in pairs:
            key.verify("approve", message, signature)

    def checked() -> None:
        verify_approvals(request, approvals, roster, 5, EXPIRES - 1).verify()

    return [
        Row(
            "verify_approvals, 5 of 7 (render, checks, 5 hybrid verifies)",
            ops_per_second(checked, min_time=min_time),
            "5 x HybridVerifyKey.verify on the same text",
            ops_per_second(raw, min_time=min_time),
        )
    ]
