"""Example approval requests and statements: one per operation and per kind.

Fixed deployment, roster, proposal id and times, so each statement renders
to the bytes pinned in tests/golden/statements/.
"""

from __future__ import annotations

import dataclasses
import hashlib

from keyquorum.quorum import statements
from keyquorum.quorum.statements import ApprovalContext, ApprovalRequest, Person, Statement

EXPIRES = 1_795_608_000  # 2026-11-25 12:00:00 UTC
PROPOSED = EXPIRES - 3600
NOW = EXPIRES - 1800
PROPOSAL = bytes.fromhex("3f2a9c0e5d7b41a68c2e0f1b9d3a7c55")
OTHER_PROPOSAL = bytes.fromhex("00112233445566778899aabbccddeeff")


def person(name: str) -> Person:
    return Person(hashlib.sha256(name.encode()).hexdigest(), name)


NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")
ROSTER_NOW = tuple(person(n) for n in NAMES)
HENRY, ZOE = person("henry"), person("Zo\u00eb \u00c5berg")
CONTEXT = ApprovalContext(
    roster=ROSTER_NOW, threshold=5, approvals_needed=5, destroy_wait_seconds=7 * 86400
)


def approval_request(**changes: object) -> ApprovalRequest:
    fields: dict[str, object] = {
        "deployment": "acme-prod",
        "proposal_id": PROPOSAL,
        "operation": "activate-tenant",
        "parameters": {"tenant": "acme-health", "duration_seconds": 28800},
        "log_position": 42,
        "proposed_at": PROPOSED,
        "expires_at": EXPIRES,
        "context": CONTEXT,
    }
    fields.update(changes)
    return ApprovalRequest.from_mapping(**fields)  # type: ignore[arg-type]


REQUEST = approval_request()
OPS_BOT = person("ops-bot")
#: Fixed keys of a witness and of the deployment's next log key (C2SP vkeys).
WITNESS_KEY = "witness.example/w1+4984b47f+BFVVHcfurX9U/x2v9w/yzkle4JgiZAHVy+WGwXA7vhkR"
NEXT_LOG_KEY = "keyquorum/acme-prod+c9c70148+Ac+USs61g6ANmCrp0qmj4zMJP9DB+ejOuDA7tIV6wmn8"
NEW_ROSTER = (*ROSTER_NOW[:2], *ROSTER_NOW[4:], HENRY, ZOE)
#: One request per operation: the statement each renders is pinned in tests/golden/.
OPERATION_REQUESTS: dict[str, ApprovalRequest] = {
    "create-tenant": approval_request(
        operation="create-tenant", parameters={"tenant": "acme-health"}
    ),
    "activate-tenant": REQUEST,
    "rotate-tenant": approval_request(
        operation="rotate-tenant", parameters={"tenant": "acme-health"}
    ),
    "destroy-tenant": approval_request(
        operation="destroy-tenant", parameters={"tenant": "acme-health"}
    ),
    "grant": approval_request(
        operation="grant", parameters={"backend": "booking", "tenant": "acme-health"}
    ),
    "revoke": approval_request(
        operation="revoke",
        parameters={"backend": "booking", "tenant": "acme-health"},
        context=dataclasses.replace(CONTEXT, approvals_needed=1),
    ),
    "deactivate-tenant": approval_request(
        operation="deactivate-tenant",
        parameters={"tenant": "acme-health"},
        context=dataclasses.replace(CONTEXT, approvals_needed=1),
    ),
    "disable-version": approval_request(
        operation="disable-version",
        parameters={"tenant": "acme-health", "version": 2},
        context=dataclasses.replace(CONTEXT, approvals_needed=1),
    ),
    "cancel-destroy": approval_request(
        operation="cancel-destroy",
        parameters={"tenant": "acme-health"},
        context=dataclasses.replace(CONTEXT, approvals_needed=1),
    ),
    "change-roster": approval_request(
        operation="change-roster",
        parameters={"threshold": 4, "roster": ",".join(p.fingerprint for p in NEW_ROSTER)},
        context=dataclasses.replace(CONTEXT, newcomers=(HENRY, ZOE)),
    ),
    "add-proposer": approval_request(
        operation="add-proposer", parameters={"name": "ops-bot", "proposer": OPS_BOT.fingerprint}
    ),
    "remove-proposer": approval_request(
        operation="remove-proposer",
        parameters={"name": "ops-bot", "proposer": OPS_BOT.fingerprint},
        context=dataclasses.replace(CONTEXT, approvals_needed=1),
    ),
    "add-witness": approval_request(
        operation="add-witness", parameters={"witness": WITNESS_KEY, "witness_threshold": 1}
    ),
    "remove-witness": approval_request(
        operation="remove-witness", parameters={"witness": WITNESS_KEY, "witness_threshold": 0}
    ),
    "rotate-log-key": approval_request(
        operation="rotate-log-key", parameters={"log_key": NEXT_LOG_KEY}
    ),
    "approve-restore": approval_request(
        operation="approve-restore",
        parameters={"restored_size": 40, "abandoned_size": 57, "abandoned_root": "5f" * 32},
    ),
}
SEAL_TIME = 1_795_649_400  # 2026-11-25 19:30:00 UTC
OWN_STATEMENTS: dict[str, Statement] = {
    "confirm-share": statements.confirm_share_statement(
        deployment="acme-prod", custodian=ROSTER_NOW[2], split_id=bytes(range(16)), index=3
    ),
    "unseal-share": statements.unseal_share_statement(
        deployment="acme-prod",
        custodian=ROSTER_NOW[2],
        replica="kq-1",
        session=bytes(range(16, 32)),
        session_log_size=7,
        split_id=bytes(range(16)),
        index=3,
        ciphertext_sha256=bytes(range(32)),
    ),
    "unseal-reset": statements.unseal_reset_statement(
        deployment="acme-prod",
        custodian=ROSTER_NOW[1],
        replica="kq-1",
        session=bytes(range(16, 32)),
        session_log_size=7,
        requested_at=SEAL_TIME,
    ),
    "seal": statements.seal_statement(
        deployment="acme-prod",
        custodian=ROSTER_NOW[0],
        replica="kq-1",
        reason="suspected compromise",
        requested_at=SEAL_TIME,
    ),
    "seal-every-replica": statements.seal_statement(
        deployment="acme-prod",
        custodian=ZOE,
        replica="*",
        reason="laptop stolen",
        requested_at=SEAL_TIME,
    ),
    "propose": statements.proposal_statement(
        deployment="acme-prod",
        proposer=OPS_BOT,
        proposal_id=PROPOSAL,
        operation="activate-tenant",
        parameters={"tenant": "acme-health", "duration_seconds": 28800},
        expires_at=EXPIRES,
    ),
}
