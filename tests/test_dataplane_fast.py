"""The data plane's fast paths give exactly what the plain paths give.

- the flat-context RFC 8785 encoder against the `rfc8785` package, byte for
  byte, on contexts hypothesis makes (ASCII keys with JSON's special
  characters, any values: controls, quotes, non-BMP, U+2028);
- BatchWrap's hand-written wire format against the protobuf library's own
  serialisation, byte for byte, and parsed back;
- nonces drawn in blocks: none repeats, across threads and after a fork;
- counter reservations for a batch never hand out a number twice and stop
  at the bound.

A batch's context cache over real gRPC is in tests/test_key_service.py
(`test_batch_contexts_encoded_once_still_bind_each_item`).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.hsm import dataplane
from keyquorum.hsm.dataplane import DataPlaneLimits, EncryptionCounters, NoncePool, Wrapped
from keyquorum.hsm.key_service import _item_error, _wrapped, encode_wrap_results
from keyquorum.hsm.sqlite_store import SqliteStore
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DecryptionError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    SealedError,
)
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
    assert dataplane._flat_canonical(pairs) == rfc8785.dumps(context)
    assert dataplane.encode_context(context) == rfc8785.dumps(context)


@settings(max_examples=100, deadline=None)
@given(context=st.dictionaries(ASCII_KEYS, VALUES, min_size=2, max_size=6), data=st.data())
def test_flat_encoder_ignores_insertion_order(context: dict[str, str], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(list(context.items())))
    assert dataplane._flat_canonical(tuple(shuffled)) == dataplane._flat_canonical(
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
    dataplane._forget_drawn_nonces()  # what os.register_at_fork runs in a child
    assert pool.take() == b"\x03" * 12


@pytest.mark.parametrize(
    ("source", "per_draw"),
    [(lambda n: bytes(n - 1), 4), (bytearray, 4), (bytes, 0)],
    ids=["short-read", "not-bytes", "zero-per-draw"],
)
def test_nonce_pool_refuses_a_bad_source(source: object, per_draw: int) -> None:
    with pytest.raises(InvalidInputError):
        NoncePool(source, per_draw=per_draw).take()  # type: ignore[arg-type]


# -- counter reservations -------------------------------------------------------------


def test_take_many_stays_in_the_block_and_stops_at_the_bound(tmp_path: Path) -> None:
    with SqliteStore.in_directory(tmp_path) as store:
        counters = EncryptionCounters(store, DataPlaneLimits(encryption_limit=10, counter_block=4))
        assert counters.take_many("t", 1, 3) == 3
        assert counters.take_many("t", 1, 100) == 1  # the rest of the first block
        assert counters.take("t", 1) == 4  # none handed out twice
        assert counters.take_many("t", 1, 100) == 3
        assert counters.take_many("t", 1, 100) == 2  # the last block is cut at the bound
        with pytest.raises(LimitExceededError, match="rotate-tenant"):
            counters.take_many("t", 1, 1)
        with pytest.raises(InvalidInputError):
            counters.take_many("t", 2, 0)
