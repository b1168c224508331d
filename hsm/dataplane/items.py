"""What a data-plane call takes and gives, and the sinks that watch it.

Items are what the data plane reads of a request (KeyService hands request
messages over unconverted; `WrapInput` and `RewrapInput` say which fields
are read); results carry nothing secret in their repr, and a `Revealed`
plaintext is wiped by whoever serialises it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.secret import SecretBytes


class Wrapped:
    """A ciphertext and the key version that made it (nothing secret)."""

    __slots__ = ("ciphertext", "version")

    def __init__(self, ciphertext: bytes, version: int) -> None:
        self.ciphertext = ciphertext
        self.version = version

    def __repr__(self) -> str:
        return f"<Wrapped v{self.version}: {len(self.ciphertext)} bytes>"


class Revealed:
    """A plaintext for the caller: in the clear (`plaintext`) or sealed to it (`sealed`).

    The owner wipes `plaintext` once it is serialised (`wipe()`).
    """

    __slots__ = ("ciphertext", "plaintext", "sealed", "tenant", "version")

    def __init__(
        self,
        tenant: str,
        version: int,
        ciphertext: bytes,
        plaintext: SecretBytes | None,
        sealed: bytes | None,
    ) -> None:
        self.tenant = tenant
        self.version = version
        self.ciphertext = ciphertext
        self.plaintext = plaintext
        self.sealed = sealed

    def wipe(self) -> None:
        if self.plaintext is not None:
            self.plaintext.wipe()

    def __repr__(self) -> str:
        how = "sealed" if self.sealed is not None else "clear"
        return f"<Revealed {self.tenant} v{self.version} ({how})>"


class WrapInput(Protocol):
    """What Wrap reads of an item: a `WrapItem`, or KeyService's `WrapRequest` as it came.

    The servicer hands request messages over unconverted (no copy of the
    plaintext or the context per item); the data plane only reads them.
    """

    @property
    def tenant(self) -> str: ...
    @property
    def plaintext(self) -> bytes: ...
    @property
    def context(self) -> Mapping[str, str]: ...


class UnwrapInput(Protocol):
    """What BatchUnwrap reads of an item: KeyService's `UnwrapRequest` as it came."""

    @property
    def ciphertext(self) -> bytes: ...
    @property
    def context(self) -> Mapping[str, str]: ...
    @property
    def recipient_public_key(self) -> bytes: ...


class RewrapInput(Protocol):
    """What Rewrap reads of an item: a `RewrapItem` or a `RewrapRequest`."""

    @property
    def ciphertext(self) -> bytes: ...
    @property
    def context(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class WrapItem:
    tenant: str
    plaintext: bytes = field(repr=False)
    context: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True)
class UnwrapItem:
    ciphertext: bytes = field(repr=False)
    context: Mapping[str, str] = field(repr=False)
    recipient: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class GenerateItem:
    tenant: str
    context: Mapping[str, str] = field(repr=False)
    size: int = 0
    recipient: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RewrapItem:
    ciphertext: bytes = field(repr=False)
    context: Mapping[str, str] = field(repr=False)


class UsageSink(Protocol):
    """Where each item's outcome goes: metrics, the access log.

    `error` is None on success; `context` the canonical context bytes when
    they could be encoded (sinks keep at most a keyed hash of them).
    """

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None: ...


class RateLimit(Protocol):
    def take(self, backend: str, count: int) -> None:
        """Take `count` tokens of `backend`'s bucket or raise LimitExceededError."""
        ...

    def give_back(self, backend: str, count: int) -> None:
        """Return `count` tokens taken by a call that then started over."""
        ...
