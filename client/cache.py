"""Data-key caching for the envelope formats, with the AWS Encryption SDK's bounds.

Off by default. With `KeyClient(..., cache=CacheBounds(max_age=300))`,
`encrypt_record`/`encrypt_stream` reuse a data key from GenerateDataKey
for further messages of the same tenant and context, and
`decrypt_record`/`decrypt_stream` reuse a data key from Unwrap for the
same wrapped key and context, instead of one round trip per message. The
envelope format derives a fresh key per message from the data key and a
random 32-byte salt (docs/streaming-format.md), so reusing a data key
never reuses an AES-GCM key and nonce. `generate_data_key` and `unwrap`
themselves are never cached: a caller of those asked for a fresh key.

What an entry is keyed by (everything the daemon's decision read; the
backend identity is the client's own certificate, one per cache):
- encryption: the tenant and the whole context (its sorted pairs);
- decryption: the wrapped data key (which names tenant and key version)
  and the whole context.
A context that differs in any pair, or in a pair's presence, is another
entry: it cannot hit.

Bounds (as the ESDK's caching materials manager): an entry is used while
it is younger than `max_age` and has served fewer than `max_messages`
messages and `max_bytes` bytes; a message that would pass either bound
takes a fresh key, and a message larger than `max_bytes` is never cached.
At most `capacity` entries per cache, the least recently used evicted.

Keys live only in memory, in `SecretBytes` this module owns; a caller
gets its own copy for each message (made under the lock, so an entry
wiped by another thread can never hand out zeroed bytes) and wipes it.
Entries are wiped when they expire, reach a bound, are evicted, when the
client closes, when the daemon reports a seal (a call answered
FAILED_PRECONDITION "sealed", or the health service's NOT_SERVING), and,
for one tenant, when the daemon refuses that tenant (FAILED_PRECONDITION:
not active, disabled, destroyed; PERMISSION_DENIED: grant revoked).

What caching trades away: while an entry lives, the backend encrypts and
decrypts without asking the daemon, so a seal, a deactivation or a revoked
grant reaches those messages only when the entry ends (at most `max_age`
later, or at once when the daemon's report arrives), and a compromised
backend holds up to `capacity` data keys for up to `max_age` each. Every
message under one cached data key also shares its fate: whoever obtains
that key reads all of them.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final, Generic, NoReturn, TypeVar

from keyquorum.client.inputs import ContextKey
from keyquorum.quorum.errors import InvalidInputError
from keyquorum.quorum.secret import SecretBytes

#: NIST SP 800-38D section 8.3's bound for random nonces, the ESDK's default.
DEFAULT_MAX_MESSAGES: Final = 2**32
DEFAULT_MAX_BYTES: Final = 2**63 - 1
DEFAULT_CAPACITY: Final = 100

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class CacheBounds:
    """How long and how much one cached data key may serve (both caches)."""

    #: Seconds an entry lives after the daemon gave the key (required).
    max_age: float
    #: Messages one data key may encrypt (or decrypt), at most 2^32.
    max_messages: int = DEFAULT_MAX_MESSAGES
    #: Plaintext bytes one data key may encrypt (or decrypt).
    max_bytes: int = DEFAULT_MAX_BYTES
    #: Entries per cache; the least recently used one is evicted past this.
    capacity: int = DEFAULT_CAPACITY

    def __post_init__(self) -> None:
        age = self.max_age
        if isinstance(age, bool) or not isinstance(age, int | float) or not math.isfinite(age):
            raise InvalidInputError("max_age must be a finite number of seconds")
        if age <= 0:
            raise InvalidInputError(f"max_age must be above 0 seconds, got {age}")
        for name, value, high in (
            ("max_messages", self.max_messages, DEFAULT_MAX_MESSAGES),
            ("max_bytes", self.max_bytes, DEFAULT_MAX_BYTES),
            ("capacity", self.capacity, 2**20),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInputError(f"{name} must be an int")
            if not 1 <= value <= high:
                raise InvalidInputError(f"{name} must be 1 to {high}, got {value}")


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache since it was made."""

    entries: int
    hits: int
    misses: int
    #: Entries removed and wiped, for any reason (age, bound, capacity, seal, close).
    wiped: int


class _Entry:
    __slots__ = ("born", "bytes", "key", "messages", "tag", "version", "wrapped")

    def __init__(
        self, key: SecretBytes, wrapped: bytes, version: int, tag: str, born: float
    ) -> None:
        self.key = key
        self.wrapped = wrapped
        self.version = version
        self.tag = tag  # the tenant, to drop its entries when the daemon refuses it
        self.born = born
        self.messages = 0
        self.bytes = 0


class Lease:
    """A data key for one message: a copy the caller owns and wipes.

    `cached`: the key is (now) in the cache, and this message was counted
    against its bounds.
    """

    __slots__ = ("cached", "key", "version", "wrapped")

    def __init__(self, key: SecretBytes, wrapped: bytes, version: int, *, cached: bool) -> None:
        self.key = key
        self.wrapped = wrapped
        self.version = version
        self.cached = cached

    def wipe(self) -> None:
        self.key.wipe()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return f"<Lease of a cached data key, v{self.version}>"


class KeyCache(Generic[K]):
    """A bounded LRU of data keys; thread-safe, holds no lock while calling out."""

    def __init__(self, bounds: CacheBounds, *, clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(bounds, CacheBounds):
            raise InvalidInputError("a cache needs CacheBounds")
        self.bounds = bounds
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry] = OrderedDict()
        self._hits = self._misses = self._wiped = 0
        # Bumped by every wipe the daemon caused: a key fetched before one is not kept.
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """Read before asking the daemon for a key; hand it back to `put`."""
        with self._lock:
            return self._epoch

    def take(self, key: K, nbytes: int) -> Lease | None:
        """A copy of the entry's data key for one message of `nbytes`, counted; or None.

        None when there is no entry, or it is too old, or this message would
        pass a bound (that entry is then wiped: a fresh key takes over).
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return None
            b = self.bounds
            if (
                self._clock() - entry.born >= b.max_age
                or entry.messages + 1 > b.max_messages
                or entry.bytes + nbytes > b.max_bytes
            ):
                self._drop(key)
                self._misses += 1
                return None
            entry.messages += 1
            entry.bytes += nbytes
            self._entries.move_to_end(key)
            self._hits += 1
            copy = SecretBytes(entry.key.view(), label="data key")
            return Lease(copy, entry.wrapped, entry.version, cached=True)

    def cacheable(self, nbytes: int) -> bool:
        """Whether a message of `nbytes` may use the cache at all (the ESDK's rule)."""
        return nbytes <= self.bounds.max_bytes

    def put(
        self,
        key: K,
        data_key: SecretBytes,
        wrapped: bytes,
        version: int,
        tag: str,
        nbytes: int,
        *,
        epoch: int,
    ) -> bool:
        """Keep a copy of `data_key`, already counting the message it was fetched for.

        Not kept (False) when a wipe happened since `epoch` was read: a key the
        daemon gave before it reported a seal or refused a tenant must not
        outlive that report in the cache, even if its answer arrived after it.
        """
        copy = SecretBytes(data_key.view(), label="cached data key")
        entry = _Entry(copy, wrapped, version, tag, self._clock())
        entry.messages, entry.bytes = 1, nbytes
        with self._lock:
            if epoch != self._epoch:
                copy.wipe()
                return False
            if key in self._entries:
                self._drop(key)
            self._entries[key] = entry
            while len(self._entries) > self.bounds.capacity:
                self._drop(next(iter(self._entries)))
            return True

    def charge(self, key: K, nbytes: int) -> None:
        """Count bytes found after the fact (a stream of unknown length, decrypting)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.bytes += nbytes
            if entry.bytes >= self.bounds.max_bytes:
                self._drop(key)

    def wipe_tag(self, tag: str) -> int:
        """Wipe every entry of one tenant; how many."""
        with self._lock:
            self._epoch += 1
            doomed = [k for k, e in self._entries.items() if e.tag == tag]
            for k in doomed:
                self._drop(k)
            return len(doomed)

    def clear(self) -> int:
        """Wipe every entry; how many."""
        with self._lock:
            self._epoch += 1
            n = len(self._entries)
            for k in list(self._entries):
                self._drop(k)
            return n

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._entries), self._hits, self._misses, self._wiped)

    def _drop(self, key: K) -> None:
        entry = self._entries.pop(key)
        entry.key.wipe()
        self._wiped += 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __repr__(self) -> str:
        return f"<KeyCache: {len(self)} entries>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a KeyCache cannot be pickled")


#: An encryption entry's key: the tenant and the whole context.
EncryptionKey = tuple[str, ContextKey]
#: A decryption entry's key: the wrapped data key and the whole context.
DecryptionKey = tuple[bytes, ContextKey]


class ClientCaches:
    """The two caches of one client (one backend identity) and what empties them."""

    def __init__(self, bounds: CacheBounds, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.bounds = bounds
        self.encryption: KeyCache[EncryptionKey] = KeyCache(bounds, clock=clock)
        self.decryption: KeyCache[DecryptionKey] = KeyCache(bounds, clock=clock)

    def wipe_all(self) -> None:
        self.encryption.clear()
        self.decryption.clear()

    def wipe_tenant(self, tenant: str) -> None:
        self.encryption.wipe_tag(tenant)
        self.decryption.wipe_tag(tenant)

    def __repr__(self) -> str:
        return f"<ClientCaches: {len(self.encryption)} + {len(self.decryption)} entries>"
