"""Envelope encryption for records of any size, on the backend's side.

Each record is encrypted locally under a fresh data key from
GenerateDataKey; the daemon never sees the record, and the record's
wrapped data key is stored beside it:

    "KQE" 0x01 || u16be len(wrapped key) || wrapped key || nonce (12)
              || AES-256-GCM(data key, nonce, record, aad)
    aad = "keyquorum/v1/envelope" 0x00 || everything before the nonce

The wrapped key is bound to the tenant, its key version and the
encryption context (KeyService's ciphertext format), and the record is
bound to that wrapped key through the associated data, so a record moved
under another record's key does not open. One data key encrypts one
record, so its random nonce never repeats under it (NIST SP 800-38D,
section 8.2.2). Opening takes one Unwrap with the same context.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final

from keyquorum.client.client import Context, KeyClient
from keyquorum.quorum import aead
from keyquorum.quorum.errors import DecryptionError, DeserializationError, InvalidInputError
from keyquorum.quorum.sealing import SealingPrivateKey
from keyquorum.quorum.secret import SecretBytes

MAGIC: Final = b"KQE\x01"
AAD_LABEL: Final = b"keyquorum/v1/envelope\x00"
MAX_WRAPPED: Final = 0xFFFF


def encrypt_record(
    client: KeyClient,
    tenant: str,
    record: bytes,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """The envelope of `record`: its wrapped data key, a nonce and the AEAD output."""
    if not isinstance(record, bytes | bytearray | memoryview):
        raise InvalidInputError("a record must be bytes")
    with client.generate_data_key(tenant, context, seal_to=seal_to) as data_key:
        wrapped = data_key.ciphertext
        if len(wrapped) > MAX_WRAPPED:
            raise InvalidInputError("the wrapped data key is too long for an envelope")
        head = MAGIC + len(wrapped).to_bytes(2, "big") + wrapped
        nonce = random_bytes(aead.NONCE_SIZE)
        body = aead.encrypt(data_key.plaintext, nonce, bytes(record), AAD_LABEL + head)
    return head + nonce + body


def decrypt_record(
    client: KeyClient,
    envelope: bytes,
    context: Context | None = None,
    *,
    seal_to: SealingPrivateKey | None = None,
) -> SecretBytes:
    """The record of `envelope` (wipe it); the context must be the one used to encrypt.

    DeserializationError for a malformed envelope, DecryptionError when the
    record does not authenticate under its data key; KeyServiceError when
    the daemon refuses the Unwrap (another context: INVALID_ARGUMENT).
    """
    if not isinstance(envelope, bytes):
        raise InvalidInputError("an envelope must be bytes")
    if envelope[: len(MAGIC)] != MAGIC:
        raise DeserializationError("not a keyquorum envelope (magic KQE, version 1)")
    at = len(MAGIC) + 2
    if len(envelope) < at:
        raise DeserializationError("the envelope ends before its wrapped-key length")
    size = int.from_bytes(envelope[len(MAGIC) : at], "big")
    if len(envelope) < at + size + aead.NONCE_SIZE + aead.TAG_SIZE:
        raise DeserializationError("the envelope is shorter than its fields")
    wrapped = envelope[at : at + size]
    head = envelope[: at + size]
    nonce = envelope[at + size : at + size + aead.NONCE_SIZE]
    body = envelope[at + size + aead.NONCE_SIZE :]
    with client.unwrap(wrapped, context, seal_to=seal_to) as data_key:
        try:
            plain = aead.decrypt(data_key, nonce, body, AAD_LABEL + head)
        except DecryptionError:
            raise DecryptionError("the record does not authenticate under its data key") from None
    return SecretBytes.adopt(plain, label="record")
