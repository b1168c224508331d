from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyquorum.quorum import canonical
from keyquorum.quorum.errors import DeserializationError, InvalidInputError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_round_trip_is_byte_exact(value: object) -> None:
    data = canonical.encode(value)
    assert canonical.decode(data) == value
    assert canonical.encode(canonical.decode(data)) == data


@pytest.mark.parametrize(
    "data",
    [b'{"b":1,"a":2}', b'{"a": 1}', b'{"a":1.0}', b"[NaN]", b"\xff", b'{"a":1', b' {"a":1}'],
    ids=["unsorted", "whitespace", "float-form", "nan", "not-utf8", "truncated", "leading-space"],
)
def test_non_canonical_input_is_refused(data: bytes) -> None:
    with pytest.raises(DeserializationError):
        canonical.decode(data)


def test_unencodable_values_are_refused() -> None:
    with pytest.raises(InvalidInputError):
        canonical.encode({"x": 2**60})
    with pytest.raises(InvalidInputError):
        canonical.encode({"x": b"bytes"})


def test_hex_bytes() -> None:
    assert canonical.hex_bytes("00ff", field="f", size=2) == b"\x00\xff"
    for bad in ("00FF", "0g", 5):
        with pytest.raises(DeserializationError, match="f:"):
            canonical.hex_bytes(bad, field="f")
    with pytest.raises(DeserializationError, match="expected 3 bytes"):
        canonical.hex_bytes("00ff", field="f", size=3)


def test_parse_errors_do_not_carry_the_input() -> None:
    secret = b"\xff" + b"share-bytes-7f3a" * 4
    with pytest.raises(DeserializationError) as info:
        canonical.decode(secret)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    assert "share-bytes" not in str(info.value)
    with pytest.raises(DeserializationError) as info:
        canonical.decode(b'{"k":"share-bytes-7f3a"')
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
