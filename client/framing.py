"""Envelope format 2: a message of any size in AES-256-GCM frames under a per-message key.

The contract is docs/streaming-format.md; this module is its one
implementation, and does no key management: it takes the data key (from
GenerateDataKey, Unwrap or the cache) and the wrapped form the daemon made
of it, reads a source file object and writes a sink, holding at most two
frames at a time. Randomness (the salt) is an argument, so the vectors
in tests/vectors/envelope-v2/ are byte-exact.

    header = "KQE" 0x02 || u32 frame_size || u16 len(wrapped) || wrapped
             || salt (32) || commitment (32) || tag (16)
    frame i (i = 1, 2, ...) = AES-256-GCM(K, u88(i) || u8(final), plaintext_i, FRAME_AAD)

    K          = HKDF-SHA256(data key, salt, "keyquorum/v1/envelope-2/payload-key")
    commitment = HKDF-SHA256(data key, salt, "keyquorum/v1/envelope-2/commitment")
    tag        = AES-256-GCM(K, 0^12, "", HEADER_LABEL || header up to the tag)

As the AWS Encryption SDK's message format (a per-message key derived
from the data key and a random message id, a header authentication tag,
frames numbered from 1, a key commitment) and age's STREAM (the frame
number and a final-frame flag in the nonce): a frame moved, repeated,
dropped or cut off fails, and so does a message whose last frame is
missing. Every frame but the last holds exactly `frame_size` bytes; the
last holds 1 to `frame_size` (0 only when the message is empty).

Opening checks, in order: 0 the header's form (sizes before any
allocation), 1 the commitment (the data key belongs to this message),
2 the header tag, 3 each frame in turn, released only once it
authenticates.
"""

from __future__ import annotations

import hmac
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyquorum.quorum import aead
from keyquorum.quorum.errors import (
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    UnsupportedVersionError,
)
from keyquorum.quorum.secret import SecretBytes

MAGIC: Final = b"KQE"
#: Version 1: one record, one data key, a random nonce (client/envelope.py, read only).
RECORD_VERSION: Final = 1
FRAMED_VERSION: Final = 2

HEADER_LABEL: Final = b"keyquorum/v1/envelope-2/header\x00"
FRAME_AAD: Final = b"keyquorum/v1/envelope-2/frame\x00"
PAYLOAD_INFO: Final = b"keyquorum/v1/envelope-2/payload-key"
COMMITMENT_INFO: Final = b"keyquorum/v1/envelope-2/commitment"

DATA_KEY_SIZE: Final = 32
SALT_SIZE: Final = 32
COMMITMENT_SIZE: Final = 32
TAG_SIZE: Final = aead.TAG_SIZE
HEADER_NONCE: Final = bytes(aead.NONCE_SIZE)
#: magic, version, frame size (u32), wrapped-key length (u16).
FIXED_SIZE: Final = len(MAGIC) + 1 + 4 + 2

MIN_FRAME_SIZE: Final = 1
MAX_FRAME_SIZE: Final = 1 << 24
DEFAULT_FRAME_SIZE: Final = 1 << 16
MAX_WRAPPED: Final = 0xFFFF
#: Frame numbers fill 11 bytes of the nonce; 0 is the header's.
MAX_FRAMES: Final = (1 << 88) - 1


class TruncatedError(DecryptionError):
    """The message ends before its final frame: cut off (every frame read did authenticate)."""


class Source(Protocol):
    """A binary file object opened for reading (files, pipes, BytesIO)."""

    def read(self, size: int = -1, /) -> bytes | None: ...


class Sink(Protocol):
    """A binary file object opened for writing (files, pipes, BytesIO)."""

    def write(self, data: bytes | bytearray, /) -> int | None: ...


Progress = Callable[[int], None]


@dataclass(frozen=True)
class Header:
    """A parsed format-2 header; `signed` is its bytes up to the tag, as read."""

    frame_size: int
    wrapped: bytes
    salt: bytes
    commitment: bytes
    tag: bytes
    signed: bytes

    @property
    def size(self) -> int:
        return len(self.signed) + TAG_SIZE


@dataclass(frozen=True)
class Summary:
    """What one message held: plaintext bytes, frames, and its size on the wire."""

    plaintext_bytes: int
    frames: int
    message_bytes: int


def check_frame_size(frame_size: object) -> int:
    if isinstance(frame_size, bool) or not isinstance(frame_size, int):
        raise InvalidInputError(f"frame_size must be an int, got {type(frame_size).__name__}")
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE:
        raise InvalidInputError(
            f"frame_size must be {MIN_FRAME_SIZE} to {MAX_FRAME_SIZE} bytes, got {frame_size}"
        )
    return frame_size


def frame_nonce(index: int, final: bool) -> bytes:
    """u88(index) || u8(final): the frame's number and whether it is the last."""
    if not 1 <= index <= MAX_FRAMES:
        raise InvalidInputError(f"frame number {index} is outside 1 to 2^88 - 1")
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


# -- keys -----------------------------------------------------------------------------


def _hkdf(data_key: SecretBytes, salt: bytes, info: bytes) -> bytearray:
    out = bytearray(32)
    HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive_into(
        data_key.view(), out
    )
    return out


class MessageKey:
    """The per-message AES-256-GCM key and the commitment, derived from a data key."""

    __slots__ = ("_cipher", "_key", "commitment")

    def __init__(self, data_key: SecretBytes, salt: bytes) -> None:
        if not isinstance(data_key, SecretBytes) or len(data_key) != DATA_KEY_SIZE:
            raise InvalidInputError(f"a data key is {DATA_KEY_SIZE} bytes of SecretBytes")
        if len(salt) != SALT_SIZE:
            raise InvalidInputError(f"a salt is {SALT_SIZE} bytes, got {len(salt)}")
        self._key = SecretBytes.adopt(_hkdf(data_key, salt, PAYLOAD_INFO), label="message key")
        self._cipher = aead.Cipher(self._key)
        self.commitment = bytes(_hkdf(data_key, salt, COMMITMENT_INFO))

    def seal(self, nonce: bytes, plaintext: bytes | memoryview, aad: bytes) -> bytes:
        return self._cipher.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytearray:
        return self._cipher.decrypt(nonce, ciphertext, aad)

    def close(self) -> None:
        self._cipher.close()
        self._key.wipe()

    def __enter__(self) -> MessageKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return "<MessageKey>"


# -- the header -----------------------------------------------------------------------


def header_body(frame_size: int, wrapped: bytes, salt: bytes, commitment: bytes) -> bytes:
    """The header's bytes up to its tag."""
    check_frame_size(frame_size)
    if not 1 <= len(wrapped) <= MAX_WRAPPED:
        raise InvalidInputError(f"the wrapped data key must be 1 to {MAX_WRAPPED} bytes")
    return (
        MAGIC
        + bytes([FRAMED_VERSION])
        + frame_size.to_bytes(4, "big")
        + len(wrapped).to_bytes(2, "big")
        + wrapped
        + salt
        + commitment
    )


def read_version(src: Source) -> tuple[bytes, int]:
    """The magic and version byte (4 bytes, returned as read) and the version."""
    start = read_exactly(src, len(MAGIC) + 1)
    if len(start) < len(MAGIC) + 1 or start[: len(MAGIC)] != MAGIC:
        raise DeserializationError("not a keyquorum envelope (magic KQE)")
    version = start[len(MAGIC)]
    if version not in (RECORD_VERSION, FRAMED_VERSION):
        raise UnsupportedVersionError(f"envelope version {version} is not supported (1, 2)")
    return start, version


def read_header(src: Source, start: bytes) -> Header:
    """Step 0: the rest of a format-2 header after its first four bytes `start`."""
    sizes = read_exactly(src, 6)
    if len(sizes) < 6:
        raise DeserializationError("the envelope ends inside its header")
    frame_size = int.from_bytes(sizes[:4], "big")
    if not MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE:
        raise DeserializationError(
            f"the header's frame size {frame_size} is outside {MIN_FRAME_SIZE} to {MAX_FRAME_SIZE}"
        )
    wrapped_size = int.from_bytes(sizes[4:], "big")
    if wrapped_size == 0:
        raise DeserializationError("the header's wrapped data key is empty")
    rest = read_exactly(src, wrapped_size + SALT_SIZE + COMMITMENT_SIZE + TAG_SIZE)
    if len(rest) < wrapped_size + SALT_SIZE + COMMITMENT_SIZE + TAG_SIZE:
        raise DeserializationError("the envelope ends inside its header")
    at = wrapped_size
    salt = rest[at : at + SALT_SIZE]
    commitment = rest[at + SALT_SIZE : at + SALT_SIZE + COMMITMENT_SIZE]
    return Header(
        frame_size=frame_size,
        wrapped=rest[:at],
        salt=salt,
        commitment=commitment,
        tag=rest[-TAG_SIZE:],
        signed=start + sizes + rest[:-TAG_SIZE],
    )


def parse_header(envelope: bytes) -> Header:
    """The header at the start of `envelope` (format 2)."""
    src = io.BytesIO(envelope)
    start, version = read_version(src)
    if version != FRAMED_VERSION:
        raise DeserializationError(f"not a framed envelope (version {version})")
    return read_header(src, start)


# -- sealing --------------------------------------------------------------------------


def seal(
    data_key: SecretBytes,
    wrapped: bytes,
    src: Source,
    dst: Sink,
    *,
    salt: bytes,
    frame_size: int = DEFAULT_FRAME_SIZE,
    progress: Progress | None = None,
) -> Summary:
    """Write the envelope of everything `src` holds to `dst`, two frames in memory at most."""
    check_frame_size(frame_size)
    with MessageKey(data_key, salt) as key:
        body = header_body(frame_size, wrapped, salt, key.commitment)
        tag = key.seal(HEADER_NONCE, b"", HEADER_LABEL + body)
        dst.write(body + tag)
        written = len(body) + TAG_SIZE
        current = read_exactly(src, frame_size)
        index = total = 0
        while True:
            following = read_exactly(src, frame_size) if len(current) == frame_size else b""
            index += 1
            final = not following
            frame = key.seal(frame_nonce(index, final), current, FRAME_AAD)
            dst.write(frame)
            written += len(frame)
            total += len(current)
            if progress is not None:
                progress(len(current))
            if final:
                return Summary(total, index, written)
            current = following


def seal_bytes(
    data_key: SecretBytes,
    wrapped: bytes,
    plaintext: bytes | bytearray | memoryview,
    *,
    salt: bytes,
    frame_size: int = DEFAULT_FRAME_SIZE,
) -> bytes:
    out = io.BytesIO()
    seal(data_key, wrapped, io.BytesIO(plaintext), out, salt=salt, frame_size=frame_size)
    return out.getvalue()


# -- opening --------------------------------------------------------------------------


def open_frames(
    header: Header,
    data_key: SecretBytes,
    src: Source,
    dst: Sink,
    *,
    progress: Progress | None = None,
) -> Summary:
    """Steps 1 to 3: check the key and header, then write each frame once it authenticates.

    Frames that authenticated are written as they come, so when a later one
    fails (DecryptionError, TruncatedError), `dst` already holds a verified
    prefix: a caller that must not act on a partial message writes to a
    temporary place and keeps it only when this returns.
    """
    with MessageKey(data_key, header.salt) as key:
        # 1. The data key is the one this message was made with.
        if not hmac.compare_digest(key.commitment, header.commitment):
            raise DecryptionError(
                "the data key does not belong to this envelope (key commitment differs)"
            )
        # 2. The header as written.
        try:
            key.open(HEADER_NONCE, header.tag, HEADER_LABEL + header.signed)
        except DecryptionError:
            raise DecryptionError("the envelope's header does not authenticate") from None
        # 3. Frames, each released only once it authenticates.
        full = header.frame_size + TAG_SIZE
        current = read_exactly(src, full)
        index = total = 0
        read = header.size
        while True:
            index += 1
            following = read_exactly(src, full) if len(current) == full else b""
            final = not following
            if len(current) < TAG_SIZE:
                raise TruncatedError(
                    f"the envelope ends before its final frame (inside frame {index})"
                    if current
                    else f"the envelope ends before its final frame (after frame {index - 1})"
                )
            plain = _open_frame(key, index, final, current)
            if final and not plain and index > 1:
                raise DeserializationError(
                    f"frame {index} is an empty final frame after full ones; the format "
                    "puts the last bytes in the final frame"
                )
            dst.write(plain)
            read += len(current)
            total += len(plain)
            if progress is not None:
                progress(len(plain))
            if final:
                return Summary(total, index, read)
            current = following


def _open_frame(key: MessageKey, index: int, final: bool, frame: bytes) -> bytearray:
    try:
        return key.open(frame_nonce(index, final), frame, FRAME_AAD)
    except DecryptionError:
        pass
    # Only on failure: say which of the structural faults it is, if any.
    try:
        other = key.open(frame_nonce(index, not final), frame, FRAME_AAD)
    except DecryptionError:
        raise DecryptionError(
            f"frame {index} does not authenticate (altered, moved, repeated, from another "
            "envelope, or cut short)"
        ) from None
    other[:] = bytes(len(other))
    if final:
        raise TruncatedError(
            f"the envelope ends before its final frame (after frame {index})"
        ) from None
    raise DecryptionError(f"data follows the final frame (frame {index})") from None


def open_bytes(header: Header, data_key: SecretBytes, envelope: bytes) -> SecretBytes:
    """The plaintext of a whole envelope in memory (the header parsed from it)."""
    src = io.BytesIO(envelope)
    src.seek(header.size)
    out = _Collect()
    try:
        open_frames(header, data_key, src, out)
    except BaseException:
        out.wipe()
        raise
    return SecretBytes.adopt(out.buffer, label="record")


class _Collect:
    """A sink that keeps everything in one wipeable bytearray."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes | bytearray, /) -> int:
        self.buffer += data
        return len(data)

    def wipe(self) -> None:
        self.buffer[:] = bytes(len(self.buffer))


def read_exactly(src: Source, size: int) -> bytes:
    """`size` bytes, or fewer only at the end of `src` (pipes and sockets return short reads)."""
    data = src.read(size)
    if data is None:
        raise InvalidInputError("the source is non-blocking and had nothing to read")
    if len(data) == size or not data:
        return data
    parts = [data]
    have = len(data)
    while have < size:
        more = src.read(size - have)
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)
