"""`keyquorum proposal ...` and `keyquorum tenant list`: quorum operations.

A proposal is signed by its proposer: a custodian on the roster, or a
proposer credential the quorum registered (`add-proposer`; a proposer
makes one with `keyquorum custodian new`, the same file format). It
changes nothing until custodians sign it (`keyquorum custodian approve
ID`), k of them for an operation that widens exposure, one for one that
narrows it. The proposal and every verdict are in the quorum log.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import click

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli import display
from keyquorum.cli.connect import endpoint_options, make_endpoint, open_channel, rpc_errors
from keyquorum.cli.output import document, emit, json_option, person
from keyquorum.cli.passphrase import passphrase_options, read_passphrase
from keyquorum.quorum import canonical, people
from keyquorum.quorum.credentials import CustodianCredential, PublicCredential
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError
from keyquorum.quorum.operations import OPERATIONS
from keyquorum.quorum.statements import ApprovalContext, Person, render_time
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `30m`, `24h` or `7d`."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidInputError(f"not a duration: {text!r} (e.g. 3600, 30m, 24h, 7d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidInputError(f"--param must be KEY=VALUE, got {text!r}")
    return key, value


def describe(p: pb.Proposal) -> list[str]:
    """A proposal in a few lines, for people."""
    known = _people(p)
    named = {x.key: x.value for x in p.parameters}.get("name", "")
    params = ", ".join(
        f"{x.key}={_shown_value(x.key, x.value, known, named)}" for x in p.parameters
    )
    lines = [
        f"proposal {p.id}: {p.operation} ({params})",
        f"  status:    {p.status}; approvals {len(p.approved_by)} of {p.required}"
        + (f", refusals {len(p.refused_by)}" if p.refused_by else ""),
        f"  proposed:  at log position {p.log_position}, {render_time(p.proposed_at)}, "
        f"by {_proposer(p)} (signed)",
        f"  expires:   {render_time(p.expires_at)}",
    ]
    if p.status == "executed":
        lines.append(f"  executed:  entry {p.executed_seq}: {describe_result(p)}")
    return lines


def _proposer(p: pb.Proposal) -> str:
    """The proposer in the people's form (a custodian or a registered proposer)."""
    try:
        if p.proposer_name:
            return people.label(p.proposer_name, p.proposer)
        return people.display_fingerprint(p.proposer)
    except InvalidInputError:
        return "?"


def _shown_value(key: str, value: str, known: dict[str, Person], name: str) -> str:
    """A parameter for people: fingerprints in the people's form, with names where known.

    A roster names its custodians from the proposal's context; the proposer
    of add-proposer / remove-proposer by the `name` parameter beside it.
    """
    try:
        if key == "roster":
            return "[" + ", ".join(_who(known, f) for f in value.split(",")) + "]"
        if key == "proposer":
            return people.label(name, value) if name else people.display_fingerprint(value)
    except InvalidInputError:
        return value
    return value


def _people(p: pb.Proposal) -> dict[str, Person]:
    """Everyone the proposal's context names (roster at the proposal, newcomers)."""
    try:
        context = ApprovalContext.from_json(canonical.decode(p.context))
    except KeyquorumError:
        return {}
    return {x.fingerprint: x for x in (*context.roster, *context.newcomers)}


def _who(known: dict[str, Person], fingerprint: str) -> str:
    found = known.get(fingerprint)
    if found is not None:
        return found.label
    try:
        return f"? ({people.display_fingerprint(fingerprint)})"
    except InvalidInputError:
        return "?"


def proposal_document(p: pb.Proposal) -> dict[str, Any]:
    """One proposal for machines (docs/schemas/proposal.schema.json)."""
    known = _people(p)
    names = {fp: x.name for fp, x in known.items()}
    result = canonical.decode(p.result) if p.result else None
    return {
        "id": p.id,
        "deployment": p.deployment,
        "operation": p.operation,
        "parameters": {x.key: x.value for x in p.parameters},
        "log_position": p.log_position,
        "proposed_at": p.proposed_at,
        "expires_at": p.expires_at,
        "proposer": person(p.proposer_name or "?", p.proposer),
        "status": p.status,
        "required": p.required,
        "approved_by": [person(names.get(fp, "?"), fp) for fp in p.approved_by],
        "refused_by": [person(names.get(fp, "?"), fp) for fp in p.refused_by],
        "approve_statement": p.approve_statement,
        "refuse_statement": p.refuse_statement,
        "executed_seq": p.executed_seq if p.status == "executed" else None,
        "result": result if isinstance(result, dict) else None,
    }


def describe_result(p: pb.Proposal) -> str:
    """The logged result, without the bulky parts (wrapped keys, shares)."""
    if not p.result:
        return "-"
    result = canonical.decode(p.result)
    if not isinstance(result, dict):
        return "-"
    shown = {
        k: v
        for k, v in result.items()
        if k not in ("wrapped_key", "encrypted_shares", "rewrapped", "roster", "split")
    }
    proposer = shown.get("proposer")
    try:
        if isinstance(proposer, dict):  # add-proposer: the registered credential
            shown["proposer"] = PublicCredential.from_json(proposer).label
        elif isinstance(proposer, str):  # remove-proposer: its fingerprint
            shown["proposer"] = people.display_fingerprint(proposer)
    except KeyquorumError:
        shown["proposer"] = "?"
    for key in ("active_until", "destroy_at"):
        value = shown.get(key)
        if isinstance(value, int):
            shown[key] = render_time(value)
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))


@click.group()
def proposal() -> None:
    """Propose quorum operations and look at proposals."""


@proposal.command("new")
@endpoint_options
@click.argument("operation", type=click.Choice(sorted(OPERATIONS)))
@click.option(
    "--param", "params", multiple=True, metavar="KEY=VALUE", help="An operation parameter."
)
@click.option(
    "--expires-in",
    default=None,
    metavar="DURATION",
    help="e.g. 30m, 24h (default and maximum: the deployment's proposal TTL).",
)
@click.option(
    "--credential",
    "credential_path",
    required=True,
    envvar="KEYQUORUM_CREDENTIAL",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your credential (a custodian's, or a proposer's the quorum registered); its "
    "public file must sit beside it (env KEYQUORUM_CREDENTIAL).",
)
@passphrase_options
@click.option(
    "--roster-file",
    "roster_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="change-roster: the new roster's public credential files, in share-index order.",
)
@click.option(
    "--proposer-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="add-proposer: the public credential file of the proposer to register.",
)
def new(
    server: str,
    ca: Path | None,
    insecure_dev_plaintext: bool,
    operation: str,
    params: tuple[str, ...],
    expires_in: str | None,
    credential_path: Path,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    roster_files: tuple[Path, ...],
    proposer_file: Path | None,
) -> None:
    """Propose OPERATION, signed; prints its id and the statement custodians will sign.

    The exact `propose` statement is printed first; your passphrase is
    asked only after it.

    \b
    Operations (approvals needed):
      create-tenant     tenant                      k
      activate-tenant   tenant, duration_seconds    k
      rotate-tenant     tenant                      k
      destroy-tenant    tenant                      k  (shredded after the wait)
      grant             backend, tenant             k
      change-roster     threshold, roster           k  (--roster-file ...)
      add-proposer      proposer, name              k  (--proposer-file ...)
      add-witness       witness, witness_threshold  k  (a cosigner key, m after)
      remove-witness    witness, witness_threshold  k
      rotate-log-key    log_key                     k  (admin log-key next)
      approve-restore   restored_size, abandoned_size, abandoned_root
                                                    k  (admin restore prints them)
      deactivate-tenant tenant                      1
      disable-version   tenant, version             1
      cancel-destroy    tenant                      1
      revoke            backend, tenant             1
      remove-proposer   proposer, name              1  (the name it was registered as)

    \b
    Examples:
      keyquorum proposal new create-tenant --param tenant=acme-health \\
          --credential ~/.keyquorum/alice.kqcred
      keyquorum proposal new grant --param tenant=acme-health \\
          --param backend=keyquorum://backend/booking --credential ops-bot.kqcred
      keyquorum proposal new activate-tenant --param tenant=acme-health \\
          --param duration_seconds=28800 --expires-in 2h --credential ops-bot.kqcred
      keyquorum proposal new add-witness --param witness='witness.example/w1+...' \\
          --param witness_threshold=1 --credential ~/.keyquorum/alice.kqcred
    """
    pairs = [parse_param(p) for p in params]
    credentials = [f.read_bytes() for f in roster_files]
    if roster_files:
        if operation != "change-roster":
            raise InvalidInputError("--roster-file is for change-roster")
        if any(k == "roster" for k, _ in pairs):
            raise InvalidInputError("give the roster as --roster-file or --param roster, not both")
        fingerprints = [PublicCredential.from_bytes(c).fingerprint for c in credentials]
        pairs.append(("roster", ",".join(fingerprints)))
    if proposer_file is not None:
        if operation != "add-proposer":
            raise InvalidInputError("--proposer-file is for add-proposer")
        added = PublicCredential.from_bytes(proposer_file.read_bytes())
        pairs += [("proposer", added.fingerprint), ("name", added.name)]
        credentials.append(proposer_file.read_bytes())
    from keyquorum.cli.custodian import public_for

    public = public_for(credential_path)

    def unlock(statement: str) -> CustodianCredential:
        for line in display.statement_block(statement, heading="Signing exactly this statement"):
            click.echo(line, err=True)
        data = credential_path.read_bytes()
        with read_passphrase(
            file=passphrase_file, fd=passphrase_fd, prompt=f"Passphrase for {credential_path.name}"
        ) as passphrase:
            return CustodianCredential.decrypt(data, passphrase)

    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    with open_channel(endpoint) as channel:
        p = actions.propose(
            pb_grpc.CustodianServiceStub(channel),
            public,
            unlock,
            operation,
            pairs,
            now=int(time.time()),
            expires_in=None if expires_in is None else parse_duration(expires_in),
            public_credentials=credentials,
        )
    for line in describe(p):
        click.echo(line)
    click.echo("")
    click.echo("Custodians approve it with: keyquorum custodian approve " + p.id)
    for line in display.statement_block(
        p.approve_statement, heading="They will sign exactly this statement"
    ):
        click.echo(line)


@proposal.command("list")
@endpoint_options
@click.option("--all", "include_closed", is_flag=True, help="Also executed, cancelled, expired.")
@json_option
def list_cmd(
    server: str, ca: Path | None, insecure_dev_plaintext: bool, include_closed: bool, as_json: bool
) -> None:
    """List proposals open for approval (or all of them).

    \b
    Example:
      keyquorum proposal list --server kq.example:7443 --ca ca.crt --all
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    with open_channel(endpoint) as channel, rpc_errors():
        response = pb_grpc.CustodianServiceStub(channel).ListProposals(
            pb.ListProposalsRequest(include_closed=include_closed)
        )
    if as_json:
        proposals = [proposal_document(p) for p in response.proposals]
        emit(document("proposals", include_closed=include_closed, proposals=proposals))
        return
    if not response.proposals:
        click.echo("no proposals" if include_closed else "no open proposals")
    for p in response.proposals:
        click.echo(describe(p)[0])
        click.echo(f"  {p.status}: {len(p.approved_by)} of {p.required} approvals")


@proposal.command("show")
@endpoint_options
@click.argument("proposal_id")
@json_option
def show(
    server: str, ca: Path | None, insecure_dev_plaintext: bool, proposal_id: str, as_json: bool
) -> None:
    """Show one proposal and the exact statement an approval signs.

    \b
    Example:
      keyquorum proposal show 3f2a9c0e5d7b41a68c2e0f1b9d3a7c55 --server kq.example:7443 \\
          --ca ca.crt
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    with open_channel(endpoint) as channel, rpc_errors():
        p = pb_grpc.CustodianServiceStub(channel).GetProposal(
            pb.GetProposalRequest(id=proposal_id.lower())
        )
    if as_json:
        emit(document("proposal", proposal=proposal_document(p)))
        return
    for line in describe(p):
        click.echo(line)
    known = _people(p)
    for who in p.approved_by:
        click.echo(f"  approved by {_who(known, who)}")
    for who in p.refused_by:
        click.echo(f"  refused by  {_who(known, who)}")
    click.echo("")
    for line in display.statement_block(
        p.approve_statement, heading="Statement signed to approve it"
    ):
        click.echo(line)


@click.group()
def tenant() -> None:
    """Tenants as the quorum log records them."""


@tenant.command("list")
@endpoint_options
@json_option
def tenant_list(server: str, ca: Path | None, insecure_dev_plaintext: bool, as_json: bool) -> None:
    """List tenants: versions, activation, grants, destruction.

    \b
    Example:
      keyquorum tenant list --server kq.example:7443 --ca ca.crt
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    with open_channel(endpoint) as channel, rpc_errors():
        response = pb_grpc.CustodianServiceStub(channel).ListTenants(pb.ListTenantsRequest())
    if as_json:
        emit(document("tenants", tenants=[_tenant_document(t) for t in response.tenants]))
        return
    if not response.tenants:
        click.echo("no tenants")
    for t in response.tenants:
        if t.destroyed:
            state = "DESTROYED (shredded)"
        elif t.destroy_at:
            state = f"scheduled for destruction at {render_time(t.destroy_at)}"
        elif t.active_until:
            held = "key unwrapped" if t.unwrapped else "key NOT unwrapped here (sealed?)"
            state = f"ACTIVE until {render_time(t.active_until)}, {held}"
        else:
            state = "not active"
        click.echo(f"{t.name}: {state}")
        disabled = f" (disabled: {', '.join(map(str, t.disabled_versions))})"
        click.echo(f"  versions: {t.versions}" + (disabled if t.disabled_versions else ""))
        backends = ", ".join(f"keyquorum://backend/{b}" for b in t.backends) or "none"
        click.echo(f"  granted:  {backends}")


def _tenant_document(t: pb.Tenant) -> dict[str, Any]:
    return {
        "name": t.name,
        "versions": t.versions,
        "disabled_versions": list(t.disabled_versions),
        "active_until": t.active_until or None,
        "unwrapped": t.unwrapped,
        "destroy_at": t.destroy_at or None,
        "destroyed": t.destroyed,
        "backends": list(t.backends),
    }
