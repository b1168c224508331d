"""`keyquorum ceremony init` and `keyquorum status`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from keyquorum.cli.connect import (
    Endpoint,
    endpoint_options,
    make_endpoint,
    open_channel,
    replica_endpoint_options,
    rpc_errors,
)
from keyquorum.cli.output import document, emit, json_option, person
from keyquorum.cli.sessions import session_lines
from keyquorum.quorum import people
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc


@click.group()
def ceremony() -> None:
    """The one-time init ceremony."""


@ceremony.command("init")
@endpoint_options
@click.option("--deployment", required=True, help="Deployment name, e.g. acme-prod.")
@click.option("--threshold", default=5, show_default=True, help="Shares needed to unseal (k).")
@click.option(
    "--code",
    envvar="KEYQUORUM_CEREMONY_CODE",
    default="",
    help="The one-time code `keyquorum server run` printed at start (env "
    "KEYQUORUM_CEREMONY_CODE); not needed if the daemon was started with this roster.",
)
@click.argument(
    "public_credentials",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
def init(
    server: str,
    ca: Path | None,
    insecure_dev_plaintext: bool,
    deployment: str,
    threshold: int,
    code: str,
    public_credentials: tuple[Path, ...],
) -> None:
    """Create the master key inside the daemon and split it among custodians.

    Give the custodians' public credential files in share-index order, and
    the one-time code the daemon printed when it started (whoever reaches a
    fresh daemon without it is refused). The daemon generates the master
    key, encrypts one share to each custodian, logs the genesis entry and
    forgets the key. This machine pins the deployment's log key and
    remembers the checkpoint of the genesis. Each custodian then runs
    `keyquorum custodian confirm`.

    \b
    Example:
      keyquorum ceremony init --deployment acme-prod --threshold 5 \\
          --code K7QM-3FZ2-... alice.pub.json bob.pub.json ... grace.pub.json
    """
    # Here, not at the top: `status` shares this module and imports no crypto.
    from keyquorum.cli import seen_checkpoints
    from keyquorum.quorum.log import GenesisPayload

    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    request = pb.InitCeremonyRequest(
        deployment=deployment,
        threshold=threshold,
        public_credentials=[p.read_bytes() for p in public_credentials],
        code=code,
    )
    with open_channel(endpoint) as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        with rpc_errors():
            result = stub.InitCeremony(request)
        seen_checkpoints.remember_entry(
            stub,
            0,
            lambda e: isinstance(e.payload, GenesisPayload) and e.payload.deployment == deployment,
        )
    click.echo(f"deployment {deployment}: {threshold} of {len(result.roster)} custodians")
    click.echo(f"master key commitment: {result.master_key_commitment}")
    for c in result.roster:
        click.echo(f"  share {c.share_index}: {people.label(c.name, c.fingerprint)}")
    click.echo("each custodian now runs: keyquorum custodian confirm")


@click.command("status")
@replica_endpoint_options("for several replicas")
@json_option
def status(
    servers: tuple[str, ...], ca: Path | None, insecure_dev_plaintext: bool, as_json: bool
) -> None:
    """Show whether the daemon is sealed, unseal progress, the roster and the log key.

    While sealed: the open unseal session, who has submitted a share and
    when, when the session expires (UTC), and how the session before it
    ended if it did not unseal (expired, reset or ended by a seal). With
    several --server, each replica's state; one that cannot be reached is
    reported and the exit code is 3 (1 when none answered).

    \b
    Example:
      keyquorum status --server kq.example:7443 --ca ca.crt
      keyquorum status --server kq.example:7443 --ca ca.crt --json
      keyquorum status --server kq-1.example:7443 --server kq-2.example:7443 --ca ca.crt
    """
    if len(set(servers)) != len(servers):
        raise InvalidInputError("the same --server is given twice")
    endpoints = [make_endpoint(server, ca, insecure_dev_plaintext) for server in servers]
    if len(endpoints) == 1:
        s = _fetch(endpoints[0])
        if as_json:
            emit(status_document(s))
        else:
            for line in status_lines(s):
                click.echo(line)
        return
    answers: list[tuple[str, pb.Status | None, str]] = []
    for endpoint in endpoints:
        try:
            answers.append((endpoint.target, _fetch(endpoint), ""))
        except KeyquorumError as e:
            answers.append((endpoint.target, None, str(e)))
    if as_json:
        emit(
            document(
                "status-replicas",
                replicas=[
                    {
                        "server": target,
                        "status": None if answer is None else status_document(answer),
                        "error": error or None,
                    }
                    for target, answer, error in answers
                ],
            )
        )
    else:
        for n, (target, answer, error) in enumerate(answers):
            if n:
                click.echo("")
            click.echo(f"== {target}")
            shown = [f"UNREACHABLE: {error}"] if answer is None else status_lines(answer)
            for line in shown:
                click.echo(line)
    failed = sum(answer is None for _t, answer, _e in answers)
    if failed:
        raise SystemExit(1 if failed == len(answers) else 3)


def _fetch(endpoint: Endpoint) -> pb.Status:
    with open_channel(endpoint) as channel, rpc_errors():
        return pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest())


def status_lines(s: pb.Status) -> list[str]:
    """`status` as text: the state, the unseal session while sealed, the roster."""
    if not s.initialized:
        return ["not initialised: run `keyquorum ceremony init`"]
    state = "SEALED" if s.sealed else "UNSEALED"
    lines = [f"deployment {s.deployment}, replica {s.replica}: {state}"]
    if s.sealed:
        lines.append(f"unseal progress: {s.unseal_progress} of {s.threshold}")
        lines.extend(session_lines(s))
    lines += [
        f"ceremony confirmed by {s.confirmed_count} of {s.custodian_count}",
        f"log size: {s.log_size}",
        f"log key: {s.log_key}",
        f"roster: {s.threshold} of {s.custodian_count} custodians unseal",
    ]
    for c in s.roster:
        mark = "confirmed" if c.confirmed else "not confirmed"
        lines.append(f"  share {c.share_index}: {people.label(c.name, c.fingerprint)}, {mark}")
    return lines


def _submitted(shares: Sequence[pb.SubmittedShare]) -> list[dict[str, Any]]:
    return [
        {
            "share_index": x.share_index,
            "submitted_at": x.submitted_at,
            **person(x.name, x.fingerprint),
        }
        for x in shares
    ]


def status_document(s: pb.Status) -> dict[str, Any]:
    """`status --json` (docs/schemas/status.schema.json)."""
    session = None
    if s.HasField("unseal_session"):
        u = s.unseal_session
        session = {
            "session_id": u.session_id,
            "opened_at": u.opened_at,
            "expires_at": u.expires_at,
            "log_size": u.log_size,
            "submitted": _submitted(u.submitted),
        }
    previous = None
    if s.HasField("previous_unseal_session"):
        p = s.previous_unseal_session
        previous = {
            "session_id": p.session_id,
            "opened_at": p.opened_at,
            "ended_at": p.ended_at,
            "how": p.how,
            "reset_by": person(p.reset_by_name, p.reset_by) if p.how == "reset" else None,
            "submitted": _submitted(p.submitted),
        }
    return document(
        "status",
        initialized=s.initialized,
        sealed=s.sealed,
        deployment=s.deployment,
        replica=s.replica,
        threshold=s.threshold,
        custodian_count=s.custodian_count,
        unseal_progress=s.unseal_progress,
        unseal_session=session,
        previous_unseal_session=previous,
        confirmed_count=s.confirmed_count,
        log_size=s.log_size,
        log_key=s.log_key,
        checkpoint=s.checkpoint,
        roster=[
            {
                "share_index": c.share_index,
                "confirmed": c.confirmed,
                **person(c.name, c.fingerprint),
            }
            for c in s.roster
        ],
    )
