"""The storage contract of the daemon, independent of the database.

A `Store` keeps these things and nothing else:

1. The quorum log: entries `(seq, leaf_hash, entry_bytes)`, append-only and
   gap-free. `seq` runs 0, 1, 2, ... with no gaps or duplicates; `leaf_hash`
   is the entry's RFC 9162 section 2.1.1 leaf hash, SHA-256(0x00 || entry),
   kept so the Merkle tree is rebuilt at start without re-hashing; the
   entry bytes are exactly what was hashed and signed (never re-encoded).
2. Signed checkpoints (C2SP signed notes) by tree size: one per append,
   written in the append's own transaction (below). A stored note may later
   be replaced by the same checkpoint with cosignatures added
   (`put_checkpoint`), never by another tree head, and no checkpoint is
   ever added apart from its entries.
3. The erasable shred-salt table: one 32-byte salt per tenant key version.
   The log binds each salt by its hash; erasing a tenant's salts makes its
   logged wrapped keys unopenable for good (crypto-shredding, see
   docs/approvals.md). Erasing or replacing a salt must remove the old
   bytes, not just the row.
4. A small key-value `meta` table (schema version, deployment id).
5. Named counters that only grow, reserved in blocks (`reserve_block`):
   the data plane's per-key-version encryption counts, so the NIST SP
   800-38D random-nonce bound holds across restarts and replicas.

Append is the one write that matters, so its rules are part of the
contract, and every backend runs the same conformance suite
(tests/test_store.py):

- One call is one transaction: every entry, the signed checkpoint that
  covers them (`checkpoint`, a note of exactly the new log size), every
  new shred salt, every salt replaced and every salt erasure in the call
  are committed together or not at all, and are durable (fsynced) when
  the call returns. So no entry is ever stored without the checkpoint
  that vouches for it: the daemon refuses, at start and when it follows
  other replicas, any entry beyond the last signed checkpoint, which is
  therefore tampering, never a crash (docs/log-format.md). An execution
  entry and the salt it binds (create-tenant, rotate-tenant, the fresh
  salts of a roster change), or a `shred` entry and the erasure it
  records, never exist one without the other either.
- The call states the log size it was decided on (`expected_size`). If
  the stored size differs, another writer won: `AppendConflictError`, and
  nothing is written. This is what makes appends linearisable across
  threads, processes and (with PostgreSQL) replicas.
- Malformed calls (seq not consecutive from `expected_size`, a leaf hash
  that does not match its entry, a checkpoint note of another size, a
  salt of the wrong size) are caller bugs: `InvalidInputError` before the
  database is touched.
- A failed commit stops the store: every later call raises
  `StorageError` until it is reopened (after an fsync failure the kernel
  may have dropped the dirty pages, so retrying could report success for
  data that is not on disk).

The store does not judge entries or signatures: replay
(`keyquorum.quorum.replay`) is the one verifier, and it runs over what the
store returns. It reads only a checkpoint note's claimed size, to keep a
row and its note in step.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

from keyquorum.quorum.checkpoint import unverified_size
from keyquorum.quorum.errors import DeserializationError, InvalidInputError, LimitExceededError

SCHEMA_VERSION_KEY: Final = "schema_version"
"""The `meta` key holding the schema version; `set_meta` refuses to write it."""

DEPLOYMENT_KEY: Final = "deployment"
"""The `meta` key a daemon uses for the deployment id it was initialised for."""

SALT_SIZE: Final = 32
LEAF_HASH_SIZE: Final = 32
MAX_TENANT_LENGTH: Final = 255
READ_BATCH: Final = 512
"""Entries fetched per query by `read_all`, bounding memory on large logs."""

_META_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_COUNTER = re.compile(r"[a-z0-9][a-z0-9_./-]{0,254}")
#: Counters are SQL BIGINT / SQLite INTEGER: signed 64-bit.
MAX_COUNTER: Final = 2**63 - 1

LogRecord = tuple[int, bytes, bytes]
"""(seq, leaf_hash, entry bytes) as passed to `Store.append`."""

ShredSalt = tuple[str, int, bytes]
"""(tenant, version, salt) as passed to `Store.append(shred_salts=..., replace_salts=...)`."""

Head = tuple[int, tuple[int, str] | None]
"""(log size, latest checkpoint as (size, note) or None), read at one instant."""


class Store(Protocol):
    """What the daemon needs from a database; see the module docstring."""

    def size(self) -> int:
        """Number of log entries (the next seq)."""
        ...

    def append(
        self,
        entries: Sequence[LogRecord],
        *,
        expected_size: int,
        checkpoint: str,
        shred_salts: Sequence[ShredSalt] = (),
        erase_tenants: Sequence[str] = (),
        replace_salts: Sequence[ShredSalt] = (),
    ) -> None:
        """Append entries with the checkpoint note covering them, store new
        salts, replace salts (the old bytes erased) and erase tenants' salts,
        in one durable transaction; `AppendConflictError` if the size moved."""
        ...

    def head(self) -> Head:
        """The log size and the latest checkpoint, read at one instant."""
        ...

    def read(self, start: int, end: int) -> list[bytes]:
        """Entry bytes for seq in [start, end); requires 0 <= start <= end <= size."""
        ...

    def read_all(self) -> Iterator[bytes]:
        """Every entry in seq order, fetched in batches, up to the size at the call."""
        ...

    def leaf_hashes(self) -> list[bytes]:
        """The stored leaf hash of every entry, in seq order."""
        ...

    def put_checkpoint(self, size: int, note_text: str) -> None:
        """Replace the stored note of tree size `size` (cosignatures added);
        `StateError` when no checkpoint of that size was appended."""
        ...

    def latest_checkpoint(self) -> tuple[int, str] | None:
        """The checkpoint with the largest size, or None before the first."""
        ...

    def checkpoint_at(self, size: int) -> str | None:
        """The stored note of tree size `size`, or None."""
        ...

    def checkpoints(self) -> list[tuple[int, str]]:
        """Every stored checkpoint, by increasing size."""
        ...

    def put_shred_salt(self, tenant: str, version: int, salt: bytes) -> None:
        """Store one salt in its own transaction (daemons pass salts to `append`)."""
        ...

    def get_shred_salt(self, tenant: str, version: int) -> bytes | None:
        """The salt of a tenant key version, or None if absent or erased."""
        ...

    def erase_shred_salts(self, tenant: str) -> int:
        """Erase every salt of `tenant` so the bytes are gone; returns how many."""
        ...

    def reserve_block(self, counter: str, block: int, limit: int) -> tuple[int, int]:
        """Atomically reserve [start, end) of a named counter (0 when new):
        end = min(start + block, limit), durable when the call returns;
        `LimitExceededError` once start >= limit, writing nothing."""
        ...

    def counters(self) -> dict[str, int]:
        """Every counter's end of the last reserved block (an upper bound of its use), by name."""
        ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def schema_version(self) -> int: ...

    def durability_settings(self) -> dict[str, str]:
        """The durability settings the database reports, read back (not assumed)."""
        ...

    def close(self) -> None: ...


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 section 2.1.1: MTH({d(0)}) = SHA-256(0x00 || d(0))."""
    return hashlib.sha256(b"\x00" + entry).digest()


def check_append(
    entries: Sequence[LogRecord],
    *,
    expected_size: int,
    checkpoint: str,
    shred_salts: Sequence[ShredSalt],
    erase_tenants: Sequence[str],
    replace_salts: Sequence[ShredSalt] = (),
) -> None:
    """Preconditions of `Store.append`, shared by every backend.

    Checked before any database work, so a malformed call never opens a
    transaction. The seq numbers must already be consecutive from
    `expected_size`, and the checkpoint note must claim the size the log
    will have: a call that disagrees with itself is a bug, not a race.
    """
    check_size("expected_size", expected_size)
    if not entries:
        raise InvalidInputError("append needs at least one entry")
    check_checkpoint(expected_size + len(entries), checkpoint)
    for i, record in enumerate(entries):
        if not isinstance(record, tuple) or len(record) != 3:
            raise InvalidInputError(f"entry {i} must be a (seq, leaf_hash, entry) tuple")
        seq, hashed, entry = record
        want = expected_size + i
        if isinstance(seq, bool) or not isinstance(seq, int) or seq != want:
            raise InvalidInputError(f"entry {i} has seq {seq!r}, expected {want}")
        if not isinstance(entry, bytes) or not entry:
            raise InvalidInputError(f"entry {seq}: entry bytes must be non-empty bytes")
        if not isinstance(hashed, bytes) or len(hashed) != LEAF_HASH_SIZE:
            raise InvalidInputError(f"entry {seq}: leaf hash must be {LEAF_HASH_SIZE} bytes")
        if hashed != leaf_hash(entry):
            raise InvalidInputError(f"entry {seq}: leaf hash is not SHA-256(0x00 || entry)")
    seen: set[tuple[str, int]] = set()
    for what, items in (("shred salt", shred_salts), ("replaced salt", replace_salts)):
        for i, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 3:
                raise InvalidInputError(f"{what} {i} must be a (tenant, version, salt) tuple")
            tenant, version, salt = item
            check_salt(tenant, version, salt)
            if (tenant, version) in seen:
                raise InvalidInputError(f"a salt for {tenant!r} version {version} given twice")
            seen.add((tenant, version))
    for tenant in erase_tenants:
        check_tenant(tenant)
    both = {tenant for tenant, _ in seen} & set(erase_tenants)
    if both:
        raise InvalidInputError(
            f"one append both stores and erases salts of {sorted(both)!r}: a bug in the caller"
        )


#: The largest size or position a store holds (SQLite INTEGER, PostgreSQL BIGINT).
MAX_STORED_INT: Final = 2**63 - 1


def check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STORED_INT:
        raise InvalidInputError(f"{name} must be a non-negative int below 2^63, got {value!r}")


def check_range(start: int, end: int, size: int) -> None:
    """Preconditions of `Store.read`, each failure with its own message."""
    check_size("start", start)
    check_size("end", end)
    if start > end:
        raise InvalidInputError(f"start is after end: {start} > {end}")
    if end > size:
        raise InvalidInputError(f"end is beyond the log size: {end} > {size}")


def check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise InvalidInputError("tenant must be a non-empty string")
    if len(tenant) > MAX_TENANT_LENGTH or "\x00" in tenant:
        raise InvalidInputError(
            f"tenant must be at most {MAX_TENANT_LENGTH} characters without NUL"
        )


def check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInputError(f"tenant key version must be an int >= 1, got {version!r}")


def check_salt(tenant: str, version: int, salt: bytes) -> None:
    check_tenant(tenant)
    check_version(version)
    if not isinstance(salt, bytes) or len(salt) != SALT_SIZE:
        size = len(salt) if isinstance(salt, bytes | bytearray) else type(salt).__name__
        raise InvalidInputError(f"shred salt must be {SALT_SIZE} bytes, got {size}")


def check_checkpoint(size: int, note_text: str) -> None:
    """A note that claims tree size `size` (its signatures are replay's to check)."""
    check_size("checkpoint size", size)
    if not isinstance(note_text, str) or not note_text:
        raise InvalidInputError("checkpoint note must be a non-empty string")
    try:
        note_text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError("checkpoint note is not valid UTF-8 text") from e
    try:
        claimed = unverified_size(note_text)
    except DeserializationError as e:
        raise InvalidInputError(f"checkpoint note is not a checkpoint: {e}") from e
    if claimed != size:
        raise InvalidInputError(f"the checkpoint note is of tree size {claimed}, not {size}")


def check_reserve(counter: str, block: int, limit: int) -> None:
    """Preconditions of `Store.reserve_block`, shared by every backend."""
    if not isinstance(counter, str) or not _COUNTER.fullmatch(counter):
        raise InvalidInputError(f"counter name must match {_COUNTER.pattern}, got {counter!r}")
    for name, value in (("block", block), ("limit", limit)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNTER:
            raise InvalidInputError(f"{name} must be an int in [1, 2**63 - 1], got {value!r}")


def next_block(counter: str, start: int, block: int, limit: int) -> int:
    """The end of the block that starts at `start`; refuses a counter at its limit."""
    if start >= limit:
        raise LimitExceededError(f"counter {counter} reached its limit of {limit}")
    return min(start + block, limit)


def check_meta(key: str, value: str | None = None) -> None:
    if not isinstance(key, str) or not _META_KEY.fullmatch(key):
        raise InvalidInputError(f"meta key must match {_META_KEY.pattern}, got {key!r}")
    if value is not None and not isinstance(value, str):
        raise InvalidInputError("meta value must be a string")
