"""The daemon's log records as text or JSON lines (`server run --log-format`).

One handler on the root logger, so every library that logs through Python's
`logging` (ours, gRPC's Python layer, psycopg) comes out in one format:

- text: `2026-12-02T04:21:05.834Z INFO keyquorum.server: message`, one line
  per record: line breaks inside a message are written as `\\n`, so a
  value that reaches a message (a name, a reason) cannot forge a line;
  a traceback follows on its own indented lines.
- json: one object per line, `{"time", "level", "logger", "message"}`, plus
  `"exc"` (the traceback's text) when there is one and the fields named in
  `EXTRA_FIELDS` when a record carries them (the gRPC C core's source
  location and thread, hsm/stderr_relay.py; the full fingerprint of the
  custodian a refusal line names, hsm/services/refusals.py). `json.dumps` escapes every
  control character, so each record stays one line.

Times are UTC, RFC 3339 with milliseconds. What reaches a record is the
caller's responsibility: no module of keyquorum logs key material
(tests/test_no_secret_leaks.py). This module uses the standard library
only, so the stderr relay process can import it without gRPC.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Final, TextIO

FORMATS: Final = ("text", "json")
#: Record attributes copied into JSON lines when present.
EXTRA_FIELDS: Final = ("source", "thread_id", "fingerprint")


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: message` with the message's line breaks escaped."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        line = f"{_timestamp(record.created)} {record.levelname} {record.name}: {message}"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "\n" + "\n".join("    " + part for part in trace.splitlines())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str, stream: TextIO) -> logging.Handler:
    """Make one handler writing `fmt` records of `level` and above to `stream` the only one."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # `warnings.warn` goes through the `py.warnings` logger instead of raw stderr.
    logging.captureWarnings(True)
    return handler
