"""The real daemon as a child process (`keyquorum server run`).

What only a process shows: signals and restarts on the same data directory,
refusing to start over a tampered store, what reaches its output and its
files, the transport it accepts, its standard health and reflection
services, and its core-dump settings. The refusals of each RPC are covered
in-process by tests/test_daemon.py; the CLI's own behaviour by
tests/test_cli.py; a TLS-terminating proxy's view by tests/test_proxy.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.connect import RemoteError, rpc_errors
from keyquorum.hsm.daemon.logkey import KEY_FILE, LogKey
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.replay import verify_log
from keyquorum.v1 import custodian_pb2 as pb
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    Custodian,
    DaemonProcess,
    ceremony_request,
    console,
    custodian_secrets,
    find_secrets,
    make_custodians,
    server_command,
    start_daemon_process,
    status,
)

THRESHOLD = 5
DEPLOYMENT = "proc-deployment"
STORE = "keyquorum.sqlite"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, pki: DevPki) -> Iterator[DaemonProcess]:
    """One daemon awaiting its ceremony, for tests that do not change its state."""
    proc = start_daemon_process(tmp_path_factory.mktemp("served") / "data", pki)
    yield proc
    assert proc.stop() == 0


def stub_of(channel: grpc.Channel) -> pb_grpc.CustodianServiceStub:
    return pb_grpc.CustodianServiceStub(channel)


def ceremony(stub: pb_grpc.CustodianServiceStub, custodians: list[Custodian], code: str) -> None:
    with rpc_errors():
        stub.InitCeremony(ceremony_request(DEPLOYMENT, THRESHOLD, custodians, code))


def unseal(stub: pb_grpc.CustodianServiceStub, who: list[Custodian]) -> None:
    for n, c in enumerate(who, start=1):
        progress = actions.submit_share(stub, c.credential)
        assert (progress.have, progress.sealed) == (n, n < THRESHOLD)
    assert not status(stub).sealed


def unlocker(c: Custodian) -> Callable[[str], CustodianCredential]:
    """What the CLI's passphrase prompt returns, without the prompt."""

    def unlock(_statement: str) -> CustodianCredential:
        return c.credential

    return unlock


def seal_by(stub: pb_grpc.CustodianServiceStub, c: Custodian, reason: str) -> None:
    actions.seal(stub, c, unlocker(c), reason=reason, now=int(time.time()))


def entries(data_dir: Path) -> list[dict[str, object]]:
    """The log entries as JSON objects, read-only, with the daemon stopped."""
    con = sqlite3.connect(f"file:{data_dir / STORE}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT entry FROM log_entries ORDER BY seq").fetchall()
    finally:
        con.close()
    return [json.loads(raw) for (raw,) in rows]


def verify_offline(data_dir: Path) -> int:
    """Replay the stopped daemon's store against its latest checkpoint, as an auditor would."""
    con = sqlite3.connect(f"file:{data_dir / STORE}?mode=ro", uri=True)
    try:
        raw = [bytes(r) for (r,) in con.execute("SELECT entry FROM log_entries ORDER BY seq")]
        (note,) = con.execute("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    finally:
        con.close()
    verify_log(raw, note, LogKey.load(data_dir).vkey)
    return len(raw)


# -- restart -------------------------------------------------------------------


def test_sigterm_seals_logs_it_and_restart_unseals_with_other_custodians(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    data = tmp_path / "data"
    proc = start_daemon_process(data, pki)
    with proc.channel() as channel:
        ceremony(stub_of(channel), custodians, proc.ceremony_code())
        unseal(stub_of(channel), custodians[:THRESHOLD])
        size = status(stub_of(channel)).log_size
    assert proc.stop(signal.SIGTERM) == 0
    log = entries(data)
    assert len(log) == size + 1
    last = log[-1]
    assert last["type"] == "seal"
    assert last["payload"] == {
        **last["payload"],  # type: ignore[dict-item]
        "custodian": None,
        "signature": None,
        "reason": "daemon shutdown",
        "replica": "proc-1",
    }
    assert "sealed: daemon shutdown" in proc.output()

    again = start_daemon_process(data, pki)
    try:
        with again.channel() as channel:
            s = status(stub_of(channel))
            assert (s.initialized, s.sealed, s.log_size) == (True, True, size + 1)
            # Five custodians, two of them new, in another order.
            unseal(stub_of(channel), [custodians[i] for i in (6, 4, 2, 0, 5)])
    finally:
        assert again.stop() == 0
    assert entries(data)[-1]["payload"]["reason"] == "daemon shutdown"  # type: ignore[index]


def test_sigkill_restarts_sealed_and_the_log_verifies(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    data = tmp_path / "data"
    proc = start_daemon_process(data, pki)
    with proc.channel() as channel:
        ceremony(stub_of(channel), custodians, proc.ceremony_code())
        unseal(stub_of(channel), custodians[2:])
        size = status(stub_of(channel)).log_size
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    # No chance to log a seal: the log ends with the unseal, and is intact.
    assert verify_offline(data) == size
    assert entries(data)[-1]["type"] == "unseal"
    again = start_daemon_process(data, pki)
    try:
        with again.channel() as channel:
            s = status(stub_of(channel))
            assert (s.initialized, s.sealed, s.log_size) == (True, True, size)
        assert "log verified" in again.output()
    finally:
        assert again.stop() == 0


# -- tampering at start ----------------------------------------------------------


@pytest.fixture(scope="module")
def sealed_store(
    tmp_path_factory: pytest.TempPathFactory, pki: DevPki, custodians: list[Custodian]
) -> Path:
    """A stopped daemon's data directory: genesis, 2 confirms, unseal, seal (entries 0-4)."""
    data = tmp_path_factory.mktemp("sealed") / "data"
    proc = start_daemon_process(data, pki)
    with proc.channel() as channel:
        stub = stub_of(channel)
        ceremony(stub, custodians, proc.ceremony_code())
        for c in custodians[:2]:
            actions.confirm(stub, c, unlocker(c))
        unseal(stub, custodians[:THRESHOLD])
        seal_by(stub, custodians[3], "end of test")
    assert proc.stop() == 0
    assert [e["type"] for e in entries(data)] == [
        "genesis",
        "confirm",
        "confirm",
        "unseal",
        "seal",
    ]
    return data


def _admin(db: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """Run SQL as a database administrator would: the store's triggers dropped first."""
    con = sqlite3.connect(db)
    try:
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'"):
            con.execute(f"DROP TRIGGER {name}")
        for sql, args in statements:
            con.execute(sql, args)
        con.commit()
    finally:
        con.close()


def edit_one_byte(data: Path) -> None:
    """Change one hex digit of the signature in entry 2 (bob's confirmation)."""
    db = data / STORE
    con = sqlite3.connect(db)
    (raw,) = con.execute("SELECT entry FROM log_entries WHERE seq=2").fetchone()
    con.close()
    raw = bytearray(raw)
    at = raw.index(b'"signature":"') + len(b'"signature":"') + 10
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    _admin(db, ("UPDATE log_entries SET entry=? WHERE seq=2", (bytes(raw),)))


def delete_last_entry(data: Path) -> None:
    _admin(data / STORE, ("DELETE FROM log_entries WHERE seq=4", ()))


def replace_log_key(data: Path) -> None:
    other = data.parent / "other-key"
    other.mkdir()
    LogKey.create(other, origin=f"keyquorum/{DEPLOYMENT}")
    shutil.copyfile(other / KEY_FILE, data / KEY_FILE)


def remove_log_key(data: Path) -> None:
    (data / KEY_FILE).unlink()


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (edit_one_byte, r"entry 2\b"),
        (delete_last_entry, r"entry 4: the store holds 4 entries, its latest checkpoint vouches"),
        (replace_log_key, r"log-signing-key holds .*: the key file or the store was replaced"),
        (remove_log_key, r"log-signing-key is missing"),
    ],
    ids=["edited-byte-in-entry-2", "last-entry-deleted", "log-key-replaced", "log-key-removed"],
)
def test_tampered_store_stops_the_daemon(
    tmp_path: Path,
    pki: DevPki,
    sealed_store: Path,
    tamper: object,
    expected: str,
) -> None:
    data = tmp_path / "data"
    shutil.copytree(sealed_store, data)
    # The untouched copy starts: what follows is due to the tampering alone.
    start_daemon_process(data, pki).stop()
    tamper(data)  # type: ignore[operator]
    ready = tmp_path / "ready"
    result = subprocess.run(
        server_command(data, pki, ready),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert not ready.exists()
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    assert re.search(expected, lines[-1]), lines[-1]
    assert "Traceback" not in result.stderr


# -- no secret at rest or in the daemon's output ----------------------------------


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def test_no_secret_in_output_store_or_data_dir(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    """Ceremony, confirms, an unseal with a refused wrong share, a seal; then search.

    The haystack is the daemon's whole stdout and stderr at DEBUG level and
    every file of its data directory (the SQLite file, its -wal and -shm
    while running, the log key), copied both while it runs and after it
    stopped. The needles: every passphrase, every private seed, every
    share's plaintext (its binary form and its value), and the master key,
    raw, hex and base64. Confirms, unseal and seal run through the real CLI,
    which reads the passphrases.
    """
    data = tmp_path / "data"
    proc = start_daemon_process(data, pki, "--log-level", "DEBUG")
    conn = proc.conn_args()
    try:
        with proc.channel() as channel:
            stub = stub_of(channel)
            ceremony(stub, custodians, proc.ceremony_code())
            for c in custodians:
                r = console("custodian", "confirm", *conn, *c.cli_args())
                assert r.returncode == 0, r.stderr
            for c in custodians[:4]:
                r = console("custodian", "unseal", *conn, *c.cli_args())
                assert r.returncode == 0, r.stderr

            def flip(raw: bytearray) -> None:
                raw[-1] ^= 0x01

            with pytest.raises(RemoteError, match="custodian erin"):
                actions.submit_share(stub, custodians[4].credential, tamper=flip)
            r = console("custodian", "unseal", *conn, *custodians[5].cli_args())
            assert "UNSEALED" in r.stdout, r.stderr
            r = console("custodian", "seal", *conn, *custodians[6].cli_args())
            assert r.returncode == 0, r.stderr
            assert status(stub).sealed
            running = _files(data)
            secrets = custodian_secrets(stub, custodians, THRESHOLD)
    finally:
        assert proc.stop() == 0
    stopped = _files(data)
    output = proc.output().encode()
    # The searches are not vacuous: the store and the output hold the story.
    assert STORE in running
    assert STORE + "-wal" in running
    assert custodians[0].fingerprint.encode() in stopped[STORE]
    assert b"refused share of custodian erin" in output
    assert len(secrets) == 7 * 5 + 1
    haystacks = {"daemon output": output}
    haystacks.update({f"{n} (running)": b for n, b in running.items()})
    haystacks.update({f"{n} (stopped)": b for n, b in stopped.items()})
    leaks = {where: find_secrets(blob, secrets) for where, blob in haystacks.items()}
    assert {k: v for k, v in leaks.items() if v} == {}


# -- transport ---------------------------------------------------------------------


def _server_refuses(tmp_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "keyquorum.cli.main", "server", "run",
         "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def test_server_without_tls_files_refuses_to_start(tmp_path: Path) -> None:
    message = _server_refuses(tmp_path, "--listen", "127.0.0.1:0")
    assert "TLS is on by default" in message
    assert "--tls-cert" in message


@pytest.mark.parametrize(
    "listen",
    ["0.0.0.0:0", "[::]:0", "10.1.2.3:0", "192.168.1.10:0", "example.com:0"],
    ids=["any-v4", "any-v6", "private-v4", "lan-v4", "a-name"],
)
def test_plaintext_off_loopback_refuses_to_start(tmp_path: Path, listen: str) -> None:
    message = _server_refuses(tmp_path, "--listen", listen, "--insecure-dev-plaintext")
    assert "plaintext is allowed only on loopback" in message


def test_plaintext_with_tls_files_is_refused(tmp_path: Path, pki: DevPki) -> None:
    message = _server_refuses(
        tmp_path,
        "--listen", "127.0.0.1:0", "--insecure-dev-plaintext",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    )  # fmt: skip
    assert "--insecure-dev-plaintext" in message


def _unreachable(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as info:
        stub_of(channel).GetStatus(pb.GetStatusRequest(), timeout=3)
    return info.value.code()


def test_plaintext_on_loopback_serves_plaintext_only(tmp_path: Path, pki: DevPki) -> None:
    proc = start_daemon_process(tmp_path / "data", pki, "--insecure-dev-plaintext", tls=False)
    try:
        assert "PLAINTEXT" in proc.output()
        with grpc.insecure_channel(proc.target) as channel:
            assert not status(stub_of(channel)).initialized
        r = console("status", "--server", proc.target, "--insecure-dev-plaintext")
        assert (r.returncode, r.stdout.strip()) == (
            0,
            "not initialised: run `keyquorum ceremony init`",
        )
        # A TLS client cannot talk to it.
        assert _unreachable(proc.channel()) == grpc.StatusCode.UNAVAILABLE
    finally:
        assert proc.stop() == 0


def test_plaintext_client_cannot_talk_to_the_tls_server(served: DaemonProcess) -> None:
    assert _unreachable(grpc.insecure_channel(served.target)) == grpc.StatusCode.UNAVAILABLE
    with served.channel() as channel:
        assert not status(stub_of(channel)).initialized


def test_client_trusting_another_ca_is_refused(tmp_path: Path, served: DaemonProcess) -> None:
    other = make_dev_pki(tmp_path / "other-pki")
    creds = grpc.ssl_channel_credentials(root_certificates=other.ca_cert.read_bytes())
    channel = grpc.secure_channel(served.target, creds)
    assert _unreachable(channel) == grpc.StatusCode.UNAVAILABLE


def test_oversized_request_is_refused_and_the_daemon_keeps_serving(
    served: DaemonProcess, custodians: list[Custodian]
) -> None:
    one = custodians[0].public_path.read_bytes()
    copies = DEFAULT_LIMITS.max_message_bytes // len(one) + 1
    huge = pb.InitCeremonyRequest(
        deployment=DEPLOYMENT, threshold=THRESHOLD, public_credentials=[one] * copies
    )
    assert huge.ByteSize() > DEFAULT_LIMITS.max_message_bytes
    with served.channel() as channel:
        with pytest.raises(grpc.RpcError) as info:
            stub_of(channel).InitCeremony(huge, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Still serving, and nothing happened.
        assert not status(stub_of(channel)).initialized
    assert served.proc.poll() is None


# -- health and reflection -----------------------------------------------------------


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("", health_pb2.HealthCheckResponse.SERVING),
        ("keyquorum.v1.CustodianService", health_pb2.HealthCheckResponse.SERVING),
    ],
    ids=["server", "custodian-service"],
)
def test_health_check_serving(served: DaemonProcess, service: str, expected: int) -> None:
    with served.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == expected


def test_health_check_of_an_unknown_service_is_not_found(served: DaemonProcess) -> None:
    with served.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_custodian_service(served: DaemonProcess) -> None:
    with served.channel() as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"keyquorum.v1.CustodianService", "grpc.health.v1.Health"} <= services
        described = db.FindFileContainingSymbol("keyquorum.v1.CustodianService")
        methods = {
            m.name for s in described.service if s.name == "CustodianService" for m in s.method
        }
        assert {"InitCeremony", "SubmitShare", "Seal", "GetStatus"} <= methods


# -- core dumps ------------------------------------------------------------------------


def _limit_line(pid: int, name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith(name):
            return line[len(name) :].split()
    raise AssertionError(f"no {name!r} in /proc/{pid}/limits")


_PROBE = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("hardening", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
if sys.argv[2] == "harden":
    assert module.refuse_core_dumps() and module.is_non_dumpable()
print(os.getpid(), flush=True)
time.sleep(30)
"""


def _probe_owner(python: str, mode: str) -> int | None:
    """Run the hardening code as `nobody`; the owner of its /proc/<pid>/status.

    The kernel makes a process's /proc/<pid> files owned by root once it is
    non-dumpable (task_dump_owner in fs/proc/base.c), and by the process's
    own user otherwise; that shows PR_SET_DUMPABLE took effect, from outside.
    """
    hardening = Path(__file__).resolve().parent.parent / "hsm" / "hardening.py"
    try:
        child = subprocess.Popen(
            [python, "-c", _PROBE, str(hardening), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            user=65534,
            group=65534,
            extra_groups=[],
            cwd="/",
        )
    except OSError:
        return None
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            return None
        pid = int(line)
        return Path(f"/proc/{pid}/status").stat().st_uid
    finally:
        child.kill()
        child.wait()


def test_core_dumps_are_off(served: DaemonProcess) -> None:
    """What is checked, and what is not.

    Checked on the real daemon: its RLIMIT_CORE is 0 (soft and hard, from
    /proc/<pid>/limits) and it did not log that hardening failed.
    Checked on `hardening.refuse_core_dumps()`, the call the daemon makes at
    start, run as user `nobody` in a child process: afterwards the kernel
    treats that process as non-dumpable (its /proc files turn root-owned),
    and a control child that does not call it stays dumpable.
    Not checked on the daemon itself: it runs as root here, and a root
    process's /proc files are root-owned either way, so its dumpable flag
    is not observable from outside; PR_GET_DUMPABLE only reports on the
    caller.
    """
    assert _limit_line(served.proc.pid, "Max core file size")[:2] == ["0", "0"]
    assert "non-dumpable" not in served.output()
    if os.geteuid() != 0:
        pytest.skip("the dumpable probe switches to user nobody, which needs root")
    for python in (sys.executable, "/usr/bin/python3"):
        control = _probe_owner(python, "control")
        if control is None:
            continue
        assert control == 65534
        assert _probe_owner(python, "harden") == 0
        return
    pytest.skip("no Python interpreter that user nobody may run")
