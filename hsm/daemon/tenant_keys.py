"""Tenant keys: wrapped under the master key in the log, unwrapped only in memory.

Wrapping (docs/ARCHITECTURE.md, "Crypto-shredding"): each tenant key
version has its own key-encryption key

    KEK = HKDF-SHA256(IKM = master key, salt = shred_salt,
                      info = "keyquorum/v1/tenant-kek" || tenant || u32be(version))

(RFC 5869 section 2; the tenant name is ASCII from `operations.TENANT_RE`
and the version a fixed four bytes at the end, so the info is unambiguous).
The 32-byte `shred_salt` lives only in the store's erasable table, its
SHA-256 in the log; erasing it leaves the logged wrapped key unopenable by
any later quorum, since no KEK can be derived without it.

The wrapped form is versioned and bound to its place:

    0x01 || nonce (12) || AES-256-GCM(KEK, nonce, tenant key, aad)
    aad = "keyquorum/v1/tenant-key" 0x00 tenant 0x00 u32be(version)

so a wrapped key moved to another tenant or version does not open even
under the right KEK (SP 800-38D: a random 96-bit nonce per wrap; one KEK
wraps one key, except for the re-wrap of a roster change, which derives
a new KEK from the new master key).

`TenantKeyring` holds the activations: for each active tenant, its
unwrapped versions in `SecretBytes` and the time the activation ends. It
is never persisted; every removal (expiry, deactivation, disable, destroy,
seal) wipes the buffers. The daemon's key custody (custody.py) owns one
and calls it under its lock.

Beside each held version the keyring keeps its prepared AES-256-GCM key
(`aead.Cipher`, made once at activation), so the data plane does not build
a cipher (a key copy and a key schedule) per call. The cipher lives and
dies with the buffer: every removal above closes it in the same step that
wipes the key, after which no copy handed out earlier can encrypt or
decrypt any more (tests/test_tenant_key_cache.py).

"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import NoReturn

from keyquorum.hsm.dataplane.snapshot import HeldKey
from keyquorum.hsm.stores.base import SALT_SIZE as SHRED_SALT_SIZE
from keyquorum.quorum import aead
from keyquorum.quorum.errors import (
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    StateError,
)
from keyquorum.quorum.kdf import hkdf_sha256
from keyquorum.quorum.operations import TENANT_RE
from keyquorum.quorum.secret import SecretBytes, require_length

WRAP_FORMAT = 0x01
TENANT_KEY_SIZE = 32
MASTER_KEY_SIZE = 32
WRAPPED_SIZE = 1 + aead.NONCE_SIZE + TENANT_KEY_SIZE + aead.TAG_SIZE
KEK_INFO = b"keyquorum/v1/tenant-kek"
AAD_LABEL = b"keyquorum/v1/tenant-key\x00"
MAX_VERSION = 2**31


def _place(tenant: str, version: int) -> tuple[bytes, bytes]:
    """(tenant ASCII, u32be version) after checking both."""
    if not isinstance(tenant, str) or not TENANT_RE.fullmatch(tenant):
        raise InvalidInputError(f"tenant {str(tenant)[:80]!r} is not a valid tenant name")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidInputError(f"tenant key version must be in [1, {MAX_VERSION}]")
    return tenant.encode("ascii"), version.to_bytes(4, "big")


def _kek(master: SecretBytes, salt: bytes, tenant: bytes, version: bytes) -> SecretBytes:
    require_length("master key", master, MASTER_KEY_SIZE)
    if not isinstance(salt, bytes):
        raise InvalidInputError("shred salt must be bytes")
    require_length("shred salt", salt, SHRED_SALT_SIZE)
    return hkdf_sha256(master, salt=salt, info=KEK_INFO + tenant + version, length=32)


def shred_salt_digest(salt: bytes) -> bytes:
    """What the log records of a shred salt: its SHA-256."""
    return hashlib.sha256(salt).digest()


def check_salt(salt: bytes | None, logged_digest: bytes, tenant: str, version: int) -> bytes:
    """The store's salt for (tenant, version), checked against the hash in the log.

    A missing or swapped salt is a store that no longer matches its log
    (erased outside a shred, or rewritten by someone with database access).
    """
    if salt is None:
        raise StateError(
            f"the store has no shred salt for tenant {tenant!r} version {version}: "
            "the key cannot be unwrapped"
        )
    if not hmac.compare_digest(shred_salt_digest(salt), logged_digest):
        raise StateError(
            f"the store's shred salt for tenant {tenant!r} version {version} "
            "does not match the hash in the log"
        )
    return salt


def wrap(
    master: SecretBytes,
    salt: bytes,
    tenant: str,
    version: int,
    key: SecretBytes,
    *,
    nonce: bytes,
) -> bytes:
    """Wrap one tenant key version under the master key (format 0x01, above)."""
    tenant_b, version_b = _place(tenant, version)
    require_length("tenant key", key, TENANT_KEY_SIZE)
    with _kek(master, salt, tenant_b, version_b) as kek:
        body = aead.encrypt(kek, nonce, key.view(), AAD_LABEL + tenant_b + b"\x00" + version_b)
    return bytes([WRAP_FORMAT]) + nonce + body


def unwrap(
    master: SecretBytes, salt: bytes, tenant: str, version: int, wrapped: bytes
) -> SecretBytes:
    """The tenant key of `wrapped`, in a fresh SecretBytes the caller wipes.

    Raises DeserializationError for a wrong size or an unknown format byte,
    DecryptionError when the key does not open here (another master key or
    salt, another tenant or version, an altered byte).
    """
    tenant_b, version_b = _place(tenant, version)
    if not isinstance(wrapped, bytes):
        raise InvalidInputError("wrapped key must be bytes")
    if len(wrapped) != WRAPPED_SIZE:
        raise DeserializationError(
            f"wrapped key of {tenant!r} v{version} is {len(wrapped)} bytes, expected {WRAPPED_SIZE}"
        )
    if wrapped[0] != WRAP_FORMAT:
        raise DeserializationError(f"unknown wrapped-key format 0x{wrapped[0]:02x}")
    nonce, body = wrapped[1 : 1 + aead.NONCE_SIZE], wrapped[1 + aead.NONCE_SIZE :]
    with _kek(master, salt, tenant_b, version_b) as kek:
        try:
            plain = aead.decrypt(kek, nonce, body, AAD_LABEL + tenant_b + b"\x00" + version_b)
        except DecryptionError:
            raise DecryptionError(
                f"the wrapped key of tenant {tenant!r} version {version} does not open "
                "under this master key and shred salt"
            ) from None
    return SecretBytes.adopt(plain, label=f"tenant key {tenant} v{version}")


class TenantKey(SecretBytes):
    """A copy of one tenant key version for one call, with its keyring's cipher.

    The copy is what `Daemon.tenant_key` promises (the caller wipes it);
    `cipher()` is the keyring's prepared AES-256-GCM key for that version,
    shared, not owned: wiping the copy only lets go of it, and the keyring
    closes it when it wipes the version, so it refuses use from then on
    (StateError), whoever still holds a reference.
    """

    __slots__ = ("_cipher",)

    _cipher: aead.Cipher | None

    def cipher(self) -> aead.Cipher:
        """The prepared key; StateError once this copy or the held version was wiped."""
        self._check()
        cipher: aead.Cipher | None = getattr(self, "_cipher", None)  # unset: not a keyring's
        if cipher is None or cipher.closed:
            raise StateError(f"{self._label} was wiped")
        return cipher

    def wipe(self) -> None:
        self._cipher = None
        super().wipe()


class _Held:
    """One unwrapped version: the key, its prepared cipher and the label of its copies."""

    __slots__ = ("cipher", "key", "label")

    def __init__(self, tenant: str, version: int, key: SecretBytes) -> None:
        self.key = key
        self.cipher = aead.Cipher(key)
        self.label = f"tenant key {tenant} v{version}"

    def view(self) -> memoryview:
        return self.key.view()

    def copy(self) -> TenantKey:
        copy = TenantKey(self.key.view(), label=self.label)
        copy._cipher = self.cipher
        return copy

    def wipe(self) -> None:
        self.cipher.close()
        self.key.wipe()

    def __repr__(self) -> str:
        return f"<held {self.label}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a held tenant key cannot be pickled")


class _Activation:
    """One active tenant: when the activation ends and its unwrapped versions."""

    __slots__ = ("keys", "until")

    def __init__(self, until: int, keys: dict[int, _Held]) -> None:
        self.until = until
        self.keys = keys

    def wipe(self) -> None:
        for held in self.keys.values():
            held.wipe()
        self.keys.clear()

    def __repr__(self) -> str:
        return f"<activation until {self.until}: versions {sorted(self.keys)}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("an activation cannot be pickled")


class TenantKeyring:
    """The unwrapped tenant keys, per active tenant, in memory only.

    Not thread-safe on its own: `KeyCustody` calls it under its lock.
    """

    __slots__ = ("_active",)

    def __init__(self) -> None:
        self._active: dict[str, _Activation] = {}

    def activate(self, tenant: str, until: int, keys: Mapping[int, SecretBytes]) -> None:
        """Hold `keys` for `tenant` until `until`; a previous activation is wiped."""
        old = self._active.pop(tenant, None)
        if old is not None:
            old.wipe()
        try:
            held = {version: _Held(tenant, version, key) for version, key in keys.items()}
        except BaseException:
            for key in keys.values():
                key.wipe()
            raise
        self._active[tenant] = _Activation(until, held)

    def add_version(self, tenant: str, version: int, key: SecretBytes) -> bool:
        """Add a new version to an active tenant; otherwise wipe `key`. True if kept."""
        activation = self._active.get(tenant)
        if activation is None:
            key.wipe()
            return False
        try:
            held = _Held(tenant, version, key)
        except BaseException:
            key.wipe()
            raise
        old = activation.keys.pop(version, None)
        if old is not None:
            old.wipe()
        activation.keys[version] = held
        return True

    def drop_version(self, tenant: str, version: int) -> None:
        """Wipe one version of an active tenant (disable-version)."""
        activation = self._active.get(tenant)
        if activation is not None:
            held = activation.keys.pop(version, None)
            if held is not None:
                held.wipe()

    def deactivate(self, tenant: str) -> bool:
        """Wipe a tenant's activation; True if it had one."""
        activation = self._active.pop(tenant, None)
        if activation is None:
            return False
        activation.wipe()
        return True

    def expire(self, now: int) -> list[str]:
        """Wipe every activation that ended at or before `now`; the tenants wiped."""
        ended = [t for t, a in self._active.items() if now >= a.until]
        for tenant in ended:
            self.deactivate(tenant)
        return ended

    def wipe_all(self) -> None:
        for tenant in list(self._active):
            self.deactivate(tenant)

    def active(self, now: int) -> dict[str, int]:
        """Tenant -> activation end, for the activations still open at `now`."""
        return {t: a.until for t, a in self._active.items() if now < a.until}

    def key(self, tenant: str, version: int, now: int) -> TenantKey:
        """A copy of one unwrapped version (the caller wipes it); StateError if not held.

        The copy carries the version's prepared cipher (`TenantKey.cipher`).
        """
        return self._held(tenant, version, now).copy()

    def held_versions(self, tenant: str) -> dict[int, HeldKey]:
        """The held versions of `tenant` themselves (no copies), for the data-plane snapshot.

        The data plane needs only each version's cipher (and the C wire
        codec a view): one less copy of key material per call.
        """
        activation = self._active.get(tenant)
        return {} if activation is None else dict(activation.keys)

    def _held(self, tenant: str, version: int, now: int) -> _Held:
        activation = self._active.get(tenant)
        if activation is None or now >= activation.until:
            raise StateError(f"tenant {tenant!r} is not active")
        held = activation.keys.get(version)
        if held is None:
            raise StateError(f"version {version} of tenant {tenant!r} is not usable")
        return held

    def buffers_for_test(self, tenant: str) -> list[bytearray]:
        """The buffers held for `tenant`, so tests can check that wiping zeroes them."""
        activation = self._active.get(tenant)
        if activation is None:
            return []
        return [h.key.buffer_for_test() for h in activation.keys.values()]

    def ciphers_for_test(self) -> list[aead.Cipher]:
        """Every prepared cipher the keyring holds, so tests can check they go with the keys."""
        return [h.cipher for a in self._active.values() for h in a.keys.values()]

    def __repr__(self) -> str:
        return f"<TenantKeyring: {len(self._active)} active tenants>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a TenantKeyring cannot be pickled")
