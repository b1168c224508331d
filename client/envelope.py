"""Envelope encryption of records in memory, on the backend's side.

`encrypt_record` encrypts a record locally under a data key from
GenerateDataKey (or the client's cache) and returns one self-contained
envelope: the wrapped data key, a random salt and the record in AES-256-GCM
frames under a key derived for this envelope alone (format 2,
docs/streaming-format.md, the same bytes `encrypt_stream` writes). The
daemon never sees the record. The wrapped key is bound to the tenant, its
key version and the encryption context (KeyService's ciphertext format);
the envelope's header, including that wrapped key, is authenticated, and
the data key commits to the envelope, so a record moved under another
record's key does not open. Opening takes one Unwrap with the same context
(or none, from the cache).

`decrypt_record` also opens format 1, which earlier versions wrote and
which is no longer written (one data key per record, used directly with a
random nonce, so it cannot take a cached key):

    "KQE" 0x01 || u16be len(wrapped key) || wrapped key || nonce (12)
              || AES-256-GCM(data key, nonce, record, aad)
    aad = "keyquorum/v1/envelope" 0x00 || everything before the nonce

The record comes back as `SecretBytes`: use it in a `with` block (zeroed
at its end) and read it with `.reveal()` or `.view()`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from keyquorum.client import framing, inputs
from keyquorum.client.cache import Lease
from keyquorum.client.inputs import Context
from keyquorum.quorum import aead
from keyquorum.quorum.errors import DecryptionError, DeserializationError
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes

if TYPE_CHECKING:
    from keyquorum.client.client import KeyClient

MAGIC: Final = framing.MAGIC + bytes([framing.RECORD_VERSION])
AAD_LABEL: Final = b"keyquorum/v1/envelope\x00"
MAX_WRAPPED: Final = 0xFFFF


def seal_record(
    lease: Lease,
    record: bytes,
    *,
    frame_size: int,
    random_bytes: Callable[[int], bytes],
) -> bytes:
    """The format-2 envelope of `record` under the lease's data key."""
    return framing.seal_bytes(
        lease.key,
        lease.wrapped,
        record,
        salt=random_bytes(framing.SALT_SIZE),
        frame_size=frame_size,
    )


class Parsed:
    """An envelope's version and wrapped key, and how to open it once the key is there."""

    __slots__ = ("_envelope", "_header", "version", "wrapped")

    def __init__(self, envelope: bytes) -> None:
        self._envelope = envelope
        _start, self.version = framing.read_version(io.BytesIO(envelope))
        self._header: framing.Header | None = None
        if self.version == framing.FRAMED_VERSION:
            self._header = framing.parse_header(envelope)
            self.wrapped = self._header.wrapped
        else:
            self.wrapped = _v1_wrapped(envelope)

    def open(self, data_key: SecretBytes) -> SecretBytes:
        if self._header is not None:
            return framing.open_bytes(self._header, data_key, self._envelope)
        return _open_v1(data_key, self._envelope)


def _v1_wrapped(envelope: bytes) -> bytes:
    at = len(MAGIC) + 2
    if len(envelope) < at:
        raise DeserializationError("the envelope ends before its wrapped-key length")
    size = int.from_bytes(envelope[len(MAGIC) : at], "big")
    if len(envelope) < at + size + aead.NONCE_SIZE + aead.TAG_SIZE:
        raise DeserializationError("the envelope is shorter than its fields")
    return envelope[at : at + size]


def _open_v1(data_key: SecretBytes, envelope: bytes) -> SecretBytes:
    at = len(MAGIC) + 2 + int.from_bytes(envelope[len(MAGIC) : len(MAGIC) + 2], "big")
    head, nonce = envelope[:at], envelope[at : at + aead.NONCE_SIZE]
    body = envelope[at + aead.NONCE_SIZE :]
    try:
        plain = aead.decrypt(data_key, nonce, body, AAD_LABEL + head)
    except DecryptionError:
        raise DecryptionError("the record does not authenticate under its data key") from None
    return SecretBytes.adopt(plain, label="record")


def encrypt_record(
    client: KeyClient,
    tenant: str,
    record: bytes,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    frame_size: int = framing.DEFAULT_FRAME_SIZE,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """The envelope of `record` (format 2): its wrapped data key, a salt, the frames.

    With a cache on the client, the data key may be one already used for
    this tenant and context (within the cache's bounds).
    """
    tenant = inputs.check_tenant(tenant)
    data = inputs.check_bytes("a record", record)
    ctx = inputs.check_context(context)
    framing.check_frame_size(frame_size)
    with client._encryption_key(tenant, ctx, len(data), seal_to) as lease:
        return seal_record(lease, data, frame_size=frame_size, random_bytes=random_bytes)


def decrypt_record(
    client: KeyClient,
    envelope: bytes,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
) -> SecretBytes:
    """The record of `envelope` (SecretBytes: wipe it); the context used to encrypt.

    DeserializationError for a malformed envelope; DecryptionError when it
    does not authenticate under its data key (TruncatedError, a subclass,
    when frames are missing at its end); KeyServiceError when the daemon
    refuses the Unwrap (another context: INVALID_ARGUMENT).
    """
    data = inputs.check_bytes("an envelope", envelope)
    ctx = inputs.check_context(context)
    parsed = Parsed(data)
    with client._decryption_key(parsed.wrapped, ctx, seal_to) as lease:
        plain = parsed.open(lease.key)
    client._charge_decryption(parsed.wrapped, ctx, len(plain))
    return plain
