"""CLI start-up: `keyquorum --help` and `keyquorum status`, process start to exit.

Each row is the median wall time of whole processes (interpreter start,
imports, the command), against `python -c pass` with the same interpreter
in the same run. `status` asks a daemon started here (awaiting
its ceremony: one GetStatus call over TLS, as an operator runs it). The target is 0.2 s
per command on this project's 2-core machine (issue 18).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.harness import Row

KEYQUORUM = Path(sys.executable).with_name("keyquorum")
TARGET_SECONDS = 0.2


def _median_seconds(argv: Sequence[str], runs: int) -> float:
    subprocess.run(argv, capture_output=True, check=True)  # warm the page cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def _daemon() -> Iterator[tuple[str, Path]]:
    """A daemon on a loopback port with a development PKI: (target, CA certificate)."""
    with tempfile.TemporaryDirectory() as scratch:
        ready, pki = Path(scratch) / "ready", Path(scratch) / "pki"
        subprocess.run(
            [str(KEYQUORUM), "admin", "dev-pki", "--out", str(pki)], capture_output=True, check=True
        )
        proc = subprocess.Popen(
            [
                str(KEYQUORUM), "server", "run", "--data-dir", f"{scratch}/data",
                "--listen", "127.0.0.1:0", "--tls-cert", str(pki / "server.crt"),
                "--tls-key", str(pki / "server.key"),
                "--ready-file", str(ready), "--log-level", "WARNING",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the benchmark's daemon did not start")
                time.sleep(0.05)
            yield f"127.0.0.1:{json.loads(ready.read_text())['port']}", pki / "ca.crt"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _row(what: str, seconds: float, baseline: float) -> Row:
    verdict = "MET" if seconds < TARGET_SECONDS else "NOT MET"
    return Row(
        f"{what} (median {seconds * 1000:.0f} ms; target <{TARGET_SECONDS * 1000:.0f} ms: "
        f"{verdict})",
        1 / seconds,
        f"python -c pass (median {baseline * 1000:.0f} ms)",
        1 / baseline,
        unit="runs/s",
    )


def run(quick: bool) -> list[Row]:
    runs = 5 if quick else 21
    baseline = _median_seconds([sys.executable, "-c", "pass"], runs)
    rows = [_row("keyquorum --help", _median_seconds([str(KEYQUORUM), "--help"], runs), baseline)]
    with _daemon() as (target, ca):
        status = [str(KEYQUORUM), "status", "--server", target, "--ca", str(ca)]
        rows.append(
            _row("keyquorum status (one GetStatus call)", _median_seconds(status, runs), baseline)
        )
    return rows
