"""`keyquorum custodian ...`: what a custodian runs on their own machine."""

from __future__ import annotations

import hmac
import time
from pathlib import Path

import click

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli import display, seen_checkpoints
from keyquorum.cli import unseal as unseal_flow
from keyquorum.cli.connect import (
    endpoint_options,
    make_endpoint,
    open_channel,
    replica_endpoint_options,
)
from keyquorum.cli.files import replace_atomically, write_new
from keyquorum.cli.output import document, emit, json_option, person
from keyquorum.cli.passphrase import check_strength, passphrase_options, read_passphrase
from keyquorum.cli.proposal import describe_result
from keyquorum.quorum.credentials import CustodianCredential, PublicCredential
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError, StateError, with_context
from keyquorum.quorum.log import (
    ApprovalPayload,
    ConfirmPayload,
    Entry,
    RefusalPayload,
    SealPayload,
)
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

PRIVATE_SUFFIX = ".kqcred"
PUBLIC_SUFFIX = ".pub.json"


def credential_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--credential",
        "credential_path",
        required=True,
        envvar="KEYQUORUM_CREDENTIAL",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=f"Your private credential file (*{PRIVATE_SUFFIX}; env KEYQUORUM_CREDENTIAL).",
    )(f)


def public_for(private_path: Path) -> PublicCredential:
    """The public credential file written beside a private one by `custodian new`."""
    name = private_path.name.removesuffix(PRIVATE_SUFFIX)
    public_path = private_path.with_name(name + PUBLIC_SUFFIX)
    if not public_path.exists():
        raise InvalidInputError(
            f"{public_path} is missing: keep the public file beside the private one"
        )
    return PublicCredential.from_bytes(public_path.read_bytes())


def _unlocker(
    path: Path, passphrase_file: Path | None, passphrase_fd: int | None
) -> actions.Unlock:
    def unlock(statement: str) -> CustodianCredential:
        if display.is_statement(statement):
            for line in display.statement_block(
                statement, heading="You are about to sign exactly this statement"
            ):
                click.echo(line, err=True)
        else:
            click.echo(statement, err=True)
        data = path.read_bytes()
        with read_passphrase(
            file=passphrase_file, fd=passphrase_fd, prompt=f"Passphrase for {path.name}"
        ) as passphrase:
            return CustodianCredential.decrypt(data, passphrase)

    return unlock


def witness_wait_option(f: click.decorators.FC) -> click.decorators.FC:
    return click.option(
        "--witness-wait",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        help="Seconds to wait for the deployment's witnesses to cosign the log this "
        "signature is about; nothing is signed over a log fewer than m witnesses cosigned.",
    )(f)


def _show_signing(statement: str) -> None:
    for line in display.statement_block(statement, heading="Signing exactly this statement"):
        click.echo(line, err=True)


@click.group()
def custodian() -> None:
    """Custodian credentials, share confirmation, unseal, seal, approvals."""


@custodian.command("new")
@click.option("--name", required=True, help="Your name as the roster will show it.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    show_default=True,
    help="Directory for the two files.",
)
@passphrase_options
def new(name: str, out_dir: Path, passphrase_file: Path | None, passphrase_fd: int | None) -> None:
    """Make a new custodian credential on this machine.

    Writes NAME.kqcred (private, encrypted under your passphrase with
    Argon2id and AES-256-GCM, mode 0600) and NAME.pub.json (public: send it
    to whoever runs the ceremony). Compare the fingerprint aloud.

    The passphrase needs at least 12 characters and must not be easy to
    guess (several unrelated words work well); see docs/credentials.md.

    \b
    Example:
      keyquorum custodian new --name alice --out ~/.keyquorum
    """
    if not name or any(c in name for c in "/\\\x00") or name.startswith("."):
        raise InvalidInputError(f"{name!r} cannot be used as a file name")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path = out_dir / f"{name}{PRIVATE_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_SUFFIX}"
    for p in (private_path, public_path):
        if p.exists():
            raise StateError(f"{p} exists; refusing to overwrite a credential")
    credential = CustodianCredential.generate(name)
    with read_passphrase(
        file=passphrase_file, fd=passphrase_fd, prompt="New passphrase", confirm=True
    ) as passphrase:
        check_strength(passphrase, name=name)
        blob = credential.encrypt(passphrase)
    public = credential.public()
    write_new(private_path, blob, 0o600)
    write_new(public_path, public.to_bytes(), 0o644)
    click.echo(f"private credential: {private_path}")
    click.echo(f"public credential:  {public_path}")
    click.echo(f"fingerprint:        {public.short_fingerprint}")


@custodian.command("passphrase")
@credential_option
@passphrase_options
@click.option(
    "--new-passphrase-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the new passphrase from the first line of this file (automation).",
)
@click.option(
    "--new-passphrase-fd",
    type=int,
    help="Read the new passphrase from this open file descriptor (automation).",
)
def passphrase_cmd(
    credential_path: Path,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    new_passphrase_file: Path | None,
    new_passphrase_fd: int | None,
) -> None:
    """Change the passphrase of your credential file.

    Asks for the current passphrase, then the new one twice. The keys do
    not change (nor your fingerprint): the file is encrypted anew, checked
    to open with the new passphrase, and replaced atomically (a temporary
    file in the same directory, fsync, rename, fsync of the directory), so
    a crash leaves the old file or the new one, never neither.

    \b
    Example:
      keyquorum custodian passphrase --credential ~/.keyquorum/alice.kqcred
    """
    data = credential_path.read_bytes()
    with read_passphrase(
        file=passphrase_file,
        fd=passphrase_fd,
        prompt=f"Current passphrase for {credential_path.name}",
    ) as old:
        credential = CustodianCredential.decrypt(data, old)
        with read_passphrase(
            file=new_passphrase_file, fd=new_passphrase_fd, prompt="New passphrase", confirm=True
        ) as new:
            if hmac.compare_digest(new.reveal(), old.reveal()):
                raise InvalidInputError("the new passphrase is the current one")
            check_strength(new, name=credential.name)
            blob = credential.encrypt(new)
            # Never replace a file by one that does not open with what was just typed.
            if CustodianCredential.decrypt(blob, new).fingerprint != credential.fingerprint:
                raise StateError("the re-encrypted credential does not check: nothing changed")
    replace_atomically(credential_path, blob, 0o600)
    click.echo(f"passphrase changed: {credential_path} (fingerprint {credential.public().label})")


@custodian.command("show")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@json_option
def show(path: Path, as_json: bool) -> None:
    """Show the name and fingerprint of a public credential file.

    The fingerprint is the one read aloud at enrolment and shown beside the
    name everywhere else; `--json` adds the full SHA-256 for machines.

    \b
    Example:
      keyquorum custodian show ~/.keyquorum/alice.pub.json
    """
    public = PublicCredential.from_bytes(path.read_bytes())
    if as_json:
        emit(document("custodian", **person(public.name, public.fingerprint)))
        return
    click.echo(f"name:        {public.name}")
    click.echo(f"fingerprint: {public.short_fingerprint}")
    click.echo(f"shown as:    {public.label}")


@custodian.command("confirm")
@endpoint_options
@credential_option
@passphrase_options
@witness_wait_option
def confirm_cmd(
    server: str,
    ca: Path | None,
    insecure_dev_plaintext: bool,
    credential_path: Path,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    witness_wait: float,
) -> None:
    """Check your share after the ceremony, and log that it checks out.

    Your share is decrypted on this machine and compared with the commitment
    in the log; nothing secret is sent. The log must extend what this
    machine saw, under the pinned log key, and be cosigned by the
    deployment's witnesses; the checkpoint that includes your confirmation
    is remembered.

    \b
    Example:
      keyquorum custodian confirm --server kq.example:7443 --ca ca.crt \\
          --credential ~/.keyquorum/alice.kqcred
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    public = public_for(credential_path)
    fingerprint = public.fingerprint
    with open_channel(endpoint) as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        result = actions.confirm(
            stub,
            public,
            _unlocker(credential_path, passphrase_file, passphrase_fd),
            before_sign=lambda: seen_checkpoints.require_witnessed(stub, 1, wait=witness_wait),
        )
        seen_checkpoints.remember_entry(
            stub,
            result.seq,
            lambda e: isinstance(e.payload, ConfirmPayload) and e.payload.custodian == fingerprint,
        )
    click.echo(
        f"share confirmed; ceremony confirmed by {result.confirmed_count} "
        f"of {result.custodian_count}"
    )


@custodian.command("unseal")
@replica_endpoint_options("to unseal several replicas in one go")
@click.option(
    "--reset",
    is_flag=True,
    help="Discard every share of each replica's open unseal session instead (a signed "
    "request, logged as an unseal-reset entry naming you); the next share starts a new session.",
)
@credential_option
@passphrase_options
@witness_wait_option
def unseal_cmd(
    servers: tuple[str, ...],
    ca: Path | None,
    insecure_dev_plaintext: bool,
    reset: bool,
    credential_path: Path,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    witness_wait: float,
) -> None:
    """Submit your share to unseal the daemon (or several replicas).

    The share is decrypted here, re-encrypted to each daemon's fresh
    unseal-session key (HPKE), and signed; a proxy never sees it. Each
    replica has its own session, so each gets its own encryption and
    signature; the passphrase is asked once.

    Before anything is unlocked, each daemon must show a log under the
    pinned log key that extends the last checkpoint this machine saw for
    the deployment (an RFC 9162 consistency proof), cosigned by the
    deployment's witnesses up to the session; a rolled-back or re-keyed log
    is refused.

    Each replica's session is shown first: who has submitted, when it
    expires, and, if the session before it expired or was reset, that it
    did. With several --server, a replica that cannot be reached or
    refuses is reported and the others still get the share. Exit codes:
    0 every replica accepted (or was already unsealed), 1 none did,
    3 some did (partial; the lines above say which).

    --reset discards each replica's open session instead, by a signed
    request that is logged (an unseal-reset entry the audit report shows).

    \b
    Example:
      keyquorum custodian unseal --server kq.example:7443 --ca ca.pem \\
          --credential ~/.keyquorum/alice.kqcred
    Two replicas in one go (one passphrase prompt):
      keyquorum custodian unseal --server kq-1.example:7443 \\
          --server kq-2.example:7443 --ca ca.pem --credential ~/.keyquorum/alice.kqcred
    Start the session over (signed and logged):
      keyquorum custodian unseal --reset --server kq.example:7443 --ca ca.pem \\
          --credential ~/.keyquorum/alice.kqcred
    """
    if len(set(servers)) != len(servers):
        raise InvalidInputError("the same --server is given twice")
    endpoints = [make_endpoint(server, ca, insecure_dev_plaintext) for server in servers]
    unlock = _unlocker(credential_path, passphrase_file, passphrase_fd)
    if reset:
        unseal_flow.reset(endpoints, public_for(credential_path), unlock, witness_wait=witness_wait)
    else:
        unseal_flow.unseal(
            endpoints,
            public_for(credential_path),
            unlock,
            witness_wait=witness_wait,
            show_signing=_show_signing,
        )


@custodian.command("seal")
@endpoint_options
@credential_option
@passphrase_options
@click.option("--reason", default="emergency seal", show_default=True, help="Logged reason.")
@click.option(
    "--all-replicas",
    is_flag=True,
    help='Seal every replica of the deployment (the statement names replica "*"); '
    "each replica wipes its keys when it follows the logged seal.",
)
def seal_cmd(
    server: str,
    ca: Path | None,
    insecure_dev_plaintext: bool,
    credential_path: Path,
    passphrase_file: Path | None,
    passphrase_fd: int | None,
    reason: str,
    all_replicas: bool,
) -> None:
    """Seal the daemon now: it wipes the master key and every tenant key.

    One custodian is enough; the request is signed and logged.

    \b
    Example:
      keyquorum custodian seal --server kq.example:7443 --ca ca.crt \\
          --credential ~/.keyquorum/alice.kqcred --reason "suspected compromise"
    """
    endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
    public = public_for(credential_path)
    fingerprint = public.fingerprint
    now = int(time.time())
    with open_channel(endpoint) as channel:
        stub = pb_grpc.CustodianServiceStub(channel)
        # A seal waits for nothing: no witness, no check of the log comes first.
        response = actions.seal(
            stub,
            public,
            _unlocker(credential_path, passphrase_file, passphrase_fd),
            reason=reason,
            now=now,
            replica="*" if all_replicas else None,
        )
        click.echo("every replica sealed" if all_replicas else "sealed")

        def my_seal(entry: Entry) -> bool:
            payload = entry.payload
            return (
                isinstance(payload, SealPayload)
                and payload.custodian == fingerprint
                and payload.requested_at == now
            )

        try:
            seen_checkpoints.remember_entry(stub, response.seq, my_seal)
        except KeyquorumError as e:
            raise with_context(e, "sealed, but the log that records it does not check") from e


def _verdict_command(verdict: str) -> click.Command:
    """`custodian approve ID` / `custodian refuse ID`: one signed verdict."""

    @endpoint_options
    @credential_option
    @passphrase_options
    @witness_wait_option
    @click.argument("proposal_id")
    @click.option(
        "--proposer-file",
        "--roster-file",
        "roster_files",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="After a daemon restart: the public file of the proposer an add-proposer "
        "registers (a change-roster's newcomers are in its log entry).",
    )
    def command(
        server: str,
        ca: Path | None,
        insecure_dev_plaintext: bool,
        credential_path: Path,
        passphrase_file: Path | None,
        passphrase_fd: int | None,
        witness_wait: float,
        proposal_id: str,
        roster_files: tuple[Path, ...],
    ) -> None:
        endpoint = make_endpoint(server, ca, insecure_dev_plaintext)
        fingerprint = public_for(credential_path).fingerprint
        kind = ApprovalPayload if verdict == "approve" else RefusalPayload
        with open_channel(endpoint) as channel:
            stub = pb_grpc.CustodianServiceStub(channel)
            # A restore's approve-restore may be decided on over a shorter log.
            seen_checkpoints.require_extension(stub, deciding_on=proposal_id)
            response = actions.verdict(
                stub,
                proposal_id,
                fingerprint,
                _unlocker(credential_path, passphrase_file, passphrase_fd),
                verdict=verdict,
                public_credentials=[f.read_bytes() for f in roster_files],
                before_sign=lambda p: seen_checkpoints.require_witnessed(
                    stub, p.log_position + 1, wait=witness_wait, deciding_on=proposal_id
                ),
            )
            seen_checkpoints.remember_entry(
                stub,
                response.seq,
                lambda e: (
                    isinstance(e.payload, kind)
                    and e.payload.custodian == fingerprint
                    and e.payload.proposal.hex() == response.proposal.id
                ),
                deciding_on=proposal_id,
            )
        p = response.proposal
        if verdict == "refuse":
            click.echo(f"refused and logged; {len(p.refused_by)} refusal(s) so far")
        elif response.executed:
            click.echo(f"approved: {len(p.approved_by)} of {p.required}; EXECUTED {p.operation}")
            click.echo(f"  {describe_result(p)}")
        else:
            click.echo(
                f"approved: {len(p.approved_by)} of {p.required}; "
                f"not executed yet ({p.required - len(p.approved_by)} more needed)"
            )

    command.__doc__ = (
        f"{verdict.capitalize()} proposal PROPOSAL_ID with your signature.\n\n"
        "The exact statement text is printed first; your passphrase is asked\n"
        "only after it, and the signature covers exactly that text.\n\n"
        "\b\nExample:\n"
        f"  keyquorum custodian {verdict} 3f0c... --credential ~/.keyquorum/alice.kqcred"
    )
    return click.command(verdict)(command)


custodian.add_command(_verdict_command("approve"))
custodian.add_command(_verdict_command("refuse"))
