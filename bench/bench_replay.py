"""Replay and full verification of the quorum log, against hashlib over the same bytes.

Two logs, each built once per run:
- a cheap one of 50,000 entries (10,000 with --quick): the genesis, then
  the daemon's own seals, each signed by the log key (one Ed25519
  verification per entry: nothing enters the log unsigned), so the row
  shows what decoding, schema checks, the hash chain, the state and the
  cheapest signature cost;
- a signed one of 10,000 entries (2,000 with --quick): the genesis, then
  create-tenant proposals each with 3 hybrid-signed approvals (Ed25519 +
  ML-DSA-65) and an execution, so the row is honest about signature cost.

`verify` is `replay.verify_log`: replay plus the RFC 9162 root of every
entry plus the checkpoint's Ed25519 signature. The baseline is plain
`hashlib.sha256` of each entry's bytes, in the same run.
"""

from __future__ import annotations

import hashlib

from bench.harness import Row, items_per_second
from keyquorum.quorum.log import SealPayload, entry_hash, next_entry
from keyquorum.quorum.replay import replay, verify_log
from tests.logfactory import LogFactory, log_signer


class _Head:
    """Just enough of a log's end for `next_entry`, without replaying while building."""

    def __init__(self, size: int, head: bytes, time: int) -> None:
        self.size, self.head, self.time = size, head, time


def _cheap_log(count: int) -> tuple[list[bytes], str]:
    f = LogFactory(seed=b"bench")
    entries = list(f.entries)
    head = _Head(1, entry_hash(entries[0]), f.time)
    sign = log_signer().sign_message
    for i in range(1, count):
        payload = SealPayload(f"replica-{i % 3}", None, "shutdown", head.time, None)
        raw = next_entry(head, payload.TYPE, payload, head.time + i % 2, sign=sign)
        entries.append(raw)
        head = _Head(head.size + 1, entry_hash(raw), head.time + i % 2)
    f.entries = entries
    return entries, f.checkpoint()


def _signed_log(count: int) -> tuple[list[bytes], str]:
    f = LogFactory(seed=b"bench-signed")
    i = 0
    while len(f.entries) < count:
        f.tick()
        f.run("create-tenant", tenant=f"tenant-{i}")
        i += 1
    return f.entries, f.checkpoint()


def _rows(label: str, entries: list[bytes], note: str, rounds: int) -> list[Row]:
    verifier = log_signer().verifier()
    n = len(entries)
    size = sum(map(len, entries))

    def sha() -> None:
        for raw in entries:
            hashlib.sha256(raw).digest()

    baseline = items_per_second(sha, n, rounds=3)
    replay_rate = items_per_second(lambda: replay(entries), n, rounds=rounds)
    verify_rate = items_per_second(lambda: verify_log(entries, note, verifier), n, rounds=rounds)
    what = f"{label}, {n:,} entries, {size / n:,.0f} B avg"
    return [
        Row(f"replay ({what})", replay_rate, "hashlib.sha256 per entry", baseline, "entries/s"),
        Row(f"verify_log ({what})", verify_rate, "hashlib.sha256 per entry", baseline, "entries/s"),
    ]


def run(quick: bool) -> list[Row]:
    rounds = 1 if quick else 3
    cheap, cheap_note = _cheap_log(10_000 if quick else 50_000)
    signed, signed_note = _signed_log(2_000 if quick else 10_000)
    return [
        *_rows("daemon entries, each signed by the log key", cheap, cheap_note, rounds),
        *_rows("60% hybrid-signed", signed, signed_note, rounds),
    ]
