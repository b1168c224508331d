"""Envelope encryption of files of any size, in bounded memory.

`encrypt_stream(client, tenant, src, dst, context)` reads a binary file
object to its end and writes envelope format 2 (docs/streaming-format.md)
to another: one data key from GenerateDataKey (or the cache), a key
derived for this file, then fixed-size AES-256-GCM frames, each numbered
and the last one marked, so a file cut short, reordered or spliced does
not open. At most two frames are in memory (`frame_size`, 64 KiB by
default), whatever the file's size.

`decrypt_stream(client, src, dst, context)` reads the header, gets the
data key with one Unwrap (or from the cache), and writes each frame to
`dst` once it authenticates. When a later frame fails, `dst` already holds
the frames before it: they are authentic, but the file is not whole.
Write to a temporary file and keep it only when `decrypt_stream` returns
(`keyquorum backend decrypt-file` does).

Caching: an encryption may use a cached data key only when the source's
length is known before it starts (a seekable file; `length=` otherwise),
since the cache's byte bound is checked before the key is used; the
source must then not grow during the encryption (InvalidInputError).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from keyquorum.client import framing, inputs
from keyquorum.client.framing import Progress, Sink, Source, Summary
from keyquorum.client.inputs import Context
from keyquorum.quorum.errors import DeserializationError, InvalidInputError
from keyquorum.quorum.sealing import SealingPrivateKey

if TYPE_CHECKING:
    from keyquorum.client.client import KeyClient


def remaining_length(src: object) -> int | None:
    """Bytes left in a seekable source from where it stands; None for a pipe or socket."""
    try:
        if not src.seekable():  # type: ignore[attr-defined]
            return None
        here = src.tell()  # type: ignore[attr-defined]
        end = src.seek(0, io.SEEK_END)  # type: ignore[attr-defined]
        src.seek(here)  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
    return max(0, int(end) - int(here))


class Reserved:
    """A source that may yield at most the bytes a cached key was reserved for."""

    def __init__(self, src: Source, limit: int) -> None:
        self._src = src
        self._left = limit

    def read(self, size: int = -1, /) -> bytes:
        data = self._src.read(size) or b""
        self._left -= len(data)
        if self._left < 0:
            raise InvalidInputError(
                "the source grew while it was encrypted: a cached data key was reserved for "
                "the length it had at the start (pass length=, or encrypt without a cache)"
            )
        return data


def check_stream_args(
    tenant: object, context: object, frame_size: object, length: object
) -> tuple[str, dict[str, str], int | None]:
    tenant = inputs.check_tenant(tenant)
    ctx = inputs.check_context(context)
    framing.check_frame_size(frame_size)
    if length is not None:
        inputs.check_int("length", length, 0, 2**63 - 1)
    return tenant, ctx, length  # type: ignore[return-value]


def encrypt_stream(
    client: KeyClient,
    tenant: str,
    src: Source,
    dst: Sink,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    frame_size: int = framing.DEFAULT_FRAME_SIZE,
    length: int | None = None,
    progress: Progress | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> Summary:
    """Encrypt everything `src` holds into `dst` (format 2); what was written."""
    tenant, ctx, length = check_stream_args(tenant, context, frame_size, length)
    if length is None:
        length = remaining_length(src)
    with client._encryption_key(tenant, ctx, length, seal_to) as lease:
        source = Reserved(src, length) if lease.cached and length is not None else src
        return framing.seal(
            lease.key,
            lease.wrapped,
            source,
            dst,
            salt=random_bytes(framing.SALT_SIZE),
            frame_size=frame_size,
            progress=progress,
        )


def read_stream_header(src: Source) -> framing.Header:
    start, version = framing.read_version(src)
    if version != framing.FRAMED_VERSION:
        raise DeserializationError(
            f"a version-{version} envelope is a record: open it with decrypt_record"
        )
    return framing.read_header(src, start)


def decrypt_stream(
    client: KeyClient,
    src: Source,
    dst: Sink,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    progress: Progress | None = None,
) -> Summary:
    """Write the plaintext of the envelope in `src` to `dst`, frame by frame (see above)."""
    ctx = inputs.check_context(context)
    header = read_stream_header(src)
    with client._decryption_key(header.wrapped, ctx, seal_to) as lease:
        summary = framing.open_frames(header, lease.key, src, dst, progress=progress)
    client._charge_decryption(header.wrapped, ctx, summary.plaintext_bytes)
    return summary
