"""Fresh random 96-bit nonces for AES-256-GCM, drawn from the system in blocks."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Final

from keyquorum.quorum import aead
from keyquorum.quorum.errors import InvalidInputError

#: Nonces drawn from the random source at once (one getrandom call per 256 Wraps).
NONCES_PER_DRAW: Final = 256

_POOLS: weakref.WeakSet[NoncePool] = weakref.WeakSet()


def _forget_drawn_nonces() -> None:
    """In a forked child: drop every nonce drawn before the fork (the parent uses them)."""
    for pool in list(_POOLS):
        pool.forget()


os.register_at_fork(after_in_child=_forget_drawn_nonces)


class NoncePool:
    """Fresh random 96-bit nonces (SP 800-38D, section 8.2.2), drawn in blocks.

    One read of the random source gives `per_draw` nonces; they are handed
    out in order, one for a Wrap or many at once for a batch, never twice
    (a lock guards the offset). Drawing in blocks keeps the system call,
    which releases the interpreter lock and makes the calling thread queue
    for it again, off the path of nearly every Wrap. Nonces are not secret
    (each is written into its ciphertext); what matters is that none
    repeats, so a forked child forgets the parent's drawn nonces
    (`os.register_at_fork`). Data keys are never drawn here.
    """

    __slots__ = ("__weakref__", "_buffer", "_lock", "_offset", "_per_draw", "_random")

    def __init__(
        self, random_bytes: Callable[[int], bytes], per_draw: int = NONCES_PER_DRAW
    ) -> None:
        if per_draw < 1:
            raise InvalidInputError("per_draw must be at least 1")
        self._random = random_bytes
        self._per_draw = per_draw
        self._buffer = b""
        self._offset = 0
        self._lock = threading.Lock()
        _POOLS.add(self)

    def take(self) -> bytes:
        """One nonce no other call got."""
        return self.take_many(1)

    def take_many(self, count: int) -> bytes:
        """`count` nonces no other call got, concatenated (12 bytes each).

        The same stream `take` hands out, in the same order, so a batch
        sealed at once gets the nonces its items would have got one by one.
        """
        if count < 1:
            raise InvalidInputError("take_many needs at least one nonce")
        size = aead.NONCE_SIZE * count
        with self._lock:
            start = self._offset
            if start + size > len(self._buffer):
                self._buffer = self._buffer[start:] + self._draw(size - (len(self._buffer) - start))
                start = 0
            self._offset = start + size
            return self._buffer[start : start + size]

    def _draw(self, at_least: int) -> bytes:
        """Whole blocks of `per_draw` nonces, at least `at_least` bytes (the lock is held)."""
        block = aead.NONCE_SIZE * self._per_draw
        drawn: list[bytes] = []
        total = 0
        while total < at_least:
            fresh = self._random(block)
            if not isinstance(fresh, bytes) or len(fresh) != block:
                raise InvalidInputError("the random source returned the wrong number of bytes")
            drawn.append(fresh)
            total += block
        return b"".join(drawn)

    def forget(self) -> None:
        """Drop every drawn nonce (in a forked child: a new lock, the old one may be held)."""
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0

    def __repr__(self) -> str:
        return f"<NoncePool: {(len(self._buffer) - self._offset) // aead.NONCE_SIZE} drawn>"
