"""The data plane's ciphertext format and the encoding of encryption contexts.

Pure functions, no state. Ciphertext (format 0x01); every field before the
nonce is the header:

    0x01 || u8 len(tenant) || tenant (ASCII) || u32be key version
         || nonce (12) || AES-256-GCM(tenant key, nonce, plaintext, aad)
    aad  = "keyquorum/v1/data" 0x00 || header || RFC 8785 JSON of the context

The header is authenticated whole, so an altered format byte, tenant or
version does not open; the context is bound without being stored, so the
caller must present it again. A decoder branches on the format byte first
(STYLE.md 7); an unknown one is `UnsupportedVersionError`. Nonces are
96-bit random (NIST SP 800-38D, section 8.2.2; see `nonces.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from json.encoder import encode_basestring
from typing import Final

from keyquorum.quorum import aead, canonical
from keyquorum.quorum.errors import (
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    LimitExceededError,
    UnsupportedVersionError,
)
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from keyquorum.quorum.operations import TENANT_RE
from keyquorum.quorum.sealing import SEALED_DATA_KEY_INFO
from keyquorum.quorum.secret import SecretBytes

FORMAT_V1: Final = 0x01
AAD_LABEL: Final = b"keyquorum/v1/data\x00"
MAX_TENANT: Final = 63


def encode_context(context: Mapping[str, str], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The RFC 8785 JSON of a context map: the bytes bound as associated data."""
    return encode_context_pairs(tuple(context.items()), limits)


def encode_context_pairs(
    pairs: tuple[tuple[str, str], ...], limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """`encode_context` of a map's items (distinct keys, any order), read once."""
    if len(pairs) > limits.max_context_pairs:
        raise LimitExceededError(
            f"the encryption context has {len(pairs)} pairs; at most {limits.max_context_pairs}"
        )
    ascii_keys = True
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInputError("encryption context keys and values must be strings")
        if not key:
            raise InvalidInputError("an encryption context key is empty")
        ascii_keys = ascii_keys and key.isascii()
    encoded = _flat_canonical(pairs) if ascii_keys else canonical.encode(dict(pairs))
    if len(encoded) > limits.max_context_bytes:
        raise LimitExceededError(
            f"the encryption context is {len(encoded)} bytes encoded; "
            f"at most {limits.max_context_bytes}"
        )
    return encoded


def _flat_canonical(pairs: tuple[tuple[str, str], ...]) -> bytes:
    """RFC 8785 of a flat string map whose keys are all ASCII, without the general encoder.

    For such keys, code-point order is the UTF-16 order RFC 8785 section
    3.2.3 sorts by (keys are distinct, so values are never compared), and
    the standard library's JSON string escaping without ensure_ascii
    (`json.encoder.encode_basestring`, the C function json.dumps uses) is
    ECMAScript's (section 3.2.2.2: the two-character escapes, other control
    characters as lowercase \\u00xx, everything else as is); the object is
    "{", members "key":"value" joined by ",", "}" (section 3.2.1, no
    whitespace). tests/test_dataplane.py checks it against the general
    encoder (the rfc8785 package) byte for byte.
    """
    quote = encode_basestring
    text = "{" + ",".join([quote(k) + ":" + quote(v) for k, v in sorted(pairs)]) + "}"
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError("the encryption context is not valid Unicode") from None


def header(tenant: str, version: int) -> bytes:
    """Format byte, tenant and key version: the part of a ciphertext before the nonce."""
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise InvalidInputError(f"tenant {str(tenant)[:80]!r} is not a valid tenant name")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**32:
        raise InvalidInputError("key version must be in [1, 2**32)")
    name = tenant.encode("ascii")
    return bytes([FORMAT_V1, len(name)]) + name + version.to_bytes(4, "big")


def encrypt(
    key: SecretBytes | aead.Cipher,
    tenant: str,
    version: int,
    plaintext: bytes | memoryview,
    context: bytes,
    nonce: bytes,
) -> bytes:
    """A format-0x01 ciphertext of `plaintext` (see the module docstring)."""
    head = header(tenant, version)
    aad = AAD_LABEL + head + context
    if isinstance(key, aead.Cipher):
        return head + nonce + key.encrypt(nonce, plaintext, aad)
    return head + nonce + aead.encrypt(key, nonce, plaintext, aad)


class Parsed:
    """A ciphertext's fields, read but not yet authenticated."""

    __slots__ = ("body", "header", "nonce", "tenant", "version")

    def __init__(self, tenant: str, version: int, head: bytes, nonce: bytes, body: bytes) -> None:
        self.tenant = tenant
        self.version = version
        self.header = head
        self.nonce = nonce
        self.body = body

    def __repr__(self) -> str:
        return f"<ciphertext {self.tenant} v{self.version}: {len(self.body)} bytes>"


def parse(data: bytes) -> Parsed:
    """Split a ciphertext into its fields; `_unverified` until `decrypt` checks the tag.

    0. the format byte (UnsupportedVersionError for another);
    1. the tenant length and name;
    2. the version, the nonce and at least a tag.
    """
    if not isinstance(data, bytes):
        raise InvalidInputError("ciphertext must be bytes")
    if not data:
        raise DeserializationError("the ciphertext is empty")
    # 0.
    if data[0] != FORMAT_V1:
        raise UnsupportedVersionError(f"unknown ciphertext format 0x{data[0]:02x}")
    # 1.
    if len(data) < 2:
        raise DeserializationError("the ciphertext ends before its tenant length")
    size = data[1]
    if not 1 <= size <= MAX_TENANT:
        raise DeserializationError(f"the ciphertext's tenant length {size} is not in [1, 63]")
    fixed = 2 + size + 4 + aead.NONCE_SIZE + aead.TAG_SIZE
    if len(data) < fixed:
        raise DeserializationError(
            f"the ciphertext is {len(data)} bytes, shorter than its {fixed}-byte minimum"
        )
    try:
        tenant = data[2 : 2 + size].decode("ascii")
    except UnicodeDecodeError:
        raise DeserializationError("the ciphertext's tenant is not ASCII") from None
    if not TENANT_RE.fullmatch(tenant):
        raise DeserializationError("the ciphertext's tenant is not a valid tenant name")
    # 2.
    at = 2 + size
    version = int.from_bytes(data[at : at + 4], "big")
    if version == 0:
        raise DeserializationError("the ciphertext names key version 0")
    at += 4
    return Parsed(
        tenant, version, data[:at], data[at : at + aead.NONCE_SIZE], data[at + aead.NONCE_SIZE :]
    )


def decrypt(key: SecretBytes | aead.Cipher, parsed: Parsed, context: bytes) -> SecretBytes:
    """The plaintext of a parsed ciphertext; DecryptionError if it does not authenticate."""
    aad = AAD_LABEL + parsed.header + context
    try:
        if isinstance(key, aead.Cipher):
            plain = key.decrypt(parsed.nonce, parsed.body, aad)
        else:
            plain = aead.decrypt(key, parsed.nonce, parsed.body, aad)
    except DecryptionError:
        raise DecryptionError(
            "the ciphertext does not authenticate: another encryption context, "
            "or the ciphertext was altered"
        ) from None
    return SecretBytes.adopt(plain, label="unwrapped data")


def sealed_info(ciphertext: bytes) -> bytes:
    """HPKE info for a key sealed to the backend: bound to the wrapped form it belongs to."""
    return SEALED_DATA_KEY_INFO + ciphertext
