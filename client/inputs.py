"""Checks of what a backend passes to the client, before anything is sent.

Protobuf's own checks end in messages such as `TypeError: bad argument type
for built-in operation`, which name neither the field nor the value's type.
These raise `InvalidInputError` naming what is wrong:

    context key 'visit' has a value of type int; context values must be str

A context value is never put in a message (contexts name patients); a key
is named when it is a str, else only its type. The daemon still applies its
own limits (64 pairs, 4 KiB encoded, names and sizes): the client checks
types and shapes, the daemon checks everything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from keyquorum.quorum.errors import InvalidInputError

Context = Mapping[str, str]
#: A context as the cache keys it: its pairs sorted by key, exactly as given.
ContextKey = tuple[tuple[str, str], ...]

Bytes = bytes | bytearray | memoryview
BYTES_TYPES: Final = (bytes, bytearray, memoryview)


def _type(value: object) -> str:
    return type(value).__name__


def check_context(context: object) -> dict[str, str]:
    """`context` as a fresh dict of str to str (None is the empty context)."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise InvalidInputError(f"a context must be a mapping of str to str, got {_type(context)}")
    out: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str):
            raise InvalidInputError(
                f"a context key has type {_type(key)}; context keys must be str"
            )
        if not isinstance(value, str):
            raise InvalidInputError(
                f"context key {key!r} has a value of type {_type(value)}; "
                "context values must be str"
            )
        out[key] = value
    return out


def context_key(context: Mapping[str, str]) -> ContextKey:
    """The whole context, order-free: what a cache entry is keyed by."""
    return tuple(sorted(context.items()))


def check_tenant(tenant: object) -> str:
    if not isinstance(tenant, str):
        raise InvalidInputError(f"a tenant must be a str, got {_type(tenant)}")
    return tenant


def check_bytes(name: str, value: object) -> bytes:
    """`value` as bytes; `name` says which argument in the error."""
    if not isinstance(value, BYTES_TYPES):
        raise InvalidInputError(f"{name} must be bytes, got {_type(value)}")
    return bytes(value)


def check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an int, got {_type(value)}")
    if not low <= value <= high:
        raise InvalidInputError(f"{name} must be {low} to {high}, got {value}")
    return value


def check_items(name: str, items: object, width: int) -> list[tuple[object, ...]]:
    """A batch: a sequence of `width`-tuples; names the first bad item by index."""
    if isinstance(items, str | bytes) or not hasattr(items, "__iter__"):
        raise InvalidInputError(f"{name} takes a list of items, got {_type(items)}")
    out: list[tuple[object, ...]] = []
    for i, item in enumerate(items):
        if not isinstance(item, tuple | list) or len(item) != width:
            raise InvalidInputError(f"{name} item {i} must be a tuple of {width}")
        out.append(tuple(item))
    return out
