"""Unseal a custodian can follow, over real gRPC with real TLS.

`status` names who has submitted and when the session expires; the next
custodian is told when a session expired (never a silent 1 of 3 -> 0 of
3); `custodian unseal --reset` is a signed request, logged as an
`unseal-reset` entry that replay checks and the audit report shows; a
forged, misdirected or stranger's reset changes nothing. With several
replicas, unseal and status go on past one that cannot be reached and the
exit code says partial.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest
from click.testing import CliRunner

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli import sessions
from keyquorum.cli.connect import rpc_errors
from keyquorum.cli.main import main as cli_main
from keyquorum.cli.unseal import EXIT_FAILED, EXIT_PARTIAL
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.quorum import export, people, statements
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.limits import DEFAULT_LIMITS
from keyquorum.quorum.log import Entry, UnsealResetPayload
from keyquorum.quorum.replay import replay
from keyquorum.v1 import custodian_pb2 as pb
from tests.harness import (
    CEREMONY_CODE,
    Custodian,
    FakeClock,
    InProcessDaemon,
    in_process_daemon,
    make_custodians,
    status,
)

THRESHOLD = 3
SCHEMAS = Path(__file__).parent.parent / "docs" / "schemas"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("people"), ("alice", "bob", "carol", "dave"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Custodian:
    return make_custodians(tmp_path_factory.mktemp("stranger"), ("mallory",))[0]


def ceremony(d: InProcessDaemon, custodians: list[Custodian], deployment: str) -> None:
    d.stub.InitCeremony(
        pb.InitCeremonyRequest(
            deployment=deployment,
            threshold=THRESHOLD,
            public_credentials=[c.public_path.read_bytes() for c in custodians],
            code=CEREMONY_CODE,
        )
    )


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki, custodians: list[Custodian]) -> Iterator[InProcessDaemon]:
    # The CLI signs reset requests with this machine's clock: the daemon's starts there.
    with in_process_daemon(tmp_path / "a", pki, clock=FakeClock(int(time.time()))) as d:
        ceremony(d, custodians, "acme-a")
        yield d


def cli(
    d: InProcessDaemon, pki: DevPki, *args: str, servers: tuple[str, ...] = ()
) -> tuple[int, str]:
    targets = servers or (d.target,)
    conn = [x for t in targets for x in ("--server", t)]
    r = CliRunner().invoke(cli_main, [*args, *conn, "--ca", str(pki.ca_cert)])
    return r.exit_code, r.output


def unseal_cli(
    d: InProcessDaemon, pki: DevPki, c: Custodian, *more: str, **kw: tuple[str, ...]
) -> tuple[int, str]:
    return cli(d, pki, "custodian", "unseal", *more, *c.cli_args(), **kw)


def label(c: Custodian) -> str:
    return people.label(c.name, c.fingerprint)


def entries(d: InProcessDaemon) -> list[bytes]:
    return list(d.store.read_all())


# -- status ----------------------------------------------------------------------------


def test_status_names_who_submitted_and_when_the_session_expires(
    daemon: InProcessDaemon, pki: DevPki, custodians: list[Custodian]
) -> None:
    alice, bob = custodians[:2]
    opened = daemon.clock.now
    actions.submit_share(daemon.stub, alice.credential)
    daemon.clock.advance(30)
    actions.submit_share(daemon.stub, bob.credential)
    s = status(daemon.stub)
    session = s.unseal_session
    assert s.HasField("unseal_session")
    assert not s.HasField("previous_unseal_session")
    assert [(x.name, x.fingerprint, x.share_index) for x in session.submitted] == [
        ("alice", alice.fingerprint, 1),
        ("bob", bob.fingerprint, 2),
    ]
    assert [x.submitted_at for x in session.submitted] == [opened, opened + 30]
    assert session.expires_at == opened + DEFAULT_LIMITS.unseal_session_seconds
    code, out = cli(daemon, pki, "status")
    assert code == 0, out
    expires = statements.render_time(session.expires_at)
    assert sessions.render_time(session.expires_at) == expires  # one time form for both
    assert f"unseal session {session.session_id[:16]}: 2 of 3 shares" in out
    assert f"expires at {expires}" in out
    assert (
        f"  submitted: {label(alice)} at {statements.render_time(opened)}, "
        f"{label(bob)} at {statements.render_time(opened + 30)}"
    ) in out
    assert alice.fingerprint not in out  # the people's form only
    code, out = cli(daemon, pki, "status", "--json")
    doc = json.loads(out)
    jsonschema.validate(doc, json.loads((SCHEMAS / "status.schema.json").read_text()))
    assert doc["log_key"] == s.log_key
    assert [x["fingerprint"] for x in doc["unseal_session"]["submitted"]] == [
        alice.fingerprint,
        bob.fingerprint,
    ]
    assert doc["unseal_session"]["expires_at"] == session.expires_at
    assert doc["previous_unseal_session"] is None


# -- expiry ----------------------------------------------------------------------------


def test_an_expired_session_is_said_to_the_next_custodian(
    daemon: InProcessDaemon, pki: DevPki, custodians: list[Custodian]
) -> None:
    alice, bob = custodians[:2]
    opened = daemon.clock.now
    first = actions.submit_share(daemon.stub, alice.credential)
    assert (first.have, first.need) == (1, 3)
    expires = opened + DEFAULT_LIMITS.unseal_session_seconds
    daemon.clock.advance(DEFAULT_LIMITS.unseal_session_seconds + 5)
    # Status already says so, before anyone opens a new session.
    s = status(daemon.stub)
    assert not s.HasField("unseal_session")
    assert s.previous_unseal_session.how == "expired"
    assert s.previous_unseal_session.ended_at == expires
    code, out = unseal_cli(daemon, pki, bob)
    assert code == 0, out
    said = (
        f"the unseal session {s.previous_unseal_session.session_id[:16]} started at "
        f"{statements.render_time(opened)} by {label(alice)} expired at "
        f"{statements.render_time(expires)}; the share of {label(alice)} was discarded; "
        "starting a new one"
    )
    assert said in out
    assert "share accepted: 1 of 3; still sealed" in out
    after = status(daemon.stub)
    assert [x.name for x in after.unseal_session.submitted] == ["bob"]
    assert after.previous_unseal_session.how == "expired"
    code, out = cli(daemon, pki, "status")
    assert f"before it: the unseal session {s.previous_unseal_session.session_id[:16]}" in out


def test_a_custodian_joining_an_open_session_sees_who_is_in_it(
    daemon: InProcessDaemon, pki: DevPki, custodians: list[Custodian]
) -> None:
    alice, bob, carol = custodians[:3]
    actions.submit_share(daemon.stub, alice.credential)
    actions.submit_share(daemon.stub, bob.credential)
    code, out = unseal_cli(daemon, pki, carol)
    assert code == 0, out
    assert f"submitted so far: {label(alice)} at " in out
    assert "share accepted: 3 of 3; UNSEALED" in out
    s = status(daemon.stub)
    assert not s.sealed
    assert not s.HasField("unseal_session")
    assert not s.HasField("previous_unseal_session")


# -- reset -----------------------------------------------------------------------------


def test_reset_is_signed_logged_replayed_and_reported(
    daemon: InProcessDaemon, pki: DevPki, custodians: list[Custodian], tmp_path: Path
) -> None:
    alice, bob, carol, dave = custodians
    actions.submit_share(daemon.stub, bob.credential)
    actions.submit_share(daemon.stub, alice.credential)
    before = status(daemon.stub)
    session = before.unseal_session.session_id
    code, out = unseal_cli(daemon, pki, carol, "--reset")
    assert code == 0, out
    assert "UNSEAL-RESET" in out
    assert f"custodian: {label(carol)}" in out
    assert f"was reset by {label(carol)} at " in out
    assert f"the 2 shares of {label(bob)}, {label(alice)} were discarded" in out
    after = status(daemon.stub)
    assert after.log_size == before.log_size + 1
    assert not after.HasField("unseal_session")
    assert after.previous_unseal_session.how == "reset"
    assert after.previous_unseal_session.reset_by == carol.fingerprint
    # The entry: who reset which session, whose shares went; replay checks it.
    raw = entries(daemon)
    entry = Entry.from_bytes(raw[-1])
    assert isinstance(entry.payload, UnsealResetPayload)
    assert entry.payload.custodian == carol.fingerprint
    assert entry.payload.session.hex() == session
    assert entry.payload.discarded == tuple(sorted([alice.fingerprint, bob.fingerprint]))
    assert replay(raw).size == len(raw)
    # The next share starts a fresh session, told why.
    code, out = unseal_cli(daemon, pki, dave)
    assert code == 0, out
    assert f"was reset by {label(carol)}" in out
    assert "starting a new one" in out
    assert "share accepted: 1 of 3" in out
    # The audit report shows the reset: text, JSON and HTML.
    path = tmp_path / "log.kqexport"
    notes = [note for _size, note in daemon.store.checkpoints()]
    path.write_bytes(b"".join(export.produce(entries(daemon), notes)))
    verify = ["audit", "verify", str(path), "--log-key", after.log_key]
    report = CliRunner().invoke(cli_main, verify)
    assert report.exit_code == 0, report.output
    assert (
        f"replica test-1, session {session[:16]} reset by {label(carol)}; discarded: "
        f"{label(alice)}, {label(bob)}"
    ) in report.output
    doc = json.loads(CliRunner().invoke(cli_main, [*verify, "--json"]).output)
    jsonschema.validate(doc, json.loads((SCHEMAS / "audit-report.schema.json").read_text()))
    [reset] = doc["unseal_resets"]
    assert reset["by"]["fingerprint"] == carol.fingerprint
    assert {p["name"] for p in reset["discarded"]} == {"alice", "bob"}
    html = tmp_path / "report.html"
    CliRunner().invoke(cli_main, [*verify, "--html", str(html)])
    assert "Unseal sessions reset" in html.read_text()


def _reset_request(
    d: InProcessDaemon, signer: Custodian, *, claimed: Custodian | None = None, session: str = ""
) -> pb.ResetUnsealSessionRequest:
    s = status(d.stub)
    statement = actions.reset_statement(s, signer.credential.public(), now=d.clock.now)
    signed = statements.sign_statement(statement, signer.credential)
    return pb.ResetUnsealSessionRequest(
        session_id=session or s.unseal_session.session_id,
        custodian=(claimed or signer).fingerprint,
        requested_at=d.clock.now,
        signature=signed.signature.to_bytes(),
    )


@pytest.mark.parametrize(
    ("case", "code", "match"),
    [
        ("signed by another custodian", grpc.StatusCode.PERMISSION_DENIED, "signature"),
        ("a stranger", grpc.StatusCode.PERMISSION_DENIED, "not on the roster"),
        ("another session", grpc.StatusCode.ALREADY_EXISTS, "another unseal session"),
        ("stale request", grpc.StatusCode.FAILED_PRECONDITION, "too far"),
        ("replayed", grpc.StatusCode.NOT_FOUND, "no open unseal session"),
    ],
)
def test_a_bad_reset_changes_nothing(
    daemon: InProcessDaemon,
    custodians: list[Custodian],
    stranger: Custodian,
    case: str,
    code: grpc.StatusCode,
    match: str,
) -> None:
    alice, bob, carol = custodians[:3]
    actions.submit_share(daemon.stub, alice.credential)
    if case == "signed by another custodian":
        request = _reset_request(daemon, bob, claimed=carol)
    elif case == "a stranger":
        request = _reset_request(daemon, stranger)
    elif case == "another session":
        request = _reset_request(daemon, bob, session="00" * 16)
    elif case == "stale request":
        request = _reset_request(daemon, bob)
        daemon.clock.advance(DEFAULT_LIMITS.seal_request_skew_seconds + 1)
    else:
        request = _reset_request(daemon, bob)
        daemon.stub.ResetUnsealSession(request)
    before = status(daemon.stub)
    with pytest.raises(KeyquorumError) as info, rpc_errors():
        daemon.stub.ResetUnsealSession(request)
    assert getattr(info.value, "code", None) == code, str(info.value)
    assert match in str(info.value)
    after = status(daemon.stub)
    assert after.log_size == before.log_size
    assert after.unseal_session == before.unseal_session
    if case != "replayed":
        assert [x.name for x in after.unseal_session.submitted] == ["alice"]


def test_no_reset_once_unsealed(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    request = None
    for c in custodians[:THRESHOLD]:
        if request is None:
            actions.submit_share(daemon.stub, c.credential)
            request = _reset_request(daemon, custodians[3])
        else:
            actions.submit_share(daemon.stub, c.credential)
    assert request is not None
    with pytest.raises(KeyquorumError, match="already unsealed"), rpc_errors():
        daemon.stub.ResetUnsealSession(request)


# -- several replicas ------------------------------------------------------------------


def _dead_target() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


def test_unseal_and_status_go_on_past_an_unreachable_replica(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    clock = FakeClock(int(time.time()))
    with (
        in_process_daemon(tmp_path / "a", pki, clock=clock, replica="kq-a") as a,
        in_process_daemon(tmp_path / "b", pki, clock=clock, replica="kq-b") as b,
    ):
        ceremony(a, custodians, "acme-a")
        ceremony(b, custodians, "acme-b")
        dead = _dead_target()
        servers = (a.target, dead, b.target)
        code, out = unseal_cli(a, pki, custodians[0], servers=servers)
        assert code == EXIT_PARTIAL, out
        assert f"{a.target} (replica kq-a): share accepted: 1 of 3; still sealed" in out
        assert f"{b.target} (replica kq-b): share accepted: 1 of 3; still sealed" in out
        assert f"{dead}: FAILED: cannot reach the daemon at {dead}" in out
        assert "PARTIAL: done on 2 of 3 replicas" in out
        for d in (a, b):
            assert [x.name for x in status(d.stub).unseal_session.submitted] == ["alice"]
        # Status of each replica, the unreachable one said so.
        code, out = cli(a, pki, "status", servers=servers)
        assert code == EXIT_PARTIAL, out
        assert f"== {dead}\nUNREACHABLE: cannot reach the daemon at {dead}" in out
        assert "deployment acme-b, replica kq-b: SEALED" in out
        code, out = cli(a, pki, "status", "--json", servers=servers)
        doc = json.loads(out[: out.rindex("}") + 1])
        jsonschema.validate(doc, json.loads((SCHEMAS / "status-replicas.schema.json").read_text()))
        status_schema = json.loads((SCHEMAS / "status.schema.json").read_text())
        for item in doc["replicas"]:
            if item["status"] is not None:
                jsonschema.validate(item["status"], status_schema)
        assert [item["error"] is None for item in doc["replicas"]] == [True, False, True]
        # Nothing reachable: exit 1.
        code, out = unseal_cli(a, pki, custodians[1], servers=(dead, _dead_target()))
        assert code == EXIT_FAILED, out
        assert "nothing done on any of the 2 replicas" in out
