"""`keyquorum audit verify` of an exported log, against hashlib over the same bytes.

The log: 100,000 entries (10,000 with --quick) built once per run with
tests/logfactory.py: the genesis, five confirmations and an unseal, then
blocks of 50 entries, each one create-tenant (its signed proposal, 3
hybrid-signed approvals (Ed25519 + ML-DSA-65) and its execution) and 45
seals of the daemon itself; so 8 % of the entries carry a hybrid
signature and every other one the log key's Ed25519 signature (nothing
enters the log unsigned). It is exported (`quorum.export.produce`) with a checkpoint every
1,000 entries and at the end, and the timed operation is what the command
does after reading the file: `export.parse` of the lines, then
`audit_report.audit` (every checkpoint's signature, fork check,
`replay.verify_log` over every entry, the Merkle tree, the report).

The baseline is one `hashlib.sha256` per entry over the same entry bytes,
in the same run: the least any verification of these bytes costs.
"""

from __future__ import annotations

import hashlib

from bench.harness import Row, items_per_second
from keyquorum.quorum import export
from keyquorum.quorum.audit_report import audit
from keyquorum.quorum.log import SealPayload
from tests.logfactory import LogFactory, log_signer

BLOCK = 50
CHECKPOINT_EVERY = 1000


def build(count: int) -> tuple[LogFactory, list[bytes]]:
    """A valid log of `count` entries and its export file's lines."""
    f = LogFactory(seed=b"bench-audit")
    for cred in f.creds:
        f.confirm(cred)
    f.unseal("replica-a", f.creds[: f.k])
    i = 0
    while len(f.entries) < count:
        f.tick()
        if i % BLOCK == 0 and count - len(f.entries) >= 5:
            f.run("create-tenant", tenant=f"t{i}")
            i += 5
        else:
            f.append(SealPayload.TYPE, SealPayload("replica-b", None, "shutdown", f.time, None))
            i += 1
    sizes = [*range(CHECKPOINT_EVERY, count, CHECKPOINT_EVERY), count]
    notes = [f.checkpoint(n) for n in sizes]
    return f, list(export.produce(f.entries, notes))


def run(quick: bool) -> list[Row]:
    n = 10_000 if quick else 100_000
    f, lines = build(n)
    key = log_signer().verifier_key()
    megabytes = sum(map(len, lines)) / 1e6

    def verify() -> None:
        report = audit(export.parse(lines), log_key=key)
        assert report.entries == n

    def sha() -> None:
        sha256 = hashlib.sha256
        for raw in f.entries:
            sha256(raw).digest()

    rate = items_per_second(verify, n, rounds=1 if not quick else 2)
    baseline = items_per_second(sha, n, rounds=3)
    return [
        Row(
            f"audit verify of an exported log ({n:,} entries, {megabytes:,.0f} MB file)",
            rate,
            "hashlib.sha256 per entry",
            baseline,
            "entries/s",
        )
    ]
