"""`keyquorum audit verify` as an auditor runs it: exit codes, summary, filters, golden reports.

The log is a small export checked in under tests/golden/audit/ (real
signatures; made by tests/logfactory.py), so its report is pinned byte for
byte: text, JSON and HTML. `KEYQUORUM_UPDATE_GOLDEN=1` rebuilds the export
and the reports; the tests compare otherwise.

Exit codes: 0 verified against a pinned key, 1 not intact (tampered,
damaged), 2 usage error (a malformed key), 3 cannot be judged (no key
pinned, not an export, nothing vouches for the entries).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner, Result

from keyquorum.cli.audit import flip_one_byte
from keyquorum.cli.main import main as cli_main
from keyquorum.quorum import export
from keyquorum.quorum.note import NoteSigner, SignatureType
from tests.logfactory import (
    EXPORT,
    GOLDEN_AUDIT,
    LOG_KEY,
    Counter,
    LogFactory,
    custodians,
    outsider,
)

SCHEMAS = Path(__file__).parent.parent / "docs" / "schemas"
UPDATE = os.environ.get("KEYQUORUM_UPDATE_GOLDEN") == "1"
#: The witness the golden log adds (its cosignatures are not in the export).
WITNESS = NoteSigner.generate(
    "w1.example", sig_type=SignatureType.COSIGNATURE_V1, random_bytes=Counter(b"w1")
).verifier_key()


def _build_export() -> None:
    """A small log touching every section of the report (run with KEYQUORUM_UPDATE_GOLDEN=1)."""
    f = LogFactory(n=5, k=3, seed=b"golden audit")
    for cred in f.creds[:4]:
        f.confirm(cred)
    f.tick()
    f.unseal_reset("kq-1", f.creds[1], f.creds[:1])
    f.tick()
    f.unseal("kq-1", f.creds[:3])
    f.tick(60)
    f.run("create-tenant", tenant="acme-health")
    f.run("activate-tenant", tenant="acme-health", duration_seconds=28800)
    f.run("grant", backend="booking", tenant="acme-health")
    f.tick(60)
    refused = f.propose("destroy-tenant", ttl=600, tenant="acme-health")
    f.refuse(refused, f.creds[4])
    f.approve(refused, f.creds[0])
    f.tick(3600)  # it expires with one approval of three
    f.run("create-tenant", tenant="other-clinic")
    ops = custodians(9)[8]
    f.run("add-proposer", proposer=ops.fingerprint, name=ops.public().name)
    f.run("add-witness", witness=WITNESS, witness_threshold=1)
    f.run("remove-proposer", proposer=ops.fingerprint, name=ops.public().name)
    f.seal("kq-1", f.creds[1])
    f.tick(86400)
    roster = ",".join([*(c.fingerprint for c in f.creds[:4]), outsider().fingerprint])
    f.run("change-roster", roster=roster, threshold=3)
    f.seal("*", None)
    notes = [f.checkpoint(n) for n in range(1, len(f.entries) + 1)]
    GOLDEN_AUDIT.mkdir(parents=True, exist_ok=True)
    EXPORT.write_bytes(b"".join(export.produce(f.entries, notes)))


if UPDATE:
    _build_export()


def verify(*args: str) -> Result:
    return CliRunner().invoke(cli_main, ["audit", "verify", *args], catch_exceptions=False)


def _golden(name: str, text: str) -> None:
    path = GOLDEN_AUDIT / name
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.read_text(encoding="utf-8") == text, f"{path} differs from the report"


def _schema(name: str) -> dict[str, object]:
    schema: dict[str, object] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


# -- exit codes -------------------------------------------------------------------------------


def test_verified_with_a_pinned_key_exits_0_and_pins_the_text_report() -> None:
    r = verify(str(EXPORT), "--log-key", LOG_KEY)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[2].startswith("Verdict:     VERIFIED: ")
    _golden("small.report.txt", r.stdout)


def test_a_pinned_key_file_works_like_the_option(tmp_path: Path) -> None:
    key_file = tmp_path / "acme-prod.vkey"
    key_file.write_text(LOG_KEY + "\n")
    r = verify(str(EXPORT), "--log-key-file", str(key_file))
    assert r.exit_code == 0, r.output
    assert "(pinned by you)" in r.stdout


def test_without_a_pinned_key_it_never_says_verified_and_exits_3() -> None:
    r = verify(str(EXPORT))
    assert r.exit_code == 3, r.output
    assert "Verdict:     NOT VERIFIED: " in r.stdout
    assert "VERIFIED:" not in r.stdout.replace("NOT VERIFIED:", "")
    assert "the log key was not pinned" in r.stdout


def test_a_malformed_key_is_a_usage_error_not_tampering() -> None:
    r = verify(str(EXPORT), "--log-key", "keyquorum/acme-prod+zz+notbase64")
    assert r.exit_code == 2, r.output
    assert "the log key you gave is not a note verifier key" in r.output


def test_a_file_that_is_not_an_export_cannot_be_judged(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello\n")
    r = verify(str(other), "--log-key", LOG_KEY)
    assert r.exit_code == 3, r.output
    assert r.stderr.startswith("CANNOT VERIFY: ")
    assert "is not a keyquorum export" in r.stderr


def test_the_demos_flipped_byte_is_damage_and_exits_1(tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.kqexport"
    seq = flip_one_byte(EXPORT, tampered)
    r = verify(str(tampered), "--log-key", LOG_KEY)
    assert r.exit_code == 1, r.output
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"VERIFICATION FAILED: entry {seq}: damaged: its bytes are not the ")
    assert "expired" not in r.stderr
    assert f"first bad entry: {seq}" in r.stderr


def test_json_failure_names_the_exit_code_and_entry(tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.kqexport"
    seq = flip_one_byte(EXPORT, tampered)
    r = verify(str(tampered), "--log-key", LOG_KEY, "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, _schema("audit-failure"))
    assert (doc["verdict"], doc["exit_code"], doc["seq"]) == ("failed", 1, seq)


# -- summary and filters --------------------------------------------------------------------


def test_the_report_opens_with_a_summary_of_who_holds_what() -> None:
    out = verify(str(EXPORT), "--log-key", LOG_KEY).stdout
    summary = out[out.index("Summary of the whole log") : out.index("\nDetails")]
    assert "Who holds a share: 3 of 5 unseal" in summary
    assert "mallory (" in summary  # added by the roster change
    assert "no longer on the roster: custodian 4 (" in summary
    assert "Unseals: 1" in summary
    assert "acme-health: " in summary
    assert "granted to: booking" in summary
    assert "refused proposal" in summary
    assert "expired without enough approvals (1 of 3 approvals)" in summary
    # The roster change made new shares, and nobody confirmed theirs since.
    assert "5 of 5 custodians never confirmed their current share: custodian 0 (" in summary
    # Each time once, in UTC; no Unix seconds in brackets.
    assert re.search(r"UTC \([0-9]+\)", out) is None


def test_who_signed_what_is_labelled() -> None:
    out = verify(str(EXPORT), "--log-key", LOG_KEY).stdout
    assert re.search(r"proposed by custodian 0 \([A-Z2-7-]{19}\) \(signed by the proposer\)", out)
    assert "reason (written by the daemon, signed by the log key): 'shutdown'" in out
    assert "reason (signed): 'test seal'" in out
    assert "statement offered (nobody approved it" not in out
    assert "statement the 1 approver(s) signed" in out


def test_filters_cut_the_details_and_keep_the_summary() -> None:
    # The first run pins the key and remembers the latest checkpoint; the
    # runs after it also show that the log extends it ("Trusted:").
    verify(str(EXPORT), "--log-key", LOG_KEY)
    whole = verify(str(EXPORT), "--log-key", LOG_KEY).stdout
    r = verify(str(EXPORT), "--log-key", LOG_KEY, "--tenant", "other-clinic")
    assert r.exit_code == 0
    summary = whole[: whole.index("\nDetails")]
    assert r.stdout.startswith(summary)
    details = r.stdout[r.stdout.index("\nDetails") :]
    assert "Details, filtered: tenant other-clinic" in details
    assert "tenant=other-clinic" in details
    assert "tenant=acme-health" not in details
    assert "Unseals (" not in details
    _golden("small.report-tenant.txt", r.stdout)


def test_filter_by_custodian_type_and_time() -> None:
    r = verify(str(EXPORT), "--log-key", LOG_KEY, "--custodian", "custodian 4", "--type", "refusal")
    details = r.stdout[r.stdout.index("\nDetails") :]
    assert "REFUSED by custodian 4" in details
    assert details.count("  proposal ") == 1
    assert "Seals" not in details
    late = verify(str(EXPORT), "--log-key", LOG_KEY, "--since", "2026-11-26", "--type", "seal")
    details = late.stdout[late.stdout.index("\nDetails") :]
    assert "sealed by the daemon itself" in details
    assert "reason (signed): 'test seal'" not in details


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "is not a UTC date"),
        (["--type", "everything"], "unknown --type everything"),
        (["--since", "2026-11-27", "--until", "2026-11-26"], "--since must be before --until"),
    ],
    ids=["bad-date", "bad-type", "empty-range"],
)
def test_bad_filters_are_usage_errors(args: list[str], message: str) -> None:
    r = verify(str(EXPORT), "--log-key", LOG_KEY, *args)
    assert r.exit_code == 2
    assert message in r.output


# -- machine output -----------------------------------------------------------------------


def test_json_report_matches_its_schema_and_golden_file() -> None:
    r = verify(str(EXPORT), "--log-key", LOG_KEY, "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, _schema("audit-report"))
    assert doc["verdict"] == "verified"
    assert doc["summary"]["threshold"] == 3
    holder = doc["summary"]["holders"][0]["custodian"]
    assert len(holder["fingerprint"]) == 64  # the full hash, for machines
    _golden("small.report.json", r.stdout)


def test_html_report_is_golden_and_self_contained(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    r = verify(str(EXPORT), "--log-key", LOG_KEY, "--html", str(page))
    assert r.exit_code == 0
    html = page.read_text(encoding="utf-8")
    _golden("small.report.html", html)
    assert "Content-Security-Policy" in html
    assert "default-src 'none'" in html
    for marker in ("<script", "src=", "href=", "url(", "@import", "http://", "https://"):
        assert marker not in html


def test_people_are_never_shown_as_bare_hex_in_the_reports(tmp_path: Path) -> None:
    """Custodians, proposers, rosters: names and base32 groups; 64-hex only in JSON."""
    fingerprint = re.compile(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])")
    text = verify(str(EXPORT), "--log-key", LOG_KEY).stdout
    html_path = tmp_path / "r.html"
    verify(str(EXPORT), "--log-key", LOG_KEY, "--html", str(html_path))
    for shown in (text, html_path.read_text()):
        assert fingerprint.search(shown) is None, fingerprint.search(shown)
        assert "proposer=custodian 8 (" in shown
        assert "Unseal sessions reset" in shown
        assert "w1.example+" in shown  # the witness the quorum added
    assert "reset by custodian 1 (PPIO-IJ7T-CTHE-ACH7); discarded: custodian 0 (" in text
    doc = json.loads(verify(str(EXPORT), "--log-key", LOG_KEY, "--json").stdout)
    added = next(p for p in doc["proposals"] if p["operation"] == "add-proposer")
    assert fingerprint.fullmatch(dict(added["parameters"])["proposer"])


def _audit_cli(*args: str) -> Result:
    return CliRunner().invoke(cli_main, ["audit", *args], catch_exceptions=False)


def test_the_other_audit_commands_follow_a_rotation_verify_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `rotate-log-key` the checkpoints are signed by the new key. `audit verify`
    with the key the auditor trusts follows the rotation over the log itself; from then
    on `audit checkpoint` with that same key uses the key in force, saying so. A machine
    that followed nothing refuses, naming both keys; and a key no followed rotation
    leads from is refused even where another was followed."""
    from tests import logfactory

    # Log keys named as a daemon names them (keyquorum/<deployment>): what pins key on.
    def named(n: int = 0) -> NoteSigner:
        seed = b"log key" if n == 0 else b"log key %d" % n
        return NoteSigner.generate("keyquorum/acme-prod", random_bytes=Counter(seed))

    monkeypatch.setattr(logfactory, "log_signer", named)
    monkeypatch.setattr(logfactory, "next_log_signer", named)
    old_key, new_key = named().verifier_key(), named(1).verifier_key()
    f = LogFactory(n=5, k=3, seed=b"rotated audit")
    f.run("create-tenant", tenant="acme-health")
    f.run("rotate-log-key", log_key=new_key)
    f.run("create-tenant", tenant="other-clinic")
    path = tmp_path / "rotated.kqexport"
    notes = [f.checkpoint(n) for n in range(1, len(f.entries) + 1)]
    path.write_bytes(b"".join(export.produce(f.entries, notes)))

    # A fresh machine: the old key signs none of the latest checkpoint; refused.
    fresh = _audit_cli("checkpoint", "--from", str(path), "--log-key", old_key)
    assert fresh.exit_code != 0
    assert "checkpoint" in fresh.output

    # In another home, verify follows the rotation; then checkpoint with the old key works.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "auditor"))
    verified = verify("--log-key", old_key, str(path))
    assert verified.exit_code == 0, verified.output
    followed = _audit_cli("checkpoint", "--from", str(path), "--log-key", old_key)
    assert followed.exit_code == 0, followed.output
    assert f"followed the rotations signed key by key to {new_key}" in followed.output
    assert f"checkpoint of size {len(f.entries)} verified" in followed.output
    # The new key itself is the pin now; a key outside the chain is refused, naming both.
    assert _audit_cli("checkpoint", "--from", str(path), "--log-key", new_key).exit_code == 0
    stranger = named(2).verifier_key()
    refused = _audit_cli("checkpoint", "--from", str(path), "--log-key", stranger)
    assert refused.exit_code != 0
    assert stranger in refused.output
    assert new_key in refused.output
