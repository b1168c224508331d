"""Opaque holders for secret bytes.

Secrets live in a `bytearray` that `wipe()` overwrites in place. The holder
never prints its contents (`repr` shows a label and the length only),
refuses pickling and copying, and gives the bytes out through one explicit
accessor so that every use is greppable. Python cannot guarantee that no
other copy exists (the interpreter and OpenSSL may copy), so wiping is a
best effort that narrows exposure; README's threat model says so.
"""

from __future__ import annotations

import hmac
from typing import NoReturn

from keyquorum.quorum.errors import InvalidInputError, StateError


class SecretBytes:
    """Secret bytes in a wipeable buffer that never print themselves."""

    __slots__ = ("_buf", "_label", "_wiped")

    def __init__(self, data: bytes | bytearray | memoryview, *, label: str = "secret") -> None:
        self._buf = bytearray(data)
        self._label = label
        self._wiped = False

    @classmethod
    def adopt(cls, buf: bytearray, *, label: str = "secret") -> SecretBytes:
        """Take ownership of `buf` without copying it (the caller drops its reference)."""
        obj = cls.__new__(cls)
        obj._buf = buf
        obj._label = label
        obj._wiped = False
        return obj

    def reveal(self) -> bytes:
        """The secret as immutable bytes: the one accessor, for APIs that need bytes."""
        self._check()
        return bytes(self._buf)

    def view(self) -> memoryview:
        """A read-only view of the buffer, for APIs that take a buffer (no copy)."""
        self._check()
        return memoryview(self._buf).toreadonly()

    def wipe(self) -> None:
        """Overwrite the buffer with zeros in place; the object is unusable afterwards.

        A same-length slice assignment writes into the existing storage (one
        memset-like copy, not a new buffer), so views taken earlier see the
        zeros and the length never changes (which a bytearray with exported
        views would refuse). tests/test_secret.py holds a view across it.
        """
        self._buf[:] = bytes(len(self._buf))
        self._wiped = True

    @property
    def wiped(self) -> bool:
        return self._wiped

    def buffer_for_test(self) -> bytearray:
        """The underlying buffer itself, so tests can check that wipe() zeroed it."""
        return self._buf

    def equals(self, other: SecretBytes | bytes) -> bool:
        """Constant-time comparison."""
        theirs = other.view() if isinstance(other, SecretBytes) else other
        return hmac.compare_digest(self.view(), theirs)

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        state = "wiped" if self._wiped else f"{len(self._buf)} bytes"
        return f"<{type(self).__name__} {self._label}: {state}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        # Equality by value would invite `==` on secrets; use equals().
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __deepcopy__(self, memo: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be copied")

    def __enter__(self) -> SecretBytes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def _check(self) -> None:
        if self._wiped:
            raise StateError(f"{self._label} was wiped")


def require_length(
    name: str, data: bytes | bytearray | memoryview | SecretBytes, size: int
) -> None:
    """Raise InvalidInputError unless `data` is exactly `size` bytes long."""
    if len(data) != size:
        raise InvalidInputError(f"{name} must be {size} bytes, got {len(data)}")
