"""The prepared AES-GCM keys: one per held tenant key version, gone when the key is wiped.

`aead.Cipher` against the one-shot `aead.encrypt`/`decrypt` (same bytes,
same refusals), and `TenantKeyring`'s cache of them: made at activation,
handed out with each key copy, closed in the same step as every wipe
(deactivation, expiry, disable, replacement, seal), after which the cache
holds nothing for that version and no copy taken before can encrypt or
decrypt any more.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest

from keyquorum.hsm.daemon.tenant_keys import TenantKey, TenantKeyring
from keyquorum.quorum import aead
from keyquorum.quorum.errors import DecryptionError, InvalidInputError, StateError
from keyquorum.quorum.secret import SecretBytes

KEY = bytes(range(32))
NONCE = bytes(range(12))
AAD = b"keyquorum/v1/data\x00header"
NOW = 1_000


def secret(fill: int = 1) -> SecretBytes:
    return SecretBytes(bytes([fill]) * 32, label="test tenant key")


# -- aead.Cipher ---------------------------------------------------------------------


def test_cipher_gives_the_one_shot_bytes_and_opens_them() -> None:
    cipher = aead.Cipher(SecretBytes(KEY))
    sealed = cipher.encrypt(NONCE, b"data key", AAD)
    assert sealed == aead.encrypt(KEY, NONCE, b"data key", AAD)
    assert cipher.decrypt(NONCE, sealed, AAD) == bytearray(b"data key")
    assert aead.decrypt(KEY, NONCE, sealed, AAD) == bytearray(b"data key")


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.decrypt(NONCE, b"\x00" * 24, AAD), DecryptionError, "did not authenticate"),
        (lambda c: c.decrypt(NONCE, b"\x00" * 15, AAD), DecryptionError, "shorter"),
        (lambda c: c.encrypt(NONCE[:11], b"x", AAD), InvalidInputError, "12 bytes"),
        (lambda c: c.decrypt(NONCE + b"\x00", b"\x00" * 16, AAD), InvalidInputError, "12 bytes"),
    ],
    ids=["bad-tag", "short-ciphertext", "short-nonce-encrypt", "long-nonce-decrypt"],
)
def test_cipher_refuses_as_the_one_shot_functions_do(
    call: Callable[[aead.Cipher], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call(aead.Cipher(SecretBytes(KEY)))


@pytest.mark.parametrize(
    ("key", "error"),
    [(SecretBytes(bytes(16)), InvalidInputError), (KEY, InvalidInputError)],
    ids=["16-byte-key", "plain-bytes"],
)
def test_cipher_takes_only_a_32_byte_secret(key: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        aead.Cipher(key)  # type: ignore[arg-type]


def test_closed_cipher_refuses_use_and_shows_nothing() -> None:
    cipher = aead.Cipher(SecretBytes(KEY))
    sealed = cipher.encrypt(NONCE, b"x", AAD)
    assert KEY.hex() not in repr(cipher)
    cipher.close()
    assert cipher.closed
    uses = (
        lambda: cipher.encrypt(NONCE, b"x", AAD),
        lambda: cipher.decrypt(NONCE, sealed, AAD),
    )
    for use in uses:
        with pytest.raises(StateError, match="wiped"):
            use()
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            attempt(aead.Cipher(SecretBytes(KEY)))


def test_cipher_reads_the_owners_buffer_which_still_wipes_in_place() -> None:
    """The cipher holds a view of the owner's buffer, not a copy; the owner's wipe still works.

    (A view pins the bytearray's size: a wipe that resized it would raise
    BufferError here.)
    """
    key = SecretBytes(KEY)
    cipher = aead.Cipher(key)
    buf = key.buffer_for_test()
    key.wipe()
    assert buf == bytearray(32)
    cipher.close()


# -- the keyring's cache -------------------------------------------------------------


def keyring() -> TenantKeyring:
    ring = TenantKeyring()
    ring.activate("acme", NOW + 100, {1: secret(1), 2: secret(2)})
    ring.activate("other", NOW + 10, {1: secret(3)})
    return ring


def test_one_cipher_per_held_version_and_copies_carry_it() -> None:
    ring = keyring()
    assert len(ring.ciphers_for_test()) == 3
    copy_ = ring.key("acme", 2, NOW)
    assert isinstance(copy_, TenantKey)
    assert copy_.cipher() in ring.ciphers_for_test()
    assert copy_.cipher() is ring.key("acme", 2, NOW).cipher()
    sealed = copy_.cipher().encrypt(NONCE, b"x", AAD)
    assert sealed == aead.encrypt(bytes([2]) * 32, NONCE, b"x", AAD)
    # Wiping the copy lets go of the cipher but does not close the keyring's.
    held = copy_.cipher()
    copy_.wipe()
    with pytest.raises(StateError):
        copy_.cipher()
    assert not held.closed
    assert ring.key("acme", 2, NOW).cipher().encrypt(NONCE, b"x", AAD) == sealed


WIPES: dict[str, tuple[Callable[[TenantKeyring], object], list[tuple[str, int]]]] = {
    "deactivate": (lambda r: r.deactivate("acme"), [("acme", 1), ("acme", 2)]),
    "expire": (lambda r: r.expire(NOW + 10), [("other", 1)]),
    "drop-version": (lambda r: r.drop_version("acme", 1), [("acme", 1)]),
    "seal-wipe-all": (lambda r: r.wipe_all(), [("acme", 1), ("acme", 2), ("other", 1)]),
    "re-activate": (
        lambda r: r.activate("acme", NOW + 100, {3: secret(9)}),
        [("acme", 1), ("acme", 2)],
    ),
    "replace-version": (lambda r: r.add_version("acme", 2, secret(7)), [("acme", 2)]),
}


@pytest.mark.parametrize("how", list(WIPES), ids=list(WIPES))
def test_every_wipe_closes_and_drops_the_cipher(how: str) -> None:
    ring = keyring()
    wipe, gone = WIPES[how]
    before = {(t, v): ring.key(t, v, NOW) for t, v in [("acme", 1), ("acme", 2), ("other", 1)]}
    ciphers = {place: c.cipher() for place, c in before.items()}
    # What the data plane holds during a call: the version itself and a view of it.
    lent = {(t, v): ring.held_versions(t)[v] for t, v in before}
    views = {place: h.view() for place, h in lent.items()}
    wipe(ring)
    held = ring.ciphers_for_test()
    for place, cipher in ciphers.items():
        assert lent[place].cipher is cipher
        if place in gone:
            assert cipher.closed
            assert bytes(views[place]) == bytes(32)  # zeroed where C would read it
            with pytest.raises(StateError, match="wiped"):
                lent[place].view()
            assert cipher not in held
            with pytest.raises(StateError, match="wiped"):
                before[place].cipher()  # a copy taken before the wipe is useless now
            with pytest.raises(StateError, match="wiped"):
                cipher.encrypt(NONCE, b"x", AAD)
        else:
            assert not cipher.closed
            assert cipher in held
            assert before[place].cipher().encrypt(NONCE, b"x", AAD)
            assert bytes(views[place]) == bytes(before[place].view())
    # New calls cannot get the wiped versions at all.
    for tenant, version in gone:
        if how == "replace-version":  # the new key of that version, with its own cipher
            assert ring.key(tenant, version, NOW).cipher() is not ciphers[(tenant, version)]
            continue
        with pytest.raises(StateError):
            ring.key(tenant, version, NOW)
        assert version not in ring.held_versions(tenant)


def test_seal_leaves_the_cache_empty() -> None:
    ring = keyring()
    ciphers = ring.ciphers_for_test()
    ring.wipe_all()
    assert ring.ciphers_for_test() == []
    assert all(c.closed for c in ciphers)


def test_a_copy_not_made_by_a_keyring_has_no_prepared_key() -> None:
    with pytest.raises(StateError):
        TenantKey(KEY, label="stray copy").cipher()
