"""The data plane: Wrap, Unwrap, GenerateDataKey and Rewrap, without gRPC.

`KeyService` (hsm/services/key_service.py) is a thin layer over `DataPlane`;
this module decides what is checked and in which order, the HPKE option
and the batch rules (the format is `format.py`, the counters
`counters.py`). Grants and tenant keys come from the snapshot governance
publishes (`snapshot.py`), read once per call with no lock. A batch
checks each tenant's grant and activation once per key version, at the
first item that names it, and uses that key until the batch ends; a seal
during a call closes the key's cipher, so no later item encrypts or
decrypts with it, and step 4 stops every result that would carry a key.
BatchWrap requests are read and sealed in C where every item would succeed
(`_wire`, hsm/dataplane/_wire.c, docs/adr/0001); the Python path here is the
reference it is tested against and decides every other request.

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

A call made on an event loop never waits for the store (counters.py):
where it would, `WouldWait` leaves the whole call with nothing recorded and
its rate-limit tokens given back (a batch's usage records are buffered
until it ends), and the caller repeats the call on a thread.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

from keyquorum.hsm.dataplane.counters import EncryptionCounters, WouldWait
from keyquorum.hsm.dataplane.format import (
    AAD_LABEL,
    Parsed,
    decrypt,
    encode_context_pairs,
    header,
    parse,
    sealed_info,
)
from keyquorum.hsm.dataplane.items import (
    GenerateItem,
    RateLimit,
    Revealed,
    RewrapInput,
    UnwrapInput,
    UnwrapItem,
    UsageSink,
    WrapInput,
    Wrapped,
)
from keyquorum.hsm.dataplane.nonces import NoncePool
from keyquorum.hsm.dataplane.snapshot import DataPlaneSnapshot, HeldKey, SnapshotSource
from keyquorum.hsm.pki import ClientIdentity
from keyquorum.hsm.stores.base import Store
from keyquorum.quorum import aead
from keyquorum.quorum.errors import (
    AccessDeniedError,
    InvalidInputError,
    KeyquorumError,
    LimitExceededError,
    SealedError,
    StateError,
)
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.operations import TENANT_RE
from keyquorum.quorum.sealing import SealingPublicKey
from keyquorum.quorum.secret import SecretBytes

try:  # the wire codec in C (hsm/dataplane/_wire.c, docs/adr/0001)
    from keyquorum.hsm.dataplane import _wire

    #: True when the wire codec is built (`make install` builds it, or fails; a
    #: build without it is `KEYQUORUM_WITHOUT_NATIVE=1`, see `require_wire_codec`).
    WIRE_CODEC_BUILT = True
except ImportError:  # pragma: no cover
    WIRE_CODEC_BUILT = False

#: The environment variable that makes running without the wire codec a choice.
WITHOUT_NATIVE: Final = "KEYQUORUM_WITHOUT_NATIVE"


def require_wire_codec() -> None:
    """Refuse to serve without the C wire codec unless the operator chose that.

    Without it every call takes the Python path (same results, more CPU per
    call); that must be a decision (`KEYQUORUM_WITHOUT_NATIVE=1`, at install
    and at start), never a silent consequence of a missing compiler.
    """
    if not WIRE_CODEC_BUILT and os.environ.get(WITHOUT_NATIVE) != "1":
        raise StateError(
            "the data plane's C wire codec (hsm/dataplane/_wire.c) is not built: install "
            "a C compiler and OpenSSL's headers (Debian: libssl-dev) and run `make clean "
            f"install`, or set {WITHOUT_NATIVE}=1 to serve with the Python path only"
        )


log = logging.getLogger(__name__)

DEFAULT_DATA_KEY_SIZE: Final = 32
MIN_DATA_KEY_SIZE: Final = 16
MAX_DATA_KEY_SIZE: Final = 64
#: Label for a tenant the caller is not granted (metrics never carry unchecked names).
UNKNOWN: Final = "-"

T = TypeVar("T")
R = TypeVar("R")

#: Headers remembered per (tenant, version) before the cache starts over.
HEADER_CACHE: Final = 4096
#: A ciphertext's nonce and tag: what follows its header at least.
NONCE_AND_TAG: Final = aead.NONCE_SIZE + aead.TAG_SIZE
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

    __slots__ = ("backend", "contexts", "keys", "left", "now", "records", "snapshot")

    def __init__(self, backend: str, snapshot: DataPlaneSnapshot, now: int, *, batch: bool) -> None:
        self.backend = backend
        #: Governance as this call sees it, read once at its start.
        self.snapshot = snapshot
        self.now = now
        self.keys: dict[tuple[str, int | None], _Key] = {}
        self.contexts: dict[tuple[tuple[str, str], ...], bytes] | None = {} if batch else None
        #: Items of the call from the current one on (sizes counter reservations).
        self.left = 1
        #: A batch's usage records, given to the sinks when it ends (None: at once).
        self.records: list[tuple[str, str, KeyquorumError | None, bytes | None]] | None = None

    def __repr__(self) -> str:
        return f"<scope: {len(self.keys)} keys>"


class DataPlane:
    """Wrap, Unwrap, GenerateDataKey and Rewrap for authenticated backends.

    `identity` is the verified client certificate's URI
    (`keyquorum://backend/<name>`); the servicer checks its role first.
    """

    def __init__(
        self,
        source: SnapshotSource,
        store: Store,
        *,
        limits: Limits | None = None,
        usage: Sequence[UsageSink] = (),
        rate_limit: RateLimit | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        require_wire_codec()
        self._source = source
        self._published = source.data_plane_snapshot
        if limits is None:
            limits = source.data_plane_snapshot().limits
        self._limits = limits
        self._usage = tuple(usage)
        self._rate = rate_limit
        self._random = random_bytes
        self._nonces = NoncePool(random_bytes)
        self._counters = EncryptionCounters(store, limits)
        self._headers: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        #: Ciphertext headers parsed before: header bytes -> (tenant, version, length).
        self._heads: dict[bytes, tuple[str, int, int]] = {}
        self._backends: dict[str, str] = {}
        # What `_wire` checks step 0 against (it takes values up to 2**30; no
        # gRPC message comes near that, and anything larger goes the Python way).
        self._wire_limits = (
            min(limits.max_batch_items, 2**30),
            min(limits.max_plaintext, 2**30),
            min(limits.max_context_pairs, 2**30),
            min(limits.max_context_bytes, 2**30),
        )

    @property
    def limits(self) -> Limits:
        return self._limits

    def _scope(self, backend: str, *, batch: bool) -> _Scope:
        """A call's scope: the published snapshot and the time, read once."""
        source = self._source
        return _Scope(backend, source.data_plane_snapshot(), source.now(), batch=batch)

    # -- single calls ---------------------------------------------------------

    def wrap(self, identity: str, item: WrapInput) -> Wrapped:
        return self._single(identity, "wrap", item, self._wrap)

    def unwrap(self, identity: str, item: UnwrapItem) -> Revealed:
        return self._single(identity, "unwrap", item, self._unwrap)

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

    def batch_unwrap_requests(
        self, identity: str, items: Sequence[UnwrapInput]
    ) -> list[Revealed | KeyquorumError]:
        """BatchUnwrap of request messages as they came: `batch_unwrap`'s results.

        Each item takes a short way when it is ordinary (no recipient key, a
        ciphertext header seen before in this process, the tag authentic, no
        seal since the call began): the checks of `_unwrap`, in its order,
        with the header's parse and the context's encoding remembered (each
        keyed by the bytes that decided it). Any other item, and any item
        that fails on the short way, is decided by `_unwrap` itself, the
        reference, from its start (the short way changed nothing before it
        gave up), so results, errors and usage records are the reference's
        (tests/test_key_service.py compares them item by item).
        """
        return self._batch(identity, "batch_unwrap", items, self._unwrap_request)

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
        "The BatchWrap fast path"): `_wire.scan` checks each item's step 0
        over the wire bytes; here each distinct tenant gets its steps 1 to 3
        once (grant, key, a counter reservation for all its items); then the
        call-level checks `_batch` makes (rate limit, seal) and one
        `_wire.seal`, which encrypts every item and writes the serialised
        BatchWrapResponse. None, with nothing recorded, whenever any of that
        would not succeed for every item (or the extension is not built): the
        caller then parses the request and calls `batch_wrap`, the reference,
        which decides each item's result. Counter numbers reserved before a
        None are skipped (the count only over-states); after the seal step's
        None (a key closed during the call) the rate-limit tokens are given
        back, since the reference takes them again.
        A call-level refusal (rate limit, sealed) raises as `batch_wrap` does. The answer is the
        bytes `batch_wrap` and `encode_wrap_results` would give with the
        same nonces (tests/test_wire.py).
        """
        if not WIRE_CODEC_BUILT:
            return None
        limits = self._wire_limits
        tenants = _wire.scan(request, limits)
        if tenants is None:
            return None
        backend = self._backend(identity)
        operation = "batch_wrap"
        scope = self._scope(backend, batch=True)
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
        self._admit_batch(backend, operation, scope, items)
        response, contexts = _wire.seal(
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

    def batch_unwrap_serialized(self, identity: str, request: bytes) -> bytes | None:
        """BatchUnwrap of a serialised BatchUnwrapRequest in one C call, or None.

        The fast path for a batch whose every item opens (docs/dataplane.md,
        "The BatchUnwrap fast path"): `_wire.scan_unwrap` checks each item's
        shape over the wire bytes (no recipient key, a well-formed ciphertext,
        the context within the limits) and names the distinct headers; here
        each header is read as `format.parse` reads it and its key version
        gets steps 1 and 2 once (grant, activation, version usable); then the
        call-level checks `_batch` makes (rate limit, seal) and one
        `_wire.open_all`, which decrypts every item and writes the serialised
        BatchUnwrapResponse. None, with nothing recorded, whenever any of that
        would not succeed for every item (an item that does not authenticate
        included, its plaintexts erased in C), or when a seal or the end of a
        key's activation came during the call (step 4; the rate-limit tokens
        go back, since the reference takes them again): the caller then
        parses the request and calls `batch_unwrap_requests`, the reference,
        which decides each item's result. A call-level refusal (rate limit,
        sealed) raises as the reference does. The answer is the bytes the
        reference and `encode_unwrap_results` give (tests/test_wire_codec.py).
        """
        if not WIRE_CODEC_BUILT:
            return None
        limits = self._wire_limits
        heads = _wire.scan_unwrap(request, limits)
        if heads is None:
            return None
        backend = self._backend(identity)
        operation = "batch_unwrap"
        scope = self._scope(backend, batch=True)
        tenants: list[str] = []
        keys: list[_Key] = []
        entries: list[tuple[memoryview, bytes]] = []
        for head, _ in heads:
            read = _header_fields(head)
            if read is None:
                return None
            tenant, version = read
            try:
                key = self._key(scope, tenant, version)
            except KeyquorumError:
                return None
            if key.head != head:
                return None
            tenants.append(tenant)
            keys.append(key)
            entries.append((key.held.view(), head))
        items = sum(count for _, count in heads)
        self._admit_batch(backend, operation, scope, items)
        opened = _wire.open_all(request, limits, entries, AAD_LABEL, bool(self._usage))
        if opened is not None:
            response, contexts = opened
            try:
                # 4. A key closed while opening (a seal, the activation's end),
                # or a seal since the call began: the reference says so.
                if not any(key.cipher.closed for key in keys) and not self._sealed_since(scope):
                    answer = bytes(response)
                    if contexts is not None:
                        for index, context in contexts:
                            self._record(backend, tenants[index], operation, None, context)
                    return answer
            finally:
                response[:] = bytes(len(response))
        if self._rate is not None:
            self._rate.give_back(backend, items)
        return None

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
        try:
            return one(operation, item, self._scope(backend, batch=False))
        except WouldWait:
            # Repeated on a thread: that call takes its token again.
            if self._rate is not None:
                self._rate.give_back(backend, 1)
            raise

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
        except KeyquorumError as e:
            self._record(backend, UNKNOWN, operation, e, None)
            raise
        scope = self._scope(backend, batch=True)
        self._admit_batch(backend, operation, scope, len(items))
        if self._usage:
            scope.records = []
        results: list[R | KeyquorumError] = []
        append = results.append
        left = len(items)
        try:
            for item in items:
                scope.left = left
                left -= 1
                try:
                    append(one(operation, item, scope))
                except KeyquorumError as e:
                    append(e)
        except WouldWait:
            # The call is repeated on a thread, from its first item: nothing of
            # this attempt is recorded, and its tokens go back.
            if self._rate is not None:
                self._rate.give_back(backend, len(items))
            raise
        if scope.records:
            for tenant, op, error, context in scope.records:
                self._record(backend, tenant, op, error, context)
        return results

    def _admit_batch(self, backend: str, operation: str, scope: _Scope, items: int) -> None:
        """A batch's call-level checks, on every path: the rate limit for all its items,
        then the seal; a refusal is recorded (no tenant named) and raised."""
        try:
            if self._rate is not None:
                self._rate.take(backend, items)
            if scope.snapshot.sealed:
                raise SealedError("the service is sealed")
        except KeyquorumError as e:
            self._record(backend, UNKNOWN, operation, e, None)
            raise

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
        self._note(scope, tenant, operation, error, context)

    def _note(
        self,
        scope: _Scope,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        """One item's usage: to the sinks, or into its batch's buffer."""
        if self._usage:
            if scope.records is not None:
                scope.records.append((tenant, operation, error, context))
            else:
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
            number, held = scope.snapshot.key_for(scope.backend, tenant, version, scope.now)
            key = scope.keys[(tenant, version)] = _Key(number, held, *self._header(tenant, number))
        return key

    def _sealed_since(self, scope: _Scope) -> bool:
        """Whether a seal came since the call read its snapshot (step 4)."""
        now = self._published()
        return now.sealed or now.generation != scope.snapshot.generation

    def _wiped_during_call(self, scope: _Scope, tenant: str) -> StateError:
        """The key was wiped between taking it and using it: a seal, or the tenant ended."""
        if self._sealed_since(scope):
            return SealedError("the service was sealed during the call")
        return StateError(f"tenant {tenant!r} stopped being active during the call")

    def _remember_head(self, parsed: Parsed) -> None:
        """A parsed header, for `_unwrap_request`: keyed by its bytes, what parse decided."""
        if parsed.header not in self._heads:
            if len(self._heads) >= HEADER_CACHE:
                self._heads.clear()
            self._heads[parsed.header] = (parsed.tenant, parsed.version, len(parsed.header))

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
            raise self._wiped_during_call(scope, tenant) from None
        return Wrapped(key.head + nonce + body, key.version)

    def _open(self, scope: _Scope, parsed: Parsed, context: bytes) -> SecretBytes:
        key = self._key(scope, parsed.tenant, parsed.version)
        try:
            return decrypt(key.cipher, parsed, context)
        except StateError:
            raise self._wiped_during_call(scope, parsed.tenant) from None

    def _reveal(
        self,
        scope: _Scope,
        where: tuple[str, int],
        ciphertext: bytes,
        plaintext: SecretBytes,
        recipient: SealingPublicKey | None,
    ) -> Revealed:
        """Step 4: refuse if a seal came in between; seal to the recipient if asked."""
        tenant, version = where
        try:
            if self._sealed_since(scope):
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
        self._note(scope, tenant, operation, None, context)
        return result

    def _unwrap(self, operation: str, item: UnwrapItem, scope: _Scope) -> Revealed:
        try:
            # 0. (the recipient key in `_unwrap_checked`)
            parsed = parse(item.ciphertext)
            self._remember_head(parsed)
            context = self._context(item.context, scope)
        except KeyquorumError as e:
            self._refused(scope, UNKNOWN, operation, e, None)
            raise
        return self._unwrap_checked(
            operation, parsed, item.ciphertext, context, item.recipient, scope
        )

    def _unwrap_request(self, operation: str, item: UnwrapInput, scope: _Scope) -> Revealed:
        """One BatchUnwrap item: the short way (`batch_unwrap_requests`) or `_unwrap`."""
        ciphertext = item.ciphertext
        if len(ciphertext) > 1 and not item.recipient_public_key:
            known = self._heads.get(ciphertext[: 6 + ciphertext[1]])
            if known is not None and len(ciphertext) >= known[2] + NONCE_AND_TAG:
                # 0. (the ciphertext's shape: its header parsed before, its length checked)
                tenant, version, end = known
                context_map = item.context
                pairs = tuple([(k, context_map[k]) for k in context_map])
                contexts = scope.contexts
                context = None if contexts is None else contexts.get(pairs)
                try:
                    if context is None:
                        context = self._context(context_map, scope)
                    # 1. and 2.
                    key = scope.keys.get((tenant, version)) or self._key(scope, tenant, version)
                    # 3.
                    nonce_end = end + aead.NONCE_SIZE
                    plain = key.cipher.decrypt(
                        ciphertext[end:nonce_end], ciphertext[nonce_end:], key.aad + context
                    )
                except KeyquorumError:
                    pass
                else:
                    # 4.
                    published = self._published()
                    if not published.sealed and published.generation == scope.snapshot.generation:
                        if self._usage:
                            self._note(scope, tenant, operation, None, context)
                        return Revealed(tenant, version, ciphertext, SecretBytes.adopt(plain), None)
                    plain[:] = bytes(len(plain))
        # Not ordinary, or it failed: the reference decides, from the item's start.
        return self._unwrap(operation, _as_item(item), scope)

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
            plaintext = self._open(scope, parsed, context)
            # 4.
            result = self._reveal(scope, (tenant, parsed.version), ciphertext, plaintext, recipient)
        except KeyquorumError as e:
            self._refused(scope, tenant, operation, e, context)
            raise
        self._note(scope, tenant, operation, None, context)
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
            self._key(scope, tenant, None)  # refused before a data key is drawn
            plaintext = SecretBytes.adopt(bytearray(self._random(size)), label="data key")
            try:
                wrapped = self._encrypt_current(scope, tenant, plaintext.view(), context)
            except BaseException:
                plaintext.wipe()
                raise
            # 4.
            result = self._reveal(
                scope, (tenant, wrapped.version), wrapped.ciphertext, plaintext, recipient
            )
        except KeyquorumError as e:
            self._refused(scope, tenant, operation, e, context)
            raise
        self._note(scope, tenant, operation, None, context)
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
        self._note(scope, tenant, operation, None, context)
        return result


def _header_fields(head: bytes) -> tuple[str, int] | None:
    """The tenant and version of a ciphertext header `_wire.scan_unwrap` returned,
    or None where `format.parse` would refuse it (the reference then says why)."""
    try:
        parsed = parse(head + bytes(NONCE_AND_TAG))
    except KeyquorumError:
        return None
    return parsed.tenant, parsed.version


def _as_item(item: UnwrapInput) -> UnwrapItem:
    context = item.context
    return UnwrapItem(item.ciphertext, {k: context[k] for k in context}, item.recipient_public_key)


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
