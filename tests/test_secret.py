from __future__ import annotations

import copy
import pickle

import pytest

from keyquorum.quorum.errors import StateError
from keyquorum.quorum.secret import SecretBytes

SECRET = b"\x8a\x11correct horse battery staple\x01"


def test_repr_and_str_hide_the_bytes() -> None:
    s = SecretBytes(SECRET, label="master key")
    for text in (repr(s), str(s), f"{s}", f"{s!r}", str([s]), str({"k": s})):
        assert SECRET.hex() not in text
        assert "correct horse" not in text
        assert "master key" in text


def test_wipe_zeroes_the_buffer_and_blocks_use() -> None:
    s = SecretBytes(SECRET)
    buf = s.buffer_for_test()
    s.wipe()
    assert buf == bytearray(len(SECRET))
    with pytest.raises(StateError, match="wiped"):
        s.reveal()
    with pytest.raises(StateError):
        s.view()


def test_context_manager_wipes() -> None:
    with SecretBytes(SECRET) as s:
        buf = s.buffer_for_test()
        assert s.reveal() == SECRET
    assert buf == bytearray(len(SECRET))


@pytest.mark.parametrize(
    "attempt",
    [pickle.dumps, copy.copy, copy.deepcopy],
    ids=["pickle", "copy", "deepcopy"],
)
def test_cannot_leave_its_box(attempt: object) -> None:
    with pytest.raises(TypeError):
        attempt(SecretBytes(SECRET))  # type: ignore[operator]


def test_equals_is_by_value_and_eq_is_identity() -> None:
    a, b = SecretBytes(SECRET), SecretBytes(SECRET)
    assert a.equals(b)
    assert a.equals(SECRET)
    assert not a.equals(b"x" * len(SECRET))
    assert a != b


@pytest.mark.parametrize("size", [1, 32, 4096], ids=["one-byte", "key-sized", "page-sized"])
def test_wipe_overwrites_in_place_under_a_held_view(size: int) -> None:
    """A view taken before the wipe reads zeros after it: the storage itself was overwritten.

    A wipe that swapped in a new buffer would leave the old bytes visible
    here, and one that resized it would raise BufferError (a bytearray with
    an exported view cannot change its length).
    """
    secret = bytes((i % 255) + 1 for i in range(size))
    s = SecretBytes(secret)
    held = memoryview(s.buffer_for_test())
    assert held.tobytes() == secret
    s.wipe()
    assert held.tobytes() == bytes(size)
    assert len(s.buffer_for_test()) == size
    held.release()
