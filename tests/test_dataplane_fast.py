"""The data plane's fast paths give exactly what the plain paths give.

- the flat-context RFC 8785 encoder against the `rfc8785` package, byte for
  byte, on contexts hypothesis makes (ASCII keys with JSON's special
  characters, any values: controls, quotes, non-BMP, U+2028);
- BatchWrap's and BatchUnwrap's hand-written wire formats against the
  protobuf library's own serialisation, byte for byte, and parsed back;
- BatchUnwrap's short way (`DataPlane.batch_unwrap_requests`) against the
  reference `batch_unwrap`: the same results, errors and usage records for
  batches mixing ordinary items with every kind of refusal;
- nonces drawn in blocks: none repeats, across threads and after a fork, and a
  batch's `take_many` is the stream `take` gives one by one, across refills;
- counter reservations for a batch never hand out a number twice and stop
  at the bound.

A batch's context cache over real gRPC is in tests/test_key_service.py
(`test_batch_contexts_encoded_once_still_bind_each_item`).
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.hsm import dataplane
from keyquorum.hsm.dataplane import EncryptionCounters, NoncePool, Revealed, Wrapped
from keyquorum.hsm.dataplane import format as dataplane_format
from keyquorum.hsm.dataplane import nonces as dataplane_nonces
from keyquorum.hsm.services.key_service import (
    _item_error,
    _unwrapped,
    _wrapped,
    encode_unwrap_results,
    encode_wrap_response,
    encode_wrap_results,
)
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DecryptionError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    SealedError,
)
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import key_pb2 as pb

# -- RFC 8785 of flat contexts ----------------------------------------------------------

ASCII_KEYS = st.text(
    alphabet=st.one_of(
        st.characters(max_codepoint=127),
        st.sampled_from(list('"\\/\b\f\n\r\t\x00\x1f\x7f')),
    ),
    min_size=1,
    max_size=10,
)
VALUES = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(list('"\\/\b\f\n\r\t\x00\x1f\x7f\u2028\u2029\ufeff\U0001f600')),
    ),
    max_size=16,
)


@settings(max_examples=400, deadline=None)
@given(context=st.dictionaries(ASCII_KEYS, VALUES, max_size=8))
def test_flat_encoder_is_byte_identical_to_rfc8785(context: dict[str, str]) -> None:
    pairs = tuple(context.items())
    assert dataplane_format._flat_canonical(pairs) == rfc8785.dumps(context)
    assert dataplane.encode_context(context) == rfc8785.dumps(context)


@settings(max_examples=100, deadline=None)
@given(context=st.dictionaries(ASCII_KEYS, VALUES, min_size=2, max_size=6), data=st.data())
def test_flat_encoder_ignores_insertion_order(context: dict[str, str], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(list(context.items())))
    assert dataplane_format._flat_canonical(tuple(shuffled)) == dataplane_format._flat_canonical(
        tuple(context.items())
    )


def test_request_map_encodes_as_the_dict_does() -> None:
    """The servicer hands the request's own map over; it encodes as the dict would."""
    context = {"b": "2", "a": "\n", "é": "x"}
    request = pb.WrapRequest.FromString(
        pb.WrapRequest(tenant="t", plaintext=b"x", context=context).SerializeToString()
    )
    assert dataplane.encode_context(request.context) == rfc8785.dumps(context)


# -- the batch answer's wire format -----------------------------------------------------

ERRORS = st.sampled_from(
    [
        InvalidInputError("the plaintext is empty"),
        AccessDeniedError("backend booking is not granted tenant 'x'"),
        SealedError("the service was sealed during the call"),
        LimitExceededError("ünïcode message \U0001f600 " + "x" * 200),
        DecryptionError(""),
    ]
)
RESULTS = st.lists(
    st.one_of(
        st.builds(
            Wrapped,
            st.binary(max_size=300),
            st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
        ),
        ERRORS,
    ),
    max_size=12,
)


def message_of(results: list[Wrapped | KeyquorumError]) -> pb.BatchWrapResponse:
    return pb.BatchWrapResponse(
        results=[
            pb.WrapResult(error=_item_error(r))
            if isinstance(r, KeyquorumError)
            else pb.WrapResult(ok=_wrapped(r))
            for r in results
        ]
    )


@settings(max_examples=300, deadline=None)
@given(results=RESULTS)
def test_batch_answer_bytes_are_protobufs_own(results: list[Wrapped | KeyquorumError]) -> None:
    wire = encode_wrap_results(results)
    expected = message_of(results)
    assert wire == expected.SerializeToString(deterministic=True)
    assert pb.BatchWrapResponse.FromString(wire) == expected
    rewrap = pb.BatchRewrapResponse(
        results=[
            pb.RewrapResult(error=e.error)
            if e.HasField("error")
            else pb.RewrapResult(
                ok=pb.RewrapResponse(ciphertext=e.ok.ciphertext, key_version=e.ok.key_version)
            )
            for e in expected.results
        ]
    )
    assert wire == rewrap.SerializeToString(deterministic=True)  # BatchRewrap: same layout


@settings(max_examples=300, deadline=None)
@given(
    result=st.builds(
        Wrapped,
        st.binary(max_size=300),
        st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
    )
)
def test_wrap_answer_bytes_are_protobufs_own(result: Wrapped) -> None:
    wire = encode_wrap_response(result)
    assert wire == _wrapped(result).SerializeToString(deterministic=True)
    assert pb.WrapResponse.FromString(wire) == _wrapped(result)


def _revealed(tenant: str, version: int, plaintext: bytes | None, sealed: bytes | None) -> Revealed:
    return Revealed(
        tenant,
        version,
        b"ct",
        None if plaintext is None else SecretBytes(plaintext),
        sealed,
    )


UNWRAP_RESULTS = st.lists(
    st.one_of(
        st.builds(
            _revealed,
            st.sampled_from(["acme-health", "a", "t" * 63, ""]),
            st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
            st.one_of(st.none(), st.binary(max_size=200)),
            st.one_of(st.none(), st.binary(min_size=1, max_size=200)),
        ),
        ERRORS,
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(results=UNWRAP_RESULTS)
def test_batch_unwrap_answer_bytes_are_protobufs_own(
    results: list[Revealed | KeyquorumError],
) -> None:
    copies = [
        r
        if isinstance(r, KeyquorumError)
        else _revealed(
            r.tenant, r.version, None if r.plaintext is None else r.plaintext.reveal(), r.sealed
        )
        for r in results
    ]
    expected = pb.BatchUnwrapResponse(
        results=[
            pb.UnwrapResult(error=_item_error(r))
            if isinstance(r, KeyquorumError)
            else pb.UnwrapResult(ok=_unwrapped(r))
            for r in copies
        ]
    )
    wire = encode_unwrap_results(results)
    assert wire == expected.SerializeToString(deterministic=True)
    assert pb.BatchUnwrapResponse.FromString(wire) == expected
    # Every plaintext was wiped once written.
    assert all(
        r.plaintext.wiped for r in results if isinstance(r, Revealed) and r.plaintext is not None
    )


# -- nonces ---------------------------------------------------------------------------


def test_nonces_never_repeat_across_threads() -> None:
    pool = NoncePool(os.urandom, per_draw=7)
    got: list[list[bytes]] = [[] for _ in range(6)]

    def draw(mine: list[bytes]) -> None:
        mine.extend(pool.take() for _ in range(500))

    threads = [threading.Thread(target=draw, args=(g,)) for g in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [n for g in got for n in g]
    assert all(len(n) == 12 for n in every)
    assert len(set(every)) == len(every) == 3000


def test_nonces_come_from_the_random_source_in_order_and_a_fork_forgets_them() -> None:
    draws: list[int] = []

    def counting(n: int) -> bytes:
        draws.append(n)
        return bytes([len(draws)]) * n

    pool = NoncePool(counting, per_draw=4)
    assert [pool.take() for _ in range(5)] == [b"\x01" * 12] * 4 + [b"\x02" * 12]
    assert draws == [48, 48]
    dataplane_nonces._forget_drawn_nonces()  # what os.register_at_fork runs in a child
    assert pool.take() == b"\x03" * 12


@pytest.mark.parametrize(
    ("source", "per_draw"),
    [(lambda n: bytes(n - 1), 4), (bytearray, 4), (bytes, 0)],
    ids=["short-read", "not-bytes", "zero-per-draw"],
)
def test_nonce_pool_refuses_a_bad_source(source: object, per_draw: int) -> None:
    with pytest.raises(InvalidInputError):
        NoncePool(source, per_draw=per_draw).take()  # type: ignore[arg-type]


class Numbered:
    """A random source whose k-th 12-byte nonce is k: where each handed-out nonce came from."""

    def __init__(self) -> None:
        self.drawn = 0
        self.draws: list[int] = []

    def __call__(self, size: int) -> bytes:
        assert size % 12 == 0
        self.draws.append(size)
        first, self.drawn = self.drawn, self.drawn + size // 12
        return b"".join(n.to_bytes(12, "big") for n in range(first, self.drawn))


def numbers(nonces: bytes) -> list[int]:
    assert len(nonces) % 12 == 0
    return [int.from_bytes(nonces[i : i + 12], "big") for i in range(0, len(nonces), 12)]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    per_draw=st.integers(1, 9),
    seed=st.binary(min_size=1, max_size=8),
)
def test_take_many_is_the_stream_take_gives_one_by_one(
    sizes: list[int], per_draw: int, seed: bytes
) -> None:
    """A batch's nonces are the ones its items would have got one by one, across refills."""

    def source() -> Callable[[int], bytes]:
        drawn = 0

        def random_bytes(size: int) -> bytes:
            nonlocal drawn
            drawn += size
            return hashlib.shake_256(seed).digest(drawn)[drawn - size :]

        return random_bytes

    batched, single = NoncePool(source(), per_draw=per_draw), NoncePool(source(), per_draw=per_draw)
    many = [batched.take_many(n) for n in sizes]
    assert [len(m) for m in many] == [12 * n for n in sizes]
    assert b"".join(many) == b"".join(single.take() for _ in range(sum(sizes)))
    assert b"".join(many) == hashlib.shake_256(seed).digest(12 * sum(sizes))


def test_take_many_spans_refills_in_whole_draws() -> None:
    source = Numbered()
    pool = NoncePool(source, per_draw=4)
    assert numbers(pool.take_many(3)) == [0, 1, 2]
    assert numbers(pool.take_many(6)) == [3, 4, 5, 6, 7, 8]  # the rest of one draw, then two more
    assert source.draws == [48, 48, 48]
    assert numbers(pool.take()) == [9]
    assert numbers(pool.take_many(10)) == list(range(10, 20))
    assert source.draws == [48] * 5
    assert numbers(pool.take_many(1)) == [20]


@pytest.mark.parametrize("count", [0, -1, -12])
def test_take_many_refuses_no_nonces(count: int) -> None:
    source = Numbered()
    pool = NoncePool(source, per_draw=4)
    with pytest.raises(InvalidInputError, match="at least one nonce"):
        pool.take_many(count)
    assert source.draws == []
    assert numbers(pool.take()) == [0]


def test_forget_drops_the_drawn_nonces() -> None:
    source = Numbered()
    pool = NoncePool(source, per_draw=4)
    assert numbers(pool.take_many(2)) == [0, 1]
    pool.forget()
    assert "0 drawn" in repr(pool)
    assert numbers(pool.take_many(3)) == [4, 5, 6]  # 2 and 3 are never handed out
    assert numbers(pool.take()) == [7]
    assert source.draws == [48, 48]


def test_take_and_take_many_across_threads_never_repeat_or_skip() -> None:
    """Six threads mixing single nonces and batches: every nonce drawn is handed out once."""
    source = Numbered()
    pool = NoncePool(source, per_draw=7)
    got: list[list[int]] = [[] for _ in range(6)]

    def draw(mine: list[int], seed: int) -> None:
        sizes = random.Random(seed)
        for _ in range(300):
            mine.extend(
                numbers(
                    pool.take_many(sizes.randint(1, 30)) if sizes.random() < 0.5 else pool.take()
                )
            )

    threads = [threading.Thread(target=draw, args=(g, i)) for i, g in enumerate(got)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(n for g in got for n in g)
    assert every == list(range(len(every)))  # none twice, none skipped
    assert source.drawn - len(every) < 7  # what is left is less than one draw
    for mine in got:
        assert mine == sorted(mine)  # each thread's nonces come in stream order


# -- counter reservations -------------------------------------------------------------


def test_take_many_stays_in_the_block_and_stops_at_the_bound(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as store:
        counters = EncryptionCounters(store, Limits(encryption_limit=10, counter_block=4))
        assert counters.take_many("t", 1, 3) == 3
        assert counters.take_many("t", 1, 100) == 1  # the rest of the first block
        assert counters.take("t", 1) == 4  # none handed out twice
        assert counters.take_many("t", 1, 100) == 3
        assert counters.take_many("t", 1, 100) == 2  # the last block is cut at the bound
        with pytest.raises(LimitExceededError, match="rotate-tenant"):
            counters.take_many("t", 1, 1)
        with pytest.raises(InvalidInputError):
            counters.take_many("t", 2, 0)
