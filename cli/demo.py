"""`keyquorum demo`: the whole story on a fresh machine, step by step.

It makes a temporary data directory and a development PKI, starts a real
daemon process over TLS on a free loopback port, and then runs the same
`keyquorum` commands a person would type (in this process, with each
command line printed), so the demo exercises the real CLI end to end.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.audit import run_audit_demo_steps
from keyquorum.cli.connect import make_endpoint, open_channel
from keyquorum.cli.demo_postgres import throwaway_cluster
from keyquorum.client import KeyClient, KeyServiceError, decrypt_record, encrypt_record
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

CUSTODIANS = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")
THRESHOLD = 5
DEPLOYMENT = "demo-health"
TENANT = "acme-health"
BACKEND = "keyquorum://backend/booking"


def _step(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def _run(args: Sequence[str]) -> None:
    """Run one `keyquorum` command in this process, echoing it first."""
    from keyquorum.cli.main import main

    click.secho("$ keyquorum " + " ".join(shlex.quote(a) for a in args), fg="cyan")
    try:
        main.main(list(args), prog_name="keyquorum", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            raise click.ClickException(f"command failed with exit code {e.code}") from None


@contextmanager
def _daemon(
    work: Path, env: dict[str, str], replica: str = "demo-1", store: str = "sqlite"
) -> Iterator[tuple[int, int, str]]:
    """One replica: its own data directory; with PostgreSQL, the shared database
    (the DSN comes from the environment, KEYQUORUM_DSN, not the command line)."""
    name = "data" if replica == "demo-1" else f"data-{replica}"
    data_dir, pki = work / name, work / "pki"
    ready = work / f"{replica}.ready"
    log_path = work / ("daemon.log" if replica == "demo-1" else f"daemon-{replica}.log")
    cmd = [
        sys.executable, "-m", "keyquorum.cli.main", "server", "run",
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key"),
        "--replica", replica, "--ready-file", str(ready), "--store", store,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(pki / "ca.crt"),
    ]  # fmt: skip
    click.secho(
        f"$ keyquorum server run --data-dir {name} --replica {replica} --store {store} "
        "--listen 127.0.0.1:0 --listen-mtls 127.0.0.1:0 --client-ca ca.crt ...",
        fg="cyan",
    )
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise click.ClickException(
                        "the daemon did not start:\n" + log_path.read_text(errors="replace")
                    )
                time.sleep(0.05)
            info = json.loads(ready.read_text())
            port, mtls_port = int(info["port"]), int(info["mtls_port"])
            click.echo(
                f"daemon pid {proc.pid} listening on 127.0.0.1:{port} (TLS) and "
                f"127.0.0.1:{mtls_port} (mTLS: backends, auditors)"
            )
            # The one-time code: a log record of the daemon's, in its log format.
            found = re.search(
                r"one-time ceremony code: ([A-Z2-7]{4}(?:-[A-Z2-7]{4})+)",
                log_path.read_text(errors="replace"),
            )
            code = found.group(1) if found else ""
            if code:
                click.echo(f"it logged its one-time ceremony code: {code} (for the ceremony)")
            yield port, mtls_port, code
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
            click.echo(f"daemon stopped (exit code {proc.returncode}); its log: {log_path}")


@click.command("demo")
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Work in this directory and keep it, instead of a temporary one.",
)
@click.option(
    "--store",
    type=click.Choice(["sqlite", "postgres"]),
    default="sqlite",
    show_default=True,
    help="postgres: a throw-away PostgreSQL cluster and TWO replicas over it.",
)
def demo(keep: Path | None, store: str) -> None:
    """Run the full story: ceremony, confirm, unseal, a quorum-approved tenant key, seal.

    \b
    Example:
      keyquorum demo            # in a temporary directory
      keyquorum demo --keep ./demo-run
      keyquorum demo --store postgres   # two replicas over one database
    """
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        _story(keep, store)
    else:
        with tempfile.TemporaryDirectory(prefix="keyquorum-demo-") as tmp:
            _story(Path(tmp), store)


def _story(work: Path, store: str = "sqlite") -> None:
    # The custodians' CLIs remember checkpoints (cli/seen_checkpoints.py):
    # here, in the demo's directory rather than the user's home.
    saved_config = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(work / "custodians-config")
    try:
        with ExitStack() as stack:
            if store == "postgres":
                _step("0. A throw-away PostgreSQL cluster for the replicas' shared database")
                os.environ["KEYQUORUM_DSN"] = stack.enter_context(throwaway_cluster())
                stack.callback(os.environ.pop, "KEYQUORUM_DSN", None)
            _chapters(work, store)
    finally:
        if saved_config is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = saved_config


def _chapters(work: Path, store: str) -> None:
    env = dict(os.environ)
    creds, pki = work / "custodians", work / "pki"
    _step(
        "1. A development PKI: CA, server certificate, two backend certificates, one for a witness"
    )
    _run(
        ["admin", "dev-pki", "--out", str(pki),
         "--client", "backend/booking", "--client", "backend/messaging",
         "--client", "auditor/witness"]
    )  # fmt: skip

    _step(f"2. Seven custodians each make a credential ({len(CUSTODIANS)} people, 7 laptops)")
    passphrases = {}
    for name in CUSTODIANS:
        pf = work / f"{name}.passphrase"
        pf.write_text(f"demo passphrase of {name}, not a real one\n")
        pf.chmod(0o600)
        passphrases[name] = pf
        _run(
            ["custodian", "new", "--name", name, "--out", str(creds), "--passphrase-file", str(pf)]
        )

    with ExitStack() as replicas:
        port, mtls_port, code = replicas.enter_context(_daemon(work, env, store=store))
        server = f"127.0.0.1:{port}"
        conn = ["--server", server, "--ca", str(pki / "ca.crt")]
        # Unseal goes to every replica in one command; the rest through demo-1.
        every = ["--server", server]
        conn_b: list[str] = []

        def cred(name: str) -> list[str]:
            return [
                "--credential", str(creds / f"{name}.kqcred"),
                "--passphrase-file", str(passphrases[name]),
            ]  # fmt: skip

        _step("3. Status before the ceremony")
        _run(["status", *conn])

        _step(f"4. The init ceremony: {THRESHOLD}-of-{len(CUSTODIANS)}")
        _run(
            [
                "ceremony", "init", *conn, "--deployment", DEPLOYMENT,
                "--threshold", str(THRESHOLD), "--code", code,
                *[str(creds / f"{n}.pub.json") for n in CUSTODIANS],
            ]
        )  # fmt: skip

        if store == "postgres":
            _step("4b. A second replica, demo-2, over the same database")
            click.echo("The operator gives it the log signing key (docs/replicas.md):")
            (work / "data-demo-2").mkdir(mode=0o700)
            shutil.copy2(work / "data" / "log-signing-key", work / "data-demo-2")
            port_b, _mtls_b, _code_b = replicas.enter_context(_daemon(work, env, "demo-2", store))
            conn_b = ["--server", f"127.0.0.1:{port_b}", "--ca", str(pki / "ca.crt")]
            every += ["--server", f"127.0.0.1:{port_b}"]
            _run(["status", *conn_b])
        every += ["--ca", str(pki / "ca.crt")]

        _step("5. Each custodian checks their share and confirms it")
        for name in CUSTODIANS:
            _run(["custodian", "confirm", *conn, *cred(name)])
        _run(["status", *conn])

        _step("6. Unseal: four shares, still sealed" + (" (each replica)" if conn_b else ""))
        for name in CUSTODIANS[:4]:
            _run(["custodian", "unseal", *every, *cred(name)])

        _step("7. A wrong share (erin's, one byte altered): refused, custodian named")
        endpoint = make_endpoint(server, pki / "ca.crt", False)
        erin = CustodianCredential.decrypt(
            (creds / "erin.kqcred").read_bytes(), passphrases["erin"].read_bytes().strip()
        )

        def flip_last_byte(raw: bytearray) -> None:
            raw[-1] ^= 0x01

        with open_channel(endpoint) as channel:
            try:
                actions.submit_share(
                    pb_grpc.CustodianServiceStub(channel), erin, tamper=flip_last_byte
                )
                raise click.ClickException("the daemon accepted a wrong share")
            except KeyquorumError as e:
                click.secho(f"refused: {e}", fg="yellow")

        _step("8. The fifth share: unsealed")
        _run(["custodian", "unseal", *every, *cred("erin")])
        _run(["status", *conn])
        if conn_b:
            _run(["status", *conn_b])

        with open_channel(endpoint) as channel:
            stub = pb_grpc.CustodianServiceStub(channel)
            witness = _witness_story(stub, conn, cred, work, pki, f"127.0.0.1:{mtls_port}")
            replicas.callback(_stop_witness, witness)
            _quorum_story(stub, conn, cred)
            if conn_b:
                _step("12b. demo-2 followed the log: the activation approved through demo-1")
                time.sleep(1.5)  # at most the follower's bound (docs/replicas.md)
                _run(["tenant", "list", *conn_b])
            _data_plane_story(stub, conn, cred, pki, f"127.0.0.1:{mtls_port}")

        _step("17. One custodian seals in an emergency: the master key and tenant keys are wiped")
        seal_all = ["--all-replicas"] if conn_b else []
        _run(["custodian", "seal", *conn, *cred("grace"), *seal_all, "--reason", "end of demo"])
        _run(["status", *conn])
        if conn_b:
            time.sleep(1.5)  # demo-2 follows the logged seal of every replica
            _run(["status", *conn_b])
        _run(["tenant", "list", *conn])

    # The daemon has stopped: the auditor works from the log alone.
    if store == "postgres":
        _verify_postgres_log(work / "data")
    else:
        run_audit_demo_steps(work, work / "data", step=_step, witnesses=1)

    _step("Done. Every step above is in the quorum log, signed by the custodians.")


def _verify_postgres_log(data_dir: Path) -> None:
    """The replicas have stopped: replay the shared log as an auditor's verifier does."""
    from keyquorum.hsm.daemon.logkey import LogKey
    from keyquorum.hsm.stores.postgres import PostgresStore
    from keyquorum.quorum.replay import verify_log

    _step("The log both replicas wrote, replayed from PostgreSQL by the verifier")
    store = PostgresStore.open(os.environ["KEYQUORUM_DSN"])
    try:
        entries = list(store.read_all())
        latest = store.latest_checkpoint()
    finally:
        store.close()
    if latest is None:
        raise click.ClickException("the shared log has no checkpoint")
    state = verify_log(entries, latest[1], LogKey.load(data_dir).vkey)
    click.echo(
        f"verified: {state.size} entries written through two replicas, one history, "
        f"checkpoint at {latest[0]}"
    )


def _witness_args(work: Path, pki: Path, target: str) -> list[str]:
    return [
        "audit", "witness", "--server", target, "--ca", str(pki / "ca.crt"),
        "--cert", str(pki / "auditor-witness.crt"), "--key", str(pki / "auditor-witness.key"),
        "--signing-key", str(work / "witness.cosigner"), "--state", str(work / "witness.state"),
    ]  # fmt: skip


def _witness_story(
    stub: pb_grpc.CustodianServiceStub,
    conn: list[str],
    cred: Callable[[str], list[str]],
    work: Path,
    pki: Path,
    target: str,
) -> subprocess.Popen[bytes]:
    """Steps 8b to 8e: a witness joins; nothing is signed over what it has not seen.

    Returns the witness process left running for the rest of the story.
    """
    _step("8b. An auditor makes a witness key; the quorum adds it to the log (m = 1)")
    _run(["audit", "keygen", "--name", "witness.demo/w1", "--out", str(work / "witness.cosigner")])
    vkey = (work / "witness.cosigner.vkey").read_text().strip()
    _run(
        ["proposal", "new", "add-witness", *conn, *cred("alice"), "--expires-in", "1h",
         "--param", f"witness={vkey}", "--param", "witness_threshold=1"]
    )  # fmt: skip
    pid = _latest(stub)
    for name in CUSTODIANS[:THRESHOLD]:
        _run(["custodian", "approve", pid, *conn, *cred(name)])

    _step("8c. A new proposal no witness has cosigned yet: bob refuses to sign over it")
    _run(
        ["proposal", "new", "create-tenant", *conn, *cred("alice"), "--param", f"tenant={TENANT}"]
    )  # fmt: skip
    try:
        _run(["custodian", "approve", _latest(stub), *conn, *cred("bob"), "--witness-wait", "0"])
    except click.ClickException:
        click.secho("refused, as it must be: no witness vouches for this log yet", fg="yellow")
    else:
        raise click.ClickException("a custodian signed over an unwitnessed checkpoint")

    _step("8d. The witness looks at the log and cosigns its checkpoint")
    key = stub.GetStatus(pb.GetStatusRequest()).log_key
    _run([*_witness_args(work, pki, target), "--log-key", key, "--once"])

    _step("8e. From now on the witness polls every second; the custodians sign what it saw")
    click.secho("$ keyquorum audit witness ... --interval 1 &", fg="cyan")
    log_file = (work / "witness.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "keyquorum.cli.main", *_witness_args(work, pki, target),
         "--interval", "1"],
        stdout=log_file, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _stop_witness(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def _latest(stub: pb_grpc.CustodianServiceStub) -> str:
    """The id of the proposal just made (the newest open one)."""
    proposals = stub.ListProposals(pb.ListProposalsRequest()).proposals
    if not proposals:
        raise click.ClickException("the proposal was not logged")
    return proposals[-1].id


def _quorum_story(
    stub: pb_grpc.CustodianServiceStub,
    conn: list[str],
    cred: Callable[[str], list[str]],
) -> None:
    """Steps 9 to 12: a tenant key created, granted and activated by the quorum."""
    _step(f"9. Create tenant {TENANT}: the key is made inside the daemon, stored only wrapped")
    pid = _latest(stub)  # proposed in 8c, cosigned by the witness in 8d
    for name in CUSTODIANS[:THRESHOLD]:
        _run(["custodian", "approve", pid, *conn, *cred(name)])

    _step(f"10. Grant the booking backend ({BACKEND}, its certificate identity)")
    _run(
        ["proposal", "new", "grant", *conn, *cred("alice"),
         "--param", f"tenant={TENANT}", "--param", f"backend={BACKEND}"]
    )  # fmt: skip
    pid = _latest(stub)
    for name in CUSTODIANS[2 : 2 + THRESHOLD]:
        _run(["custodian", "approve", pid, *conn, *cred(name)])

    _step(f"11. Activate {TENANT} for 8 hours: four approvals, not active yet")
    _run(
        ["proposal", "new", "activate-tenant", *conn, *cred("alice"), "--expires-in", "1h",
         "--param", f"tenant={TENANT}", "--param", "duration_seconds=28800"]
    )  # fmt: skip
    pid = _latest(stub)
    for name in CUSTODIANS[:4]:
        _run(["custodian", "approve", pid, *conn, *cred(name)])
    _run(["tenant", "list", *conn])

    _step("    alice approves again: refused, a custodian counts once")
    try:
        _run(["custodian", "approve", pid, *conn, *cred("alice")])
    except click.ClickException:
        click.secho("refused, as it must be (see the error above)", fg="yellow")
    else:
        raise click.ClickException("the daemon counted alice twice")

    _step("12. The fifth approval (frank): executed, the key is unwrapped in memory")
    _run(["custodian", "approve", pid, *conn, *cred("frank")])
    _run(["tenant", "list", *conn])
    proposal = stub.GetProposal(pb.GetProposalRequest(id=pid))
    click.secho("\nThe statement each of the five custodians read and signed:", bold=True)
    click.echo(proposal.approve_statement, nl=False)


def _backend(pki: Path, target: str, name: str) -> KeyClient:
    return KeyClient(
        target,
        ca=pki / "ca.crt",
        cert=pki / f"backend-{name}.crt",
        key=pki / f"backend-{name}.key",
    )


def _refused(call: Callable[[], object], code: str) -> None:
    """`call` must fail with gRPC status `code`; show the refusal."""
    try:
        call()
    except KeyServiceError as e:
        if e.code.name != code:
            raise click.ClickException(f"expected {code}, got: {e}") from None
        click.secho(f"refused: {e}", fg="yellow")
        return
    raise click.ClickException(f"the daemon accepted a call it must refuse ({code})")


def _data_plane_story(
    stub: pb_grpc.CustodianServiceStub,
    conn: list[str],
    cred: Callable[[str], list[str]],
    pki: Path,
    target: str,
) -> None:
    """Steps 13 to 16: backends call KeyService through keyquorum.client over mTLS."""
    context = {"patient": "p-4711", "record": "appointment-2026-05-01"}
    _step(
        f"13. The booking backend (mTLS, {BACKEND}) wraps, unwraps and generates data keys "
        f"for {TENANT}"
    )
    with _backend(pki, target, "booking") as booking:
        wrapped = booking.wrap(TENANT, b"a small secret", context)
        click.echo(
            f"Wrap: {len(wrapped.ciphertext)}-byte ciphertext under key version "
            f"{wrapped.key_version}, bound to the context {context}"
        )
        with booking.unwrap(wrapped.ciphertext, context) as plain:
            click.echo(f"Unwrap with the same context: {plain.reveal()!r}")
        with booking.generate_data_key(TENANT, context) as data_key:
            click.echo(
                f"GenerateDataKey: a {len(data_key.plaintext)}-byte data key and its "
                f"{len(data_key.ciphertext)}-byte wrapped form to store beside the data"
            )
            with booking.unwrap(data_key.ciphertext, context) as again:
                if not again.equals(data_key.plaintext):
                    raise click.ClickException("the unwrapped data key differs")
            click.echo("Unwrap of the wrapped data key: the same key")
        record = b"appointment 2026-05-01 09:30, dermatology, patient p-4711"
        envelope = encrypt_record(booking, TENANT, record, context)
        click.echo(
            f"Envelope encryption: a {len(record)}-byte record encrypted locally under a "
            f"fresh data key, {len(envelope)} bytes stored with the wrapped key beside it"
        )
        with decrypt_record(booking, envelope, context) as opened:
            click.echo(f"... and opened again: {opened.reveal()!r}")

        _step("14. Unwrap with a wrong context (another patient): refused")
        _refused(
            lambda: booking.unwrap(wrapped.ciphertext, {**context, "patient": "p-4712"}),
            "INVALID_ARGUMENT",
        )

        _step("15. The messaging backend has a valid certificate but no grant: refused")
        with _backend(pki, target, "messaging") as messaging:
            _refused(lambda: messaging.wrap(TENANT, b"x", context), "PERMISSION_DENIED")
            _refused(lambda: messaging.unwrap(wrapped.ciphertext, context), "PERMISSION_DENIED")

        _step(f"16. One custodian (grace) deactivates {TENANT}: the key is wiped, calls fail")
        _run(
            ["proposal", "new", "deactivate-tenant", *conn, *cred("grace"),
             "--param", f"tenant={TENANT}"]
        )  # fmt: skip
        _run(["custodian", "approve", _latest(stub), *conn, *cred("grace")])
        _refused(lambda: booking.unwrap(wrapped.ciphertext, context), "FAILED_PRECONDITION")
        _refused(lambda: booking.generate_data_key(TENANT, context), "FAILED_PRECONDITION")
