"""Every refused custodian action as one log line: method, who, code, reason.

An operator reading the daemon's log sees each refusal of the custodian
port (a share that fails its commitment, a forged or replayed signature, a
proposal that cannot be approved, ...): the method, the custodian, the gRPC
code, and the reason as the error's kind and its description
(`SignatureError: A signature does not verify under the key it claims`).

Nothing a client sent is written: the error's own message can quote the
request (an unknown name, a parameter), so it goes to the caller only; the
custodian is named by fingerprint only when that fingerprint is on the
roster in force, "unknown" otherwise. So a log line holds no key material,
no share and no text an attacker chose (tests/test_service_fuzz.py
searches the daemon's output for request bytes). A custodian is named as
people read them everywhere, `alice (FKAO-JAYM-D5SP-FPYZ)` (quorum/people.py);
the full fingerprint goes only in the record's `fingerprint` field, which
the JSON log format writes as its own key (hsm/logs.py).

Anyone who reaches the custodian port (no client certificate) can make
refusals, so this log is bounded: per method and code, a burst of `BURST`
lines, then one per `INTERVAL` seconds, each saying how many were left out
since the previous one.

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
from keyquorum.quorum.people import label

log = logging.getLogger("keyquorum.custodian")

BURST: Final = 20
INTERVAL: Final = 1.0
#: Methods that only read; every other method of CustodianService acts.
READS: Final = frozenset(
    {"GetStatus", "GetEncryptedShare", "GetLogExtension", "ListProposals", "GetProposal",
     "ListTenants"}
)  # fmt: skip


def reason(error: KeyquorumError) -> str:
    """The error's kind and its class's one-line description (never its message)."""
    doc = (type(error).__doc__ or "").strip().split("\n\n", 1)[0]
    summary = " ".join(doc.split()).split("; ", 1)[0].rstrip(".")
    return f"{type(error).__name__}: {summary}" if summary else type(error).__name__


class RefusalLog:
    """Logs refusals, at most BURST then one per INTERVAL per (method, code).

    `name_of(fingerprint)` is the name of a custodian on the roster in
    force, None for anyone else; only a custodian on the roster is named.
    """

    def __init__(
        self,
        name_of: Callable[[str], str | None] = lambda _fingerprint: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name_of = name_of
        self._clock = clock
        self._lock = threading.Lock()
        # (method, code) -> [tokens, last refill, dropped since the last line]
        self._buckets: dict[tuple[str, str], list[float]] = {}

    def record(self, method: str, who: str, error: KeyquorumError) -> None:
        """Log that `method`, naming custodian `who` ("" if none), was refused with `error`."""
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
        name = self._name_of(who) if who else None
        if not who:
            named = "-"
        elif name is not None:
            named = label(name, who)
        else:
            named = "unknown"
        level = logging.INFO if method in READS else logging.WARNING
        log.log(
            level,
            "refused %s from custodian %s (%s): %s%s",
            method,
            named,
            code,
            reason(error),
            f" [{dropped} more {method} {code} refusals not logged]" if dropped else "",
            extra={"fingerprint": who} if name is not None else None,
        )
