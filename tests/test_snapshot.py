"""`DataPlaneSnapshot.decides_as`: when the worker pool may skip a snapshot.

It may only when no call could get another answer: every field the data
plane reads is equal and each held key is the very same object. Each case
below changes one such field and must not decide as the original.
"""

from __future__ import annotations

import dataclasses

import pytest

from keyquorum.hsm.dataplane.snapshot import DataPlaneSnapshot, TenantAccess
from keyquorum.quorum import aead
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.secret import SecretBytes


class Held:
    def __init__(self, key: bytes) -> None:
        self._key = SecretBytes(key, label="test key")
        self.cipher = aead.Cipher(self._key)

    def view(self) -> memoryview:
        return self._key.view()


KEY = Held(bytes(32))
TENANT = TenantAccess(
    versions=2,
    current=2,
    active_until=2_000_000_000,
    destroyed=False,
    disabled=frozenset({1}),
    held={2: KEY},
    shredded_grants=frozenset(),
)
BASE = DataPlaneSnapshot(
    generation=3,
    sealed=False,
    log_size=40,
    grants=frozenset({("keyquorum://backend/booking", "acme")}),
    tenants={"acme": TENANT},
    limits=DEFAULT_LIMITS,
)


def with_tenant(**changes: object) -> DataPlaneSnapshot:
    return dataclasses.replace(BASE, tenants={"acme": dataclasses.replace(TENANT, **changes)})


def test_only_the_log_size_differs() -> None:
    later = dataclasses.replace(BASE, log_size=41, tenants={"acme": dataclasses.replace(TENANT)})
    assert later.decides_as(BASE)
    assert BASE.decides_as(later)


@pytest.mark.parametrize(
    "changed",
    [
        dataclasses.replace(BASE, generation=4),
        dataclasses.replace(BASE, sealed=True),
        dataclasses.replace(BASE, grants=frozenset()),
        dataclasses.replace(BASE, limits=dataclasses.replace(DEFAULT_LIMITS, max_batch_items=5)),
        dataclasses.replace(BASE, tenants={}),
        dataclasses.replace(BASE, tenants={"acme": TENANT, "other": TENANT}),
        with_tenant(versions=3),
        with_tenant(current=1),
        with_tenant(active_until=None),
        with_tenant(active_until=2_000_000_001),
        with_tenant(destroyed=True),
        with_tenant(disabled=frozenset()),
        with_tenant(shredded_grants=frozenset({"keyquorum://backend/booking"})),
        with_tenant(held={}),
        with_tenant(held={2: KEY, 1: KEY}),
        # The same bytes in another object: the original may have been wiped.
        with_tenant(held={2: Held(bytes(32))}),
    ],
    ids=[
        "generation",
        "sealed",
        "grants",
        "limits",
        "no tenant",
        "another tenant",
        "versions",
        "current",
        "deactivated",
        "activation end",
        "destroyed",
        "disabled",
        "shredded grants",
        "no key held",
        "another version held",
        "another key object",
    ],
)
def test_any_field_a_call_reads_makes_it_another_snapshot(changed: DataPlaneSnapshot) -> None:
    assert not changed.decides_as(BASE)
    assert not BASE.decides_as(changed)
