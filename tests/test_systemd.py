"""The systemd unit (deploy/keyquorum.service) and the daemon's side of it.

- `systemd-analyze verify` accepts the unit without a warning, and
  `systemd-analyze security --offline` rates its exposure below 2.0;
- the hardening the operator guide promises is in it;
- the daemon sends READY=1 on the NOTIFY_SOCKET a test opens (a path and an
  abstract socket), only once it serves, then STOPPING=1 on SIGTERM;
- MemoryDenyWriteExecute holds: the daemon goes through a ceremony, an
  unseal and Wrap, Unwrap and BatchWrap (the C module) under the kernel's
  own refusal of writable-and-executable memory (PR_SET_MDWE, Linux 6.3+),
  which systemd's option asks for.

No service manager runs here (the machine's PID 1 is not systemd), so the
unit is checked offline and the protocol with a socket of the test's own.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyquorum.client import KeyClient
from keyquorum.hsm.pki import DevPki, make_dev_pki
from tests.custodian_steps import K, ceremony, run, unseal
from tests.harness import DaemonProcess, make_custodians, server_command, start_daemon_process

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "keyquorum.service"
KEYQUORUM = Path(sys.executable).with_name("keyquorum")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze not found (Debian: apt-get install systemd; .ci/run installs it)",
)
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"), clients=["backend/booking"])


def unit_here(directory: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's keyquorum (verify runs it by path)."""
    text = UNIT.read_text().replace("/opt/keyquorum/bin/keyquorum", str(KEYQUORUM))
    path = directory / "keyquorum.service"
    path.write_text(text)
    return path


def settings(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


@needs_systemd
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert result.stderr.strip() == ""  # not even a warning (an unknown key would be one)


@needs_systemd
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    unit = unit_here(tmp_path)
    unit.write_text(unit.read_text().replace("PrivateTmp=yes", "PrivateTmp=yes\nPrivateTmpp=yes"))
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert "Unknown key" in result.stderr


@needs_systemd
def test_the_units_exposure_is_low(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_here(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for keyquorum.service: ([0-9.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found[1]) < 2.0, result.stdout


def test_the_unit_has_the_promised_hardening() -> None:
    s = settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == [
        "/opt/keyquorum/bin/keyquorum server run --config /etc/keyquorum/server.toml"
    ]
    for key, expected in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "MemoryDenyWriteExecute": "yes",
        "LimitCORE": "0",
        "ProtectHome": "yes",
        "UMask": "0077",
        "CapabilityBoundingSet": "",
    }.items():
        assert s[key] == [expected], key
    # Writable: the data directory only.
    assert s["ReadWritePaths"] == ["/var/lib/keyquorum"]
    assert s["StateDirectory"] == ["keyquorum"]
    # A stop seals first: SIGTERM to the daemon, not SIGKILL to everything.
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["KillMode"] == ["mixed"]


# -- the daemon's side: sd_notify ----------------------------------------------------------


def notify_socket(tmp_path: Path, abstract: bool) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"keyquorum-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(30)
    return sock, address


def receive(sock: socket.socket, key: str) -> dict[str, str]:
    """The next message that sets `key` (STATUS-only updates may come between)."""
    while True:
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.splitlines())
        if key in fields:
            return fields


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_the_daemon_notifies_ready_then_stopping(
    tmp_path: Path, pki: DevPki, abstract: bool
) -> None:
    sock, address = notify_socket(tmp_path, abstract)
    ready_file = tmp_path / "ready.json"
    with sock, (tmp_path / "out.log").open("wb") as out:
        proc = subprocess.Popen(
            server_command(tmp_path / "data", pki, ready_file),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": address},
        )
        try:
            ready = receive(sock, "READY")
            assert ready["READY"] == "1"
            port = int(ready["STATUS"].rsplit("port ", 1)[1])
            # Ready means serving: a connection to the port is accepted right away.
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assert ready["STATUS"].startswith("awaiting ceremony")
            proc.send_signal(signal.SIGTERM)
            stopping = receive(sock, "STOPPING")
            assert stopping["STOPPING"] == "1"
            assert proc.wait(timeout=30) == 0
            assert json.loads(ready_file.read_text())["port"] == port
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_without_notify_socket_nothing_is_sent(tmp_path: Path, pki: DevPki) -> None:
    # The harness starts daemons without NOTIFY_SOCKET; they start and stop as before.
    env = os.environ.pop("NOTIFY_SOCKET", None)
    try:
        start_daemon_process(tmp_path / "data", pki).stop()
    finally:
        if env is not None:
            os.environ["NOTIFY_SOCKET"] = env


# -- MemoryDenyWriteExecute -----------------------------------------------------------------


def _mdwe_supported() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    f"if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_SET_MDWE failed: errno %d' % ctypes.get_errno())\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)
PROBE = (
    "import ctypes, mmap\n"
    f"print(ctypes.CDLL(None).prctl({PR_GET_MDWE}, 0, 0, 0, 0))\n"
    "try:\n"
    "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "    print('wx allowed')\n"
    "except OSError:\n"
    "    print('wx refused')\n"
)


def under_mdwe(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", MDWE_EXEC, *argv]


@pytest.fixture
def mdwe() -> None:
    if not _mdwe_supported():
        pytest.skip("PR_SET_MDWE needs Linux 6.3 or later")
    probe = subprocess.run(
        under_mdwe([sys.executable, "-c", PROBE]), capture_output=True, text=True, check=True
    )
    # In force across exec, and it refuses writable-and-executable memory.
    assert probe.stdout.split() == ["1", "wx", "refused"], probe.stdout


@pytest.mark.slow
def test_the_daemon_serves_under_memory_deny_write_execute(
    tmp_path: Path, pki: DevPki, mdwe: None
) -> None:
    custodians = make_custodians(tmp_path / "custodians")
    data = tmp_path / "data"
    data.mkdir()
    ready = tmp_path / "ready.json"
    argv = server_command(
        data, pki, ready,
        "--listen-mtls", "127.0.0.1:0", "--client-ca", str(pki.ca_cert),
        "--metrics-listen", "127.0.0.1:0",
    )  # fmt: skip
    with (tmp_path / "out.log").open("wb") as out:
        child = subprocess.Popen(under_mdwe(argv), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, (tmp_path / "out.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    proc = DaemonProcess(child, info["port"], data, tmp_path / "out.log", pki)
    try:

        class Handle:
            stub = None
            proc = None  # whose one-time ceremony code `ceremony` reads

        handle = Handle()
        handle.proc = proc  # type: ignore[assignment]
        with proc.channel() as channel:
            from keyquorum.v1 import custodian_pb2_grpc as pb_grpc

            handle.stub = pb_grpc.CustodianServiceStub(channel)  # type: ignore[assignment]
            ceremony(handle, custodians)  # type: ignore[arg-type]
            unseal(handle, custodians[:K])  # type: ignore[arg-type]
            for op, params in (
                ("create-tenant", {"tenant": "acme"}),
                ("grant", {"tenant": "acme", "backend": "booking"}),
                ("activate-tenant", {"tenant": "acme", "duration_seconds": 600}),
            ):
                run(handle, custodians, op, **params)  # type: ignore[arg-type]
        files = pki.client("backend/booking")
        with KeyClient(
            f"127.0.0.1:{info['mtls_port']}", ca=pki.ca_cert, cert=files.cert, key=files.key
        ) as kq:
            wrapped = kq.wrap("acme", b"under MDWE", {"k": "v"})
            with kq.unwrap(wrapped.ciphertext, {"k": "v"}) as plain:
                assert plain.reveal() == b"under MDWE"
            batch = kq.batch_wrap([("acme", b"item %d" % n, {"k": "v"}) for n in range(50)])
            assert len(batch) == 50
            assert all(not isinstance(item, Exception) for item in batch)
        assert proc.proc.poll() is None
    finally:
        assert proc.stop() == 0, proc.output()


# -- a stop signal, whichever thread the kernel hands it to ------------------------------

SYS_TGKILL = 234  # x86-64


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
    reason="tgkill's number is x86-64's",
)
def test_sigterm_delivered_to_a_grpc_thread_still_stops_the_daemon(
    tmp_path: Path, pki: DevPki
) -> None:
    """The kernel may give a process-directed SIGTERM to any thread; the daemon
    must stop all the same (a plain Event.wait() in the main thread never woke)."""
    proc = start_daemon_process(tmp_path / "data", pki)
    pid = proc.proc.pid
    others = [
        int(t.name)
        for t in Path(f"/proc/{pid}/task").iterdir()
        if int(t.name) != pid and (t / "comm").read_text().strip() != "python3"
    ]
    assert others, "no gRPC thread to signal"
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        assert libc.syscall(SYS_TGKILL, pid, others[0], signal.SIGTERM) == 0
        assert proc.proc.wait(timeout=10) == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
    assert "signal 15: sealing and stopping" in proc.output()
