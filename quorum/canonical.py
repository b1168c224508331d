"""The one canonical encoding of signed and hashed structures.

Log entries (and anything else that is hashed or signed as structured data)
are encoded as RFC 8785 JSON Canonicalization Scheme bytes, via the
`rfc8785` package. Binary values are carried as lowercase hex strings so
that an auditor can read them with any JSON tool. Integers must fit in the
IEEE-754 safe range (RFC 8785, section 3.2.2.3), which `rfc8785` enforces.

The decoder re-encodes what it parsed and refuses input that is not already
canonical, so one structure has exactly one byte form and the bytes that
were hashed are the bytes that are kept.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

from keyquorum.quorum.errors import DeserializationError, InvalidInputError

MAX_DOCUMENT = 16 * 1024 * 1024


def encode(value: Any) -> bytes:
    """RFC 8785 bytes of `value` (dicts with str keys, lists, str, int, bool, None)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
        raise InvalidInputError(f"value cannot be canonically encoded: {e}") from e


def decode(data: bytes) -> Any:
    """Parse canonical JSON; refuse anything that is not in canonical form."""
    if len(data) > MAX_DOCUMENT:
        raise DeserializationError(f"document too large: {len(data)} > {MAX_DOCUMENT} bytes")
    # Errors are raised outside the except blocks: the UnicodeDecodeError and
    # JSONDecodeError hold the whole input, which may be secret, and must not
    # stay reachable as __context__ of what we raise.
    problem = None
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        problem = f"not UTF-8 (byte {e.start})"
    except ValueError as e:
        problem = f"not valid JSON at character {_position(e)}"
    if problem is not None:
        raise DeserializationError(problem)
    try:
        again = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as e:
        raise DeserializationError(f"JSON is not canonicalizable: {e}") from e
    if again != data:
        raise DeserializationError("JSON is not in RFC 8785 canonical form")
    return value


def _position(error: ValueError) -> str:
    return str(getattr(error, "pos", "?"))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def hex_bytes(value: object, *, field: str, size: int | None = None) -> bytes:
    """Decode a lowercase-hex field, checking its length when `size` is given."""
    if not isinstance(value, str):
        raise DeserializationError(f"{field}: expected a hex string")
    if value != value.lower():
        raise DeserializationError(f"{field}: hex must be lowercase")
    try:
        raw = bytes.fromhex(value)
    except ValueError as e:
        raise DeserializationError(f"{field}: not hex") from e
    if size is not None and len(raw) != size:
        raise DeserializationError(f"{field}: expected {size} bytes, got {len(raw)}")
    return raw
