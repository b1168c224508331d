"""Envelope format 2 (docs/streaming-format.md) on its own: vectors, properties, every mutation.

No daemon here: the data key is given, as the format sees it. The checked-in
vectors must equal what the generator makes now; the implementation must
agree with a naive reference written from the spec; every truncation,
reordering, duplication and bit flip of a message is refused, and a reader
never releases bytes of a frame that did not authenticate. The same format
through a real daemon over mTLS is in tests/test_sdk_client.py.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyquorum.client import framing
from keyquorum.quorum import errors
from keyquorum.quorum.secret import SecretBytes
from tests import envelope_reference as ref
from tests import envelope_vectors as gen

VECTORS = Path(__file__).parent / "vectors" / "envelope-v2"
VALID = sorted((VECTORS / "valid").glob("*.json"))
INVALID = sorted((VECTORS / "invalid").glob("*.json"))
KEY = gen.DATA_KEY
WRAPPED = gen.WRAPPED
SALT = bytes(range(32))

ERRORS: dict[str, type[Exception]] = {
    "DecryptionError": errors.DecryptionError,
    "TruncatedError": framing.TruncatedError,
    "DeserializationError": errors.DeserializationError,
    "UnsupportedVersionError": errors.UnsupportedVersionError,
}


def seal(plaintext: bytes, frame_size: int, salt: bytes = SALT) -> bytes:
    with SecretBytes(KEY) as key:
        return framing.seal_bytes(key, WRAPPED, plaintext, salt=salt, frame_size=frame_size)


class Recorder:
    """A sink that records each write, to see exactly what a reader released."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes | bytearray, /) -> int:
        self.writes.append(bytes(data))
        return len(data)

    @property
    def value(self) -> bytes:
        return b"".join(self.writes)


class Chunky:
    """A source that returns at most `step` bytes per read, like a pipe; records read sizes."""

    def __init__(self, data: bytes, step: int) -> None:
        self._src = io.BytesIO(data)
        self._step = step
        self.asked: list[int] = []

    def read(self, size: int = -1, /) -> bytes:
        self.asked.append(size)
        return self._src.read(min(size, self._step) if size >= 0 else self._step)


def open_all(envelope: bytes, key: bytes = KEY, sink: Recorder | None = None) -> bytes:
    return gen.open_with(envelope, key) if sink is None else _open_into(envelope, key, sink)


def _open_into(envelope: bytes, key: bytes, sink: Recorder) -> bytes:
    src = io.BytesIO(envelope)
    start, _version = framing.read_version(src)
    header = framing.read_header(src, start)
    with SecretBytes(key) as k:
        framing.open_frames(header, k, src, sink)
    return sink.value


def refused(envelope: bytes, plaintext: bytes, frame_size: int) -> Exception:
    """`envelope` must not open; what was released must be whole authentic frames."""
    sink = Recorder()
    with pytest.raises(
        (errors.DecryptionError, errors.DeserializationError, errors.InvalidInputError)
    ) as info:
        open_all(envelope, sink=sink)
    released = sink.value
    assert plaintext.startswith(released)
    assert len(released) % frame_size == 0  # only whole, non-final frames came out
    return info.value


# -- vectors ------------------------------------------------------------------------------


def test_vectors_do_not_drift() -> None:
    """The checked-in files are exactly what the generator makes from today's code."""
    assert gen.drift() == []
    assert len(VALID) == len(gen.VALID)
    assert len(INVALID) >= 20


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    key, salt = bytes.fromhex(v["data_key"]), bytes.fromhex(v["salt"])
    plaintext, envelope = bytes.fromhex(v["plaintext"]), bytes.fromhex(v["envelope"])
    assert ref.keys(key, salt) == (bytes.fromhex(v["payload_key"]), bytes.fromhex(v["commitment"]))
    with SecretBytes(key) as k:
        sealed = framing.seal_bytes(
            k, bytes.fromhex(v["wrapped"]), plaintext, salt=salt, frame_size=v["frame_size"]
        )
    assert sealed == envelope
    assert envelope.startswith(bytes.fromhex(v["header"]))
    header = framing.parse_header(envelope)
    assert header.size == len(bytes.fromhex(v["header"]))
    assert (header.frame_size, header.wrapped, header.salt) == (
        v["frame_size"],
        bytes.fromhex(v["wrapped"]),
        salt,
    )
    assert len(envelope) == header.size + len(plaintext) + 16 * v["frames"]
    assert open_all(envelope, key) == plaintext


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    with pytest.raises(ERRORS[v["error"]], match=None) as info:
        open_all(bytes.fromhex(v["envelope"]), bytes.fromhex(v["data_key"]))
    assert type(info.value) is ERRORS[v["error"]]
    assert v["message"] in str(info.value)


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    plaintext=st.binary(max_size=3000),
    frame_size=st.integers(1, 300),
    salt=st.binary(min_size=32, max_size=32),
)
def test_implementation_matches_the_reference(
    plaintext: bytes, frame_size: int, salt: bytes
) -> None:
    assert seal(plaintext, frame_size, salt) == ref.seal(KEY, WRAPPED, plaintext, salt, frame_size)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plaintext=st.binary(max_size=5000),
    frame_size=st.integers(1, 600),
    step=st.integers(1, 700),
)
def test_round_trip_through_short_reads(plaintext: bytes, frame_size: int, step: int) -> None:
    """Sources that return fewer bytes than asked (pipes) change nothing; reads stay bounded."""
    src, out = Chunky(plaintext, step), io.BytesIO()
    with SecretBytes(KEY) as key:
        summary = framing.seal(key, WRAPPED, src, out, salt=SALT, frame_size=frame_size)
    envelope = out.getvalue()
    assert envelope == seal(plaintext, frame_size)
    assert summary.plaintext_bytes == len(plaintext)
    assert summary.message_bytes == len(envelope)
    assert max(src.asked) <= frame_size  # never the whole input
    back = Chunky(envelope, step)
    start, _ = framing.read_version(back)
    header = framing.read_header(back, start)
    sink = Recorder()
    with SecretBytes(KEY) as key:
        opened = framing.open_frames(header, key, back, sink)
    assert sink.value == plaintext
    assert opened.frames == summary.frames
    assert max(back.asked) <= max(frame_size + 16, header.size)
    assert all(len(w) <= frame_size for w in sink.writes)


# -- every mutation of one message -----------------------------------------------------------

FRAME = 16
PLAINTEXT = bytes(range(56))  # 16 + 16 + 16 + 8: four frames, the last one partial
ENVELOPE = seal(PLAINTEXT, FRAME)
HEAD = framing.parse_header(ENVELOPE).size
FRAMES = [
    ENVELOPE[HEAD + i : HEAD + i + FRAME + 16] for i in range(0, 4 * (FRAME + 16), FRAME + 16)
]


def test_the_message_under_test_is_what_it_seems() -> None:
    assert b"".join([ENVELOPE[:HEAD], *FRAMES]) == ENVELOPE
    assert [len(f) for f in FRAMES] == [32, 32, 32, 24]
    assert open_all(ENVELOPE) == PLAINTEXT


@pytest.mark.parametrize("length", range(len(ENVELOPE)))
def test_every_truncation_is_refused(length: int) -> None:
    error = refused(ENVELOPE[:length], PLAINTEXT, FRAME)
    if length in (HEAD, HEAD + 32, HEAD + 64, HEAD + 96):
        assert isinstance(error, framing.TruncatedError)


def test_every_bit_flip_is_refused() -> None:
    for at in range(len(ENVELOPE)):
        for bit in range(8):
            flipped = bytearray(ENVELOPE)
            flipped[at] ^= 1 << bit
            refused(bytes(flipped), PLAINTEXT, FRAME)


def _order(order: tuple[int, ...]) -> bytes:
    return ENVELOPE[:HEAD] + b"".join(FRAMES[i] for i in order)


@pytest.mark.parametrize(
    "order", [p for p in itertools.permutations(range(4)) if p != (0, 1, 2, 3)], ids=str
)
def test_every_reordering_is_refused(order: tuple[int, ...]) -> None:
    refused(_order(order), PLAINTEXT, FRAME)


def test_every_duplication_and_deletion_is_refused() -> None:
    for frame, at in itertools.product(range(4), range(5)):
        order = list(range(4))
        order.insert(at, frame)
        refused(_order(tuple(order)), PLAINTEXT, FRAME)
    for dropped in range(4):
        refused(_order(tuple(i for i in range(4) if i != dropped)), PLAINTEXT, FRAME)
    for extra in FRAMES:
        refused(ENVELOPE + extra, PLAINTEXT, FRAME)


def test_a_frame_of_another_message_is_refused_everywhere() -> None:
    other = seal(PLAINTEXT, FRAME, salt=bytes(32))  # same key and plaintext, another salt
    other_frames = [other[HEAD + i : HEAD + i + 32] for i in range(0, 128, 32)]
    for at in range(4):
        spliced = list(FRAMES)
        spliced[at] = other_frames[at]
        refused(ENVELOPE[:HEAD] + b"".join(spliced), PLAINTEXT, FRAME)


@settings(max_examples=200, deadline=None)
@given(
    plaintext=st.binary(min_size=1, max_size=400),
    frame_size=st.integers(1, 64),
    data=st.data(),
)
def test_random_mutations_are_refused(
    plaintext: bytes, frame_size: int, data: st.DataObject
) -> None:
    envelope = seal(plaintext, frame_size)
    kind = data.draw(st.sampled_from(["truncate", "flip", "swap", "duplicate", "append"]))
    head = framing.parse_header(envelope).size
    step = frame_size + 16
    frames = [envelope[i : i + step] for i in range(head, len(envelope), step)]
    if kind == "truncate":
        mutated = envelope[: data.draw(st.integers(0, len(envelope) - 1))]
    elif kind == "flip":
        at, bit = data.draw(st.integers(0, len(envelope) - 1)), data.draw(st.integers(0, 7))
        mutated = envelope[:at] + bytes([envelope[at] ^ (1 << bit)]) + envelope[at + 1 :]
    elif kind == "append":
        mutated = envelope + data.draw(st.binary(min_size=1, max_size=80))
    elif len(frames) < 2:
        mutated = envelope + frames[0]
    elif kind == "swap":
        i = data.draw(st.integers(0, len(frames) - 2))
        frames[i], frames[i + 1] = frames[i + 1], frames[i]
        mutated = envelope[:head] + b"".join(frames)
    else:
        i = data.draw(st.integers(0, len(frames) - 1))
        mutated = envelope[:head] + b"".join(frames[: i + 1] + frames[i:])
    if mutated == envelope:  # swapping two identical frames cannot happen (distinct nonces)
        return
    refused(mutated, plaintext, frame_size)


# -- keys ---------------------------------------------------------------------------------------


def test_the_message_key_is_wiped_and_its_cipher_closed() -> None:
    with SecretBytes(KEY) as data_key:
        key = framing.MessageKey(data_key, SALT)
        held = key._key
        key.close()
    assert held.wiped
    assert held.buffer_for_test() == bytearray(32)
    with pytest.raises(errors.StateError):
        key.seal(framing.frame_nonce(1, True), b"x", b"")


@pytest.mark.parametrize(
    ("frame_size", "match"),
    [(0, "1 to 16777216"), (framing.MAX_FRAME_SIZE + 1, "1 to 16777216"), (True, "an int")],
    ids=["zero", "too-large", "bool"],
)
def test_bad_frame_sizes_are_refused_when_sealing(frame_size: object, match: str) -> None:
    with SecretBytes(KEY) as key, pytest.raises(errors.InvalidInputError, match=match):
        framing.seal_bytes(key, WRAPPED, b"x", salt=SALT, frame_size=frame_size)  # type: ignore[arg-type]
