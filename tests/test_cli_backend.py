"""`keyquorum backend` against a real daemon over mTLS, with the backend's certificate.

In process through click's runner (stdin fed, stdout read as bytes), and
once as the installed console script in a child process with pipes. Secrets
go in by file or stdin only; what comes out that is secret lands in new
0600 files or on stdout; a failed decryption leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from keyquorum.cli.main import main as cli_main
from keyquorum.client import decrypt_record, framing
from keyquorum.hsm.pki import DevPki
from tests.harness import KEYQUORUM, Custodian, make_custodians
from tests.key_plane import BOOKING, CONTEXT, TENANT, Served, make_pki, served


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("cli-backend")
    pki: DevPki = make_pki(base / "pki")
    custodians: list[Custodian] = make_custodians(base / "custodians")
    with served(base / "data", pki, custodians) as s:
        yield s


@pytest.fixture(scope="module")
def context_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ctx") / "context.json"
    path.write_text(json.dumps(CONTEXT))
    return path


def conn(world: Served) -> list[str]:
    files = world.kp.pki.client(BOOKING)
    return [
        "--server", world.kp.target, "--ca", str(world.kp.pki.ca_cert),
        "--cert", str(files.cert), "--key", str(files.key),
    ]  # fmt: skip


def cli(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(cli_main, list(args), input=stdin, catch_exceptions=False)


def test_wrap_reads_stdin_and_unwrap_gives_it_back(world: Served, context_file: Path) -> None:
    secret = b"a value to keep \x00\xff"
    wrapped = cli("backend", "wrap", *conn(world), "--tenant", TENANT,
                  "--context-file", str(context_file), stdin=secret)  # fmt: skip
    assert wrapped.exit_code == 0, wrapped.output
    ciphertext = base64.b64decode(wrapped.stdout)
    with world.client() as c:
        assert c.unwrap(ciphertext, CONTEXT).reveal() == secret
    pairs = [arg for k, v in CONTEXT.items() for arg in ("--context", f"{k}={v}")]
    back = cli("backend", "unwrap", *conn(world), *pairs, stdin=wrapped.stdout_bytes)
    assert back.exit_code == 0, back.output
    assert back.stdout_bytes == secret


def test_wrap_json_and_unwrap_into_a_new_private_file(
    world: Served, context_file: Path, tmp_path: Path
) -> None:
    plain_in = tmp_path / "secret.bin"
    plain_in.write_bytes(b"from a file")
    r = cli("backend", "wrap", *conn(world), "--tenant", TENANT, "--context-file",
            str(context_file), "--in", str(plain_in), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert answer["key_version"] == 1
    ct = tmp_path / "secret.wrapped"
    ct.write_text(answer["ciphertext"] + "\n")
    out = tmp_path / "back.bin"
    args = ["backend", "unwrap", *conn(world), "--context-file", str(context_file),
            "--in", str(ct), "--out", str(out)]  # fmt: skip
    assert cli(*args).exit_code == 0
    assert out.read_bytes() == b"from a file"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    again = cli(*args)
    assert again.exit_code == 1
    assert "exists; it is not overwritten" in again.output
    assert out.read_bytes() == b"from a file"


def test_data_key_prints_the_wrapped_form_and_writes_the_key_privately(
    world: Served, context_file: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "dk.bin"
    r = cli("backend", "data-key", *conn(world), "--tenant", TENANT, "--context-file",
            str(context_file), "--plaintext-out", str(key_file))  # fmt: skip
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    assert answer["size"] == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    with world.client() as c:
        unwrapped = c.unwrap(base64.b64decode(answer["ciphertext"]), CONTEXT)
        assert unwrapped.reveal() == key_file.read_bytes()
    assert key_file.read_bytes().hex() not in r.output
    bare = cli("backend", "data-key", *conn(world), "--tenant", TENANT, "--size", "16")
    assert bare.exit_code == 0
    assert set(json.loads(bare.stdout)) == {"ciphertext", "key_version", "size"}


def test_encrypt_and_decrypt_a_file(world: Served, context_file: Path, tmp_path: Path) -> None:
    data = os.urandom(1_000_000)
    src, sealed, out = tmp_path / "scan.pdf", tmp_path / "scan.kqe", tmp_path / "scan.out"
    src.write_bytes(data)
    ctx = ["--context-file", str(context_file)]
    r = cli("backend", "encrypt-file", *conn(world), "--tenant", TENANT, *ctx,
            "--frame-size", "100000", str(src), str(sealed))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "encrypted 1,000,000 bytes into 10 frames" in r.stderr
    assert framing.parse_header(sealed.read_bytes()).frame_size == 100_000
    r = cli("backend", "decrypt-file", *conn(world), *ctx, str(sealed), str(out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == data
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with world.client() as c:  # the same bytes as the library's
        assert decrypt_record(c, sealed.read_bytes(), CONTEXT).reveal() == data
    refused = cli("backend", "encrypt-file", *conn(world), "--tenant", TENANT, *ctx,
                  str(src), str(sealed))  # fmt: skip
    assert refused.exit_code == 1
    assert "give --force" in refused.output


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", "ends before its final frame"),
        ("flip", "frame 3 does not authenticate"),
        ("context", "does not authenticate: another encryption context"),
    ],
    ids=["truncated", "bit-flip", "wrong-context"],
)
def test_a_failed_decryption_leaves_nothing_behind(
    world: Served, context_file: Path, tmp_path: Path, damage: str, match: str
) -> None:
    src, sealed = tmp_path / "in", tmp_path / "in.kqe"
    src.write_bytes(os.urandom(5000))
    ctx = ["--context-file", str(context_file)]
    r = cli("backend", "encrypt-file", *conn(world), "--tenant", TENANT, *ctx,
            "--frame-size", "1000", str(src), str(sealed))  # fmt: skip
    assert r.exit_code == 0
    envelope = sealed.read_bytes()
    if damage == "truncate":
        sealed.write_bytes(envelope[: -(1000 + 16)])
    elif damage == "flip":
        head = framing.parse_header(envelope).size
        sealed.write_bytes(
            envelope[: head + 2 * 1016 + 5]
            + bytes([envelope[head + 2 * 1016 + 5] ^ 4])
            + envelope[head + 2 * 1016 + 6 :]
        )
    else:
        ctx = ["--context", "patient=someone-else"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = cli("backend", "decrypt-file", *conn(world), *ctx, str(sealed), str(out_dir / "plain"))
    assert r.exit_code == 1
    assert match in r.output
    assert list(out_dir.iterdir()) == []  # neither the output nor a temporary file


def test_a_progress_bar_when_asked(world: Served, context_file: Path, tmp_path: Path) -> None:
    """Not on a terminal: asked for, the bar writes its label once; told not to, nothing."""
    src, sealed = tmp_path / "big", tmp_path / "big.kqe"
    src.write_bytes(bytes(3_000_000))
    r = cli("backend", "encrypt-file", *conn(world), "--tenant", TENANT, "--context-file",
            str(context_file), "--progress", str(src), str(sealed))  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stderr.count("encrypting") == 1
    quiet = cli("backend", "decrypt-file", *conn(world), "--context-file", str(context_file),
                "--no-progress", str(sealed), str(tmp_path / "back"))  # fmt: skip
    assert quiet.exit_code == 0
    assert "decrypting" not in quiet.stderr


def test_a_large_file_draws_a_bar_on_a_terminal(
    world: Served, context_file: Path, tmp_path: Path
) -> None:
    """The console script with stderr on a pseudo-terminal: a bar by default from 8 MiB."""
    src, sealed = tmp_path / "big", tmp_path / "big.kqe"
    src.write_bytes(bytes(9 << 20))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [str(KEYQUORUM), "backend", "encrypt-file", *conn(world), "--tenant", TENANT,
         "--context-file", str(context_file), str(src), str(sealed)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0, seen
    assert b"encrypting" in seen
    assert b"100%" in seen
    assert b"[####" in seen


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["wrap", "--tenant", TENANT, "my secret"], "unexpected extra argument"),
        (["wrap", "--tenant", TENANT, "--plaintext", "x"], "No such option"),
        (["unwrap", "--context", "novalue"], "--context takes KEY=VALUE"),
        (["unwrap", "--context", "a=1", "--context", "a=2"], "context key 'a' is given twice"),
    ],
    ids=["secret-as-argument", "secret-as-option", "bad-pair", "pair-twice"],
)
def test_secrets_never_come_from_the_command_line(
    world: Served, args: list[str], match: str
) -> None:
    r = CliRunner().invoke(cli_main, ["backend", args[0], *conn(world), *args[1:]], input=b"")
    assert r.exit_code != 0
    assert match in r.output


def test_a_context_file_with_a_number_is_named(world: Served, tmp_path: Path) -> None:
    bad = tmp_path / "ctx.json"
    bad.write_text('{"patient": "p-1", "visit": 3}')
    r = cli("backend", "wrap", *conn(world), "--tenant", TENANT, "--context-file", str(bad),
            stdin=b"x")  # fmt: skip
    assert r.exit_code == 1
    assert "context key 'visit' has a value of type int" in r.output


def test_mtls_files_are_required(world: Served) -> None:
    r = cli("backend", "wrap", "--server", world.kp.target, "--tenant", TENANT, stdin=b"x")
    assert r.exit_code == 1
    assert "needs mTLS" in r.output


def test_the_console_script_streams_through_pipes(world: Served, context_file: Path) -> None:
    """The installed command, a child process: stdin to stdout both ways, settings from env."""
    files = world.kp.pki.client(BOOKING)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEYQUORUM_")},
        "KEYQUORUM_BACKEND_SERVER": world.kp.target,
        "KEYQUORUM_CA": str(world.kp.pki.ca_cert),
        "KEYQUORUM_CLIENT_CERT": str(files.cert),
        "KEYQUORUM_CLIENT_KEY": str(files.key),
    }
    data = os.urandom(300_000)
    ctx = ["--context-file", str(context_file)]

    def run(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(KEYQUORUM), "backend", *args], input=stdin, capture_output=True,
            env=env, timeout=60, check=False,
        )  # fmt: skip

    sealed = run("encrypt-file", "--tenant", TENANT, *ctx, "-", "-", stdin=data)
    assert sealed.returncode == 0, sealed.stderr
    assert sealed.stdout[:4] == b"KQE\x02"
    opened = run("decrypt-file", *ctx, "-", "-", stdin=sealed.stdout)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == data
    cut = run("decrypt-file", *ctx, "-", "-", stdin=sealed.stdout[:-100])
    assert cut.returncode == 1
    assert b"error:" in cut.stderr
