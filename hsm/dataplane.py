"""The data plane: what backends call all day, without gRPC.

`KeyService` (`key_service.py`) is a thin layer over `DataPlane`; this
module decides everything: the ciphertext format, what is checked and in
which order, the per-key-version encryption counter, the HPKE option, the
batch rules. Grants and tenant keys come from `Daemon.data_key` (the grant
check, then the keyring's held key version, under one lock), which reads
the state the quorum log replays to. A batch checks each tenant's grant
and activation once per key version, at the first item that names it, and
uses that key until the batch ends (at most 1000 items, milliseconds); a
seal during a call closes the key's cipher, so no later item encrypts or
decrypts with it, and step 4 stops every result that would carry a key.
BatchWrap has a C fast path for batches whose every item succeeds
(`batch_wrap_serialized`, hsm/_wrapfast.c), and a single Wrap's or
Unwrap's request is read in C where its shape allows (`wrap_serialized`,
`unwrap_serialized`); the Python path here stays the reference they are
tested against, and decides every other request.

Ciphertext (format 0x01), every field before the nonce is the header:

    0x01 || u8 len(tenant) || tenant (ASCII) || u32be key version
         || nonce (12) || AES-256-GCM(tenant key, nonce, plaintext, aad)
    aad  = "keyquorum/v1/data" 0x00 || header || RFC 8785 JSON of the context

The header is authenticated whole, so an altered format byte, tenant or
version does not open; the context is bound without being stored, so the
caller must present it again. A decoder branches on the format byte first
(STYLE.md 7); an unknown one is `UnsupportedVersionError`.

Nonces are 96-bit random (NIST SP 800-38D, section 8.2.2). Section 8.3
bounds one key to 2^32 invocations with random IVs, so each tenant key
version counts its encryptions (Wrap, GenerateDataKey, Rewrap) and refuses
the next one at the bound, telling the operator to rotate. The count lives
in the store (`Store.reserve_block`), reserved in blocks: the running
block is in memory, the next one is reserved in the background when three
quarters of it are used, so a call waits on a disk write only when a
block runs out before the next arrived (and on the first use after a
start). Numbers of a block not used before a restart are lost, never
reused: the count can only over-state.

Order of checks for one item (each failure names itself, none carries
plaintext, a key or the context):
0. sizes and shapes (plaintext, context, ciphertext header, recipient key);
1. the backend is granted the tenant (PERMISSION_DENIED, also for a tenant
   that does not exist, so names cannot be probed);
2. the key version exists (INVALID_ARGUMENT: a forged header), is enabled
   and the tenant active, the service unsealed (FAILED_PRECONDITION);
3. the encryption count (RESOURCE_EXHAUSTED), or authentication of the
   ciphertext (INVALID_ARGUMENT);
4. for results carrying a key: no seal happened since the key was taken
   (FAILED_PRECONDITION), so no key leaves after a seal.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from typing import Final, Protocol, TypeVar

from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.store import Store
from keyquorum.hsm.tenant_keys import HeldKey
from keyquorum.quorum import aead, canonical
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    SealedError,
    StateError,
    UnsupportedVersionError,
)
from keyquorum.quorum.operations import TENANT_RE
from keyquorum.quorum.sealing import SealingPublicKey
from keyquorum.quorum.secret import SecretBytes

try:  # the C accelerator for BatchWrap (hsm/_wrapfast.c); optional, see batch_wrap_serialized
    from keyquorum.hsm import _wrapfast

    #: True when the BatchWrap fast path is built (`make install` builds it where
    #: OpenSSL's headers are; tests require it on CI: KEYQUORUM_REQUIRE_NATIVE).
    NATIVE_BATCH_WRAP = True
except ImportError:  # pragma: no cover
    NATIVE_BATCH_WRAP = False

log = logging.getLogger(__name__)

FORMAT_V1: Final = 0x01
AAD_LABEL: Final = b"keyquorum/v1/data\x00"
SEALED_INFO_LABEL: Final = b"keyquorum/v1/sealed-data-key\x00"
MAX_TENANT: Final = 63
#: NIST SP 800-38D, section 8.3: at most 2^32 invocations with random IVs per key.
NONCE_BOUND: Final = 2**32
DEFAULT_DATA_KEY_SIZE: Final = 32
MIN_DATA_KEY_SIZE: Final = 16
MAX_DATA_KEY_SIZE: Final = 64
#: Label for a tenant the caller is not granted (metrics never carry unchecked names).
UNKNOWN: Final = "-"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DataPlaneLimits:
    """The data plane's limits (docs/dataplane.md, "Limits")."""

    #: Largest plaintext Wrap accepts (data keys and small secrets).
    max_plaintext: int = 4096
    #: Pairs in one encryption context.
    max_context_pairs: int = 64
    #: Bytes of one context's canonical encoding.
    max_context_bytes: int = 4096
    #: Items in one batch call.
    max_batch_items: int = 1000
    #: Encryptions per tenant key version (SP 800-38D, section 8.3).
    encryption_limit: int = NONCE_BOUND
    #: Counter values reserved per store write.
    counter_block: int = 65536

    def __post_init__(self) -> None:
        if not 1 <= self.encryption_limit <= NONCE_BOUND:
            raise InvalidInputError("encryption_limit must be in [1, 2**32] (SP 800-38D 8.3)")
        if self.counter_block < 1:
            raise InvalidInputError("counter_block must be at least 1")


DEFAULT_DATA_LIMITS: Final = DataPlaneLimits()


# -- the format (pure) ----------------------------------------------------------


def encode_context(
    context: Mapping[str, str], limits: DataPlaneLimits = DEFAULT_DATA_LIMITS
) -> bytes:
    """The RFC 8785 JSON of a context map: the bytes bound as associated data."""
    return encode_context_pairs(tuple(context.items()), limits)


def encode_context_pairs(
    pairs: tuple[tuple[str, str], ...], limits: DataPlaneLimits = DEFAULT_DATA_LIMITS
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
    return SEALED_INFO_LABEL + ciphertext


# -- results ------------------------------------------------------------------


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


# -- usage ----------------------------------------------------------------------


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


# -- the encryption counter -------------------------------------------------------


class _Count:
    __slots__ = ("end", "exhausted", "failure", "next", "pending", "spare")

    def __init__(self) -> None:
        self.next = 0
        self.end = 0
        self.spare: tuple[int, int] | None = None
        self.pending = False
        self.exhausted = False
        self.failure: KeyquorumError | None = None


class EncryptionCounters:
    """Counts encryptions per tenant key version against the SP 800-38D bound.

    Thread-safe. `take` returns the number of this encryption (unique per
    key version across restarts and replicas) or raises LimitExceededError.
    """

    def __init__(self, store: Store, limits: DataPlaneLimits = DEFAULT_DATA_LIMITS) -> None:
        self._store = store
        self._block = limits.counter_block
        self._limit = limits.encryption_limit
        # Callers take the plain lock (cheaper to enter than the condition);
        # the condition over it is for waiting on a block being reserved.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._counts: dict[tuple[str, int], _Count] = {}

    @staticmethod
    def name(tenant: str, version: int) -> str:
        return f"enc/{tenant}/v{version}"

    def take(self, tenant: str, version: int) -> int:
        """The number of one encryption."""
        return self._take(tenant, version, 1)[0]

    def take_many(self, tenant: str, version: int, wanted: int) -> int:
        """Reserve 1 to `wanted` encryptions at once (fewer at a block's end); how many.

        For a batch: one lock round per block instead of one per item. The
        caller may leave some unused (an item that fails later); those
        numbers are skipped, so the count only over-states, as after a restart.
        """
        if wanted < 1:
            raise InvalidInputError("take_many needs at least one encryption")
        return self._take(tenant, version, wanted)[1]

    def _take(self, tenant: str, version: int, wanted: int) -> tuple[int, int]:
        """(first number, how many) of up to `wanted` consecutive numbers."""
        with self._lock:
            count = self._counts.get((tenant, version))
            if count is None:
                count = self._counts[(tenant, version)] = _Count()
            while True:
                if count.next < count.end:
                    number = count.next
                    taken = min(wanted, count.end - number)
                    count.next += taken
                    if count.end - count.next <= self._block // 4:
                        self._prefetch(tenant, version, count)
                    return number, taken
                if count.spare is not None:
                    count.next, count.end = count.spare
                    count.spare = None
                    continue
                if count.exhausted:
                    raise self._exhausted(tenant, version)
                if count.failure is not None:
                    failure, count.failure = count.failure, None
                    raise failure
                if not count.pending:
                    count.pending = True
                    self._lock.release()
                    try:
                        self._reserve(self.name(tenant, version), count)
                    finally:
                        self._lock.acquire()
                else:
                    self._cond.wait()

    def _prefetch(self, tenant: str, version: int, count: _Count) -> None:
        """Reserve the next block in the background (the caller holds the lock)."""
        if count.pending or count.spare is not None or count.exhausted:
            return
        count.pending = True
        threading.Thread(
            target=self._reserve,
            args=(self.name(tenant, version), count),
            name="kq-counter",
            daemon=True,
        ).start()

    def _reserve(self, name: str, count: _Count) -> None:
        """One store write; wakes every caller waiting on this counter."""
        block: tuple[int, int] | None = None
        failure: KeyquorumError | None = None
        exhausted = False
        try:
            block = self._store.reserve_block(name, self._block, self._limit)
        except LimitExceededError:
            exhausted = True
        except KeyquorumError as e:
            failure = e
        with self._cond:
            count.pending = False
            if block is not None:
                count.spare = block
                if block[0] >= self._limit // 2:
                    log.warning(
                        "%s: %d of %d encryptions used; rotate this tenant key soon",
                        name,
                        block[0],
                        self._limit,
                    )
            count.exhausted = count.exhausted or exhausted
            if failure is not None:
                log.error("could not reserve encryptions for %s: %s", name, failure)
                count.failure = failure
            self._cond.notify_all()

    def _exhausted(self, tenant: str, version: int) -> LimitExceededError:
        return LimitExceededError(
            f"tenant {tenant!r} key version {version} reached its {self._limit} encryptions "
            "(the NIST SP 800-38D random-nonce bound): a quorum must rotate the tenant key "
            "(rotate-tenant); unwrapping still works"
        )


# -- nonces -------------------------------------------------------------------------

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


# -- the data plane ---------------------------------------------------------------

#: Headers remembered per (tenant, version) before the cache starts over.
HEADER_CACHE: Final = 4096
#: Backend identities remembered (their parsed names) before the cache starts over.
IDENTITY_CACHE: Final = 1024


class _Key:
    """One tenant key version as a call uses it: the keyring's held key, the header.

    Nothing here is a copy: the cipher is the keyring's, closed when it
    wipes the version (a seal, the activation's end), after which any use
    raises StateError.
    """

    __slots__ = ("aad", "allowance", "cipher", "head", "held", "version")

    def __init__(self, version: int, held: HeldKey, head: bytes, aad: bytes) -> None:
        self.version = version
        self.held = held
        self.cipher = held.cipher
        self.head = head
        self.aad = aad
        #: Encryptions reserved for this call and not used yet.
        self.allowance = 0

    def __repr__(self) -> str:
        return f"<call key v{self.version}>"


class _Scope:
    """What one call learned once: the keys (grant checked), the encoded contexts.

    A batch checks a tenant's grant and takes a key version once, at the
    first item that needs it, and reuses them for the rest of the batch.
    Identical contexts in one batch are encoded once (`contexts`). A scope
    lives for one call: nothing in it outlives the call's stack frame.
    """

    __slots__ = ("backend", "contexts", "keys", "left")

    def __init__(self, backend: str, *, batch: bool) -> None:
        self.backend = backend
        self.keys: dict[tuple[str, int | None], _Key] = {}
        self.contexts: dict[tuple[tuple[str, str], ...], bytes] | None = {} if batch else None
        #: Items of the call from the current one on (sizes counter reservations).
        self.left = 1

    def __repr__(self) -> str:
        return f"<scope: {len(self.keys)} keys>"


class DataPlane:
    """Wrap, Unwrap, GenerateDataKey and Rewrap for authenticated backends.

    `identity` is the verified client certificate's URI
    (`keyquorum://backend/<name>`); the servicer checks its role first.
    """

    def __init__(
        self,
        daemon: Daemon,
        store: Store,
        *,
        limits: DataPlaneLimits = DEFAULT_DATA_LIMITS,
        usage: Sequence[UsageSink] = (),
        rate_limit: RateLimit | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._daemon = daemon
        self._limits = limits
        self._usage = tuple(usage)
        self._rate = rate_limit
        self._random = random_bytes
        self._nonces = NoncePool(random_bytes)
        self._counters = EncryptionCounters(store, limits)
        self._headers: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        self._backends: dict[str, str] = {}
        # What `_wrapfast` checks step 0 against (it takes values up to 2**30; no
        # gRPC message comes near that, and anything larger goes the Python way).
        self._wire_limits = (
            min(limits.max_batch_items, 2**30),
            min(limits.max_plaintext, 2**30),
            min(limits.max_context_pairs, 2**30),
            min(limits.max_context_bytes, 2**30),
        )
        self._epoch = 0
        daemon.add_seal_observer(self._on_seal_state)

    @property
    def limits(self) -> DataPlaneLimits:
        return self._limits

    def _on_seal_state(self, sealed: bool) -> None:
        if sealed:
            self._epoch += 1

    # -- single calls ---------------------------------------------------------

    def wrap(self, identity: str, item: WrapInput) -> Wrapped:
        return self._single(identity, "wrap", item, self._wrap)

    def wrap_serialized(self, identity: str, request: bytes) -> Wrapped | None:
        """Wrap of a serialised WrapRequest whose step 0 C did, or None.

        `_wrapfast.parse_wrap` reads the fields and encodes the context over
        the wire bytes, most of what a single Wrap spends in the interpreter;
        steps 1 to 3 are `wrap`'s own code. None, with nothing recorded and
        nothing taken, for any request it does not accept whole (malformed,
        over a limit, a non-ASCII context key, a repeated field...) or when
        the extension is not built: the caller then parses the request and
        calls `wrap`, which decides (tests/test_wrapfast.py compares both).
        """
        if not NATIVE_BATCH_WRAP:
            return None
        fields = _wrapfast.parse_wrap(request, self._wire_limits)
        if fields is None:
            return None
        return self._single(identity, "wrap", fields, self._wrap_checked)

    def unwrap(self, identity: str, item: UnwrapItem) -> Revealed:
        return self._single(identity, "unwrap", item, self._unwrap)

    def unwrap_serialized(self, identity: str, request: bytes) -> Revealed | None:
        """Unwrap of a serialised UnwrapRequest whose context C encoded, or None.

        As `wrap_serialized`: `_wrapfast.parse_unwrap` reads the fields and
        encodes the context; the ciphertext and the recipient key are checked
        here as `unwrap` checks them. None (nothing recorded, nothing taken)
        for a request it does not accept whole: parse it and call `unwrap`.
        """
        if not NATIVE_BATCH_WRAP:
            return None
        fields = _wrapfast.parse_unwrap(request, self._wire_limits)
        if fields is None:
            return None
        return self._single(identity, "unwrap", fields, self._unwrap_encoded)

    def generate_data_key(self, identity: str, item: GenerateItem) -> Revealed:
        return self._single(identity, "generate_data_key", item, self._generate)

    def rewrap(self, identity: str, item: RewrapInput) -> Wrapped:
        return self._single(identity, "rewrap", item, self._rewrap)

    # -- batches --------------------------------------------------------------

    def batch_wrap(
        self, identity: str, items: Sequence[WrapInput]
    ) -> list[Wrapped | KeyquorumError]:
        return self._batch(identity, "batch_wrap", items, self._wrap)

    def batch_unwrap(
        self, identity: str, items: Sequence[UnwrapItem]
    ) -> list[Revealed | KeyquorumError]:
        return self._batch(identity, "batch_unwrap", items, self._unwrap)

    def batch_generate_data_key(
        self, identity: str, items: Sequence[GenerateItem]
    ) -> list[Revealed | KeyquorumError]:
        return self._batch(identity, "batch_generate_data_key", items, self._generate)

    def batch_rewrap(
        self, identity: str, items: Sequence[RewrapInput]
    ) -> list[Wrapped | KeyquorumError]:
        return self._batch(identity, "batch_rewrap", items, self._rewrap)

    def batch_wrap_serialized(self, identity: str, request: bytes) -> bytes | None:
        """BatchWrap of a serialised BatchWrapRequest in one C call, or None.

        The fast path for a batch whose every item succeeds (docs/dataplane.md,
        "The BatchWrap fast path"): `_wrapfast.scan` checks each item's step 0
        over the wire bytes; here each distinct tenant gets its steps 1 to 3
        once (grant, key, a counter reservation for all its items); then the
        call-level checks `_batch` makes (rate limit, seal) and one
        `_wrapfast.seal`, which encrypts every item and writes the serialised
        BatchWrapResponse. None, with nothing recorded, whenever any of that
        would not succeed for every item (or the extension is not built): the
        caller then parses the request and calls `batch_wrap`, the reference,
        which decides each item's result. Counter numbers reserved before a
        None are skipped (the count only over-states); after the seal step's
        None (a key closed during the call) the rate-limit tokens are given
        back, since the reference takes them again.
        A call-level refusal (rate limit, sealed) raises as `batch_wrap` does. The answer is the
        bytes `batch_wrap` and `encode_wrap_results` would give with the
        same nonces (tests/test_wrapfast.py).
        """
        if not NATIVE_BATCH_WRAP:
            return None
        limits = self._wire_limits
        tenants = _wrapfast.scan(request, limits)
        if tenants is None:
            return None
        backend = self._backend(identity)
        operation = "batch_wrap"
        scope = _Scope(backend, batch=True)
        keys: list[_Key] = []
        views: list[tuple[memoryview, bytes, int]] = []
        for tenant, count in tenants:
            if not TENANT_RE.fullmatch(tenant):
                return None
            try:
                key = self._key(scope, tenant, None)
                views.append((key.held.view(), key.head, key.version))
                reserved = 0
                while reserved < count:
                    reserved += self._counters.take_many(tenant, key.version, count - reserved)
            except KeyquorumError:
                return None
            keys.append(key)
        items = sum(count for _, count in tenants)
        try:
            if self._rate is not None:
                self._rate.take(backend, items)
            if self._daemon.sealed:
                raise SealedError("the service is sealed")
        except KeyquorumError as e:
            self._record(backend, UNKNOWN, operation, e, None)
            raise
        response, contexts = _wrapfast.seal(
            request, limits, views, AAD_LABEL, self._nonces.take_many(items), bool(self._usage)
        )
        # A seal or a deactivation while sealing (the keyring closes a version's
        # cipher before it zeroes the bytes): the items would have failed one by
        # one; let the reference path say so. It takes the call's tokens again,
        # so they go back first.
        if any(key.cipher.closed for key in keys):
            if self._rate is not None:
                self._rate.give_back(backend, items)
            return None
        if contexts is not None:
            for index, context in contexts:
                self._record(backend, tenants[index][0], operation, None, context)
        return response

    def refused(self, operation: str, error: KeyquorumError) -> None:
        """Count a call refused before it reached here (no backend identity)."""
        self._record(UNKNOWN, UNKNOWN, operation, error, None)

    # -- the shared frame -------------------------------------------------------

    def _backend(self, identity: str) -> str:
        """The backend's name from its identity URI, parsed once per identity."""
        name = self._backends.get(identity)
        if name is None:
            name = _backend_name(identity)
            if len(self._backends) >= IDENTITY_CACHE:
                self._backends.clear()
            self._backends[identity] = name
        return name

    def _single(
        self, identity: str, operation: str, item: T, one: Callable[[str, T, _Scope], R]
    ) -> R:
        backend = self._backend(identity)
        try:
            if self._rate is not None:
                self._rate.take(backend, 1)
        except KeyquorumError as e:
            self._record(backend, UNKNOWN, operation, e, None)
            raise
        return one(operation, item, _Scope(backend, batch=False))

    def _batch(
        self,
        identity: str,
        operation: str,
        items: Sequence[T],
        one: Callable[[str, T, _Scope], R],
    ) -> list[R | KeyquorumError]:
        """Call-level checks once, then each item on its own (errors become results)."""
        backend = self._backend(identity)
        try:
            if not items:
                raise InvalidInputError("a batch needs at least one item")
            if len(items) > self._limits.max_batch_items:
                raise LimitExceededError(
                    f"a batch has at most {self._limits.max_batch_items} items, got {len(items)}"
                )
            if self._rate is not None:
                self._rate.take(backend, len(items))
            if self._daemon.sealed:
                raise SealedError("the service is sealed")
        except KeyquorumError as e:
            self._record(backend, UNKNOWN, operation, e, None)
            raise
        results: list[R | KeyquorumError] = []
        append = results.append
        scope = _Scope(backend, batch=True)
        left = len(items)
        for item in items:
            scope.left = left
            left -= 1
            try:
                append(one(operation, item, scope))
            except KeyquorumError as e:
                append(e)
        return results

    def _record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        if self._usage:
            for sink in self._usage:
                sink.record(backend, tenant, operation, error, context)

    def _refused(
        self,
        scope: _Scope,
        tenant: str,
        operation: str,
        error: KeyquorumError,
        context: bytes | None,
    ) -> None:
        """Record an item's refusal; one for want of a grant does not name the tenant.

        The data plane learns whether a tenant exists only after the grant
        check passed, so metrics and the access log carry a name the backend
        sent only if it is granted that name.
        """
        if isinstance(error, AccessDeniedError):
            tenant = UNKNOWN
        self._record(scope.backend, tenant, operation, error, context)

    def _context(self, context: Mapping[str, str], scope: _Scope) -> bytes:
        """The canonical context; in a batch, each distinct context is encoded once."""
        if type(context) is dict:
            pairs = tuple(context.items())
        else:  # a request's map: indexing is quicker than its items() view
            pairs = tuple([(k, context[k]) for k in context])
        cache = scope.contexts
        if cache is None:
            return encode_context_pairs(pairs, self._limits)
        try:
            encoded = cache.get(pairs)
        except TypeError:  # an unhashable value: encode_context_pairs names the problem
            return encode_context_pairs(pairs, self._limits)
        if encoded is None:
            encoded = cache[pairs] = encode_context_pairs(pairs, self._limits)
        return encoded

    def _check_plaintext(self, plaintext: bytes) -> None:
        if not isinstance(plaintext, bytes):
            raise InvalidInputError("plaintext must be bytes")
        if not plaintext:
            raise InvalidInputError("the plaintext is empty")
        if len(plaintext) > self._limits.max_plaintext:
            raise LimitExceededError(
                f"the plaintext is {len(plaintext)} bytes; at most {self._limits.max_plaintext} "
                "(wrap a data key and encrypt larger data locally)"
            )

    def _key(self, scope: _Scope, tenant: str, version: int | None) -> _Key:
        """Steps 1 and 2: the grant, then the key version (the current one for None).

        One daemon call (`Daemon.data_key`) checks the grant, that a named
        version exists, and the key's state; a call asks once per tenant and
        version. The key is the keyring's, not a copy: a seal or the
        activation's end closes its cipher, and `_wiped_during_call` names
        that when the call then uses it.
        """
        key = scope.keys.get((tenant, version))
        if key is None:
            number, held = self._daemon.data_key(scope.backend, tenant, version)
            key = scope.keys[(tenant, version)] = _Key(number, held, *self._header(tenant, number))
        return key

    def _wiped_during_call(self, tenant: str) -> StateError:
        """The key was wiped between taking it and using it: a seal, or the tenant ended."""
        if self._daemon.sealed:
            return SealedError("the service was sealed during the call")
        return StateError(f"tenant {tenant!r} stopped being active during the call")

    def _header(self, tenant: str, version: int) -> tuple[bytes, bytes]:
        """A key version's header and the AAD's fixed start (label, header), remembered."""
        known = self._headers.get((tenant, version))
        if known is None:
            head = header(tenant, version)
            if len(self._headers) >= HEADER_CACHE:
                self._headers.clear()
            known = self._headers[(tenant, version)] = (head, AAD_LABEL + head)
        return known

    def _encrypt_current(
        self, scope: _Scope, tenant: str, plaintext: bytes | memoryview, context: bytes
    ) -> Wrapped:
        key = self._key(scope, tenant, None)
        if key.allowance < 1:
            key.allowance = self._counters.take_many(tenant, key.version, scope.left)
        key.allowance -= 1
        nonce = self._nonces.take()
        try:
            body = key.cipher.encrypt(nonce, plaintext, key.aad + context)
        except StateError:
            raise self._wiped_during_call(tenant) from None
        return Wrapped(key.head + nonce + body, key.version)

    def _open(self, scope: _Scope, parsed: Parsed, context: bytes) -> SecretBytes:
        key = self._key(scope, parsed.tenant, parsed.version)
        try:
            return decrypt(key.cipher, parsed, context)
        except StateError:
            raise self._wiped_during_call(parsed.tenant) from None

    def _reveal(
        self,
        epoch: int,
        where: tuple[str, int],
        ciphertext: bytes,
        plaintext: SecretBytes,
        recipient: SealingPublicKey | None,
    ) -> Revealed:
        """Step 4: refuse if a seal came in between; seal to the recipient if asked."""
        tenant, version = where
        try:
            if self._epoch != epoch or self._daemon.sealed:
                raise SealedError("the service was sealed during the call")
            if recipient is None:
                return Revealed(tenant, version, ciphertext, plaintext, None)
            sealed = recipient.seal(plaintext, sealed_info(ciphertext))
        except BaseException:
            plaintext.wipe()
            raise
        plaintext.wipe()
        return Revealed(tenant, version, ciphertext, None, sealed)

    # -- the four operations ------------------------------------------------------

    def _wrap(self, operation: str, item: WrapInput, scope: _Scope) -> Wrapped:
        try:
            # 0. (each field read once: a request message makes a new object per read)
            plaintext = item.plaintext
            self._check_plaintext(plaintext)
            context = self._context(item.context, scope)
        except KeyquorumError as e:
            self._refused(scope, UNKNOWN, operation, e, None)
            raise
        return self._wrap_checked(operation, (item.tenant, plaintext, context), scope)

    def _wrap_checked(
        self, operation: str, item: tuple[str, bytes, bytes], scope: _Scope
    ) -> Wrapped:
        """Steps 1 to 3 of a Wrap past step 0: (tenant, plaintext, the encoded context)."""
        tenant, plaintext, context = item
        try:
            result = self._encrypt_current(scope, tenant, plaintext, context)
        except KeyquorumError as e:
            self._refused(scope, tenant, operation, e, context)
            raise
        self._record(scope.backend, tenant, operation, None, context)
        return result

    def _unwrap(self, operation: str, item: UnwrapItem, scope: _Scope) -> Revealed:
        try:
            # 0. (the recipient key in `_unwrap_checked`)
            parsed = parse(item.ciphertext)
            context = self._context(item.context, scope)
        except KeyquorumError as e:
            self._refused(scope, UNKNOWN, operation, e, None)
            raise
        return self._unwrap_checked(
            operation, parsed, item.ciphertext, context, item.recipient, scope
        )

    def _unwrap_encoded(
        self, operation: str, item: tuple[bytes, bytes, bytes], scope: _Scope
    ) -> Revealed:
        """`_unwrap` of (ciphertext, recipient key, the context already encoded)."""
        ciphertext, recipient, context = item
        try:
            parsed = parse(ciphertext)
        except KeyquorumError as e:
            self._refused(scope, UNKNOWN, operation, e, None)
            raise
        return self._unwrap_checked(operation, parsed, ciphertext, context, recipient, scope)

    def _unwrap_checked(
        self,
        operation: str,
        parsed: Parsed,
        ciphertext: bytes,
        context: bytes,
        recipient_key: bytes,
        scope: _Scope,
    ) -> Revealed:
        """The rest of step 0 (the recipient key), then steps 1 to 4."""
        tenant = UNKNOWN
        try:
            recipient = _recipient(recipient_key)
            # 1. to 3.
            tenant = parsed.tenant
            epoch = self._epoch
            plaintext = self._open(scope, parsed, context)
            # 4.
            result = self._reveal(epoch, (tenant, parsed.version), ciphertext, plaintext, recipient)
        except KeyquorumError as e:
            self._refused(scope, tenant, operation, e, context)
            raise
        self._record(scope.backend, tenant, operation, None, context)
        return result

    def _generate(self, operation: str, item: GenerateItem, scope: _Scope) -> Revealed:
        tenant, context = UNKNOWN, None
        try:
            # 0.
            size = item.size or DEFAULT_DATA_KEY_SIZE
            if not MIN_DATA_KEY_SIZE <= size <= MAX_DATA_KEY_SIZE:
                raise InvalidInputError(
                    f"a data key is {MIN_DATA_KEY_SIZE} to {MAX_DATA_KEY_SIZE} bytes, got {size}"
                )
            context = self._context(item.context, scope)
            recipient = _recipient(item.recipient)
            # 1. to 3.
            tenant = item.tenant
            epoch = self._epoch
            self._key(scope, tenant, None)  # refused before a data key is drawn
            plaintext = SecretBytes.adopt(bytearray(self._random(size)), label="data key")
            try:
                wrapped = self._encrypt_current(scope, tenant, plaintext.view(), context)
            except BaseException:
                plaintext.wipe()
                raise
            # 4.
            result = self._reveal(
                epoch, (tenant, wrapped.version), wrapped.ciphertext, plaintext, recipient
            )
        except KeyquorumError as e:
            self._refused(scope, tenant, operation, e, context)
            raise
        self._record(scope.backend, tenant, operation, None, context)
        return result

    def _rewrap(self, operation: str, item: RewrapInput, scope: _Scope) -> Wrapped:
        tenant, context = UNKNOWN, None
        try:
            # 0.
            parsed = parse(item.ciphertext)
            context = self._context(item.context, scope)
            # 1. to 3.
            tenant = parsed.tenant
            with self._open(scope, parsed, context) as plaintext:
                result = self._encrypt_current(scope, tenant, plaintext.view(), context)
        except KeyquorumError as e:
            self._refused(scope, tenant, operation, e, context)
            raise
        self._record(scope.backend, tenant, operation, None, context)
        return result


def _backend_name(identity: str) -> str:
    """The backend's name from its identity URI (the servicer checked the role)."""
    try:
        client = ClientIdentity.parse(identity)
    except InvalidInputError as e:
        raise AccessDeniedError(str(e)) from None
    if client.role != "backend":
        raise AccessDeniedError(f"{identity} is not a backend identity")
    return client.name


def _recipient(raw: bytes) -> SealingPublicKey | None:
    """The caller's HPKE public key, when it asked for a sealed result."""
    if not raw:
        return None
    return SealingPublicKey(raw)
