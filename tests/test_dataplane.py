"""The data plane's pure parts: ciphertext format, context encoding, counters, limits.

Format tests are byte-exact with fixed keys and nonces; the parse refusals
are named cases with their error class; hypothesis flips any bit of any
ciphertext and any context and checks that nothing opens. The counter runs
on a real SQLite store (the PostgreSQL `reserve_block` is in
tests/test_store.py's conformance suite).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.hsm import dataplane
from keyquorum.hsm.dataplane import EncryptionCounters
from keyquorum.hsm.dataplane import plane as dataplane_plane
from keyquorum.hsm.dataplane.ratelimit import RateLimiter
from keyquorum.hsm.services.access_log import KEY_FILE, AccessLog, load_or_create_key
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum import aead, canonical
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    StorageError,
    UnsupportedVersionError,
)
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from keyquorum.quorum.secret import SecretBytes

KEY = bytes(range(32))
NONCE = bytes(range(100, 112))
CTX = {"patient": "p-1", "doctor": "d-2"}


def key() -> SecretBytes:
    return SecretBytes(KEY, label="tenant key")


def ciphertext(plaintext: bytes = b"data key bytes", context: dict[str, str] = CTX) -> bytes:
    return dataplane.encrypt(
        key(), "acme-health", 3, plaintext, dataplane.encode_context(context), NONCE
    )


# -- the format ---------------------------------------------------------------------


def test_ciphertext_layout_is_byte_exact() -> None:
    ct = ciphertext()
    head = b"\x01\x0bacme-health\x00\x00\x00\x03"
    assert ct[: len(head)] == head
    assert ct[len(head) : len(head) + 12] == NONCE
    aad = b"keyquorum/v1/data\x00" + head + b'{"doctor":"d-2","patient":"p-1"}'
    assert ct[len(head) + 12 :] == aead.encrypt(KEY, NONCE, b"data key bytes", aad)
    parsed = dataplane.parse(ct)
    assert (parsed.tenant, parsed.version, parsed.header, parsed.nonce) == (
        "acme-health",
        3,
        head,
        NONCE,
    )
    with dataplane.decrypt(key(), parsed, dataplane.encode_context(CTX)) as plain:
        assert plain.reveal() == b"data key bytes"
    assert "data key" not in repr(parsed)


def test_context_encoding_is_canonical_and_bound() -> None:
    assert dataplane.encode_context({"b": "2", "a": "1"}) == b'{"a":"1","b":"2"}'
    assert dataplane.encode_context({}) == b"{}"
    assert dataplane.encode_context({"é": "ü"}) == '{"é":"ü"}'.encode()
    parsed = dataplane.parse(ciphertext())
    for other in ({}, {"patient": "p-1"}, {**CTX, "x": ""}, {"patient": "p-1", "doctor": "d-3"}):
        with pytest.raises(DecryptionError, match="another encryption context"):
            dataplane.decrypt(key(), parsed, dataplane.encode_context(other))


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"", DeserializationError, "empty"),
        (b"\x02" + ciphertext()[1:], UnsupportedVersionError, "format 0x02"),
        (b"\x00", UnsupportedVersionError, "format 0x00"),
        (b"\x01", DeserializationError, "before its tenant length"),
        (b"\x01\x00" + b"x" * 40, DeserializationError, "tenant length 0"),
        (b"\x01\x40" + b"x" * 100, DeserializationError, "tenant length 64"),
        (ciphertext()[:44], DeserializationError, "shorter than its 45-byte minimum"),
        (b"\x01\x02\xff\xfe" + bytes(40), DeserializationError, "not ASCII"),
        (b"\x01\x02A-" + bytes(40), DeserializationError, "not a valid tenant name"),
        (b"\x01\x02ab\x00\x00\x00\x00" + bytes(40), DeserializationError, "version 0"),
    ],
    ids=[
        "empty", "future-format", "zero-format", "no-length", "zero-length", "long-tenant",
        "truncated", "non-ascii-tenant", "bad-tenant", "version-zero",
    ],
)  # fmt: skip
def test_parse_refusals(data: bytes, error: type[KeyquorumError], match: str) -> None:
    with pytest.raises(error, match=match):
        dataplane.parse(data)


def test_parse_refuses_non_bytes() -> None:
    with pytest.raises(InvalidInputError, match="must be bytes"):
        dataplane.parse(bytearray(ciphertext()))  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(plaintext=st.binary(min_size=1, max_size=64), data=st.data())
def test_any_bit_flip_fails(plaintext: bytes, data: st.DataObject) -> None:
    ct = ciphertext(plaintext)
    bit = data.draw(st.integers(min_value=0, max_value=len(ct) * 8 - 1))
    flipped = bytearray(ct)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises((DeserializationError, DecryptionError)):
        _open(bytes(flipped))


def _open(data: bytes) -> SecretBytes:
    """Parse and decrypt with the one test key. A flip in the tenant or version would
    select another key in real use; the same key must still refuse, since the whole
    header is authenticated."""
    return dataplane.decrypt(key(), dataplane.parse(data), dataplane.encode_context(CTX))


@settings(max_examples=300, deadline=None)
@given(
    context=st.dictionaries(
        st.one_of(st.text(max_size=8), st.text(alphabet=st.characters(max_codepoint=127))),
        st.text(max_size=12),
        max_size=6,
    )
)
def test_context_fast_path_is_rfc_8785(context: dict[str, str]) -> None:
    """The ASCII-key fast path and the general encoder give the same bytes."""
    context = {k: v for k, v in context.items() if k}
    assert dataplane.encode_context(context) == canonical.encode(context)


@pytest.mark.parametrize(
    "context",
    [{"k": '\x00\x1f\x7f\u2028"\\/'}, {"\U0001f600": "a", "\uffff": "b"}, {"b": "1", "a": "\n"}],
    ids=["control-characters", "astral-vs-bmp-key-order", "key-order"],
)
def test_context_encoding_edge_cases(context: dict[str, str]) -> None:
    assert dataplane.encode_context(context) == canonical.encode(context)


def test_context_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidInputError):
        dataplane.encode_context({"k": "\ud800"})


@pytest.mark.parametrize(
    ("context", "error", "match"),
    [
        ({f"k{i}": "v" for i in range(65)}, LimitExceededError, "65 pairs"),
        ({"k": "v" * 5000}, LimitExceededError, "at most 4096"),
        ({"": "v"}, InvalidInputError, "key is empty"),
        ({"k": 1}, InvalidInputError, "must be strings"),
    ],
    ids=["too-many-pairs", "too-long", "empty-key", "non-string"],
)
def test_context_refusals(context: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        dataplane.encode_context(context)  # type: ignore[arg-type]


def test_header_checks_its_fields() -> None:
    with pytest.raises(InvalidInputError, match="not a valid tenant"):
        dataplane.header("Bad Name", 1)
    with pytest.raises(InvalidInputError, match="key version"):
        dataplane.header("ok", 0)
    with pytest.raises(InvalidInputError, match="key version"):
        dataplane.header("ok", 2**32)


def test_limits_refuse_a_bound_above_sp_800_38d() -> None:
    with pytest.raises(InvalidInputError, match="2\\*\\*32"):
        Limits(encryption_limit=2**32 + 1)
    with pytest.raises(InvalidInputError, match="counter_block"):
        Limits(counter_block=0)
    assert DEFAULT_LIMITS.encryption_limit == 2**32


def test_backend_name_needs_a_backend_identity() -> None:
    assert dataplane_plane._backend_name("keyquorum://backend/booking") == "booking"
    for identity in ("keyquorum://auditor/alice", "https://backend/booking", "keyquorum://x"):
        with pytest.raises(AccessDeniedError):
            dataplane_plane._backend_name(identity)


# -- the encryption counter ----------------------------------------------------------------


def test_counter_numbers_are_unique_across_restarts(tmp_path: Path) -> None:
    limits = Limits(counter_block=8)
    seen: list[int] = []
    for _ in range(3):
        with SqliteStore.in_directory(tmp_path) as store:
            counters = EncryptionCounters(store, limits)
            seen += [counters.take("t", 1) for _ in range(5)]
    assert len(set(seen)) == len(seen) == 15
    # Blocks are never reused: each restart starts on a fresh block.
    assert seen[:5] == [0, 1, 2, 3, 4]
    assert seen[5] >= 8
    assert seen[10] >= 16


def test_counter_refuses_at_the_bound_and_names_the_fix(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as store:
        counters = EncryptionCounters(store, Limits(encryption_limit=10, counter_block=3))
        assert [counters.take("t", 1) for _ in range(10)] == list(range(10))
        for _ in range(2):
            with pytest.raises(LimitExceededError, match="rotate-tenant"):
                counters.take("t", 1)
        assert counters.take("t", 2) == 0  # each version counts on its own


def test_counter_prefetches_the_next_block(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as store:
        counters = EncryptionCounters(store, Limits(counter_block=100))
        for _ in range(80):
            counters.take("t", 1)
        # The next block was reserved in the background once a quarter was left.
        for _ in range(500):
            if counters._counts[("t", 1)].spare is not None:
                break
            time.sleep(0.01)
        assert counters._counts[("t", 1)].spare == (100, 200)
        numbers = [counters.take("t", 1) for _ in range(40)]
        assert numbers == list(range(80, 100)) + list(range(100, 120))


def test_counter_is_thread_safe(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as store:
        counters = EncryptionCounters(store, Limits(counter_block=16))
        got: list[int] = []
        lock = threading.Lock()

        def work() -> None:
            mine = [counters.take("t", 1) for _ in range(200)]
            with lock:
                got.extend(mine)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(got)) == 800


def test_counter_store_failure_is_reported_then_retried(tmp_path: Path) -> None:
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def reserve_block(self, counter: str, block: int, limit: int) -> tuple[int, int]:
            self.calls += 1
            if self.calls == 1:
                raise StorageError("database down")
            return (0, block)

    store = Failing()
    counters = EncryptionCounters(store, Limits(counter_block=4))  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="database down"):
        counters.take("t", 1)
    assert counters.take("t", 1) == 0


# -- rate limits -------------------------------------------------------------------------------


def test_rate_limiter_buckets_per_backend() -> None:
    now = [0.0]
    limiter = RateLimiter(2, burst=4, clock=lambda: now[0])
    limiter.take("a", 4)
    with pytest.raises(LimitExceededError, match="backend a is over its rate limit of 2"):
        limiter.take("a")
    limiter.take("b", 4)  # b has its own bucket
    now[0] = 1.0
    limiter.take("a", 2)  # two tokens came back in one second
    with pytest.raises(LimitExceededError):
        limiter.take("a")
    now[0] = 100.0
    limiter.take("a", 4)  # refilled to the burst, not beyond
    with pytest.raises(LimitExceededError):
        limiter.take("a")
    with pytest.raises(LimitExceededError, match="exceed the per-backend burst of 4"):
        limiter.take("c", 5)


def test_rate_limiter_gives_back_up_to_the_burst() -> None:
    limiter = RateLimiter(1, burst=4, clock=lambda: 0.0)
    limiter.take("a", 3)
    limiter.give_back("a", 2)  # 1 + 2
    limiter.take("a", 3)
    with pytest.raises(LimitExceededError):
        limiter.take("a")
    limiter.give_back("a", 10)  # capped at the burst of 4
    limiter.take("a", 4)
    with pytest.raises(LimitExceededError):
        limiter.take("a")
    limiter.give_back("b", 1)  # a fresh bucket is already full
    limiter.take("b", 4)
    with pytest.raises(InvalidInputError):
        limiter.give_back("a", 0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, None), (-1, None), (1, 0.5)], ids=["zero", "negative", "tiny-burst"]
)
def test_rate_limiter_refuses_bad_settings(rate: float, burst: float | None) -> None:
    with pytest.raises(InvalidInputError):
        RateLimiter(rate, burst)


# -- the access log ----------------------------------------------------------------------------


def test_access_log_key_is_made_once_private_and_checked(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    assert len(key) == 32
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path) == key
    (tmp_path / KEY_FILE).write_bytes(b"short")
    with pytest.raises(InvalidInputError, match="not an access-log key"):
        load_or_create_key(tmp_path)


def test_access_log_line_format(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "a.jsonl", bytes(32), clock=lambda: 1_790_000_000.25)
    context = canonical.encode(CTX)
    log.record("booking", "acme-health", "wrap", None, context)
    log.record("booking", "-", "unwrap", DecryptionError("x"), None)
    log.close()
    first, second = (json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines())
    assert first == {
        "backend": "booking",
        "context_hmac": log.context_hmac(context),
        "operation": "wrap",
        "outcome": "OK",
        "tenant": "acme-health",
        "time": "2026-09-21T14:13:20.250Z",
    }
    assert second["outcome"] == "INVALID_ARGUMENT"
    assert second["context_hmac"] is None
    # Keyed: another deployment's key gives another hash of the same context.
    other = AccessLog(tmp_path / "b.jsonl", b"\x01" * 32)
    assert other.context_hmac(context) != log.context_hmac(context)
    other.close()
    assert "p-1" not in (tmp_path / "a.jsonl").read_text()
