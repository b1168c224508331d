"""Log entries: one canonical byte form, strict decoding, no secret in any payload."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from keyquorum.quorum import canonical
from keyquorum.quorum.errors import (
    DeserializationError,
    InvalidInputError,
    UnsupportedVersionError,
)
from keyquorum.quorum.log import (
    ENTRY_TYPES,
    GENESIS_PREV,
    Entry,
    SealPayload,
    ShredPayload,
    entry_hash,
    next_entry,
    share_info,
)
from keyquorum.quorum.merkle import leaf_hash
from keyquorum.quorum.replay import replay
from tests.logfactory import LogFactory, custodians, standard_log

C = custodians(5)


@pytest.fixture(scope="module")
def log() -> LogFactory:
    return standard_log()


def _by_type(log: LogFactory) -> dict[str, dict[str, Any]]:
    """The first entry of each type, as a JSON object to mutate."""
    out: dict[str, dict[str, Any]] = {}
    for raw in log.entries:
        obj = json.loads(raw)
        out.setdefault(obj["type"], obj)
    return out


def test_entry_hash_is_the_rfc9162_leaf_hash(log: LogFactory) -> None:
    for raw in log.entries[:5]:
        assert entry_hash(raw) == leaf_hash(raw)
    for before, after in zip(log.entries, log.entries[1:], strict=False):
        assert Entry.from_bytes(after).prev == entry_hash(before)
    assert Entry.from_bytes(log.entries[0]).prev == GENESIS_PREV == bytes(32)


def handed_over() -> LogFactory:
    """A replica unsealed, then its state handed to a new process (standard_log has none)."""
    f = LogFactory()
    f.tick()
    f.unseal("replica-a", f.creds[: f.k])
    f.tick()
    f.handover("replica-a")
    return f


def test_payloads_round_trip_through_json(log: LogFactory) -> None:
    seen = set()
    for raw in [*log.entries, handed_over().entries[-1]]:
        entry = Entry.from_bytes(raw)
        again = type(entry.payload).from_json(entry.payload.to_json())
        assert again == entry.payload
        assert canonical.encode(entry.to_json()) == raw
        seen.add(entry.type)
    assert seen == set(ENTRY_TYPES)


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(obj: dict[str, Any]) -> None:
        keys = path.split(".")
        target: Any = obj
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if value is _DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return change


_DELETE = object()

# (id, entry type to start from, change, expected error class, message)
MALFORMED: list[tuple[str, str, Callable[[dict[str, Any]], None], type[Exception], str]] = [
    ("version-2", "proposal", _set("v", 2), UnsupportedVersionError, "version"),
    ("version-missing", "proposal", _set("v", _DELETE), DeserializationError, "missing v"),
    ("extra-envelope-field", "proposal", _set("note", "x"), DeserializationError, "unknown field"),
    ("seq-negative", "proposal", _set("seq", -1), DeserializationError, "outside"),
    ("seq-bool", "proposal", _set("seq", True), DeserializationError, "integer"),
    ("seq-string", "proposal", _set("seq", "7"), DeserializationError, "integer"),
    ("seq-float", "proposal", _set("seq", 7.5), DeserializationError, "integer"),
    ("time-beyond-9999", "proposal", _set("time", 253_402_300_800), DeserializationError,
     "outside"),
    ("prev-short", "proposal", _set("prev", "00" * 31), DeserializationError, "32 bytes"),
    ("prev-uppercase", "proposal", _set("prev", "AB" * 32), DeserializationError, "lowercase"),
    ("prev-odd-length", "proposal", _set("prev", "0" * 63), DeserializationError, "whole bytes"),
    ("type-unknown", "proposal", _set("type", "backdoor"), DeserializationError,
     "unknown entry type"),
    ("type-not-matching-payload", "proposal", _set("type", "shred"), DeserializationError,
     "missing log_signature, tenant"),
    ("payload-not-object", "proposal", _set("payload", []), DeserializationError, "object"),
    ("payload-extra-field", "proposal", _set("payload.secret", "00"), DeserializationError,
     "unknown field secret"),
    ("proposal-unknown-operation", "proposal", _set("payload.operation", "export-master"),
     DeserializationError, "unknown operation"),
    ("proposal-tenant-uppercase", "proposal", _set("payload.parameters.tenant", "Tenant"),
     DeserializationError, "not a valid name"),
    ("proposal-extra-parameter", "proposal", _set("payload.parameters.force", 1),
     DeserializationError, "unknown field force"),
    ("proposal-id-15-bytes", "proposal", _set("payload.id", "00" * 15), DeserializationError,
     "16 bytes"),
    ("proposer-not-a-fingerprint", "proposal", _set("payload.proposer", "a\nb"),
     DeserializationError, "not lowercase hex"),
    ("proposal-unsigned", "proposal", _set("payload.signature", _DELETE), DeserializationError,
     "missing signature"),
    ("shred-log-signature-short", "shred", _set("payload.log_signature", "00" * 63),
     DeserializationError, "expected 64 bytes"),
    ("custodian-seal-with-log-signature", "seal", _set("payload.log_signature", "00" * 64),
     DeserializationError, "carries no log_signature"),
    ("approval-signature-truncated", "approval", _set("payload.signature", "00" * 100),
     DeserializationError, "hybrid signature"),
    ("approval-custodian-short", "approval", _set("payload.custodian", "ab" * 31),
     DeserializationError, "32 bytes"),
    ("seal-signature-without-custodian", "seal", _set("payload.custodian", None),
     DeserializationError, "null exactly when"),
    ("reset-discarded-twice", "unseal-reset",
     _set("payload.discarded", ["ab" * 32, "ab" * 32]), DeserializationError, "distinct"),
    ("reset-discarded-unsorted", "unseal-reset",
     _set("payload.discarded", ["cd" * 32, "ab" * 32]), DeserializationError, "sorted"),
    ("reset-unsigned", "unseal-reset", _set("payload.signature", _DELETE),
     DeserializationError, "missing signature"),
    ("unseal-no-shares", "unseal", _set("payload.shares", []), DeserializationError, "0 items"),
    ("unseal-session-log-size-zero", "unseal", _set("payload.session_log_size", 0),
     DeserializationError, "outside"),
    ("execution-result-missing-field", "execution", _set("payload.result.wrapped_key", _DELETE),
     DeserializationError, "missing wrapped_key"),
    ("execution-salt-hash-short", "execution", _set("payload.result.shred_salt_sha256", "00"),
     DeserializationError, "32 bytes"),
    ("genesis-threshold-above-roster", "genesis", _set("payload.threshold", 6),
     DeserializationError, "outside"),
    ("genesis-threshold-one", "genesis", _set("payload.threshold", 1), DeserializationError,
     "outside"),
    ("genesis-policy-zero", "genesis", _set("payload.policy.destroy_wait_seconds", 0),
     DeserializationError, "outside"),
    ("genesis-share-for-other-custodian", "genesis",
     _set("payload.encrypted_shares.0.custodian", "00" * 32), DeserializationError,
     "not for custodian 0"),
    ("genesis-share-index-order", "genesis", _set("payload.encrypted_shares.0.index", 2),
     DeserializationError, "expected 1"),
    ("confirm-index-zero", "confirm", _set("payload.index", 0), DeserializationError, "outside"),
    ("shred-tenant-too-long", "shred", _set("payload.tenant", "a" * 64), DeserializationError,
     "not a valid name"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("start", "change", "error", "message"),
    [m[1:] for m in MALFORMED],
    ids=[m[0] for m in MALFORMED],
)
def test_malformed_entry_is_refused(
    log: LogFactory,
    start: str,
    change: Callable[[dict[str, Any]], None],
    error: type[Exception],
    message: str,
) -> None:
    obj = json.loads(json.dumps(_by_type(log)[start]))
    change(obj)
    raw = canonical.encode(obj)
    with pytest.raises(error, match=message):
        Entry.from_bytes(raw)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda raw: raw.replace(b'"seq":', b'"seq": ', 1),
        lambda raw: raw + b"\n",
        lambda raw: b'{"v":1,' + raw[1:].replace(b',"v":1}', b"}"),
        lambda raw: raw[:-1],
        lambda raw: raw.replace(b'"v":1', b'"v":1.0'),
        lambda raw: raw.replace(b'"type":"proposal"', b'"type":"proposal","type":"proposal"'),
    ],
    ids=[
        "whitespace",
        "trailing-newline",
        "keys-unsorted",
        "truncated",
        "float-v",
        "duplicate-key",
    ],
)
def test_non_canonical_bytes_are_refused(log: LogFactory, mutate: Callable[[bytes], bytes]) -> None:
    raw = next(r for r in log.entries if b'"type":"proposal"' in r)
    with pytest.raises(DeserializationError):
        Entry.from_bytes(mutate(raw))


def test_not_bytes_is_refused() -> None:
    with pytest.raises(DeserializationError, match="bytes"):
        Entry.from_bytes("{}")  # type: ignore[arg-type]


def test_share_info_binds_every_field() -> None:
    base = ("acme-prod", b"\x01" * 16, "ab" * 32, 3)
    info = share_info(*base)
    assert info == (
        b"keyquorum/v1/share-encryption\0"
        b'{"deployment":"acme-prod","fingerprint":"' + b"ab" * 32 + b'","index":3,'
        b'"split_id":"' + b"01" * 16 + b'"}'
    )
    variants = [
        ("acme-test", *base[1:]),
        (base[0], b"\x02" * 16, *base[2:]),
        (*base[:2], "cd" * 32, base[3]),
        (*base[:3], 4),
    ]
    assert len({share_info(*v) for v in variants} | {info}) == 5  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "args",
    [
        ("Acme", b"\x01" * 16, "ab" * 32, 1),
        ("acme", b"\x01" * 15, "ab" * 32, 1),
        ("acme", b"\x01" * 16, "AB" * 32, 1),
        ("acme", b"\x01" * 16, "ab" * 32, 0),
        ("acme", b"\x01" * 16, "ab" * 32, 256),
    ],
    ids=["deployment-uppercase", "split-id-short", "fingerprint-uppercase", "index-0", "index-256"],
)
def test_share_info_refuses_bad_input(args: tuple[str, bytes, str, int]) -> None:
    with pytest.raises((InvalidInputError, DeserializationError)):
        share_info(*args)


def test_next_entry_links_and_refuses_going_back(log: LogFactory) -> None:
    f = LogFactory()
    raw = next_entry(f.state, "shred", ShredPayload("t1"), f.time)
    entry = Entry.from_bytes(raw)
    assert entry.seq == f.state.size == 1
    assert entry.prev == entry_hash(f.entries[0])
    with pytest.raises(InvalidInputError, match="before the last"):
        next_entry(f.state, "shred", ShredPayload("t1"), f.time - 1)
    with pytest.raises(InvalidInputError, match="genesis"):
        next_entry(f.state, "genesis", f.make_genesis(), f.time)
    with pytest.raises(InvalidInputError, match="genesis"):
        next_entry(None, "shred", ShredPayload("t1"), f.time)
    with pytest.raises(InvalidInputError, match="not a seal"):
        next_entry(f.state, "seal", ShredPayload("t1"), f.time)


def test_seal_payload_refuses_signature_without_custodian() -> None:
    with pytest.raises(InvalidInputError):
        SealPayload("r1", None, "x", 0, b"\x00")


def test_no_secret_reaches_the_log() -> None:
    """Master keys, share plaintexts and shred salts never appear in the log's bytes."""
    f = LogFactory(seed=b"secrets")
    secrets = f.recorded_secrets
    f.run("create-tenant", tenant="t1")
    f.run("change-roster", roster=",".join(c.fingerprint for c in custodians(6)[1:]), threshold=3)
    blob = b"".join(f.entries)
    assert len(secrets) >= 2 * (1 + 5)  # two master keys, their ten shares
    for secret in secrets:
        assert secret.hex().encode() not in blob
        assert secret not in blob
    assert replay(f.entries) == f.state
