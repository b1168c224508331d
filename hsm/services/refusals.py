"""Every refused custodian action as one log line: method, who, code, reason.

An operator reading the daemon's log sees each refusal of the custodian
port (a share that fails its commitment, a forged or replayed signature, a
proposal that cannot be approved, ...) with the method, the custodian's
fingerprint as the request names it, the gRPC code and the error's message.
Those messages never carry key material (quorum/errors.py's contract); the
request's other fields (shares, signatures, ciphertexts) are never logged.

Anyone who reaches the custodian port (no client certificate) can make
refusals, so this log is bounded: per method and code, a burst of `BURST`
lines, then one per `INTERVAL` seconds, each saying how many were left out
since the previous one. Text that came from a request is cut to a length
and kept to printable ASCII before it is written.

Changing actions are logged at WARNING; refused reads (an unknown
proposal, a status call during a database outage) at INFO.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from keyquorum.hsm.services.status import code_for
from keyquorum.quorum.errors import KeyquorumError

log = logging.getLogger("keyquorum.custodian")

BURST: Final = 20
INTERVAL: Final = 1.0
MAX_REASON: Final = 300
#: Methods that only read; every other method of CustodianService acts.
READS: Final = frozenset(
    {"GetStatus", "GetEncryptedShare", "GetLogExtension", "ListProposals", "GetProposal",
     "ListTenants"}
)  # fmt: skip


def _printable(text: str, limit: int) -> str:
    kept = "".join(c if " " <= c <= "~" else "?" for c in text[:limit])
    return kept + ("..." if len(text) > limit else "")


def _who(custodian: str) -> str:
    if not custodian:
        return "-"
    if len(custodian) >= 16 and all(c in "0123456789abcdef" for c in custodian):
        return custodian[:16]
    return repr(_printable(custodian, 40))


class RefusalLog:
    """Logs refusals, at most BURST then one per INTERVAL per (method, code)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # (method, code) -> [tokens, last refill, dropped since the last line]
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def record(self, method: str, who: str, error: KeyquorumError) -> None:
        code = code_for(error).name
        now = self._clock()
        with self._lock:
            bucket = self._buckets.setdefault((method, code), [float(BURST), now, 0.0])
            bucket[0] = min(float(BURST), bucket[0] + (now - bucket[1]) / INTERVAL)
            bucket[1] = now
            if bucket[0] < 1:
                bucket[2] += 1
                return
            bucket[0] -= 1
            dropped, bucket[2] = int(bucket[2]), 0.0
        level = logging.INFO if method in READS else logging.WARNING
        log.log(
            level,
            "refused %s from custodian %s (%s): %s%s",
            method,
            _who(who),
            code,
            _printable(str(error), MAX_REASON),
            f" [{dropped} more {method} {code} refusals not logged]" if dropped else "",
        )
