"""Test harness: real daemons over real gRPC and TLS, real SQLite files.

Two ways to run a daemon:
- `InProcessDaemon`: the `Daemon` and a real gRPC server on a loopback port
  in this process, with a controllable clock, so tests can expire sessions
  and look at buffers after a seal.
- `DaemonProcess`: `keyquorum server run` as a child process, for the CLI,
  restarts, signals, log output and the proxy tests.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from keyquorum.cli.main import main as cli_main
from keyquorum.hsm import tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.ceremony import CeremonyGate
from keyquorum.hsm.pki import DevPki
from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.admission import AddressPeers
from keyquorum.hsm.services.server import Listener, create_server
from keyquorum.hsm.stores.base import Store
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum import canonical, shamir, statements
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")
#: The one-time ceremony code of the in-process daemons (processes print their own).
CEREMONY_CODE = "TEST-CERE-MONY-CODE-0000-0000"


@dataclass
class Custodian:
    """One test custodian: files on disk plus the unlocked credential."""

    name: str
    credential: CustodianCredential
    private_path: Path
    public_path: Path
    passphrase: bytes
    passphrase_path: Path
    #: The random bytes `CustodianCredential.generate` turned into the private
    #: keys (signing seeds, sealing seeds), for the tests that search for them.
    seeds: tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def fingerprint(self) -> str:
        return self.credential.public().fingerprint

    def cli_args(self) -> list[str]:
        return [
            "--credential",
            str(self.private_path),
            "--passphrase-file",
            str(self.passphrase_path),
        ]


def make_custodians(directory: Path, names: tuple[str, ...] = NAMES) -> list[Custodian]:
    """Credentials with real Argon2id parameters, written as the CLI writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        passphrase = f"passphrase of {name} 7f3a".encode()
        drawn: list[bytes] = []

        def recording(n: int, drawn: list[bytes] = drawn) -> bytes:
            drawn.append(os.urandom(n))
            return drawn[-1]

        credential = CustodianCredential.generate(name, random_bytes=recording)
        private_path = directory / f"{name}.kqcred"
        public_path = directory / f"{name}.pub.json"
        private_path.write_bytes(credential.encrypt(passphrase))
        public_path.write_bytes(credential.public().to_bytes())
        pp = directory / f"{name}.passphrase"
        pp.write_bytes(passphrase + b"\n")
        out.append(
            Custodian(name, credential, private_path, public_path, passphrase, pp, tuple(drawn))
        )
    return out


class FakeClock:
    """An injectable clock the tests move by hand."""

    def __init__(self, start: int = 1_790_000_000) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += seconds


@dataclass
class InProcessDaemon:
    daemon: Daemon
    port: int
    clock: FakeClock
    server: Listener
    channel: grpc.Channel
    store: Store
    data_dir: Path
    #: Who signs the proposals tests make (a custodian, set with the ceremony).
    proposer: CustodianCredential | None = None

    @property
    def stub(self) -> pb_grpc.CustodianServiceStub:
        return pb_grpc.CustodianServiceStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=None).wait()
        self.daemon.seal_for_shutdown()
        self.store.close()


def tls_channel(pki: DevPki, target: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    return grpc.secure_channel(target, creds)


@contextmanager
def in_process_daemon(
    data_dir: Path,
    pki: DevPki,
    *,
    clock: FakeClock | None = None,
    limits: Limits = DEFAULT_LIMITS,
    replica: str = "test-1",
    store: Store | None = None,
) -> Iterator[InProcessDaemon]:
    """A daemon with its custodian service on TLS; SQLite in `data_dir` unless `store` is given."""
    clock = clock or FakeClock()
    data_dir.mkdir(parents=True, exist_ok=True)
    store = store or SqliteStore.open(data_dir / "keyquorum.sqlite")
    daemon = Daemon(
        store,
        data_dir=data_dir,
        replica=replica,
        limits=limits,
        clock=clock,
        ceremony=CeremonyGate(code=CEREMONY_CODE),
    )
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=tls.server_credentials(pki.server_cert, pki.server_key),
        limits=limits,
        register=[custodian_service.register(daemon, limits)],
        service_names=[custodian_service.SERVICE_NAME],
        peers=AddressPeers(),
    )
    server.start()
    channel = tls_channel(pki, f"127.0.0.1:{port}")
    handle = InProcessDaemon(daemon, port, clock, server, channel, store, data_dir)
    try:
        yield handle
    finally:
        handle.close()


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log_path: Path
    pki: DevPki
    _closed: bool = field(default=False)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def conn_args(self) -> list[str]:
        return ["--server", self.target, "--ca", str(self.pki.ca_cert)]

    def channel(self) -> grpc.Channel:
        return tls_channel(self.pki, self.target)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ceremony_code(self) -> str:
        """The one-time ceremony code this daemon printed at start."""
        # A log record in either format: text, or a JSON object's message.
        found = re.search(r"one-time ceremony code: ([A-Z2-7]{4}(?:-[A-Z2-7]{4})+)", self.output())
        if found is not None:
            return found.group(1)
        raise AssertionError("the daemon printed no ceremony code:\n" + self.output())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode


def server_command(
    data_dir: Path, pki: DevPki, ready: Path, *extra: str, tls: bool = True
) -> list[str]:
    tls_args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    return [
        sys.executable, "-m", "keyquorum.cli.main", "server", "run",
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        *(tls_args if tls else []),
        "--replica", "proc-1", "--ready-file", str(ready), *extra,
    ]  # fmt: skip


def start_daemon_process(
    data_dir: Path, pki: DevPki, *extra: str, timeout: float = 30, tls: bool = True
) -> DaemonProcess:
    """Start `keyquorum server run` and wait until it serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = data_dir.parent / f"{data_dir.name}.ready"
    ready.unlink(missing_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            server_command(data_dir, pki, ready, *extra, tls=tls),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"daemon did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    port = int(json.loads(ready.read_text())["port"])
    return DaemonProcess(proc, port, data_dir, log_path, pki)


#: The installed console script, beside the interpreter running the tests.
KEYQUORUM = Path(sys.executable).with_name("keyquorum")


def console(
    *args: str, pass_fds: tuple[int, ...] = (), timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed `keyquorum` script; no KEYQUORUM_* settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYQUORUM_")}
    return subprocess.run(
        [str(KEYQUORUM), *args],
        capture_output=True,
        text=True,
        env=env,
        pass_fds=pass_fds,
        timeout=timeout,
        check=False,
    )


def run_cli(*args: str) -> tuple[int, str]:
    """Run a `keyquorum` command in this process; (exit code, combined output)."""
    from click.testing import CliRunner

    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def status(stub: pb_grpc.CustodianServiceStub) -> pb.Status:
    return stub.GetStatus(pb.GetStatusRequest())


def ceremony_request(
    deployment: str,
    threshold: int,
    custodians: list[Custodian],
    code: str = CEREMONY_CODE,
) -> pb.InitCeremonyRequest:
    """The ceremony of `custodians`, with the code the daemon expects."""
    return pb.InitCeremonyRequest(
        deployment=deployment,
        threshold=threshold,
        public_credentials=[c.public_path.read_bytes() for c in custodians],
        code=code,
    )


def signed_proposal(
    stub: pb_grpc.CustodianServiceStub,
    signer: CustodianCredential,
    operation: str,
    parameters: dict[str, str | int],
    *,
    expires_in: int | None = None,
    now: int | None = None,
    public_credentials: tuple[bytes, ...] = (),
) -> pb.ProposeRequest:
    """A proposal request signed by `signer` as `keyquorum proposal new` signs it.

    `now` is the wall clock unless given (tests with a fake clock pass its
    time); `expires_in` defaults to the policy's proposal TTL.
    """
    from keyquorum.quorum.errors import InvalidInputError
    from keyquorum.quorum.operations import typed_parameters

    st = status(stub)
    expires_in = expires_in or max(60, st.proposal_ttl_seconds - 300)
    raw = [(k, str(v)) for k, v in parameters.items()]
    try:
        params: tuple[tuple[str, str | int], ...] = typed_parameters(raw)
    except InvalidInputError:
        params = tuple(sorted(raw))  # sent as given, for the daemon to refuse
    when = int(time.time()) if now is None else now
    proposal_id = os.urandom(16)
    try:
        statement = statements.proposal_statement(
            deployment=st.deployment,
            proposer=signer.public(),
            proposal_id=proposal_id,
            operation=operation,
            parameters=dict(params),
            expires_at=when + expires_in,
        )
    except InvalidInputError:
        # Nothing valid to sign: a signature over something else, for the
        # daemon to refuse the request on its merits.
        statement = statements.proposal_statement(
            deployment=st.deployment,
            proposer=signer.public(),
            proposal_id=proposal_id,
            operation="create-tenant",
            parameters={"tenant": "unsignable"},
            expires_at=when + expires_in,
        )
    signed = statements.sign_statement(statement, signer)
    return pb.ProposeRequest(
        operation=operation,
        parameters=[pb.Parameter(key=k, value=str(v)) for k, v in params],
        proposer=signer.public().fingerprint,
        id=proposal_id.hex(),
        expires_at=when + expires_in,
        signature=signed.signature.to_bytes(),
        public_credentials=list(public_credentials),
    )


def propose(
    stub: pb_grpc.CustodianServiceStub,
    signer: CustodianCredential,
    operation: str,
    parameters: dict[str, str | int],
    **options: object,
) -> pb.Proposal:
    """`signed_proposal`, sent."""
    request = signed_proposal(stub, signer, operation, parameters, **options)  # type: ignore[arg-type]
    return stub.Propose(request, timeout=30)


# -- searching bytes for secrets ---------------------------------------------------


def encodings(secret: bytes) -> dict[str, bytes]:
    """`secret` as raw bytes, hex (both cases) and base64 (standard and URL-safe).

    Base64 of a secret embedded in a longer base64 text depends on where it
    starts modulo 3, so each of the three alignments is included: the full
    4-character groups that only the secret's own bytes determine.
    """
    out = {"raw": secret, "hex": secret.hex().encode(), "HEX": secret.hex().upper().encode()}
    for skip in range(3):
        tail = secret[skip:]
        groups = 4 * (len(tail) // 3)
        out[f"base64+{skip}"] = base64.b64encode(tail)[:groups]
        out[f"base64url+{skip}"] = base64.urlsafe_b64encode(tail)[:groups]
    return out


def find_secrets(haystack: bytes, secrets: dict[str, bytes]) -> list[str]:
    """The names (with encoding) of the secrets that occur in `haystack`."""
    return [
        f"{name} ({how})"
        for name, secret in secrets.items()
        for how, needle in encodings(secret).items()
        if needle in haystack
    ]


def custodian_secrets(
    stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian], threshold: int
) -> dict[str, bytes]:
    """Every secret a custodian or the ceremony holds, rebuilt here as a custodian would.

    Passphrases and private seeds come from the custodians; each share is
    decrypted locally exactly as the CLI does (`fetch_and_check_share`); the
    master key is rebuilt from `threshold` shares with `shamir.combine`,
    which checks it against the logged commitment.
    """
    from keyquorum.cli import custodian_actions as actions
    from keyquorum.quorum.sealing import SealingPrivateKey
    from keyquorum.quorum.signatures import HybridSigningKey

    found: dict[str, bytes] = {}
    shares: list[shamir.Share] = []
    commitments: shamir.SplitCommitments | None = None
    for c in custodians:
        public = c.credential.public()
        signing_seeds, sealing_seeds = c.seeds
        # The recorded bytes really are this custodian's keys.
        assert HybridSigningKey.from_seeds(signing_seeds).verify_key() == public.verify_key
        assert SealingPrivateKey.from_seeds(sealing_seeds).public_key() == public.sealing_key
        found[f"{c.name} passphrase"] = c.passphrase
        found[f"{c.name} signing seeds"] = signing_seeds
        found[f"{c.name} sealing seeds"] = sealing_seeds
        share, enc = actions.fetch_and_check_share(stub, c.credential)
        with share.to_bytes() as plain:
            found[f"{c.name} share"] = bytes(plain.view())
        found[f"{c.name} share value"] = bytes(share.value.view())
        commitments = shamir.SplitCommitments.from_json(canonical.decode(enc.split_commitments))
        shares.append(share)
    assert commitments is not None
    with shamir.combine(shares[:threshold], commitments) as master:
        found["master key"] = bytes(master.view())
    for share in shares:
        share.wipe()
    return found
