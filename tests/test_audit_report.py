"""The export format and the offline audit over factory-built logs (no daemon).

Every tamper case of issue 8 item 3 is a named case pinning the error class
and the entry it names. The daemon-made export is in tests/test_audit_daemon.py;
here the log comes from tests/logfactory.py (real signatures, every entry
type), with a checkpoint for every size as the daemon writes them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from functools import cache

import pytest

from keyquorum.quorum import canonical, export
from keyquorum.quorum.audit_html import render_html
from keyquorum.quorum.audit_report import Report, audit
from keyquorum.quorum.audit_text import render_text
from keyquorum.quorum.checkpoint import NoteSigner, cosign_checkpoint
from keyquorum.quorum.errors import (
    DeserializationError,
    ForkError,
    KeyquorumError,
    LogIntegrityError,
    ThresholdError,
    UnverifiedNoteError,
)
from keyquorum.quorum.log import Entry, ExecutionPayload
from keyquorum.quorum.merkle import CompactRange, leaf_hash
from keyquorum.quorum.note import SignatureType
from keyquorum.quorum.people import label
from tests.logfactory import (
    DEPLOYMENT,
    Counter,
    LogFactory,
    custodians,
    log_signer,
    next_log_signer,
    resigned,
    standard_log,
)

LOG_KEY = log_signer().verifier_key()


@cache
def _factory() -> LogFactory:
    return standard_log()


@cache
def _other() -> LogFactory:
    """Another log of the same deployment and log key: a rewritten history."""
    f = LogFactory(seed=b"other history")
    for cred in f.creds:
        f.confirm(cred)
    f.unseal("replica-b", f.creds[: f.k])
    return f


def _notes(f: LogFactory) -> list[str]:
    return [f.checkpoint(n) for n in range(1, len(f.entries) + 1)]


def _file(entries: list[bytes], notes: list[str]) -> list[bytes]:
    return list(export.produce(entries, notes))


def _audit(lines: list[bytes], **kw: object) -> Report:
    return audit(export.parse(lines), **kw)  # type: ignore[arg-type]


def _sign(entries: list[bytes], size: int, signer: NoteSigner | None = None) -> str:
    tree = CompactRange()
    for raw in entries[:size]:
        tree.append(leaf_hash(raw))
    return (signer or log_signer()).sign_checkpoint(size, tree.root())


def _rechain(entries: list[bytes], start: int) -> list[bytes]:
    """Entries with every `prev` from `start` on recomputed, and the daemon's
    entries re-signed: the re-link of an attacker who holds the log key."""
    out = list(entries)
    for i in range(start, len(out)):
        obj = json.loads(out[i])
        obj["prev"] = leaf_hash(out[i - 1]).hex()
        out[i] = resigned(canonical.encode(obj))
    return out


def test_a_valid_export_verifies_and_reports_who_did_what() -> None:
    f = _factory()
    report = _audit(_file(f.entries, _notes(f)), log_key=LOG_KEY)
    assert report.verdict == "verified"
    assert (report.entries, report.covered) == (len(f.entries), len(f.entries))
    assert report.log_key_pinned
    assert report.rosters[0].threshold == 3
    assert len(report.confirmations) == 5
    assert [m.name for m in report.unseals[0].custodians] == [
        "custodian 0",
        "custodian 1",
        "custodian 2",
    ]
    assert [s.by.name if s.by else None for s in report.seals] == ["custodian 1", None]
    rotate = next(p for p in report.proposals if p.operation == "rotate-tenant")
    assert [v.custodian.name for v in rotate.refusals] == ["custodian 4"]
    assert len(rotate.approvals) == 3
    assert rotate.outcome == "executed"
    assert "operation: rotate-tenant" in rotate.statement
    tenants = {t.name: t for t in report.tenants}
    assert tenants["tenant-2"].state == "destroyed (shredded)"
    assert [(g.tenant, g.ended) for g in report.grants] == [
        ("tenant-0", None),
        ("tenant-1", "revoked"),
        ("tenant-2", "tenant shredded"),
    ]
    text = render_text(report)
    assert "REFUSED by custodian 4" in text
    assert f"{len(f.entries)} checkpoint(s), tree sizes 1..{len(f.entries)}" in text


def test_same_file_gives_the_same_report_twice() -> None:
    f = _factory()
    lines = _file(f.entries, _notes(f))
    first, second = _audit(lines), _audit(lines)
    assert first == second
    assert render_text(first) == render_text(second)
    assert json.dumps(first.to_json()) == json.dumps(second.to_json())
    assert not first.log_key_pinned
    assert "NOT pinned" in render_text(first)


def test_export_bytes_are_deterministic_and_round_trip() -> None:
    f = _factory()
    notes = _notes(f)
    assert _file(f.entries, notes) == _file(f.entries, notes)
    parsed = export.parse(_file(f.entries, notes))
    assert parsed.entries == tuple(f.entries)
    assert parsed.checkpoints == tuple(notes)


# -- tamper cases (issue 8, item 3) -------------------------------------------------

Tamper = Callable[[list[bytes], list[str]], tuple[list[bytes], list[str]]]


def _edit_time(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    out = list(entries)
    obj = json.loads(out[20])
    obj["time"] += 1
    out[20] = canonical.encode(obj)
    return out, notes


def _edit_and_relink(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    """Rewrite the wrapped key an execution logged and re-link every later entry,
    re-signing the daemon's entries with the log key: only the roots tell."""
    out = list(entries)
    seq = next(
        i
        for i, raw in enumerate(out)
        if isinstance(Entry.from_bytes(raw).payload, ExecutionPayload)
        and Entry.from_bytes(raw).payload.operation == "create-tenant"  # type: ignore[union-attr]
    )
    obj = json.loads(out[seq])
    obj["payload"]["result"]["wrapped_key"] = "ab" * 60
    out[seq] = resigned(canonical.encode(obj))
    return _rechain(out, seq + 1), notes


def _delete(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    return entries[:30] + entries[31:], notes


def _insert(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    return [*entries[:31], entries[30], *entries[31:]], notes


def _reorder(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    out = list(entries)
    out[40], out[41] = out[41], out[40]
    return out, notes


def _truncate(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    return entries[:-3], notes


def _foreign_key(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    forger = NoteSigner.generate(DEPLOYMENT, random_bytes=Counter(b"forger"))
    return entries, [*notes[:-1], _sign(entries, len(entries), forger)]


def _fork(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    other = _other()
    return entries, sorted([*notes, other.checkpoint(8)], key=lambda n: int(n.split("\n")[1]))


def _stripped_relinked(entries: list[bytes], notes: list[str]) -> tuple[list[bytes], list[str]]:
    """Edited and re-linked, checkpoints re-signed: only the log key could do that."""
    tampered, _ = _edit_and_relink(entries, notes)
    return tampered, [_sign(tampered, n) for n in range(1, len(tampered) + 1)]


CASES: list[tuple[str, Tamper, type[KeyquorumError], int | None, str]] = [
    (
        "edited-entry",
        _edit_time,
        LogIntegrityError,
        20,
        r"damaged: its bytes are not the ones that were logged \(the checkpoint of size 21 "
        r"signed by the log key has another root; entry 21 records another hash of it\)",
    ),
    (
        "edited-and-relinked",
        _edit_and_relink,
        LogIntegrityError,
        11,
        r"entry 11: damaged: .*checkpoint of size 12 .* another root\); as it stands it reads: "
        r"an execution at 2026-11-25 ",
    ),
    ("deleted-entry", _delete, LogIntegrityError, 30, "sequence number 31, expected 30"),
    ("inserted-entry", _insert, LogIntegrityError, 31, "sequence number 30, expected 31"),
    ("reordered-entries", _reorder, LogIntegrityError, 40, "sequence number 41, expected 40"),
    ("truncated", _truncate, LogIntegrityError, 73, "truncated"),
    (
        "checkpoint-by-another-key",
        _foreign_key,
        UnverifiedNoteError,
        None,
        "checkpoint 76 of the export does not check",
    ),
    ("fork-same-size-two-roots", _fork, ForkError, None, "fork"),
]


@pytest.mark.parametrize(
    ("tamper", "error", "seq", "match"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_tampered_export_is_refused_naming_the_first_bad_entry(
    tamper: Tamper, error: type[KeyquorumError], seq: int | None, match: str
) -> None:
    f = _factory()
    entries, notes = tamper(list(f.entries), _notes(f))
    with pytest.raises(error, match=match) as info:
        _audit(_file(entries, notes), log_key=LOG_KEY)
    if seq is not None:
        assert isinstance(info.value, LogIntegrityError)
        assert info.value.seq == seq
        assert str(info.value).startswith(f"entry {seq}:")


def _flip_time_digit(raw: bytes) -> bytes:
    """The demo's tamper: one bit of a digit of `time`, still canonical JSON."""
    out = bytearray(raw)
    at = out.index(b'"time":') + len(b'"time":') + 3
    out[at] ^= 0x01
    return bytes(out)


def _approval_seq(f: LogFactory) -> int:
    return next(i for i, raw in enumerate(f.entries) if Entry.from_bytes(raw).type == "approval")


@pytest.mark.parametrize("checkpoints", ["every-size", "only-the-last", "none-after-it"], ids=str)
def test_a_flipped_byte_is_described_as_damage_not_as_what_it_now_means(
    checkpoints: str,
) -> None:
    """A time moved by days makes an approval look late ("expired"): the bytes say damage."""
    f = _factory()
    seq = _approval_seq(f)
    entries = list(f.entries)
    entries[seq] = _flip_time_digit(entries[seq])
    if checkpoints == "every-size":
        notes = _notes(f)
    elif checkpoints == "only-the-last":
        notes = [f.checkpoint()]
    else:  # the entry is past the latest checkpoint: only the hash link vouches for it
        notes = [f.checkpoint(seq)]
    with pytest.raises(LogIntegrityError) as info:
        _audit(_file(entries, notes), log_key=LOG_KEY)
    assert info.value.seq == seq
    message = str(info.value)
    assert message.startswith(f"entry {seq}: damaged: its bytes are not the ones that were logged")
    assert f"entry {seq + 1} records another hash of it" in message
    assert "as it stands it reads: an approval at" in message
    assert "expired" not in message


def test_fork_carries_both_notes_as_evidence() -> None:
    f, other = _factory(), _other()
    notes = _notes(f)
    with pytest.raises(ForkError) as info:
        _audit(_file(f.entries, notes), log_key=LOG_KEY, trusted_checkpoint=other.checkpoint(8))
    assert info.value.size == 8
    assert set(info.value.evidence) == {notes[7], other.checkpoint(8)}


def test_relinked_log_with_resigned_checkpoints_fails_against_the_trusted_one() -> None:
    """Only the log key can re-sign; an auditor's older checkpoint still catches it."""
    f = _factory()
    trusted = f.checkpoint(40)
    entries, notes = _stripped_relinked(list(f.entries), _notes(f))
    with pytest.raises(ForkError, match="fork"):
        _audit(_file(entries, notes), log_key=LOG_KEY, trusted_checkpoint=trusted)
    # Without per-size checkpoints in the file, it is a consistency failure.
    with pytest.raises(LogIntegrityError, match="does not extend your trusted checkpoint"):
        _audit(_file(entries, notes[-1:]), log_key=LOG_KEY, trusted_checkpoint=trusted)


def test_log_shorter_than_the_trusted_checkpoint_is_truncated() -> None:
    f = _factory()
    trusted = f.checkpoint()
    short = f.entries[:50]
    with pytest.raises(LogIntegrityError, match="truncated") as info:
        _audit(_file(short, [_sign(short, 50)]), log_key=LOG_KEY, trusted_checkpoint=trusted)
    assert info.value.seq == 50


def test_log_extending_the_trusted_checkpoint_verifies_with_a_consistency_proof() -> None:
    f = _factory()
    report = _audit(
        _file(f.entries, [f.checkpoint()]), log_key=LOG_KEY, trusted_checkpoint=f.checkpoint(9)
    )
    assert report.trusted is not None
    assert (report.trusted.size, report.trusted.extended_by) == (9, len(f.entries) - 9)
    assert report.trusted.proof_hashes > 0


def test_trusted_checkpoint_signed_by_another_key_is_refused() -> None:
    f = _factory()
    forger = NoteSigner.generate(DEPLOYMENT, random_bytes=Counter(b"forger"))
    with pytest.raises(UnverifiedNoteError, match="your trusted checkpoint"):
        _audit(
            _file(f.entries, [f.checkpoint()]),
            log_key=LOG_KEY,
            trusted_checkpoint=_sign(list(f.entries), 9, forger),
        )


def test_pinned_key_of_another_log_refuses_the_export() -> None:
    f = _factory()
    other = NoteSigner.generate(DEPLOYMENT, random_bytes=Counter(b"someone else")).verifier_key()
    with pytest.raises(LogIntegrityError, match="not one this log names") as info:
        _audit(_file(f.entries, [f.checkpoint()]), log_key=other)
    # Both keys are named: the one pinned, and the one the log has.
    assert other in str(info.value)
    assert f.state.log_key in str(info.value)


def test_cosigners_are_reported_and_can_be_required() -> None:
    f = _factory()
    witness = NoteSigner.generate(
        "auditor.example/alice",
        sig_type=SignatureType.COSIGNATURE_V1,
        random_bytes=Counter(b"witness"),
    )
    cosigned = cosign_checkpoint(f.checkpoint(), log_signer().verifier(), witness, 1_800_000_000)
    report = _audit(
        _file(f.entries, [cosigned]),
        log_key=LOG_KEY,
        cosigners=[witness.verifier_key()],
        min_cosigners=1,
    )
    assert report.checkpoints[-1].cosigned_by == (("auditor.example/alice", 1_800_000_000),)
    with pytest.raises(ThresholdError, match="1 required"):
        _audit(
            _file(f.entries, [f.checkpoint()]),
            log_key=LOG_KEY,
            cosigners=[witness.verifier_key()],
            min_cosigners=1,
        )


# -- the file format --------------------------------------------------------------------


def _flip_base64(lines: list[bytes], line: int) -> list[bytes]:
    out = list(lines)
    out[line] = out[line].replace(b'"entry":"', b'"entry":"!', 1)
    return out


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda ls: [], DeserializationError, "empty"),
        (lambda ls: [b'{"format":"other","version":1}\n', *ls[1:]], DeserializationError, "line 1"),
        (lambda ls: [*ls[:-1], ls[-1][:-1]], DeserializationError, "truncated"),
        (lambda ls: [*ls, ls[2]], DeserializationError, "entry after the checkpoints"),
        (lambda ls: [*ls[:3], b'{"x":1}\n', *ls[3:]], LogIntegrityError, "unknown record"),
        (lambda ls: _flip_base64(ls, 5), LogIntegrityError, "entry 4: .*base64"),
        (lambda ls: [*ls[:3], b'{ "entry":"AA=="}\n', *ls[3:]], LogIntegrityError, "canonical"),
    ],
    ids=[
        "empty-file", "not-an-export", "truncated-last-line", "entry-after-checkpoints",
        "unknown-record", "damaged-base64-names-entry", "non-canonical-line",
    ],
)  # fmt: skip
def test_malformed_files_are_refused(
    mutate: Callable[[list[bytes]], list[bytes]], error: type[KeyquorumError], match: str
) -> None:
    f = _factory()
    with pytest.raises(error, match=match):
        export.parse(mutate(_file(f.entries, [f.checkpoint()])))


def test_export_without_any_checkpoint_vouches_for_nothing() -> None:
    f = _factory()
    with pytest.raises(KeyquorumError, match="nothing vouches"):
        _audit(_file(f.entries, []), log_key=LOG_KEY)


def test_entries_are_base64_of_the_exact_bytes() -> None:
    f = _factory()
    line = _file(f.entries, [])[1]
    assert base64.b64decode(json.loads(line)["entry"]) == f.entries[0]


def test_the_report_lists_log_keys_witnesses_and_proposers_as_people_read_them() -> None:
    """Issue 17's operations, each a quorum decision, in text, JSON and HTML."""
    f = LogFactory(seed=b"trust report")
    for cred in f.creds:
        f.confirm(cred)
    ops = custodians(9)[8]
    witness = NoteSigner.generate(
        "w9.example", sig_type=SignatureType.COSIGNATURE_V1, random_bytes=Counter(b"w9")
    ).verifier_key()
    new_key = next_log_signer(1).verifier_key()
    f.run("add-proposer", proposer=ops.fingerprint, name=ops.public().name)
    f.run("add-witness", witness=witness, witness_threshold=1)
    f.run("rotate-log-key", log_key=new_key)
    f.run("remove-proposer", proposer=ops.fingerprint, name=ops.public().name)
    report = _audit(_file(f.entries, _notes(f)), log_key=LOG_KEY)
    assert report.verified
    assert [k.log_key for k in report.log_keys] == [LOG_KEY, new_key]
    assert [(w.operation, w.witness, w.threshold) for w in report.witnesses] == [
        ("add-witness", witness, 1)
    ]
    assert [(p.operation, p.proposer.fingerprint) for p in report.proposers] == [
        ("add-proposer", ops.fingerprint),
        ("remove-proposer", ops.fingerprint),
    ]
    ops_label = label(ops.public().name, ops.fingerprint)
    approver = label(f.creds[0].public().name, f.creds[0].fingerprint)
    text = render_text(report)
    assert f"{new_key} (rotate-log-key, proposal " in text
    assert f"approved by {approver}" in text
    assert f"add-witness {witness}; threshold m = 1" in text
    assert f"add-proposer {ops_label}" in text
    assert f"remove-proposer {ops_label}" in text
    assert f"proposer={ops_label}" in text
    html = render_html(report)
    for fact in (new_key, witness, ops_label):
        assert fact in html
    doc = report.to_json()
    assert [k["log_key"] for k in doc["log_keys"]] == [LOG_KEY, new_key]
    assert doc["proposers"][1]["proposer"]["fingerprint"] == ops.fingerprint
