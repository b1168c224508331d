"""What reaches the daemon's stderr descriptor comes out as log records.

gRPC's C core logs through absl straight to file descriptor 2
(`E1202 04:21:05.834902   16170 add_port.cc:83] message`), past Python's
`logging`, so its lines would sit between ours in another format (and break
a JSON-lines consumer). `StderrRelay.start` points descriptor 2 at a pipe
read by a small child process (`python -m keyquorum.hsm.stderr_relay`) that
turns each line into a record in the daemon's format: logger `grpc.core`,
level from the line's first letter (I, W, E, F), with its `source` file and
line and its `thread_id`, for absl lines; logger `stderr` at WARNING for
anything else (Python's last-resort messages, a library printing). How much
the C core says is set by gRPC's own `GRPC_VERBOSITY` (default ERROR) and
`GRPC_TRACE` environment variables.

A process rather than a thread: when the daemon dies abruptly (absl's
FATAL, a crash) its last lines are still in the pipe, and only a reader
that outlives it can write them out. The child ignores SIGINT and SIGTERM
(a service manager signals the whole group) and ends when the pipe has no
writer left, i.e. once the daemon has exited or called `stop`. It holds
nothing of the daemon's: started before any key or credential is read, with
no descriptor but the pipe and the original stderr.

The daemon's own records do not pass through the relay: its handler writes
to `StderrRelay.original`, a duplicate of the stderr it started with.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from typing import Final, TextIO

from keyquorum.hsm import logs

#: absl's prefix: severity, MMDD, time, thread id, file:line.
ABSL_LINE: Final = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+(\d+) ([^\]\s]+:\d+)\] ?(.*)$")
ABSL_LEVELS: Final = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
#: Longest line relayed; the rest of a longer one is cut (and marked).
MAX_LINE: Final = 16_384
#: How long `stop` waits for the relay to write out what is left.
STOP_SECONDS: Final = 5.0


def to_record(line: str) -> logging.LogRecord:
    """The log record for one line written to stderr (no trailing newline)."""
    match = ABSL_LINE.match(line)
    if match is None:
        return logging.makeLogRecord(
            {"name": "stderr", "levelno": logging.WARNING, "levelname": "WARNING", "msg": line}
        )
    letter, thread, source, message = match.groups()
    level = ABSL_LEVELS[letter]
    return logging.makeLogRecord(
        {
            "name": "grpc.core",
            "levelno": level,
            "levelname": logging.getLevelName(level),
            "msg": message,
            "source": source,
            "thread_id": int(thread),
        }
    )


def relay(source: TextIO, out: TextIO, fmt: str) -> None:
    """Write each line of `source` to `out` as a record in `fmt`, until end of input."""
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.formatter(fmt))
    for raw in source:
        line = raw.rstrip("\n")
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + " [cut]"
        if line:
            handler.handle(to_record(line))


class StderrRelay:
    """The running relay: descriptor 2 goes to it until `stop`."""

    def __init__(self, original_fd: int, process: subprocess.Popen[bytes]) -> None:
        self._original_fd = original_fd
        self._process = process
        self.original: TextIO = os.fdopen(
            os.dup(original_fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace"
        )

    @classmethod
    def start(cls, fmt: str) -> StderrRelay:
        """Start the relay process and point descriptor 2 at it."""
        logs.formatter(fmt)  # refuse an unknown format before touching descriptors
        sys.stderr.flush()
        original = os.dup(2)
        read_end, write_end = os.pipe()
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "keyquorum.hsm.stderr_relay", "--format", fmt],
                stdin=read_end,
                stdout=original,
                stderr=original,
                close_fds=True,
                env=env,
            )
        except OSError:
            for fd in (original, read_end, write_end):
                os.close(fd)
            raise
        os.close(read_end)
        os.dup2(write_end, 2)
        os.close(write_end)
        return cls(original, process)

    @property
    def pid(self) -> int:
        return self._process.pid

    def stop(self) -> int | None:
        """Give descriptor 2 back and let the relay write out the rest; its exit code."""
        with contextlib.suppress(OSError):
            sys.stderr.flush()
        os.dup2(self._original_fd, 2)  # the pipe's last writer is gone: the relay sees EOF
        os.close(self._original_fd)
        try:
            code = self._process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            code = self._process.wait()
        self.original.close()
        return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m keyquorum.hsm.stderr_relay")
    parser.add_argument("--format", choices=logs.FORMATS, default="text")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    source = open(  # noqa: SIM115 (lives as long as the process)
        sys.stdin.fileno(), encoding="utf-8", errors="backslashreplace", closefd=False
    )
    relay(source, sys.stdout, args.format)


if __name__ == "__main__":
    main()
