"""What custodians do to a daemon: ceremony, unseal, propose, approve, a whole quorum.

The steps most daemon tests start with, driven over the real custodian gRPC
API with the CLI's own actions (`keyquorum.cli.custodian_actions`), so a
test that sets up tenants goes through the same quorum a deployment does.
"""

from __future__ import annotations

from keyquorum.cli import custodian_actions as actions
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    InProcessDaemon,
    ceremony_request,
    signed_proposal,
)

#: The threshold of the test deployments: 5 of the 7 custodians of `harness.NAMES`.
K = 5
TENANT = "acme-health"


def ceremony(d: InProcessDaemon, custodians: list[Custodian]) -> None:
    # A daemon process (tests/test_grpcurl.py) printed its own one-time code.
    proc = getattr(d, "proc", None)
    code = CEREMONY_CODE if proc is None else proc.ceremony_code()
    d.stub.InitCeremony(ceremony_request("test-deployment", K, custodians, code))
    d.proposer = custodians[0].credential


def unseal(d: InProcessDaemon, custodians: list[Custodian]) -> None:
    for c in custodians:
        progress = actions.submit_share(d.stub, c.credential)
    assert not progress.sealed


def propose(d: InProcessDaemon, op: str, expires_in: int = 0, **params: object) -> pb.Proposal:
    assert d.proposer is not None
    return d.stub.Propose(
        signed_proposal(
            d.stub,
            d.proposer,
            op,
            {k: str(v) for k, v in params.items()},
            expires_in=expires_in or None,
            now=d.clock() if hasattr(d, "clock") else None,
        )
    )


def approve(d: InProcessDaemon, c: Custodian, pid: str, **kw: object) -> pb.VerdictResponse:
    return actions.verdict(
        d.stub,
        pid,
        c.fingerprint,
        lambda _text: c.credential,
        verdict="approve",
        **kw,  # type: ignore[arg-type]
    )


def run(
    d: InProcessDaemon, custodians: list[Custodian], op: str, **params: object
) -> pb.VerdictResponse:
    """Propose and approve by as many custodians as the operation needs."""
    p = propose(d, op, **params)
    for c in custodians[: p.required]:
        response = approve(d, c, p.id)
    assert response.executed
    return response


def quorum(
    stub: pb_grpc.CustodianServiceStub,
    custodians: list[Custodian],
    operation: str,
    params: dict[str, str | int],
    *,
    proposer: Custodian | None = None,
    now: int | None = None,
) -> pb.VerdictResponse:
    """Over `stub` (a daemon process, say): propose signed, approve as needed; the last answer."""
    signer = (proposer or custodians[0]).credential
    p = stub.Propose(signed_proposal(stub, signer, operation, params, now=now))
    for c in custodians[: p.required]:
        answer = actions.verdict(stub, p.id, c.fingerprint, lambda _t, c=c: c.credential,
                                 verdict="approve")  # fmt: skip
    assert answer.executed
    return answer


def run_one(d: InProcessDaemon, custodians: list[Custodian], pid: str) -> None:
    """Execute proposal `pid`, which needs one approval, by the last custodian's."""
    assert approve(d, custodians[6], pid).executed


def key_bytes(d: InProcessDaemon, tenant: str = TENANT, version: int | None = None) -> bytes:
    """A copy of the daemon's tenant key (version `version`, else the newest)."""
    _version, key = d.daemon.tenant_key(tenant, version)
    with key:
        return key.reveal()


def zeroed(buffers: list[bytearray]) -> bool:
    return all(buf == bytearray(len(buf)) for buf in buffers)
