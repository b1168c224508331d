"""The backend SDK against real daemons over mTLS: cache, streams, async, failover, inputs.

Each daemon is a real `Daemon` with its KeyService on an mTLS listener
(tests/key_plane.py's `key_plane`), custodians' quorums creating,
granting and activating tenants. Server calls are counted by the daemon's
own data plane (a usage sink), not by the client, so "one GenerateDataKey
for ten records" is what the daemon saw. Tests that seal, deactivate or
stop a daemon get daemons of their own.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest

from keyquorum.client import (
    AsyncKeyClient,
    CacheBounds,
    DataKey,
    KeyClient,
    KeyServiceError,
    TruncatedError,
    Wrapped,
    aio,
    decrypt_record,
    decrypt_stream,
    encrypt_record,
    encrypt_stream,
    framing,
)
from keyquorum.client.cache import KeyCache
from keyquorum.hsm.pki import DevPki
from keyquorum.quorum import aead
from keyquorum.quorum.errors import (
    DecryptionError,
    DeserializationError,
    InvalidInputError,
)
from keyquorum.quorum.secret import SecretBytes
from tests.custodian_steps import propose, run_one
from tests.harness import Custodian, make_custodians
from tests.key_plane import (
    BOOKING,
    CONTEXT,
    SECOND,
    TENANT,
    Served,
    make_pki,
    served,
)

C = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"))


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, pki: DevPki, custodians: list[Custodian]
) -> Iterator[Served]:
    with served(tmp_path_factory.mktemp("sdk"), pki, custodians) as s:
        yield s


@pytest.fixture
def own(tmp_path: Path, pki: DevPki, custodians: list[Custodian]) -> Iterator[Served]:
    """A daemon of this test's own, to seal or deactivate."""
    with served(tmp_path / "data", pki, custodians) as s:
        yield s


def bounds(**kw: Any) -> CacheBounds:
    return CacheBounds(**{"max_age": 300, **kw})


def entry_buffers(cache: KeyCache[Any]) -> list[bytearray]:
    """The cache's own key buffers (to check they are zeroed when entries go)."""
    return [e.key.buffer_for_test() for e in cache._entries.values()]


# -- caching: off by default, then the bounds --------------------------------------------------


def test_without_a_cache_every_record_costs_a_call(world: Served) -> None:
    before = world.calls["generate_data_key"], world.calls["unwrap"]
    with world.client() as c:
        assert not c.caching
        boxes = [encrypt_record(c, TENANT, b"record %d" % i, CONTEXT) for i in range(5)]
        for i, box in enumerate(boxes):
            with decrypt_record(c, box, CONTEXT) as plain:
                assert plain.reveal() == b"record %d" % i
        with pytest.raises(InvalidInputError, match="no cache"):
            c.cache_stats()
    assert (world.calls["generate_data_key"], world.calls["unwrap"]) == (
        before[0] + 5,
        before[1] + 5,
    )
    assert len({framing.parse_header(b).wrapped for b in boxes}) == 5


def test_cache_reuses_a_data_key_up_to_max_messages(world: Served) -> None:
    before = world.calls["generate_data_key"]
    with world.client(cache=bounds(max_messages=3)) as c:
        boxes = [encrypt_record(c, TENANT, b"r%d" % i, CONTEXT) for i in range(10)]
        enc, _dec = c.cache_stats()
    # ceil(10 / 3) keys: messages 1, 4, 7 and 10 fetched one each.
    assert world.calls["generate_data_key"] == before + 4
    assert (enc.hits, enc.misses) == (6, 4)
    wrapped = [framing.parse_header(b).wrapped for b in boxes]
    assert [wrapped.index(w) for w in wrapped] == [0, 0, 0, 3, 3, 3, 6, 6, 6, 9]
    # Every message has its own salt, hence its own key, under a shared data key.
    assert len({framing.parse_header(b).salt for b in boxes}) == 10
    with world.client() as fresh:  # a client without a cache opens them all
        for i, box in enumerate(boxes):
            assert decrypt_record(fresh, box, CONTEXT).reveal() == b"r%d" % i


def test_cache_bounds_bytes_and_never_caches_a_larger_message(world: Served) -> None:
    before = world.calls["generate_data_key"]
    with world.client(cache=bounds(max_bytes=2500)) as c:
        for _ in range(4):  # 1000 + 1000 fit, the third would pass 2500: a new key
            encrypt_record(c, TENANT, bytes(1000), CONTEXT)
        assert world.calls["generate_data_key"] == before + 2
        for _ in range(2):  # larger than max_bytes: fetched each time, never kept
            encrypt_record(c, TENANT, bytes(3000), CONTEXT)
        assert world.calls["generate_data_key"] == before + 4
        enc, _ = c.cache_stats()
        assert enc.entries == 1


def test_cache_entries_expire_at_max_age(world: Served) -> None:
    now = [1000.0]
    before = world.calls["generate_data_key"]
    with world.client(cache=bounds(max_age=60), clock=lambda: now[0]) as c:
        encrypt_record(c, TENANT, b"a", CONTEXT)
        now[0] += 59.9
        encrypt_record(c, TENANT, b"b", CONTEXT)
        assert world.calls["generate_data_key"] == before + 1
        (entry,) = c._caches.encryption._entries.values()  # type: ignore[union-attr]
        old = entry.key.buffer_for_test()
        now[0] += 0.1
        encrypt_record(c, TENANT, b"c", CONTEXT)
        assert world.calls["generate_data_key"] == before + 2
        assert old == bytearray(32)  # the expired key was wiped


def test_cache_capacity_evicts_the_least_recently_used_and_wipes_it(world: Served) -> None:
    with world.client(cache=bounds(capacity=2)) as c:
        cache = c._caches.encryption  # type: ignore[union-attr]
        encrypt_record(c, TENANT, b"x", {"n": "1"})
        first = entry_buffers(cache)[0]
        encrypt_record(c, TENANT, b"x", {"n": "2"})
        encrypt_record(c, TENANT, b"x", {"n": "1"})  # 1 is now the most recent
        encrypt_record(c, TENANT, b"x", {"n": "3"})  # evicts 2
        assert first != bytearray(32)
        assert sorted(k[1] for k in cache._entries) == [(("n", "1"),), (("n", "3"),)]
        enc, _ = c.cache_stats()
        assert (enc.entries, enc.wiped) == (2, 1)


def test_entries_are_keyed_by_tenant_and_the_whole_context(world: Served) -> None:
    """A context differing in any pair, or a pair's presence, or another tenant cannot hit."""
    before = world.calls["generate_data_key"]
    with world.client(cache=bounds()) as c:
        encrypt_record(c, TENANT, b"x", {"patient": "p-1", "doctor": "d-1"})
        encrypt_record(c, TENANT, b"x", {"doctor": "d-1", "patient": "p-1"})  # same pairs: hit
        assert world.calls["generate_data_key"] == before + 1
        for tenant, context in [
            (TENANT, {"patient": "p-1"}),
            (TENANT, {"patient": "p-1", "doctor": "d-2"}),
            (TENANT, {"patient": "p-1", "doctor": "d-1", "room": "1"}),
            (TENANT, {"patient": "p-2", "doctor": "d-1"}),
            (TENANT, {}),
            (SECOND, {"patient": "p-1", "doctor": "d-1"}),
        ]:
            box = encrypt_record(c, tenant, b"x", context)
            assert decrypt_record(c, box, context).reveal() == b"x"
        assert world.calls["generate_data_key"] == before + 7


def test_decryption_cache_is_keyed_by_the_context_too(world: Served) -> None:
    """A key cached by one context never opens an envelope presented with another."""
    before = world.calls["unwrap"]
    with world.client(cache=bounds()) as c:
        box = encrypt_record(c, TENANT, b"secret record", CONTEXT)
        for _ in range(5):
            assert decrypt_record(c, box, CONTEXT).reveal() == b"secret record"
        assert world.calls["unwrap"] == before + 1
        other = {**CONTEXT, "patient": "someone else"}
        with pytest.raises(KeyServiceError) as info:
            decrypt_record(c, box, other)
        assert info.value.code == C.INVALID_ARGUMENT
        assert world.calls["unwrap"] == before + 2
        _, dec = c.cache_stats()
        assert (dec.hits, dec.misses) == (4, 2)


def test_decryption_cache_bounds_messages(world: Served) -> None:
    before = world.calls["unwrap"]
    with world.client(cache=bounds(max_messages=2)) as c:
        box = encrypt_record(c, TENANT, b"r", CONTEXT)
        for _ in range(5):
            decrypt_record(c, box, CONTEXT)
    assert world.calls["unwrap"] == before + 3


def test_close_wipes_every_cached_key(world: Served) -> None:
    c = world.client(cache=bounds())
    box = encrypt_record(c, TENANT, b"r", CONTEXT)
    decrypt_record(c, box, CONTEXT)
    caches = c._caches
    assert caches is not None
    held = entry_buffers(caches.encryption) + entry_buffers(caches.decryption)
    assert len(held) == 2
    assert all(b != bytearray(32) for b in held)
    c.close()
    assert all(b == bytearray(32) for b in held)
    assert len(caches.encryption) == len(caches.decryption) == 0


def test_threads_sharing_a_cache_never_use_a_wiped_key(world: Served) -> None:
    """Eight threads encrypt while a ninth keeps wiping the cache: every envelope opens.

    A key zeroed under a thread that was using it would make an envelope
    whose commitment does not match the wrapped key's data key.
    """
    boxes: list[tuple[bytes, bytes]] = []
    stop = threading.Event()
    with world.client(cache=bounds(max_messages=50)) as c:
        caches = c._caches
        assert caches is not None

        def wiper() -> None:
            while not stop.is_set():
                caches.wipe_all()
                time.sleep(0.001)

        def worker(n: int) -> None:
            for i in range(25):
                record = b"thread %d record %d" % (n, i)
                boxes.append((record, encrypt_record(c, TENANT, record, CONTEXT)))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        w = threading.Thread(target=wiper)
        w.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        w.join()
    with world.client() as fresh:
        for record, box in boxes:
            assert decrypt_record(fresh, box, CONTEXT).reveal() == record
    assert len(boxes) == 200


# -- the daemon's reports empty the cache ------------------------------------------------------


def test_a_seal_reported_by_a_call_wipes_every_entry(own: Served) -> None:
    with own.client(cache=bounds(), watch_seal=False) as c:
        box = encrypt_record(c, TENANT, b"r", CONTEXT)
        encrypt_record(c, SECOND, b"r", CONTEXT)
        decrypt_record(c, box, CONTEXT)
        caches = c._caches
        assert caches is not None
        held = entry_buffers(caches.encryption) + entry_buffers(caches.decryption)
        assert len(held) == 3
        own.seal()
        # A miss (another context) reaches the daemon, which says it is sealed.
        with pytest.raises(KeyServiceError) as info:
            encrypt_record(c, TENANT, b"r", {"other": "context"})
        assert info.value.code == C.FAILED_PRECONDITION
        assert "sealed" in info.value.details
        assert len(caches.encryption) == len(caches.decryption) == 0
        assert all(b == bytearray(32) for b in held)


def wait_for(condition: Callable[[], bool], seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_a_seal_pushed_by_the_health_watch_wipes_without_any_call(own: Served) -> None:
    with own.client(cache=bounds()) as c:
        encrypt_record(c, TENANT, b"r", CONTEXT)
        caches = c._caches
        assert caches is not None
        held = entry_buffers(caches.encryption)
        before = own.calls["generate_data_key"]
        own.seal()
        assert wait_for(lambda: len(caches.encryption) == 0)
        assert held[0] == bytearray(32)
        assert own.calls["generate_data_key"] == before  # no call was needed to learn it


def test_a_seal_pushed_to_the_async_client_wipes_too(own: Served) -> None:
    async def scenario() -> None:
        async with own.aclient(cache=bounds()) as c:
            await aio.encrypt_record(c, TENANT, b"r", CONTEXT)
            caches = c._caches
            assert caches is not None
            assert len(caches.encryption) == 1
            own.seal()
            deadline = time.monotonic() + 15
            while len(caches.encryption) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert len(caches.encryption) == 0

    asyncio.run(scenario())


def test_a_key_whose_answer_crossed_a_seal_report_is_not_kept(world: Served) -> None:
    """The seal watch fires while GenerateDataKey's or Unwrap's answer is on its way:
    that key serves its one message and is not cached (it predates the report)."""
    with world.client(cache=bounds(), watch_seal=False) as c:
        caches = c._caches
        assert caches is not None
        for rpc in ("GenerateDataKey", "Unwrap"):
            real = getattr(c._stub, rpc)

            def crossing(request: object, real: Any = real, **kw: Any) -> object:
                answer = real(request, **kw)
                caches.wipe_all()  # what the seal watch does when NOT_SERVING arrives
                return answer

            setattr(c._stub, rpc, crossing)
        box = encrypt_record(c, TENANT, b"one message", CONTEXT)
        assert decrypt_record(c, box, CONTEXT).reveal() == b"one message"
        assert len(caches.encryption) == len(caches.decryption) == 0
        enc, dec = c.cache_stats()
        assert (enc.entries, dec.entries) == (0, 0)


def test_a_refused_tenant_loses_its_entries_and_only_those(own: Served) -> None:
    """What caching trades away, and where it stops: a deactivated tenant's cached key
    still encrypts until a call reaches the daemon; the refusal then wipes that tenant."""
    with own.client(cache=bounds(), watch_seal=False) as c:
        encrypt_record(c, TENANT, b"r", CONTEXT)
        encrypt_record(c, SECOND, b"r", CONTEXT)
        run_one(own.d, own.custodians, propose(own.d, "deactivate-tenant", tenant=SECOND).id)
        encrypt_record(c, SECOND, b"still served from the cache", CONTEXT)  # the trade-off
        with pytest.raises(KeyServiceError) as info:
            encrypt_record(c, SECOND, b"r", {"a": "miss"})
        assert info.value.code == C.FAILED_PRECONDITION
        caches = c._caches
        assert caches is not None
        assert [k[0] for k in caches.encryption._entries] == [TENANT]
        with pytest.raises(KeyServiceError):
            encrypt_record(c, SECOND, b"r", CONTEXT)  # no longer from the cache


# -- streams through the daemon ----------------------------------------------------------------


def test_stream_round_trip_through_files(world: Served, tmp_path: Path) -> None:
    plain, sealed, opened = tmp_path / "in", tmp_path / "in.kqe", tmp_path / "out"
    data = os.urandom(3 * 65536 + 123)
    plain.write_bytes(data)
    before = world.calls["generate_data_key"], world.calls["unwrap"]
    seen: list[int] = []
    with world.client() as c:
        with plain.open("rb") as src, sealed.open("wb") as dst:
            summary = encrypt_stream(c, TENANT, src, dst, CONTEXT, progress=seen.append)
        assert (summary.plaintext_bytes, summary.frames) == (len(data), 4)
        assert summary.message_bytes == sealed.stat().st_size
        assert sum(seen) == len(data)
        with sealed.open("rb") as src, opened.open("wb") as dst:
            back = decrypt_stream(c, src, dst, CONTEXT)
        assert opened.read_bytes() == data
        assert back.frames == 4
        # The same bytes open as a record, and a record opens as a stream.
        assert decrypt_record(c, sealed.read_bytes(), CONTEXT).reveal() == data
        record = encrypt_record(c, TENANT, data, CONTEXT)
        out = io.BytesIO()
        decrypt_stream(c, io.BytesIO(record), out, CONTEXT)
        assert out.getvalue() == data
    assert (world.calls["generate_data_key"], world.calls["unwrap"]) == (
        before[0] + 2,
        before[1] + 3,
    )


def test_stream_refusals_through_the_daemon(world: Served) -> None:
    with world.client() as c:
        out = io.BytesIO()
        encrypt_stream(c, TENANT, io.BytesIO(bytes(5000)), out, CONTEXT, frame_size=1000)
        envelope = out.getvalue()
        with pytest.raises(KeyServiceError) as info:
            decrypt_stream(c, io.BytesIO(envelope), io.BytesIO(), {"patient": "another"})
        assert info.value.code == C.INVALID_ARGUMENT
        sink = io.BytesIO()
        with pytest.raises(TruncatedError):
            decrypt_stream(c, io.BytesIO(envelope[:-1016]), sink, CONTEXT)
        assert sink.getvalue() == bytes(3000)  # three authentic frames, and no more
        with pytest.raises(DecryptionError, match="data follows the final frame"):
            decrypt_stream(c, io.BytesIO(envelope + envelope[-1016:]), io.BytesIO(), CONTEXT)


def test_stream_from_a_pipe_bypasses_the_cache(world: Served) -> None:
    """A source of unknown length cannot be checked against max_bytes: no cached key."""
    before = world.calls["generate_data_key"]
    with world.client(cache=bounds()) as c:
        for _ in range(2):
            r, w = os.pipe()
            with os.fdopen(w, "wb") as writer:
                writer.write(b"from a pipe" * 100)
            with os.fdopen(r, "rb") as reader:
                encrypt_stream(c, TENANT, reader, io.BytesIO(), CONTEXT)
        assert world.calls["generate_data_key"] == before + 2
        for _ in range(2):
            encrypt_stream(c, TENANT, io.BytesIO(b"seekable"), io.BytesIO(), CONTEXT)
        assert world.calls["generate_data_key"] == before + 3


def test_a_source_that_grows_past_its_reservation_is_refused(world: Served) -> None:
    class Growing(io.BytesIO):
        def seek(self, offset: int, whence: int = 0) -> int:
            return 0 if whence == io.SEEK_END else super().seek(offset, whence)

    with world.client(cache=bounds()) as c:
        encrypt_record(c, TENANT, b"warm the cache", CONTEXT)
        with pytest.raises(InvalidInputError, match="the source grew"):
            encrypt_stream(c, TENANT, Growing(b"more than nothing"), io.BytesIO(), CONTEXT)


def test_format_1_records_still_open(world: Served) -> None:
    """Records written by earlier clients (one data key, random nonce) still decrypt."""
    with world.client(cache=bounds()) as c:
        dk = c.generate_data_key(TENANT, CONTEXT)
        head = b"KQE\x01" + len(dk.ciphertext).to_bytes(2, "big") + dk.ciphertext
        nonce = os.urandom(12)
        body = aead.encrypt(dk.plaintext, nonce, b"old record", b"keyquorum/v1/envelope\x00" + head)
        old = head + nonce + body
        assert decrypt_record(c, old, CONTEXT).reveal() == b"old record"
        with pytest.raises(DecryptionError, match="does not authenticate under its data key"):
            decrypt_record(c, old[:-1] + bytes([old[-1] ^ 1]), CONTEXT)
        with pytest.raises(DeserializationError, match="open it with decrypt_record"):
            decrypt_stream(c, io.BytesIO(old), io.BytesIO(), CONTEXT)


# -- inputs: a clear error, and nothing sent ---------------------------------------------------


def odd(value: object) -> Any:
    """A value of the wrong type, passed on as a caller without type checks would."""
    return value


BAD_INPUTS: dict[str, tuple[Callable[[KeyClient], object], str]] = {
    "int-value": (
        lambda c: c.wrap(TENANT, b"x", odd({"visit": 3})),
        "context key 'visit' has a value of type int",
    ),
    "bytes-value": (
        lambda c: c.unwrap(b"ct", odd({"visit": b"3"})),
        "context key 'visit' has a value of type bytes",
    ),
    "int-key": (lambda c: c.wrap(TENANT, b"x", odd({3: "visit"})), "a context key has type int"),
    "list-context": (
        lambda c: c.wrap(TENANT, b"x", odd(["visit"])),
        "a context must be a mapping",
    ),
    "int-tenant": (lambda c: c.generate_data_key(odd(5)), "a tenant must be a str, got int"),
    "str-plaintext": (
        lambda c: c.wrap(TENANT, odd("text")),
        "the plaintext must be bytes, got str",
    ),
    "str-size": (
        lambda c: c.generate_data_key(TENANT, size=odd("32")),
        "size must be an int, got str",
    ),
    "batch-item": (
        lambda c: c.batch_wrap([(TENANT, b"x", {}), (TENANT, b"x", odd({"n": 1}))]),
        "batch_wrap item 1: context key 'n'",
    ),
    "batch-shape": (
        lambda c: c.batch_unwrap(odd([(b"ct",)])),
        "batch_unwrap item 0 must be a tuple of 2",
    ),
    "record-context": (
        lambda c: encrypt_record(c, TENANT, b"x", odd({"n": 1.5})),
        "context key 'n' has a value of type float",
    ),
    "record-type": (
        lambda c: encrypt_record(c, TENANT, odd("text")),
        "a record must be bytes, got str",
    ),
    "frame-size": (
        lambda c: encrypt_record(c, TENANT, b"x", frame_size=0),
        "frame_size must be 1 to",
    ),
    "stream-context": (
        lambda c: decrypt_stream(c, io.BytesIO(b""), io.BytesIO(), odd({"n": None})),
        "context key 'n' has a value of type NoneType",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_named_and_send_nothing(world: Served, case: str) -> None:
    call, match = BAD_INPUTS[case]
    before = sum(world.calls.ops.values())
    with world.client() as c, pytest.raises(InvalidInputError) as info:
        call(c)
    assert match in str(info.value)
    assert sum(world.calls.ops.values()) == before


def test_context_values_never_appear_in_the_error(world: Served) -> None:
    with world.client() as c, pytest.raises(InvalidInputError) as info:
        c.wrap(TENANT, b"x", odd({"patient": "Erika Mustermann", "born": 1970}))
    assert "1970" not in str(info.value)
    assert "Erika" not in str(info.value)


# -- the asyncio client: the same API and errors -----------------------------------------------


def test_async_client_has_the_sync_api() -> None:
    public = [
        n for n in dir(KeyClient) if not n.startswith("_") and callable(getattr(KeyClient, n))
    ]
    for name in public:
        assert hasattr(AsyncKeyClient, name), name
        sync_sig = inspect.signature(getattr(KeyClient, name))
        async_sig = inspect.signature(getattr(AsyncKeyClient, name))
        assert list(sync_sig.parameters) == list(async_sig.parameters), name
    for name in ("wrap", "unwrap", "generate_data_key", "rewrap", "batch_wrap", "batch_unwrap"):
        assert inspect.iscoroutinefunction(getattr(AsyncKeyClient, name)), name
    for fn in ("encrypt_record", "decrypt_record", "encrypt_stream", "decrypt_stream"):
        sync_params = list(inspect.signature(globals()[fn]).parameters)
        async_params = list(inspect.signature(getattr(aio, fn)).parameters)
        assert len(sync_params) == len(async_params), fn


def test_async_client_same_results_and_errors(world: Served) -> None:
    async def scenario() -> dict[str, object]:
        async with world.aclient() as c:
            wrapped = await c.wrap(TENANT, b"hello", CONTEXT)
            plain = await c.unwrap(wrapped.ciphertext, CONTEXT)
            dk = await c.generate_data_key(TENANT, CONTEXT)
            rewrapped = await c.rewrap(wrapped.ciphertext, CONTEXT)
            batch = await c.batch_wrap([(TENANT, b"a", CONTEXT), ("not-granted", b"b", CONTEXT)])
            errors = {}
            for name, call in {
                "denied": c.wrap("not-granted", b"x", CONTEXT),
                "context": c.unwrap(wrapped.ciphertext, {"other": "context"}),
                "size": c.generate_data_key(TENANT, CONTEXT, size=8),
            }.items():
                try:
                    await call
                except KeyServiceError as e:
                    errors[name] = (e.code, e.details)
            try:
                await c.wrap(TENANT, b"x", {"visit": 3})  # type: ignore[dict-item]
            except InvalidInputError as e:
                errors["input"] = str(e)
            return {
                "types": (type(wrapped), type(plain), type(dk), type(rewrapped)),
                "plain": plain.reveal(),
                "dk": len(dk.plaintext),
                "batch": [type(x) for x in batch],
                "errors": errors,
                "ciphertext": wrapped.ciphertext,
            }

    got = asyncio.run(scenario())
    assert got["types"] == (Wrapped, SecretBytes, DataKey, Wrapped)
    assert got["plain"] == b"hello"
    assert got["batch"] == [Wrapped, KeyServiceError]
    with world.client() as c:
        # The sync client opens what the async one made, and fails the same way.
        assert c.unwrap(got["ciphertext"], CONTEXT).reveal() == b"hello"  # type: ignore[arg-type]
        expected = {}
        for name, call in {
            "denied": lambda: c.wrap("not-granted", b"x", CONTEXT),
            "context": lambda: c.unwrap(got["ciphertext"], {"other": "context"}),  # type: ignore[arg-type]
            "size": lambda: c.generate_data_key(TENANT, CONTEXT, size=8),
        }.items():
            with pytest.raises(KeyServiceError) as info:
                call()
            expected[name] = (info.value.code, info.value.details)
        with pytest.raises(InvalidInputError) as bad:
            c.wrap(TENANT, b"x", {"visit": 3})  # type: ignore[dict-item]
        expected["input"] = str(bad.value)
    assert got["errors"] == expected


def test_async_envelopes_and_streams_interoperate_with_sync(world: Served) -> None:
    data = os.urandom(200_000)

    async def scenario() -> tuple[bytes, bytes, int]:
        async with world.aclient(cache=bounds()) as c:
            box = await aio.encrypt_record(c, TENANT, b"async record", CONTEXT)
            again = await aio.decrypt_record(c, box, CONTEXT)
            assert again.reveal() == b"async record"
            sealed = io.BytesIO()
            await aio.encrypt_stream(c, TENANT, io.BytesIO(data), sealed, CONTEXT)
            out = io.BytesIO()
            await aio.decrypt_stream(c, io.BytesIO(sealed.getvalue()), out, CONTEXT)
            assert out.getvalue() == data
            enc, _ = c.cache_stats()
            return box, sealed.getvalue(), enc.hits

    box, sealed, hits = asyncio.run(scenario())
    assert hits == 1  # the stream reused the record's key (same tenant and context)
    with world.client() as c:
        assert decrypt_record(c, box, CONTEXT).reveal() == b"async record"
        out = io.BytesIO()
        decrypt_stream(c, io.BytesIO(sealed), out, CONTEXT)
        assert out.getvalue() == data


# -- several replicas: health-aware round robin, failover --------------------------------------


@pytest.fixture
def replicas(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> Iterator[tuple[Served, Served]]:
    with ExitStack() as stack:
        a = stack.enter_context(served(tmp_path / "a", pki, custodians, replica="kq-a"))
        b = stack.enter_context(served(tmp_path / "b", pki, custodians, replica="kq-b"))
        yield a, b


def both(replicas: tuple[Served, Served]) -> list[str]:
    return [r.kp.target for r in replicas]


def replica_client(replicas: tuple[Served, Served], **kw: Any) -> KeyClient:
    files = replicas[0].kp.pki.client(BOOKING)
    return KeyClient(
        both(replicas), ca=replicas[0].kp.pki.ca_cert, cert=files.cert, key=files.key, **kw
    )


def wraps(r: Served) -> int:
    return r.calls["wrap"]


def test_calls_spread_over_healthy_replicas_and_skip_a_sealed_one(
    replicas: tuple[Served, Served],
) -> None:
    a, b = replicas
    with replica_client(replicas) as c:
        for _ in range(40):
            c.wrap(TENANT, b"x", CONTEXT)
        assert wraps(a) > 5  # round robin
        assert wraps(b) > 5
        a.seal()
        # gRPC hears of the seal through its health watch; until then a call may
        # still reach kq-a and be told it is sealed. Wait for 20 clean calls in a row.
        clean = 0
        deadline = time.monotonic() + 15
        while clean < 20 and time.monotonic() < deadline:
            code = _fails(c)
            assert code in (None, C.FAILED_PRECONDITION)
            clean = clean + 1 if code is None else 0
        assert clean == 20
        at_a = wraps(a)
        for _ in range(40):
            c.wrap(TENANT, b"x", CONTEXT)  # every one succeeds: none goes to kq-a
        assert wraps(a) == at_a
        b.seal()
        assert wait_for(lambda: _fails(c) == C.UNAVAILABLE)
        with pytest.raises(KeyServiceError, match="no replica serves KeyService"):
            c.wrap(TENANT, b"x", CONTEXT)


def _fails(c: KeyClient) -> C | None:
    try:
        c.wrap(TENANT, b"x", CONTEXT)
    except KeyServiceError as e:
        return e.code
    return None


def test_a_replica_that_goes_away_fails_over_without_an_error(
    replicas: tuple[Served, Served],
) -> None:
    a, b = replicas
    with replica_client(replicas) as c:
        for _ in range(20):
            c.wrap(TENANT, b"x", CONTEXT)
        assert wraps(a) > 0
        a.kp.server.stop(grace=None).wait()
        at_b = wraps(b)
        for _ in range(40):
            c.wrap(TENANT, b"x", CONTEXT)  # retried on kq-b by gRPC's retry policy
        assert wraps(b) == at_b + 40


def test_async_client_fails_over_the_same_way(replicas: tuple[Served, Served]) -> None:
    a, b = replicas
    files = a.kp.pki.client(BOOKING)

    async def scenario() -> None:
        async with AsyncKeyClient(
            both(replicas), ca=a.kp.pki.ca_cert, cert=files.cert, key=files.key
        ) as c:
            for _ in range(20):
                await c.wrap(TENANT, b"x", CONTEXT)
            a.kp.server.stop(grace=None).wait()
            for _ in range(20):
                await c.wrap(TENANT, b"x", CONTEXT)

    at_b = wraps(b)
    asyncio.run(scenario())
    assert wraps(b) >= at_b + 20


def test_the_seal_watch_covers_every_replica(replicas: tuple[Served, Served]) -> None:
    _a, b = replicas
    with replica_client(replicas, cache=bounds()) as c:
        encrypt_record(c, TENANT, b"r", CONTEXT)
        caches = c._caches
        assert caches is not None
        assert len(caches.encryption) == 1
        b.seal()  # whichever replica gave the key: a seal anywhere wipes
        assert wait_for(lambda: len(caches.encryption) == 0)
