"""`keyquorum ceremony init` and `keyquorum status`."""

from __future__ import annotations

from pathlib import Path

import click

from keyquorum.cli.connect import endpoint_options, make_endpoint, open_channel, rpc_errors
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc


@click.group()
def ceremony() -> None:
    """The one-time init ceremony."""


@ceremony.command("init")
@endpoint_options
@click.option("--deployment", required=True, help="Deployment name, e.g. acme-prod.")
@click.option("--threshold", default=5, show_default=True, help="Shares needed to unseal (k).")
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
    public_credentials: tuple[Path, ...],
) -> None:
    """Create the master key inside the daemon and split it among custodians.

    Give the custodians' public credential files in share-index order. The
    daemon generates the master key, encrypts one share to each custodian,
    logs the genesis entry and forgets the key. Each custodian then runs
    `keyquorum custodian confirm`.

    \b
    Example:
      keyquorum ceremony init --deployment acme-prod --threshold 5 \\
          alice.pub.json bob.pub.json ... grace.pub.json
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    request = pb.InitCeremonyRequest(
        deployment=deployment,
        threshold=threshold,
        public_credentials=[p.read_bytes() for p in public_credentials],
    )
    with open_channel(endpoint) as channel, rpc_errors():
        result = pb_grpc.CustodianServiceStub(channel).InitCeremony(request)
    click.echo(f"deployment {deployment}: {threshold} of {len(result.roster)} custodians")
    click.echo(f"master key commitment: {result.master_key_commitment}")
    for c in result.roster:
        click.echo(f"  share {c.share_index}: {c.name} {c.fingerprint[:16]}")
    click.echo("each custodian now runs: keyquorum custodian confirm")


@click.command("status")
@endpoint_options
def status(server: str, ca: Path | None, insecure_dev_plaintext: bool) -> None:
    """Show whether the daemon is sealed, unseal progress and the ceremony.

    \b
    Example:
      keyquorum status --server kq.example:7443 --ca ca.crt
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    with open_channel(endpoint) as channel, rpc_errors():
        s = pb_grpc.CustodianServiceStub(channel).GetStatus(pb.GetStatusRequest())
    if not s.initialized:
        click.echo("not initialised: run `keyquorum ceremony init`")
        return
    state = "SEALED" if s.sealed else "UNSEALED"
    click.echo(f"deployment {s.deployment}, replica {s.replica}: {state}")
    if s.sealed:
        click.echo(f"unseal progress: {s.unseal_progress} of {s.threshold}")
    click.echo(f"ceremony confirmed by {s.confirmed_count} of {s.custodian_count}")
    click.echo(f"log size: {s.log_size}")
    for c in s.roster:
        mark = "confirmed" if c.confirmed else "not confirmed"
        click.echo(f"  share {c.share_index}: {c.name} {c.fingerprint[:16]} ({mark})")
