"""Connection errors say what to fix, over real sockets and real TLS.

Each case sets up one mistake for real (a certificate for other names, a
CA that did not issue it, another service on the port, a plaintext daemon,
a missing port, a daemon whose store is down) and pins the one line the
CLI prints. One run goes through the installed console script, to show the
gRPC C core's own lines never reach the terminal.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from keyquorum.cli.main import main as cli_main
from keyquorum.hsm import tls
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import custodian_service
from keyquorum.quorum.errors import StorageError
from tests.harness import CEREMONY_CODE, InProcessDaemon, console, in_process_daemon


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki) -> Iterator[InProcessDaemon]:
    with in_process_daemon(tmp_path / "data", pki) as d:
        yield d


def _grpc_server(host: str, credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    address = f"{host}:0"
    port = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    server.start()
    return server, port


@pytest.fixture
def tls_on_other_loopback(pki: DevPki) -> Iterator[int]:
    """A TLS gRPC server on 127.0.0.2, whose certificate names 127.0.0.1 and localhost only."""
    server, port = _grpc_server(
        "127.0.0.2", tls.server_credentials(pki.server_cert, pki.server_key)
    )
    yield port
    server.stop(None)


@pytest.fixture
def plaintext_grpc() -> Iterator[int]:
    server, port = _grpc_server("127.0.0.1", None)
    yield port
    server.stop(None)


@pytest.fixture
def banner_service() -> Iterator[int]:
    """A service that speaks first, as SSH does."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(1024)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join()
    listener.close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Nothing on the test's stderr, where the CLI's line is read."""


@pytest.fixture
def http_service() -> Iterator[int]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _status(*args: str) -> str:
    """Run `status` in process; the one error line it prints (exit code 1)."""
    r = CliRunner().invoke(cli_main, ["status", *args])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_certificate_for_other_names_lists_the_names_it_holds(
    pki: DevPki, tls_on_other_loopback: int
) -> None:
    line = _status("--server", f"127.0.0.2:{tls_on_other_loopback}", "--ca", str(pki.ca_cert))
    assert (
        f"cannot reach the daemon at 127.0.0.2:{tls_on_other_loopback}: the daemon's certificate "
        "holds the names localhost, 127.0.0.1, ::1, not '127.0.0.2': connect with one of them"
    ) in line
    assert "TSI" not in line
    assert "Hostname Verification" not in line


def test_a_certificate_from_another_ca_names_both(
    daemon: InProcessDaemon, other_pki: DevPki
) -> None:
    line = _status("--server", daemon.target, "--ca", str(other_pki.ca_cert))
    assert "the daemon's certificate (for " in line
    assert "was issued by 'keyquorum dev CA (not for production)' (key id " in line
    assert f"but --ca {other_pki.ca_cert} holds 'keyquorum dev CA (not for production)'" in line
    assert "give the CA that issued the daemon's certificate" in line
    assert "SSL" not in line


def test_another_service_on_the_port_is_named(pki: DevPki, banner_service: int) -> None:
    line = _status("--server", f"127.0.0.1:{banner_service}", "--ca", str(pki.ca_cert))
    assert (
        f"127.0.0.1:{banner_service} answered with another service ('SSH-2.0-OpenSSH_9.2p1 "
        "Debian-2'), not a keyquorum daemon: check the port in --server"
    ) in line


def test_an_http_server_on_the_port_is_named(pki: DevPki, http_service: int) -> None:
    line = _status("--server", f"127.0.0.1:{http_service}", "--ca", str(pki.ca_cert))
    assert f"127.0.0.1:{http_service} is a plain HTTP server, not a keyquorum daemon" in line


def test_a_plaintext_daemon_where_tls_was_expected(pki: DevPki, plaintext_grpc: int) -> None:
    line = _status("--server", f"127.0.0.1:{plaintext_grpc}", "--ca", str(pki.ca_cert))
    assert f"127.0.0.1:{plaintext_grpc} speaks plaintext gRPC, not TLS" in line
    assert "--insecure-dev-plaintext" in line


def test_tls_where_plaintext_was_asked_for(daemon: InProcessDaemon) -> None:
    line = _status("--server", daemon.target, "--insecure-dev-plaintext")
    assert f"{daemon.target} speaks TLS: drop --insecure-dev-plaintext and give --ca" in line


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("127.0.0.1", "--server '127.0.0.1' has no port: give HOST:PORT, e.g. 127.0.0.1:7443"),
        ("kq.example", "gRPC alone would try 443"),
        ("[::1]", "has no port"),
        ("127.0.0.1:99999", "port 99999 is not in 1..65535"),
        ("127.0.0.1:http", "is not HOST:PORT"),
    ],
    ids=["ip", "name", "ipv6", "port-too-big", "port-not-a-number"],
)
def test_a_missing_or_bad_port_is_refused_before_connecting(
    pki: DevPki, server: str, message: str
) -> None:
    line = _status("--server", server, "--ca", str(pki.ca_cert))
    assert message in line


def test_a_daemon_whose_store_is_down_says_so(
    daemon: InProcessDaemon, pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*_args: object, **_kw: object) -> None:
        raise StorageError("PostgreSQL is unreachable: connection refused")

    monkeypatch.setattr(daemon.store, "append", down)
    r = CliRunner().invoke(
        cli_main,
        ["ceremony", "init", "--server", daemon.target, "--ca", str(pki.ca_cert),
         "--deployment", "d", "--threshold", "2", "--code", CEREMONY_CODE,
         *_public_files(daemon.data_dir)],
    )  # fmt: skip
    assert r.exit_code == 1
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the daemon answered, but cannot use its store: ")
    assert "PostgreSQL is unreachable" in line
    assert "cannot reach the daemon" not in line


def _public_files(directory: Path) -> list[str]:
    from tests.harness import make_custodians

    return [str(c.public_path) for c in make_custodians(directory / "people", ("ann", "ben"))]


def test_the_daemon_marks_its_errors_so_unreachable_is_never_guessed(
    daemon: InProcessDaemon,
) -> None:
    from keyquorum.v1 import custodian_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        daemon.stub.GetProposal(pb.GetProposalRequest(id="00" * 16))
    call = info.value
    assert call.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    assert ("keyquorum-error", "StateError") in call.trailing_metadata()  # type: ignore[attr-defined]


def test_the_c_core_never_writes_to_the_terminal(
    daemon: InProcessDaemon, other_pki: DevPki
) -> None:
    """The installed command, a TLS failure: one line of ours on stderr, nothing else."""
    r = console("status", "--server", daemon.target, "--ca", str(other_pki.ca_cert))
    assert r.returncode == 1
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: cannot reach the daemon at {daemon.target}: ")
    for noise in (
        "ssl_transport_security",
        ".cc:",
        "E0000",
        "TSI_",
        "SSL_ERROR",
        "WARNING: All log",
    ):
        assert noise not in r.stderr


def test_custodian_service_is_registered() -> None:
    assert custodian_service.SERVICE_NAME == "keyquorum.v1.CustodianService"
