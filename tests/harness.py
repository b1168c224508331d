"""Test harness: real daemons over real gRPC and TLS, real SQLite files.

Two ways to run a daemon:
- `InProcessDaemon`: the `Daemon` and a real gRPC server on a loopback port
  in this process, with a controllable clock, so tests can expire sessions
  and look at buffers after a seal.
- `DaemonProcess`: `keyquorum server run` as a child process, for the CLI,
  restarts, signals, log output and the proxy tests.
"""

from __future__ import annotations

import json
import os
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
from keyquorum.hsm import custodian_service, tls
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.pki import DevPki
from keyquorum.hsm.server import create_server
from keyquorum.hsm.sqlite_store import SqliteStore
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace")


@dataclass
class Custodian:
    """One test custodian: files on disk plus the unlocked credential."""

    name: str
    credential: CustodianCredential
    private_path: Path
    public_path: Path
    passphrase: bytes
    passphrase_path: Path

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
        credential = CustodianCredential.generate(name)
        private_path = directory / f"{name}.kqcred"
        public_path = directory / f"{name}.pub.json"
        private_path.write_bytes(credential.encrypt(passphrase))
        public_path.write_bytes(credential.public().to_bytes())
        pp = directory / f"{name}.passphrase"
        pp.write_bytes(passphrase + b"\n")
        out.append(Custodian(name, credential, private_path, public_path, passphrase, pp))
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
    server: grpc.Server
    channel: grpc.Channel
    store: SqliteStore
    data_dir: Path

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
) -> Iterator[InProcessDaemon]:
    clock = clock or FakeClock()
    data_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore.open(data_dir / "keyquorum.sqlite")
    daemon = Daemon(store, data_dir=data_dir, replica=replica, limits=limits, clock=clock)
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=tls.server_credentials(pki.server_cert, pki.server_key),
        limits=limits,
        register=[custodian_service.register(daemon)],
        service_names=[custodian_service.SERVICE_NAME],
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

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode


def server_command(data_dir: Path, pki: DevPki, ready: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "keyquorum.cli.main", "server", "run",
        "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--replica", "proc-1", "--ready-file", str(ready), *extra,
    ]  # fmt: skip


def start_daemon_process(
    data_dir: Path, pki: DevPki, *extra: str, timeout: float = 30
) -> DaemonProcess:
    """Start `keyquorum server run` and wait until it serves."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ready = data_dir.parent / f"{data_dir.name}.ready"
    ready.unlink(missing_ok=True)
    log_path = data_dir.parent / f"{data_dir.name}.{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            server_command(data_dir, pki, ready, *extra),
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


def run_cli(*args: str) -> tuple[int, str]:
    """Run a `keyquorum` command in this process; (exit code, combined output)."""
    from click.testing import CliRunner

    result = CliRunner().invoke(cli_main, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def status(stub: pb_grpc.CustodianServiceStub) -> pb.Status:
    return stub.GetStatus(pb.GetStatusRequest())
