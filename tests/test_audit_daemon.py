"""The auditor's side against a real daemon: AuditService over mTLS, export, verify, proofs.

One daemon (module scope) runs the story: ceremony, seven confirmations,
an unseal by five custodians, a tenant proposed, refused by one custodian
and approved by five (executed), a grant, and a seal by one custodian. An AuditService listener that
requires client certificates serves the same store. The export made over
mTLS with an auditor certificate is the file every tamper case starts
from; each case is run through the real `keyquorum audit verify` command
and must exit 1 naming the first bad entry.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from keyquorum.cli import audit as cli_audit
from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.connect import rpc_errors
from keyquorum.client import tls as client_tls
from keyquorum.hsm import tls
from keyquorum.hsm.daemon.logkey import LogKey
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import audit_service
from keyquorum.hsm.services.admission import CertificatePeers
from keyquorum.hsm.services.server import create_server
from keyquorum.quorum import export
from keyquorum.quorum.checkpoint import NoteSigner, cosign_checkpoint, parse_verifier_key
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.merkle import CompactRange, leaf_hash
from keyquorum.quorum.note import SignatureType
from keyquorum.v1 import audit_pb2 as apb
from keyquorum.v1 import audit_pb2_grpc as apb_grpc
from keyquorum.v1 import custodian_pb2 as pb
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    InProcessDaemon,
    in_process_daemon,
    make_custodians,
    run_cli,
    signed_proposal,
    start_daemon_process,
)

THRESHOLD = 5
#: genesis, 7 confirms, unseal, create-tenant (proposal, refusal, 5 approvals,
#: execution), grant (proposal, 5 approvals, execution), add-witness (proposal, 5
#: approvals, execution), seal.
ENTRIES = 32
#: The daemon checkpoints after each append; an approval and the execution it
#: makes due are one append, so sizes 16, 23 and 30 have no checkpoint.
CHECKPOINTS = 29
#: Line index of the first checkpoint (line 0 is the header, entry i is line i + 1).
CP = ENTRIES + 1


@dataclass
class Deployment:
    d: InProcessDaemon
    pki: DevPki
    custodians: list[Custodian]
    audit_port: int
    witness_key: Path
    log_key: str
    early_checkpoint: Path
    export: Path

    def conn(self, client: str = "auditor/alice") -> list[str]:
        files = self.pki.client(client)
        return [
            "--server", f"127.0.0.1:{self.audit_port}", "--ca", str(self.pki.ca_cert),
            "--cert", str(files.cert), "--key", str(files.key),
        ]  # fmt: skip

    def channel(self, client: str | None = "auditor/alice") -> grpc.Channel:
        if client is None:
            creds = client_tls.channel_credentials(self.pki.ca_cert)
        else:
            files = self.pki.client(client)
            creds = client_tls.channel_credentials(
                self.pki.ca_cert, client_cert=files.cert, client_key=files.key
            )
        return grpc.secure_channel(f"127.0.0.1:{self.audit_port}", creds)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("audit")
    pki = make_dev_pki(base / "pki", clients=["auditor/alice", "backend/booking"])
    custodians = make_custodians(base / "custodians")
    code, out = run_cli(
        "audit", "keygen", "--name", "auditor.example/alice", "--out", str(base / "alice.cosign")
    )
    assert code == 0, out
    witness = parse_verifier_key(out.strip())
    with in_process_daemon(base / "data", pki) as d:
        audit_log = audit_service.AuditLog(d.store, d.daemon)
        server, port = create_server(
            host="127.0.0.1",
            port=0,
            credentials=tls.server_credentials(
                pki.server_cert, pki.server_key, client_ca=pki.ca_cert, require_client_auth=True
            ),
            limits=d.daemon.data_plane_snapshot().limits,
            register=[audit_service.register(audit_log)],
            service_names=[audit_service.SERVICE_NAME],
            peers=CertificatePeers(),
        )
        server.start()
        try:
            d.stub.InitCeremony(
                pb.InitCeremonyRequest(
                    deployment="audit-test",
                    threshold=THRESHOLD,
                    public_credentials=[c.public_path.read_bytes() for c in custodians],
                    code=CEREMONY_CODE,
                )
            )
            dep = Deployment(
                d, pki, custodians, port, base / "alice.cosign",
                LogKey.load(d.data_dir).vkey, base / "early.checkpoint", base / "log.kqexport",
            )  # fmt: skip
            code, out = run_cli(
                "audit", "checkpoint", *dep.conn(), "--log-key", dep.log_key,
                "--out", str(dep.early_checkpoint),
            )  # fmt: skip
            assert code == 0, out
            for c in custodians:
                actions.confirm(d.stub, c, lambda _t, c=c: c.credential)
            for c in custodians[:THRESHOLD]:
                actions.submit_share(d.stub, c.credential)
            governance(d, custodians, witness.vkey())
            d.clock.advance(60)
            actions.seal(
                d.stub,
                custodians[6],
                lambda _t: custodians[6].credential,
                reason="end of audit test",
                now=d.clock.now,
            )
            code, out = run_cli("audit", "export", *dep.conn(), "--out", str(dep.export))
            assert code == 0, out
            yield dep
        finally:
            server.stop(grace=None).wait()


def _decide(d: InProcessDaemon, custodians: list[Custodian], op: str, **params: str) -> str:
    proposal = d.stub.Propose(
        signed_proposal(d.stub, custodians[0].credential, op, dict(params), now=d.clock())
    )
    if op == "create-tenant":
        frank = custodians[5]
        actions.verdict(
            d.stub, proposal.id, frank.fingerprint, lambda _t: frank.credential, verdict="refuse"
        )
    for c in custodians[: proposal.required]:
        d.clock.advance(1)
        actions.verdict(d.stub, proposal.id, c.fingerprint, lambda _t, c=c: c.credential,
                        verdict="approve")  # fmt: skip
    return proposal.id


def governance(d: InProcessDaemon, custodians: list[Custodian], witness: str) -> None:
    """A tenant created (one refusal, five approvals) and granted to a backend; the
    auditor's key added as the deployment's witness (m = 1)."""
    _decide(d, custodians, "create-tenant", tenant="patients")
    _decide(d, custodians, "grant", tenant="patients", backend="booking")
    _decide(d, custodians, "add-witness", witness=witness, witness_threshold="1")


def verify(path: Path, *args: str) -> tuple[int, str]:
    return run_cli("audit", "verify", str(path), *args)


# -- export and report ------------------------------------------------------------------


def test_export_over_mtls_verifies_and_names_who_took_part(dep: Deployment) -> None:
    code, out = verify(dep.export, "--log-key", dep.log_key)
    assert code == 0, out
    assert "VERIFIED" in out
    assert "5-of-7 (genesis)" in out
    unsealers = ", ".join(c.credential.public().label for c in dep.custodians[:5])
    assert f"unsealed by 5: {unsealers}" in out  # in share order
    assert "sealed by grace" in out
    assert "'end of audit test'" in out
    details = out[out.index("\nDetails") :]
    assert details.count("    share ") == 7  # the genesis roster, in the details
    assert "pinned by you" in out
    assert f"Entries:     {ENTRIES} (0..{ENTRIES - 1})" in out
    assert f"{CHECKPOINTS} checkpoint(s), tree sizes 1..15, 17..22, 24..29, 31..32" in out
    assert "REFUSED by frank" in out
    assert "approved by alice" in out
    assert "outcome: executed at entry 16" in out
    assert "operation: create-tenant" in out  # the statement they signed
    assert "patients: inactive, 1 key version(s)" in out
    assert "booking -> patients: granted at entry 23, in force" in out


def test_same_file_gives_the_same_report_twice(dep: Deployment) -> None:
    pinned = verify(dep.export, "--json")  # the first contact pins the key (a note on stderr)
    assert "pinning the log key of deployment audit-test on first contact" in pinned[1]
    assert pinned[0] == 3  # pinned, but taken from the file: NOT VERIFIED
    key = ("--log-key", dep.log_key)
    first, second = verify(dep.export, "--json", *key), verify(dep.export, "--json", *key)
    assert first == second
    assert first[0] == 0
    report = json.loads(first[1])
    assert report["verdict"] == "verified"
    assert [u["replica"] for u in report["unseals"]] == ["test-1"]


def test_data_dir_export_is_byte_identical_to_the_mtls_export(
    dep: Deployment, tmp_path: Path
) -> None:
    offline = tmp_path / "offline.kqexport"
    code, out = run_cli("audit", "export", "--data-dir", str(dep.d.data_dir), "--out", str(offline))
    assert code == 0, out
    assert offline.read_bytes() == dep.export.read_bytes()


def test_verify_runs_with_no_daemon_in_a_fresh_process(dep: Deployment, tmp_path: Path) -> None:
    """Another machine's code path: a new interpreter, only the file and the key."""
    copy = tmp_path / "elsewhere.kqexport"
    copy.write_bytes(dep.export.read_bytes())
    proc = subprocess.run(
        [sys.executable, "-m", "keyquorum.cli.main", "audit", "verify", str(copy),
         "--log-key", dep.log_key, "--trusted-checkpoint", str(dep.early_checkpoint)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "VERIFIED" in proc.stdout
    assert "your checkpoint of size 1" in proc.stdout
    assert proc.stderr == ""  # piped: no progress bar


# -- tamper cases (issue 8, item 3) against the daemon's export ----------------------------


def _lines(dep: Deployment) -> list[bytes]:
    return dep.export.read_bytes().splitlines(keepends=True)


def _resign(dep: Deployment, entries: list[bytes], size: int, root: bytes | None = None) -> bytes:
    """A checkpoint line signed by the daemon's own log key (only it can make a fork)."""
    tree = CompactRange()
    for raw in entries[:size]:
        tree.append(leaf_hash(raw))
    note = LogKey.load(dep.d.data_dir).sign_checkpoint(size, root or tree.root())
    return list(export.produce([], [note]))[1]


def _forged(dep: Deployment) -> bytes:
    forger = NoteSigner.generate("keyquorum/audit-test")
    parsed = export.parse(_lines(dep))
    tree = CompactRange()
    for raw in parsed.entries:
        tree.append(leaf_hash(raw))
    return list(export.produce([], [forger.sign_checkpoint(len(parsed.entries), tree.root())]))[1]


def _flip(dep: Deployment, tmp: Path) -> list[bytes]:
    out = tmp / "flipped"
    cli_audit.flip_one_byte(dep.export, out)
    return out.read_bytes().splitlines(keepends=True)


# Line 0 is the header, entry i is line i + 1, the checkpoints start at line CP.
TAMPER: list[tuple[str, Callable[[Deployment, Path], list[bytes]], str]] = [
    # The middle entry (`flip_one_byte`).
    ("edited-entry-one-byte", _flip, f"entry {ENTRIES // 2}: damaged: its bytes are not the ones"),
    ("deleted-entry", lambda d, t: _lines(d)[:4] + _lines(d)[5:], "entry 3: sequence number 4"),
    (
        "inserted-entry",
        lambda d, t: [*_lines(d)[:5], _lines(d)[4], *_lines(d)[5:]],
        "entry 4: sequence number 3, expected 4",
    ),
    (
        "reordered-entries",
        lambda d, t: [*_lines(d)[:3], _lines(d)[4], _lines(d)[3], *_lines(d)[5:]],
        "entry 2: sequence number 3, expected 2",
    ),
    ("truncated", lambda d, t: _lines(d)[:9] + _lines(d)[CP:], "entry 8: .*truncated"),
    (
        "checkpoint-by-another-key",
        lambda d, t: [*_lines(d)[:-1], _forged(d)],
        f"checkpoint {CHECKPOINTS} of the export does not check under the log key",
    ),
    (
        "fork-same-size-two-roots",
        lambda d, t: [*_lines(d)[: CP + 3], _resign(d, [], 3, b"\x07" * 32), *_lines(d)[CP + 3 :]],
        "fork: .* tree size 3 with different roots",
    ),
]


@pytest.mark.parametrize(("tamper", "match"), [c[1:] for c in TAMPER], ids=[c[0] for c in TAMPER])
def test_tampered_daemon_export_fails_naming_the_first_bad_entry(
    dep: Deployment, tmp_path: Path, tamper: Callable[[Deployment, Path], list[bytes]], match: str
) -> None:
    bad = tmp_path / "bad.kqexport"
    bad.write_bytes(b"".join(tamper(dep, tmp_path)))
    code, out = verify(bad, "--log-key", dep.log_key)
    assert code == 1, out
    assert "VERIFICATION FAILED" in out
    assert pytest.importorskip("re").search(match, out), out


def test_fork_shows_both_checkpoints_as_evidence(dep: Deployment, tmp_path: Path) -> None:
    lines = _lines(dep)
    bad = tmp_path / "fork.kqexport"
    bad.write_bytes(
        b"".join([*lines[: CP + 3], _resign(dep, [], 3, b"\x07" * 32), *lines[CP + 3 :]])
    )
    code, out = verify(bad, "--log-key", dep.log_key)
    assert code == 1
    assert out.count("(a note signed by the log key)") == 2
    assert out.count("keyquorum/audit-test\n3\n") == 2


def test_shorter_than_the_trusted_checkpoint_is_truncated(dep: Deployment, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    code, _ = verify(dep.export, "--log-key", dep.log_key, "--save-checkpoint", str(trusted))
    assert code == 0
    lines = _lines(dep)
    short = tmp_path / "short.kqexport"
    short.write_bytes(b"".join([*lines[:8], *lines[CP : CP + 7]]))  # 7 entries, checkpoints 1..7
    code, out = verify(short, "--log-key", dep.log_key, "--trusted-checkpoint", str(trusted))
    assert code == 1
    assert (
        f"entry 7: the export holds 7 entries, your trusted checkpoint vouches for {ENTRIES}" in out
    )


def test_log_not_extending_the_trusted_checkpoint_is_refused(
    dep: Deployment, tmp_path: Path
) -> None:
    """A trusted checkpoint of another history, signed by the same key: caught by proof."""
    lines = _lines(dep)
    trusted = tmp_path / "other-history"
    other = _resign(dep, [], 4, b"\x05" * 32)
    trusted.write_text(json.loads(other)["checkpoint"])
    latest_only = tmp_path / "latest-only.kqexport"
    latest_only.write_bytes(b"".join([*lines[:CP], lines[-1]]))
    code, out = verify(latest_only, "--log-key", dep.log_key, "--trusted-checkpoint", str(trusted))
    assert code == 1
    assert "does not extend your trusted checkpoint (size 4)" in out
    # With the per-size checkpoints in the file, the same is shown as a fork with evidence.
    code, out = verify(dep.export, "--log-key", dep.log_key, "--trusted-checkpoint", str(trusted))
    assert code == 1
    assert "fork" in out
    assert out.count("(a note signed by the log key)") == 2


# -- proofs and receipts ----------------------------------------------------------------------


def test_prove_inclusion_and_consistency_against_trusted_checkpoints(
    dep: Deployment, tmp_path: Path
) -> None:
    latest = tmp_path / "latest"
    code, out = run_cli(
        "audit", "prove-consistency", *dep.conn(), "--log-key", dep.log_key,
        "--trusted-checkpoint", str(dep.early_checkpoint), "--save", str(latest),
    )  # fmt: skip
    assert code == 0, out
    assert f"size {ENTRIES} extends your checkpoint of size 1" in out
    code, out = run_cli(
        "audit", "prove-inclusion", "8", *dep.conn(), "--log-key", dep.log_key,
        "--trusted-checkpoint", str(latest),
    )  # fmt: skip
    assert code == 0, out
    assert "entry 8: unseal" in out
    assert f"included: entry 8 is in the tree of size {ENTRIES}" in out


def test_receipt_checks_offline_and_a_tampered_one_does_not(
    dep: Deployment, tmp_path: Path
) -> None:
    receipt = tmp_path / "seal.tlog-proof"
    code, out = run_cli("audit", "receipt", "31", *dep.conn(), "--out", str(receipt))
    assert code == 0, out
    text = receipt.read_text()
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra ")
    assert "\nindex 31\n" in text
    code, out = run_cli("audit", "check-receipt", str(receipt), "--log-key", dep.log_key)
    assert code == 0, out
    assert "entry 31: seal" in out
    assert f"valid: entry 31 is in the log of size {ENTRIES}" in out
    # The same receipt claiming another index, and one with a proof hash altered.
    other_index = tmp_path / "moved.tlog-proof"
    other_index.write_text(text.replace("\nindex 31\n", "\nindex 30\n"))
    code, out = run_cli("audit", "check-receipt", str(other_index), "--log-key", dep.log_key)
    assert code == 1
    assert "entry 30: the entry served says it is entry 31" in out
    lines = text.split("\n")
    lines[3] = ("A" if lines[3][0] != "A" else "B") + lines[3][1:]
    altered = tmp_path / "altered.tlog-proof"
    altered.write_text("\n".join(lines))
    code, out = run_cli("audit", "check-receipt", str(altered), "--log-key", dep.log_key)
    assert code == 1
    assert f"not included in the tree of size {ENTRIES}" in out


def test_receipt_from_an_export_file_is_the_same(dep: Deployment, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("audit", "receipt", "3", *dep.conn(), "--out", str(a))[0] == 0
    assert run_cli("audit", "receipt", "3", "--from", str(dep.export), "--out", str(b))[0] == 0
    assert a.read_text() == b.read_text()


# -- the service's access rules and cosignatures ------------------------------------------------


def test_audit_service_requires_an_auditor_certificate(dep: Deployment) -> None:
    request = apb.GetCheckpointRequest()
    with dep.channel() as ch:
        assert apb_grpc.AuditServiceStub(ch).GetCheckpoint(request).size == ENTRIES
    with dep.channel("backend/booking") as ch:
        with pytest.raises(grpc.RpcError) as info:
            apb_grpc.AuditServiceStub(ch).GetCheckpoint(request)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not an auditor" in (info.value.details() or "")
    with dep.channel(None) as ch:
        # No client certificate: the mTLS handshake itself fails.
        with pytest.raises(grpc.RpcError) as info:
            apb_grpc.AuditServiceStub(ch).GetCheckpoint(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("start", "end", "code"),
    [(0, ENTRIES + 1, grpc.StatusCode.INVALID_ARGUMENT), (5, 4, grpc.StatusCode.INVALID_ARGUMENT)],
    ids=["beyond-the-log", "start-after-end"],
)
def test_entry_ranges_are_checked(dep: Deployment, start: int, end: int, code: object) -> None:
    with dep.channel() as ch, pytest.raises(grpc.RpcError) as info:
        list(apb_grpc.AuditServiceStub(ch).GetEntries(apb.GetEntriesRequest(start=start, end=end)))
    assert info.value.code() == code


def test_cosignature_is_verified_merged_and_counted(dep: Deployment, tmp_path: Path) -> None:
    trusted = tmp_path / "trusted"
    trusted.write_text(dep.early_checkpoint.read_text())
    code, out = run_cli(
        "audit", "cosign", *dep.conn(), "--signing-key", str(dep.witness_key),
        "--log-key", dep.log_key, "--trusted-checkpoint", str(trusted), "--now", "1790000100",
    )  # fmt: skip
    assert code == 0, out
    witness = (dep.witness_key.parent / "alice.cosign.vkey").read_text().strip()
    fresh = tmp_path / "cosigned.kqexport"
    assert run_cli("audit", "export", *dep.conn(), "--out", str(fresh))[0] == 0
    code, out = verify(
        fresh, "--log-key", dep.log_key, "--cosigner", witness, "--min-cosigners", "1"
    )
    assert code == 0, out
    assert "cosigned by: auditor.example/alice at" in out
    # The daemon's own export still verifies without naming the cosigner.
    assert verify(fresh, "--log-key", dep.log_key)[0] == 0


def test_cosignature_by_an_unlisted_key_or_for_another_root_is_refused(dep: Deployment) -> None:
    stranger = NoteSigner.generate("auditor.example/eve", sig_type=SignatureType.COSIGNATURE_V1)
    witness = cli_audit.load_cosigner(dep.witness_key)
    log_verifier = parse_verifier_key(dep.log_key)
    with dep.channel() as ch:
        stub = apb_grpc.AuditServiceStub(ch)
        note = stub.GetCheckpoint(apb.GetCheckpointRequest(size=5)).note
        unlisted = cosign_checkpoint(note, log_verifier, stranger, 1790000000)
        with (
            pytest.raises(KeyquorumError, match="no cosignature from a witness") as info,
            rpc_errors(),
        ):
            stub.AddCosignature(apb.AddCosignatureRequest(note=unlisted))
        assert getattr(info.value, "code", None) == grpc.StatusCode.PERMISSION_DENIED
        other_root = _resign(dep, [], 5, b"\x09" * 32).decode()
        forged = cosign_checkpoint(json.loads(other_root)["checkpoint"], log_verifier, witness, 1)
        with (
            pytest.raises(KeyquorumError, match="not the one this log signed") as info,
            rpc_errors(),
        ):
            stub.AddCosignature(apb.AddCosignatureRequest(note=forged))
        assert getattr(info.value, "code", None) == grpc.StatusCode.INVALID_ARGUMENT
        assert stub.GetCheckpoint(apb.GetCheckpointRequest(size=5)).note == note


# -- the demo step and the real server process ---------------------------------------------------


def test_demo_steps_export_verify_and_catch_the_flipped_byte(
    dep: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_audit.run_audit_demo_steps(tmp_path, dep.d.data_dir)
    out = capsys.readouterr()
    assert "VERIFIED" in out.out
    assert "VERIFICATION FAILED: entry" in out.err


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_progress_bar_only_on_a_terminal(
    terminal: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    with cli_audit.progress_bar(10_000, "verifying") as advance:
        advance(5000)
    err = capsys.readouterr().err
    assert ("verifying" in err) is terminal


def test_server_process_serves_audit_on_its_mtls_port(dep: Deployment, tmp_path: Path) -> None:
    data = tmp_path / "proc-data"
    proc = start_daemon_process(
        data, dep.pki, "--listen-mtls", "127.0.0.1:0", "--client-ca", str(dep.pki.ca_cert)
    )
    try:
        ready = json.loads((data.parent / f"{data.name}.ready").read_text())
        assert ready["mtls_port"] != ready["port"]
        files = dep.pki.client("auditor/alice")
        code, out = run_cli(
            "audit", "checkpoint", "--server", f"127.0.0.1:{ready['mtls_port']}",
            "--ca", str(dep.pki.ca_cert), "--cert", str(files.cert), "--key", str(files.key),
            "--log-key", dep.log_key,
        )  # fmt: skip
        # Before a ceremony there is nothing to audit: the daemon says so.
        assert code == 1
        assert "no checkpoint yet" in out
    finally:
        proc.stop()
