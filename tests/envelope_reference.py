"""A naive reference of envelope format 2, written from docs/streaming-format.md only.

For tests: whole messages in memory, `cryptography`'s AESGCM and HKDF
called directly, no streaming, no diagnostics. The tests check that it and
`keyquorum.client.framing` agree byte for byte, so a change to one that the
spec does not describe shows up as a difference.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def hkdf(data_key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(data_key)


def keys(data_key: bytes, salt: bytes) -> tuple[bytes, bytes]:
    """(K, commitment)."""
    return (
        hkdf(data_key, salt, b"keyquorum/v1/envelope-2/payload-key"),
        hkdf(data_key, salt, b"keyquorum/v1/envelope-2/commitment"),
    )


def header(frame_size: int, wrapped: bytes, salt: bytes, commitment: bytes) -> bytes:
    """The header up to its tag."""
    return (
        b"KQE\x02"
        + frame_size.to_bytes(4, "big")
        + len(wrapped).to_bytes(2, "big")
        + wrapped
        + salt
        + commitment
    )


def nonce(i: int, final: bool) -> bytes:
    return i.to_bytes(11, "big") + bytes([final])


def frames_of(plaintext: bytes, frame_size: int) -> list[bytes]:
    """The plaintext split as the spec says: full frames, then a last of 1 to frame_size."""
    if not plaintext:
        return [b""]
    return [plaintext[i : i + frame_size] for i in range(0, len(plaintext), frame_size)]


def seal(data_key: bytes, wrapped: bytes, plaintext: bytes, salt: bytes, frame_size: int) -> bytes:
    k, commitment = keys(data_key, salt)
    aead = AESGCM(k)
    head = header(frame_size, wrapped, salt, commitment)
    out = [head, aead.encrypt(bytes(12), b"", b"keyquorum/v1/envelope-2/header\x00" + head)]
    parts = frames_of(plaintext, frame_size)
    for i, part in enumerate(parts, start=1):
        out.append(
            aead.encrypt(nonce(i, i == len(parts)), part, b"keyquorum/v1/envelope-2/frame\x00")
        )
    return b"".join(out)


def seal_frames(
    data_key: bytes, wrapped: bytes, parts: list[tuple[bytes, bool]], salt: bytes, frame_size: int
) -> bytes:
    """A message of explicitly given frames and final flags (to build malformed cases)."""
    k, commitment = keys(data_key, salt)
    aead = AESGCM(k)
    head = header(frame_size, wrapped, salt, commitment)
    out = [head, aead.encrypt(bytes(12), b"", b"keyquorum/v1/envelope-2/header\x00" + head)]
    for i, (part, final) in enumerate(parts, start=1):
        out.append(aead.encrypt(nonce(i, final), part, b"keyquorum/v1/envelope-2/frame\x00"))
    return b"".join(out)
