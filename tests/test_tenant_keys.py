"""Tenant key wrapping and the in-memory keyring (hsm/daemon/tenant_keys.py).

The wrapped form must open only under the same master key, shred salt,
tenant and version; every other combination, and every altered byte, is a
`DecryptionError` (or a `DeserializationError` for a wrong size or format),
never a wrong key. The keyring must zero every buffer it drops.
"""

from __future__ import annotations

import hashlib
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.hsm.daemon import tenant_keys
from keyquorum.hsm.daemon.tenant_keys import TenantKeyring, check_salt, unwrap, wrap
from keyquorum.quorum.errors import (
    DecryptionError,
    DeserializationError,
    InvalidInputError,
    StateError,
)
from keyquorum.quorum.kdf import hkdf_sha256
from keyquorum.quorum.secret import SecretBytes

MASTER = bytes(range(32))
SALT = bytes(range(32, 64))
KEY = bytes(range(64, 96))
NONCE = bytes(12)


def _wrap(tenant: str = "acme", version: int = 1) -> bytes:
    return wrap(SecretBytes(MASTER), SALT, tenant, version, SecretBytes(KEY), nonce=NONCE)


def test_round_trip_and_layout() -> None:
    wrapped = _wrap()
    assert len(wrapped) == tenant_keys.WRAPPED_SIZE == 61
    assert wrapped[0] == 0x01
    assert wrapped[1:13] == NONCE
    with unwrap(SecretBytes(MASTER), SALT, "acme", 1, wrapped) as key:
        assert key.reveal() == KEY
    assert KEY not in wrapped


def test_kek_is_hkdf_of_master_salt_and_place() -> None:
    """The documented derivation, byte for byte (RFC 5869 via cryptography)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    with hkdf_sha256(
        MASTER, salt=SALT, info=b"keyquorum/v1/tenant-kek" + b"acme" + (1).to_bytes(4, "big"),
        length=32,
    ) as kek:  # fmt: skip
        expected = AESGCM(kek.reveal()).encrypt(
            NONCE, KEY, b"keyquorum/v1/tenant-key\x00acme\x00" + (1).to_bytes(4, "big")
        )
    assert _wrap()[13:] == expected


@pytest.mark.parametrize(
    ("master", "salt", "tenant", "version"),
    [
        (bytes(32), SALT, "acme", 1),
        (MASTER, bytes(32), "acme", 1),
        (MASTER, SALT, "acme2", 1),
        (MASTER, SALT, "acme", 2),
    ],
    ids=["other-master-key", "other-shred-salt", "moved-to-other-tenant", "moved-to-other-version"],
)
def test_wrong_context_does_not_open(master: bytes, salt: bytes, tenant: str, version: int) -> None:
    with pytest.raises(DecryptionError, match="does not open"):
        unwrap(SecretBytes(master), salt, tenant, version, _wrap())


@settings(max_examples=60)
@given(position=st.integers(1, tenant_keys.WRAPPED_SIZE - 1), bit=st.integers(0, 7))
def test_every_flipped_bit_is_refused(position: int, bit: int) -> None:
    altered = bytearray(_wrap())
    altered[position] ^= 1 << bit
    with pytest.raises(DecryptionError):
        unwrap(SecretBytes(MASTER), SALT, "acme", 1, bytes(altered))


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (b"\x02" + _wrap()[1:], DeserializationError, "format 0x02"),
        (_wrap()[:-1], DeserializationError, "60 bytes"),
        (_wrap() + b"\x00", DeserializationError, "62 bytes"),
        (b"", DeserializationError, "0 bytes"),
    ],
    ids=["unknown-format", "truncated", "extended", "empty"],
)
def test_malformed_wrapped_keys(data: bytes, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        unwrap(SecretBytes(MASTER), SALT, "acme", 1, data)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tenant": "Acme"}, "valid tenant"),
        ({"tenant": "a\x00b"}, "valid tenant"),
        ({"version": 0}, "version"),
        ({"version": True}, "version"),
        ({"salt": b"short"}, "shred salt must be 32"),
        ({"master": b"x" * 31}, "master key must be 32"),
    ],
    ids=[
        "uppercase-tenant",
        "nul-in-tenant",
        "version-0",
        "bool-version",
        "short-salt",
        "short-master",
    ],
)
def test_preconditions(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"master": MASTER, "salt": SALT, "tenant": "acme", "version": 1}
    args.update(kwargs)
    with pytest.raises(InvalidInputError, match=match):
        wrap(
            SecretBytes(args["master"]),  # type: ignore[arg-type]
            args["salt"],  # type: ignore[arg-type]
            args["tenant"],  # type: ignore[arg-type]
            args["version"],  # type: ignore[arg-type]
            SecretBytes(KEY),
            nonce=NONCE,
        )


def test_salt_is_checked_against_the_logged_hash() -> None:
    digest = hashlib.sha256(SALT).digest()
    assert check_salt(SALT, digest, "acme", 1) == SALT
    with pytest.raises(StateError, match="no shred salt"):
        check_salt(None, digest, "acme", 1)
    with pytest.raises(StateError, match="does not match"):
        check_salt(bytes(32), digest, "acme", 1)


def test_keyring_wipes_what_it_drops() -> None:
    ring = TenantKeyring()
    keys = {v: SecretBytes(bytes([v]) * 32) for v in (1, 2)}
    ring.activate("acme", 100, keys)
    held = ring.buffers_for_test("acme")
    with ring.key("acme", 2, 99) as copy:
        assert copy.reveal() == b"\x02" * 32
    # A copy is independent: wiping it leaves the held key intact.
    assert held[1] == bytearray(b"\x02" * 32)
    ring.drop_version("acme", 1)
    assert held[0] == bytearray(32)
    with pytest.raises(StateError, match="version 1"):
        ring.key("acme", 1, 99)
    kept = ring.add_version("acme", 3, SecretBytes(b"\x03" * 32))
    assert kept
    dropped = SecretBytes(b"\x04" * 32)
    assert not ring.add_version("other", 1, dropped)
    assert dropped.buffer_for_test() == bytearray(32)
    with pytest.raises(StateError, match="not active"):
        ring.key("acme", 2, 100)
    assert ring.expire(100) == ["acme"]
    assert all(b == bytearray(32) for b in held)
    assert ring.active(0) == {}


def test_keyring_seal_and_repr() -> None:
    ring = TenantKeyring()
    ring.activate("a", 10, {1: SecretBytes(b"\x05" * 32)})
    ring.activate("b", 10, {1: SecretBytes(b"\x06" * 32)})
    buffers = ring.buffers_for_test("a") + ring.buffers_for_test("b")
    # Re-activating replaces and wipes the old activation.
    ring.activate("b", 20, {1: SecretBytes(b"\x07" * 32)})
    assert buffers[1] == bytearray(32)
    assert repr(ring) == "<TenantKeyring: 2 active tenants>"
    with pytest.raises(TypeError):
        pickle.dumps(ring)
    ring.wipe_all()
    assert buffers[0] == bytearray(32)
    assert ring.active(0) == {}
