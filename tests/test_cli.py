"""The `keyquorum` command as a custodian meets it: the installed console script.

Every run here is a child process of `.venv/bin/keyquorum` against a real
daemon process over TLS: credentials made with `custodian new`, a 5-of-7
ceremony, confirmations, an unseal, a seal, and each refusal's exit code
and one-line message. Passphrase prompts run on a pseudo-terminal that is
the child's controlling terminal, as on a custodian's laptop, so an echoed
passphrase would show in what the terminal received.
"""

from __future__ import annotations

import os
import pty
import re
import select
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest

from keyquorum.cli.main import main as cli_main
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum.credentials import CustodianCredential, PublicCredential
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import (
    KEYQUORUM,
    Custodian,
    DaemonProcess,
    ceremony_request,
    console,
    make_custodians,
    run_cli,
    start_daemon_process,
)

DEPLOYMENT = "cli-deployment"
MADE_BY_CLI = ("alice", "bob")
OTHERS = ("carol", "dave", "erin", "frank", "grace")
SEAL_HEADER = "keyquorum statement v2: SEAL"
CONFIRM_HEADER = "keyquorum statement v2: CONFIRM-SHARE"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


def _with_fd(
    data: bytes, run: Callable[[int], subprocess.CompletedProcess[str]]
) -> subprocess.CompletedProcess[str]:
    """Run with the read end of a pipe that holds `data` (a --passphrase-fd source)."""
    read, write = os.pipe()
    try:
        os.write(write, data)
        os.close(write)
        return run(read)
    finally:
        os.close(read)


@pytest.fixture(scope="module")
def made(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[Custodian], dict[str, subprocess.CompletedProcess[str]]]:
    """Alice by `custodian new --passphrase-file`, bob by `--passphrase-fd`, five more."""
    directory = tmp_path_factory.mktemp("custodians")
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    out: list[Custodian] = []
    for name in MADE_BY_CLI:
        passphrase = f"correct horse {name} battery".encode()
        pp = directory / f"{name}.passphrase"
        pp.write_bytes(passphrase + b"\n")
        args = ["custodian", "new", "--name", name, "--out", str(directory)]
        if name == "alice":
            results[name] = console(*args, "--passphrase-file", str(pp))
        else:

            def via_fd(fd: int, args: list[str] = args) -> subprocess.CompletedProcess[str]:
                return console(*args, "--passphrase-fd", str(fd), pass_fds=(fd,))

            results[name] = _with_fd(passphrase + b"\n", via_fd)
        private = directory / f"{name}.kqcred"
        if results[name].returncode != 0:
            return out, results
        credential = CustodianCredential.decrypt(private.read_bytes(), passphrase)
        out.append(
            Custodian(name, credential, private, directory / f"{name}.pub.json", passphrase, pp)
        )
    return out + make_custodians(directory, OTHERS), results


@pytest.fixture(scope="module")
def custodians(
    made: tuple[list[Custodian], dict[str, subprocess.CompletedProcess[str]]],
) -> list[Custodian]:
    assert len(made[0]) == 7, {n: r.stderr for n, r in made[1].items()}
    return made[0]


def ok(*args: str, **kw: object) -> str:
    r = console(*args, **kw)  # type: ignore[arg-type]
    assert r.returncode == 0, f"{args}: {r.stderr}"
    return r.stdout


def refused(r: subprocess.CompletedProcess[str]) -> str:
    """Exit code 1, nothing on stdout, one `error: ...` line ending stderr; that line."""
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    assert r.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0]


def run_in_pty(
    args: list[str], answers: list[tuple[str, bytes]], timeout: float = 60
) -> tuple[int, str]:
    """Run the console script with a pty as its controlling terminal.

    Each answer is written once its prompt has appeared after the previous
    one. Returns the exit code and everything the terminal showed.
    """
    master, slave = pty.openpty()
    become_tty = (
        "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYQUORUM_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", become_tty, str(KEYQUORUM), *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
        env=env,
    )
    os.close(slave)
    shown = bytearray()
    pending = list(answers)
    searched = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
                if pending:
                    at = shown.find(pending[0][0].encode(), searched)
                    if at >= 0:
                        searched = at + len(pending[0][0])
                        os.write(master, pending.pop(0)[1])
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not pending, f"prompts not seen: {pending!r}\n{shown.decode(errors='replace')}"
    return code, shown.decode(errors="replace")


def assert_shown_before_prompt(shown: str, header: str, prompt: str, secret: bytes) -> None:
    assert header in shown, shown
    assert prompt in shown, shown
    assert shown.index(header) < shown.index(prompt)
    assert secret.decode() not in shown
    assert "may be echoed" not in shown  # getpass fell back to a visible prompt


# -- custodian new and show ------------------------------------------------------


@pytest.mark.parametrize("name", MADE_BY_CLI, ids=["passphrase-file", "passphrase-fd"])
def test_custodian_new_writes_a_private_and_a_public_file(
    made: tuple[list[Custodian], dict[str, subprocess.CompletedProcess[str]]], name: str
) -> None:
    custodians, results = made
    r = results[name]
    assert r.returncode == 0, r.stderr
    c = next(c for c in custodians if c.name == name)
    assert stat.S_IMODE(c.private_path.stat().st_mode) == 0o600
    public = PublicCredential.from_bytes(c.public_path.read_bytes())
    assert public == c.credential.public()
    assert f"fingerprint:        {public.short_fingerprint}" in r.stdout.splitlines()
    assert c.passphrase.decode() not in r.stdout + r.stderr
    # It never overwrites a credential.
    again = console(
        "custodian", "new", "--name", name, "--out", str(c.private_path.parent),
        "--passphrase-file", str(c.passphrase_path),
    )  # fmt: skip
    assert "refusing to overwrite" in refused(again)


def test_custodian_new_prompt_is_hidden_and_asks_twice(tmp_path: Path) -> None:
    secret = b"a prompt passphrase 42"
    code, shown = run_in_pty(
        ["custodian", "new", "--name", "hana", "--out", str(tmp_path)],
        [("New passphrase", secret + b"\n"), ("Repeat for confirmation", secret + b"\n")],
    )
    assert code == 0, shown
    assert secret.decode() not in shown
    assert "may be echoed" not in shown
    credential = CustodianCredential.decrypt((tmp_path / "hana.kqcred").read_bytes(), secret)
    assert credential.name == "hana"


def test_custodian_show(custodians: list[Custodian]) -> None:
    c = custodians[0]
    public = c.credential.public()
    assert ok("custodian", "show", str(c.public_path)).splitlines() == [
        f"name:        {c.name}",
        f"fingerprint: {public.short_fingerprint}",
        f"shown as:    {c.name} ({public.short_fingerprint})",
    ]


# -- the full path -------------------------------------------------------------------


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki) -> Iterator[DaemonProcess]:
    proc = start_daemon_process(tmp_path / "data", pki)
    yield proc
    assert proc.stop() == 0


def status_lines(d: DaemonProcess) -> list[str]:
    return ok("status", *d.conn_args()).splitlines()


def test_ceremony_confirm_unseal_seal_from_the_command_line(
    daemon: DaemonProcess, custodians: list[Custodian]
) -> None:
    conn = daemon.conn_args()
    assert ok("status", *conn).strip() == "not initialised: run `keyquorum ceremony init`"
    out = ok(
        "ceremony", "init", *conn, "--deployment", DEPLOYMENT, "--threshold", "5",
        "--code", daemon.ceremony_code(), *(str(c.public_path) for c in custodians),
    )  # fmt: skip
    assert out.splitlines()[0] == f"deployment {DEPLOYMENT}: 5 of 7 custodians"
    for i, c in enumerate(custodians, start=1):
        assert (
            f"  share {i}: {c.name} ({c.credential.public().short_fingerprint})" in out.splitlines()
        )
    lines = status_lines(daemon)
    assert f"deployment {DEPLOYMENT}, replica proc-1: SEALED" in lines
    assert "ceremony confirmed by 0 of 7" in lines

    # Alice at a terminal: the statement, then the hidden prompt.
    alice, bob, carol = custodians[:3]
    code, shown = run_in_pty(
        ["custodian", "confirm", *conn, "--credential", str(alice.private_path)],
        [("Passphrase for alice.kqcred", alice.passphrase + b"\n")],
    )
    assert code == 0, shown
    assert_shown_before_prompt(
        shown, CONFIRM_HEADER, "Passphrase for alice.kqcred", alice.passphrase
    )
    assert f"custodian: {alice.credential.public().label}" in shown
    assert "ceremony confirmed by 1 of 7" in shown
    # Bob through a descriptor, carol through a file.
    r = _with_fd(
        bob.passphrase + b"\n",
        lambda fd: console(
            "custodian", "confirm", *conn, "--credential", str(bob.private_path),
            "--passphrase-fd", str(fd), pass_fds=(fd,),
        ),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert ok("custodian", "confirm", *conn, *carol.cli_args()).strip() == (
        "share confirmed; ceremony confirmed by 3 of 7"
    )
    assert "ceremony confirmed by 3 of 7" in status_lines(daemon)
    assert f"  share 2: {bob.credential.public().label}, confirmed" in status_lines(daemon)

    for n, c in enumerate(custodians[2:7], start=1):
        r = console("custodian", "unseal", *conn, *c.cli_args())
        assert r.returncode == 0, r.stderr
        state = "still sealed" if n < 5 else "UNSEALED"
        assert r.stdout.strip() == f"share accepted: {n} of 5; {state}"
        assert c.passphrase.decode() not in r.stdout + r.stderr
        # The exact statement is shown before it is signed.
        assert "keyquorum statement v2: UNSEAL-SHARE" in r.stderr
        assert f"custodian: {c.credential.public().label}" in r.stderr
        if n < 5:
            assert f"unseal progress: {n} of 5" in status_lines(daemon)
    assert f"deployment {DEPLOYMENT}, replica proc-1: UNSEALED" in status_lines(daemon)

    code, shown = run_in_pty(
        ["custodian", "seal", *conn, "--credential", str(bob.private_path), "--reason", "drill"],
        [("Passphrase for bob.kqcred", bob.passphrase + b"\n")],
    )
    assert code == 0, shown
    assert_shown_before_prompt(shown, SEAL_HEADER, "Passphrase for bob.kqcred", bob.passphrase)
    assert "reason: drill" in shown
    assert shown.rstrip().endswith("sealed")
    assert f"deployment {DEPLOYMENT}, replica proc-1: SEALED" in status_lines(daemon)
    assert bob.passphrase.decode() not in daemon.output()


# -- refusals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def initialised(
    tmp_path_factory: pytest.TempPathFactory, pki: DevPki, custodians: list[Custodian]
) -> Iterator[DaemonProcess]:
    proc = start_daemon_process(tmp_path_factory.mktemp("init") / "data", pki)
    with proc.channel() as channel:
        pb_grpc.CustodianServiceStub(channel).InitCeremony(
            ceremony_request(DEPLOYMENT, 5, custodians, proc.ceremony_code())
        )
    yield proc
    assert proc.stop() == 0


Args = Callable[[DaemonProcess, list[Custodian], Path], list[str]]


def _wrong_passphrase(d: DaemonProcess, cs: list[Custodian], tmp: Path) -> list[str]:
    wrong = tmp / "wrong"
    wrong.write_bytes(b"not alice's passphrase\n")
    return ["custodian", "confirm", *d.conn_args(), "--credential", str(cs[0].private_path),
            "--passphrase-file", str(wrong)]  # fmt: skip


def _second_ceremony(d: DaemonProcess, cs: list[Custodian], _tmp: Path) -> list[str]:
    return ["ceremony", "init", *d.conn_args(), "--deployment", "again",
            *(str(c.public_path) for c in cs)]  # fmt: skip


def _non_custodian(d: DaemonProcess, _cs: list[Custodian], tmp: Path) -> list[str]:
    (stranger,) = make_custodians(tmp / "stranger", ("oscar",))
    return ["custodian", "unseal", *d.conn_args(), *stranger.cli_args()]


REFUSALS: list[tuple[str, Args, str]] = [
    ("wrong-passphrase", _wrong_passphrase, "wrong passphrase for credential 'alice'"),
    ("second-ceremony", _second_ceremony, "already initialised"),
    (
        "missing-ca",
        lambda d, _cs, _t: ["status", "--server", d.target],
        "--ca is required for TLS",
    ),
    (
        "plaintext-to-lan-address",
        lambda _d, _cs, _t: ["status", "--server", "10.1.2.3:7443", "--insecure-dev-plaintext"],
        "plaintext is allowed only on loopback",
    ),
    (
        "plaintext-to-a-name",
        lambda _d, _cs, _t: ["status", "--server", "kq.example:7443", "--insecure-dev-plaintext"],
        "plaintext is allowed only on loopback",
    ),
    (
        "no-daemon-there",
        lambda d, _cs, _t: ["status", "--server", "127.0.0.1:1", "--ca", str(d.pki.ca_cert)],
        "cannot reach the daemon at 127.0.0.1:1: nothing listens on 127.0.0.1:1 "
        "(connection refused)",
    ),
    ("not-on-the-roster", _non_custodian, "not on the roster"),
]


@pytest.mark.parametrize(
    ("args", "message"), [(a, m) for _n, a, m in REFUSALS], ids=[n for n, _a, _m in REFUSALS]
)
def test_refusal_exits_1_with_one_error_line(
    initialised: DaemonProcess,
    custodians: list[Custodian],
    tmp_path: Path,
    args: Args,
    message: str,
) -> None:
    before = ok("status", *initialised.conn_args())
    line = refused(console(*args(initialised, custodians, tmp_path)))
    assert message in line, line
    assert ok("status", *initialised.conn_args()) == before


def test_duplicate_unseal_is_refused_naming_the_custodian(
    initialised: DaemonProcess, custodians: list[Custodian]
) -> None:
    dave = custodians[3]
    args = ["custodian", "unseal", *initialised.conn_args(), *dave.cli_args()]
    first = console(*args)
    assert first.returncode == 0, first.stderr
    have = re.match(r"share accepted: (\d) of 5", first.stdout)
    assert have is not None
    line = refused(console(*args))
    assert "custodian dave" in line
    assert "already submitted" in line
    assert f"unseal progress: {have[1]} of 5" in ok("status", *initialised.conn_args())


# -- help ----------------------------------------------------------------------------------


def _commands(
    group: click.Group, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


COMMANDS = list(_commands(cli_main))


def test_every_command_is_listed() -> None:
    names = {" ".join(p) for p, _c in COMMANDS}
    assert {
        "server run", "ceremony init", "custodian new", "custodian show",
        "custodian confirm", "custodian unseal", "custodian seal", "status", "admin dev-pki",
    } <= names  # fmt: skip


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _c in COMMANDS])
def test_help_works_and_keeps_examples(path: tuple[str, ...], command: click.Command) -> None:
    code, out = run_cli(*path, "--help")
    assert code == 0, out
    assert out.startswith(f"Usage: main {' '.join(path)}") or out.startswith("Usage: ")
    doc = command.help or ""
    if "Example" in doc:
        example = doc.split("Example", 1)[1].splitlines()[1:]
        for line in (ln.strip() for ln in example if ln.strip()):
            # Each example line survives as its own line (click's \b keeps it unwrapped).
            assert any(shown.strip() == line for shown in out.splitlines()), (line, out)


def test_console_script_help() -> None:
    top = ok("--help")
    for name in ("admin", "ceremony", "custodian", "server", "status"):
        assert re.search(rf"^\s+{name}\s", top, re.MULTILINE), top
    unseal = ok("custodian", "unseal", "--help")
    assert "Example:" in unseal
    assert "keyquorum custodian unseal --server kq.example:7443 --ca ca.pem" in unseal
