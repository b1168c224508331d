"""The daemon's log formats and the relay of gRPC's C-core lines (hsm/logs.py,
hsm/stderr_relay.py).

A real `server run --log-format json` must write nothing but JSON objects,
one per line, with the C core's own lines among them as `grpc.core`
records; the relay process must hold no descriptor of the daemon's but its
pipe and stderr, must not see `NOTIFY_SOCKET`, must end with the daemon,
and must write out the last lines of a daemon that was killed.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from keyquorum.hsm import logs, stderr_relay
from keyquorum.hsm.pki import DevPki, make_dev_pki
from tests.harness import start_daemon_process
from tests.waiting import until


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("keyquorum.test", level, __file__, 1, message, None, None)


def test_text_lines_cannot_be_forged_with_line_breaks() -> None:
    line = logs.TextFormatter().format(record("name\n2026-01-01T00:00:00.000Z ERROR forged"))
    assert "\n" not in line
    assert line.endswith("keyquorum.test: name\\n2026-01-01T00:00:00.000Z ERROR forged")


def test_json_lines_are_one_object_each() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "keyquorum.test", logging.ERROR, __file__, 1, "a\nb", None, sys.exc_info()
        )
    line = logs.JsonFormatter().format(failed)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["level"] == "ERROR"
    assert obj["logger"] == "keyquorum.test"
    assert obj["message"] == "a\nb"
    assert "ValueError: boom" in obj["exc"]
    assert obj["time"].endswith("Z")


@pytest.mark.parametrize(
    ("line", "logger", "level", "message", "source"),
    [
        (
            "E1202 04:21:05.834902   16170 add_port.cc:83] Failed to add port",
            "grpc.core", "ERROR", "Failed to add port", "add_port.cc:83",
        ),
        (
            "W0102 00:00:00.000001 7 log.cc:102] Log level INFO is not suitable",
            "grpc.core", "WARNING", "Log level INFO is not suitable", "log.cc:102",
        ),
        ("F0102 00:00:00.1 7 x.cc:1] fatal", "grpc.core", "CRITICAL", "fatal", "x.cc:1"),
        ("Exception ignored in: <function f>", "stderr", "WARNING", "Exception ignored in: <function f>", None),  # noqa: E501
        ("X1202 04:21:05.1 1 a.cc:1] not absl", "stderr", "WARNING", "X1202 04:21:05.1 1 a.cc:1] not absl", None),  # noqa: E501
    ],
    ids=["error", "warning", "fatal", "python", "not-absl"],
)  # fmt: skip
def test_stderr_lines_become_records(
    line: str, logger: str, level: str, message: str, source: str | None
) -> None:
    r = stderr_relay.to_record(line)
    assert (r.name, r.levelname, r.getMessage()) == (logger, level, message)
    assert r.__dict__.get("source") == source


def test_the_relay_writes_every_line_in_the_format(tmp_path: Path) -> None:
    source = tmp_path / "in"
    source.write_text("E1202 04:21:05.1 5 a.cc:1] one\n\nplain two\n" + "x" * 20_000 + "\n")
    out = tmp_path / "out"
    with source.open() as src, out.open("w") as dst:
        stderr_relay.relay(src, dst, "json")
    objs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(o["logger"], o["message"][:9]) for o in objs] == [
        ("grpc.core", "one"),
        ("stderr", "plain two"),
        ("stderr", "xxxxxxxxx"),
    ]
    assert objs[0]["source"] == "a.cc:1"
    assert objs[0]["thread_id"] == 5
    assert objs[2]["message"].endswith(" [cut]")


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_json_daemon_output_is_json_only_with_core_lines_routed(
    tmp_path: Path, pki: DevPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At INFO the C core itself says it is not a production level: a line of its own.
    monkeypatch.setenv("GRPC_VERBOSITY", "info")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "no-listener"))
    proc = start_daemon_process(tmp_path / "data", pki, "--log-format", "json")
    try:
        (relay,) = _children(proc.proc.pid)
        environ = Path(f"/proc/{relay}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"NOTIFY_SOCKET=") for v in environ)
        fds = {int(fd.name) for fd in Path(f"/proc/{relay}/fd").iterdir()}
        # stdin (the pipe), stdout and stderr (the daemon's stderr): no store, no lock.
        assert fds == {0, 1, 2}, fds
        assert Path(f"/proc/{relay}/fd/0").readlink().name.startswith("pipe:")
    finally:
        assert proc.stop() == 0
    until(lambda: not Path(f"/proc/{relay}").exists(), "the relay to end with the daemon")
    lines = proc.output().splitlines()
    objs = [json.loads(line) for line in lines]  # every line is JSON
    assert all(set(o) >= {"time", "level", "logger", "message"} for o in objs)
    core = [o for o in objs if o["logger"] == "grpc.core"]
    assert any("not suitable for production" in o["message"] for o in core), core
    assert all(o["source"] for o in core)
    assert any(o["message"].startswith("listening on") for o in objs)
    # The relay's lines may come after the daemon's own last one (two writers).
    own = [o for o in objs if o["logger"] == "keyquorum.server"]
    assert own[-1]["message"] == "stopped"


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from keyquorum.hsm.stderr_relay import StderrRelay
    relay = StderrRelay.start("json")
    print(relay.pid, flush=True)
    os.write(2, b"F1202 04:21:05.834902 1 crash.cc:9] the last words\\n")
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_the_last_lines_of_a_killed_process_still_come_out() -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLED], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == -signal.SIGKILL
    relay = int(result.stdout.strip())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{relay}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # The relay read what was left in the pipe after the writer died, then ended.
    (line,) = result.stderr.splitlines() or [""]
    if not line:
        pytest.fail("the relay wrote nothing")
    obj = json.loads(line)
    assert (obj["logger"], obj["level"], obj["message"]) == (
        "grpc.core",
        "CRITICAL",
        "the last words",
    )
