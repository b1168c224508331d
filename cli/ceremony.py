"""`keyquorum ceremony init` and `keyquorum status`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from keyquorum.cli.connect import endpoint_options, make_endpoint, open_channel, rpc_errors
from keyquorum.cli.output import document, emit, json_option, person
from keyquorum.quorum import people
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
@endpoint_options
@json_option
def status(server: str, ca: Path | None, insecure_dev_plaintext: bool, as_json: bool) -> None:
    """Show whether the daemon is sealed, unseal progress, the roster and the log key.

    \b
    Example:
      keyquorum status --server kq.example:7443 --ca ca.crt
      keyquorum status --server kq.example:7443 --ca ca.crt --json
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    with open_channel(endpoint) as channel, rpc_errors():
        s = pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest())
    if as_json:
        emit(status_document(s))
        return
    if not s.initialized:
        click.echo("not initialised: run `keyquorum ceremony init`")
        return
    state = "SEALED" if s.sealed else "UNSEALED"
    click.echo(f"deployment {s.deployment}, replica {s.replica}: {state}")
    if s.sealed:
        click.echo(f"unseal progress: {s.unseal_progress} of {s.threshold}")
    click.echo(f"ceremony confirmed by {s.confirmed_count} of {s.custodian_count}")
    click.echo(f"log size: {s.log_size}")
    click.echo(f"log key: {s.log_key}")
    click.echo(f"roster: {s.threshold} of {s.custodian_count} custodians unseal")
    for c in s.roster:
        mark = "confirmed" if c.confirmed else "not confirmed"
        click.echo(f"  share {c.share_index}: {people.label(c.name, c.fingerprint)}, {mark}")


def status_document(s: pb.Status) -> dict[str, Any]:
    """`status --json` (docs/schemas/status.schema.json)."""
    return document(
        "status",
        initialized=s.initialized,
        sealed=s.sealed,
        deployment=s.deployment,
        replica=s.replica,
        threshold=s.threshold,
        custodian_count=s.custodian_count,
        unseal_progress=s.unseal_progress,
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
