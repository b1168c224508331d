"""The data plane: what backends call all day, without gRPC.

`KeyService` (`key_service.py`) is a thin layer over `DataPlane`; this
module decides everything: the ciphertext format, what is checked and in
which order, the per-key-version encryption counter, the HPKE option, the
batch rules. Tenant keys come from `Daemon.tenant_key` (a copy, wiped when
the call ends) and grants from `Daemon.authorize_backend`; both read the
state the quorum log replays to. A batch checks each tenant's grant and
activation once, at the first item that names it, and holds that key copy
until the batch ends (at most 1000 items, milliseconds); a seal during a
batch still stops every later item that would return a key (step 4).

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

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.store import Store
from keyquorum.quorum import aead, canonical
from keyquorum.quorum.errors import (
    AccessDeniedError,
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    SealedError,
    UnsupportedVersionError,
)
from keyquorum.quorum.operations import TENANT_RE
from keyquorum.quorum.sealing import SealingPublicKey
from keyquorum.quorum.secret import SecretBytes

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
    if len(context) > limits.max_context_pairs:
        raise LimitExceededError(
            f"the encryption context has {len(context)} pairs; at most {limits.max_context_pairs}"
        )
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInputError("encryption context keys and values must be strings")
        if not key:
            raise InvalidInputError("an encryption context key is empty")
    encoded = _flat_canonical(context)
    if len(encoded) > limits.max_context_bytes:
        raise LimitExceededError(
            f"the encryption context is {len(encoded)} bytes encoded; "
            f"at most {limits.max_context_bytes}"
        )
    return encoded


def _flat_canonical(context: Mapping[str, str]) -> bytes:
    """RFC 8785 of a flat string map, fast when every key is ASCII.

    For such keys, code-point order is the UTF-16 order RFC 8785 section
    3.2.3 sorts by, and Python's JSON string escaping with ensure_ascii off is
    ECMAScript's (section 3.2.2.2: the two-character escapes, other control
    characters as lowercase \\u00xx, everything else as is). Other keys go
    through the general encoder. tests/test_dataplane.py checks both agree.
    """
    if all(key.isascii() for key in context):
        try:
            text = json.dumps(
                dict(sorted(context.items())), ensure_ascii=False, separators=(",", ":")
            )
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("the encryption context is not valid Unicode") from None
    return canonical.encode(dict(context))


def header(tenant: str, version: int) -> bytes:
    """Format byte, tenant and key version: the part of a ciphertext before the nonce."""
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise InvalidInputError(f"tenant {str(tenant)[:80]!r} is not a valid tenant name")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 2**32:
        raise InvalidInputError("key version must be in [1, 2**32)")
    name = tenant.encode("ascii")
    return bytes([FORMAT_V1, len(name)]) + name + version.to_bytes(4, "big")


def encrypt(
    key: SecretBytes,
    tenant: str,
    version: int,
    plaintext: bytes | memoryview,
    context: bytes,
    nonce: bytes,
) -> bytes:
    """A format-0x01 ciphertext of `plaintext` (see the module docstring)."""
    head = header(tenant, version)
    return head + nonce + aead.encrypt(key, nonce, plaintext, AAD_LABEL + head + context)


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


def decrypt(key: SecretBytes, parsed: Parsed, context: bytes) -> SecretBytes:
    """The plaintext of a parsed ciphertext; DecryptionError if it does not authenticate."""
    try:
        plain = aead.decrypt(key, parsed.nonce, parsed.body, AAD_LABEL + parsed.header + context)
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
        self._cond = threading.Condition()
        self._counts: dict[str, _Count] = {}

    @staticmethod
    def name(tenant: str, version: int) -> str:
        return f"enc/{tenant}/v{version}"

    def take(self, tenant: str, version: int) -> int:
        name = self.name(tenant, version)
        with self._cond:
            count = self._counts.get(name)
            if count is None:
                count = self._counts[name] = _Count()
            while True:
                if count.next < count.end:
                    number = count.next
                    count.next += 1
                    if count.end - count.next <= self._block // 4:
                        self._prefetch(name, count)
                    return number
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
                    self._cond.release()
                    try:
                        self._reserve(name, count)
                    finally:
                        self._cond.acquire()
                else:
                    self._cond.wait()

    def _prefetch(self, name: str, count: _Count) -> None:
        """Reserve the next block in the background (the caller holds the lock)."""
        if count.pending or count.spare is not None or count.exhausted:
            return
        count.pending = True
        threading.Thread(
            target=self._reserve, args=(name, count), name="kq-counter", daemon=True
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


# -- the data plane ---------------------------------------------------------------


class _Scope:
    """What one call learned once: the tenants granted and the tenant key copies.

    A batch checks each tenant's grant and takes each key once, at the first
    item that needs it, and reuses them for the rest of the batch; every
    copy is wiped when the call ends.
    """

    __slots__ = ("granted", "keys")

    def __init__(self) -> None:
        self.granted: set[str] = set()
        self.keys: dict[tuple[str, int | None], tuple[int, SecretBytes]] = {}

    def wipe(self) -> None:
        for _version, key in self.keys.values():
            key.wipe()
        self.keys.clear()

    def __repr__(self) -> str:
        return f"<scope: {len(self.granted)} tenants, {len(self.keys)} keys>"


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
        self._counters = EncryptionCounters(store, limits)
        self._epoch = 0
        daemon.add_seal_observer(self._on_seal_state)

    @property
    def limits(self) -> DataPlaneLimits:
        return self._limits

    def _on_seal_state(self, sealed: bool) -> None:
        if sealed:
            self._epoch += 1

    # -- single calls ---------------------------------------------------------

    def wrap(self, identity: str, item: WrapItem) -> Wrapped:
        return self._single(identity, "wrap", item, self._wrap)

    def unwrap(self, identity: str, item: UnwrapItem) -> Revealed:
        return self._single(identity, "unwrap", item, self._unwrap)

    def generate_data_key(self, identity: str, item: GenerateItem) -> Revealed:
        return self._single(identity, "generate_data_key", item, self._generate)

    def rewrap(self, identity: str, item: RewrapItem) -> Wrapped:
        return self._single(identity, "rewrap", item, self._rewrap)

    # -- batches --------------------------------------------------------------

    def batch_wrap(
        self, identity: str, items: Sequence[WrapItem]
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
        self, identity: str, items: Sequence[RewrapItem]
    ) -> list[Wrapped | KeyquorumError]:
        return self._batch(identity, "batch_rewrap", items, self._rewrap)

    def refused(self, operation: str, error: KeyquorumError) -> None:
        """Count a call refused before it reached here (no backend identity)."""
        self._record(UNKNOWN, UNKNOWN, operation, error, None)

    # -- the shared frame -------------------------------------------------------

    def _single(
        self, identity: str, operation: str, item: T, one: Callable[[str, str, T, _Scope], R]
    ) -> R:
        backend = _backend_name(identity)
        try:
            if self._rate is not None:
                self._rate.take(backend, 1)
        except KeyquorumError as e:
            self._record(backend, UNKNOWN, operation, e, None)
            raise
        scope = _Scope()
        try:
            return one(identity, operation, item, scope)
        finally:
            scope.wipe()

    def _batch(
        self,
        identity: str,
        operation: str,
        items: Sequence[T],
        one: Callable[[str, str, T, _Scope], R],
    ) -> list[R | KeyquorumError]:
        """Call-level checks once, then each item on its own (errors become results)."""
        backend = _backend_name(identity)
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
        scope = _Scope()
        try:
            for item in items:
                try:
                    results.append(one(identity, operation, item, scope))
                except KeyquorumError as e:
                    results.append(e)
        finally:
            scope.wipe()
        return results

    def _record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        for sink in self._usage:
            sink.record(backend, tenant, operation, error, context)

    def _context(self, context: Mapping[str, str]) -> bytes:
        return encode_context(context, self._limits)

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

    def _authorize(self, identity: str, tenant: str, scope: _Scope) -> None:
        if tenant not in scope.granted:
            self._daemon.authorize_backend(identity, tenant)
            scope.granted.add(tenant)

    def _key(self, scope: _Scope, tenant: str, version: int | None) -> tuple[int, SecretBytes]:
        """A tenant key copy for this call (the current version for None); wiped at its end."""
        held = scope.keys.get((tenant, version))
        if held is None:
            held = self._daemon.tenant_key(tenant, version)
            scope.keys[(tenant, version)] = held
        return held

    def _check_version_exists(self, parsed: Parsed) -> None:
        """A header naming a version the tenant never had is malformed input."""
        record = self._daemon.state.tenants.get(parsed.tenant)
        if record is not None and parsed.version > len(record.versions):
            raise DeserializationError(
                f"the ciphertext names key version {parsed.version} of tenant "
                f"{parsed.tenant!r}, which has {len(record.versions)}"
            )

    def _encrypt_current(
        self, scope: _Scope, tenant: str, plaintext: bytes | memoryview, context: bytes
    ) -> Wrapped:
        version, key = self._key(scope, tenant, None)
        self._counters.take(tenant, version)
        nonce = self._random(aead.NONCE_SIZE)
        return Wrapped(encrypt(key, tenant, version, plaintext, context, nonce), version)

    def _open(self, scope: _Scope, parsed: Parsed, context: bytes) -> SecretBytes:
        self._check_version_exists(parsed)
        _version, key = self._key(scope, parsed.tenant, parsed.version)
        return decrypt(key, parsed, context)

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

    def _wrap(self, identity: str, operation: str, item: WrapItem, scope: _Scope) -> Wrapped:
        backend = _backend_name(identity)
        tenant, context = UNKNOWN, None
        try:
            # 0.
            self._check_plaintext(item.plaintext)
            context = self._context(item.context)
            # 1.
            self._authorize(identity, item.tenant, scope)
            tenant = item.tenant
            # 2. and 3.
            result = self._encrypt_current(scope, tenant, item.plaintext, context)
        except KeyquorumError as e:
            self._record(backend, tenant, operation, e, context)
            raise
        self._record(backend, tenant, operation, None, context)
        return result

    def _unwrap(self, identity: str, operation: str, item: UnwrapItem, scope: _Scope) -> Revealed:
        backend = _backend_name(identity)
        tenant, context = UNKNOWN, None
        try:
            # 0.
            parsed = parse(item.ciphertext)
            context = self._context(item.context)
            recipient = _recipient(item.recipient)
            # 1.
            self._authorize(identity, parsed.tenant, scope)
            tenant = parsed.tenant
            # 2. and 3.
            epoch = self._epoch
            plaintext = self._open(scope, parsed, context)
            # 4.
            result = self._reveal(
                epoch, (tenant, parsed.version), item.ciphertext, plaintext, recipient
            )
        except KeyquorumError as e:
            self._record(backend, tenant, operation, e, context)
            raise
        self._record(backend, tenant, operation, None, context)
        return result

    def _generate(
        self, identity: str, operation: str, item: GenerateItem, scope: _Scope
    ) -> Revealed:
        backend = _backend_name(identity)
        tenant, context = UNKNOWN, None
        try:
            # 0.
            size = item.size or DEFAULT_DATA_KEY_SIZE
            if not MIN_DATA_KEY_SIZE <= size <= MAX_DATA_KEY_SIZE:
                raise InvalidInputError(
                    f"a data key is {MIN_DATA_KEY_SIZE} to {MAX_DATA_KEY_SIZE} bytes, got {size}"
                )
            context = self._context(item.context)
            recipient = _recipient(item.recipient)
            # 1.
            self._authorize(identity, item.tenant, scope)
            tenant = item.tenant
            # 2. and 3.
            epoch = self._epoch
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
            self._record(backend, tenant, operation, e, context)
            raise
        self._record(backend, tenant, operation, None, context)
        return result

    def _rewrap(self, identity: str, operation: str, item: RewrapItem, scope: _Scope) -> Wrapped:
        backend = _backend_name(identity)
        tenant, context = UNKNOWN, None
        try:
            # 0.
            parsed = parse(item.ciphertext)
            context = self._context(item.context)
            # 1.
            self._authorize(identity, parsed.tenant, scope)
            tenant = parsed.tenant
            # 2. and 3.
            with self._open(scope, parsed, context) as plaintext:
                result = self._encrypt_current(scope, tenant, plaintext.view(), context)
        except KeyquorumError as e:
            self._record(backend, tenant, operation, e, context)
            raise
        self._record(backend, tenant, operation, None, context)
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
