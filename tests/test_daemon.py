"""The daemon and the custodian plane over real gRPC and TLS on real SQLite.

Each refusal of the issue is a case here, named after what it reproduces;
each checks the error names the custodian and that nothing changed (the
log size and the unseal progress stay where they were).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from keyquorum.cli import custodian_actions as actions
from keyquorum.cli.connect import rpc_errors
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import KeyquorumError, LogIntegrityError
from keyquorum.quorum.limits import DEFAULT_LIMITS
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

THRESHOLD = 5


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(
        tmp_path_factory.mktemp("pki"), server_names=["localhost"], clients=["backend/booking"]
    )


@pytest.fixture(scope="module")
def custodians(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    return make_custodians(tmp_path_factory.mktemp("custodians"))


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> list[Custodian]:
    """Custodians of another deployment."""
    return make_custodians(tmp_path_factory.mktemp("others"), names=("oscar", "olga", "otto"))


def ceremony(d: InProcessDaemon, custodians: list[Custodian], threshold: int = THRESHOLD) -> None:
    d.stub.InitCeremony(
        pb.InitCeremonyRequest(
            deployment="test-deployment",
            threshold=threshold,
            public_credentials=[c.public_path.read_bytes() for c in custodians],
            code=CEREMONY_CODE,
        )
    )
    d.proposer = custodians[0].credential


@pytest.fixture
def daemon(tmp_path: Path, pki: DevPki, custodians: list[Custodian]) -> Iterator[InProcessDaemon]:
    with in_process_daemon(tmp_path / "data", pki) as d:
        ceremony(d, custodians)
        yield d


def submit(d: InProcessDaemon, c: Custodian, **kw: object) -> pb.UnsealProgress:
    return actions.submit_share(d.stub, c.credential, **kw)  # type: ignore[arg-type]


def refused(d: InProcessDaemon, fn: object, *, code: grpc.StatusCode, match: str) -> None:
    """`fn` fails with `code` and a message matching `match`; nothing changes."""
    before = status(d.stub)
    with pytest.raises(KeyquorumError) as info, rpc_errors():
        fn()  # type: ignore[operator]
    assert getattr(info.value, "code", None) == code, str(info.value)
    assert match in str(info.value), str(info.value)
    after = status(d.stub)
    assert (after.log_size, after.unseal_progress, after.sealed) == (
        before.log_size,
        before.unseal_progress,
        before.sealed,
    )


# -- ceremony ------------------------------------------------------------------


def test_ceremony_logs_genesis_and_forgets_the_key(daemon: InProcessDaemon) -> None:
    s = status(daemon.stub)
    assert s.initialized
    assert s.sealed
    assert (s.threshold, s.custodian_count, s.log_size) == (5, 7, 1)
    assert s.checkpoint.startswith("keyquorum/test-deployment\n1\n")
    assert daemon.daemon.master_key_buffer_for_test() is None


def test_second_ceremony_is_refused(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    refused(
        daemon,
        lambda: ceremony(daemon, custodians),
        code=grpc.StatusCode.FAILED_PRECONDITION,
        match="already initialised",
    )


@pytest.mark.parametrize(
    ("threshold", "count", "match"),
    [(1, 7, "threshold"), (8, 7, "threshold"), (0, 7, "threshold"), (2, 1, "threshold")],
    ids=["k=1", "k>n", "k=0", "one-custodian"],
)
def test_bad_ceremony_parameters_are_refused(
    tmp_path: Path,
    pki: DevPki,
    custodians: list[Custodian],
    threshold: int,
    count: int,
    match: str,
) -> None:
    with in_process_daemon(tmp_path / "data", pki) as d:
        with pytest.raises(grpc.RpcError) as info:
            ceremony(d, custodians[:count], threshold)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert match in info.value.details()  # type: ignore[attr-defined]
        assert not status(d.stub).initialized


def test_duplicate_custodian_in_ceremony_is_refused(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    with in_process_daemon(tmp_path / "data", pki) as d:
        with pytest.raises(grpc.RpcError) as info:
            ceremony(d, [*custodians[:6], custodians[0]])
        assert "listed twice" in info.value.details()  # type: ignore[attr-defined]
        assert not status(d.stub).initialized


def test_confirm_counts_each_custodian_once(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    for i, c in enumerate(custodians[:5], start=1):
        r = actions.confirm(daemon.stub, c, lambda _text, c=c: c.credential)
        assert (r.confirmed_count, r.custodian_count) == (i, 7)
    refused(
        daemon,
        lambda: actions.confirm(daemon.stub, custodians[0], lambda _t: custodians[0].credential),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        match="",
    )
    assert status(daemon.stub).confirmed_count == 5


# -- unseal ----------------------------------------------------------------------


def test_unseal_with_k_shares(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    for i, c in enumerate(custodians[:4], start=1):
        p = submit(daemon, c)
        assert (p.have, p.need, p.sealed) == (i, 5, True)
        assert status(daemon.stub).unseal_progress == i
    p = submit(daemon, custodians[4])
    assert (p.have, p.sealed) == (5, False)
    s = status(daemon.stub)
    assert not s.sealed
    assert daemon.daemon.master_key_buffer_for_test() is not None


def test_wrong_share_is_refused_and_custodian_named(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    submit(daemon, custodians[0])

    def flip(raw: bytearray) -> None:
        raw[-1] ^= 1

    refused(
        daemon,
        lambda: submit(daemon, custodians[1], tamper=flip),
        code=grpc.StatusCode.INVALID_ARGUMENT,
        match="custodian bob",
    )


def test_duplicate_custodian_in_session_is_refused(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    submit(daemon, custodians[0])
    refused(
        daemon,
        lambda: submit(daemon, custodians[0]),
        code=grpc.StatusCode.ALREADY_EXISTS,
        match="custodian alice",
    )


def test_bad_signature_is_refused(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    """Carol's share, signed by bob's key under carol's name."""
    session = daemon.stub.OpenUnsealSession(pb.OpenUnsealSessionRequest())
    carol, bob = custodians[2], custodians[1]

    class Impostor:
        """Carol's credential for decryption, bob's for the signature."""

        def public(self) -> object:
            return carol.credential.public()

        def open_sealed(self, ct: bytes, info: bytes) -> object:
            return carol.credential.open_sealed(ct, info)

        def sign(self, domain: str, message: bytes) -> object:
            return bob.credential.sign(domain, message)

    refused(
        daemon,
        lambda: actions.submit_share(daemon.stub, Impostor()),  # type: ignore[arg-type]
        code=grpc.StatusCode.PERMISSION_DENIED,
        match="signature",
    )
    assert session.progress == 0


def test_submission_for_another_session_is_refused(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    submit(daemon, custodians[0])
    real = daemon.stub.OpenUnsealSession(pb.OpenUnsealSessionRequest())

    class OtherSession:
        def __init__(self, stub: object) -> None:
            self._stub = stub

        def __getattr__(self, name: str) -> object:
            return getattr(self._stub, name)

        def OpenUnsealSession(self, request: object) -> pb.UnsealSession:
            other = pb.UnsealSession()
            other.CopyFrom(real)
            other.session_id = "00" * 16
            return other

    refused(
        daemon,
        lambda: actions.submit_share(OtherSession(daemon.stub), custodians[1].credential),  # type: ignore[arg-type]
        code=grpc.StatusCode.ALREADY_EXISTS,
        match="another unseal session",
    )


def test_expired_session_is_refused(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    submit(daemon, custodians[0])
    session = daemon.stub.OpenUnsealSession(pb.OpenUnsealSessionRequest())
    daemon.clock.advance(DEFAULT_LIMITS.unseal_session_seconds + 1)

    class StaleSession:
        def __init__(self, stub: object) -> None:
            self._stub = stub

        def __getattr__(self, name: str) -> object:
            return getattr(self._stub, name)

        def OpenUnsealSession(self, request: object) -> pb.UnsealSession:
            return session

    with pytest.raises(KeyquorumError, match="expired"):
        actions.submit_share(StaleSession(daemon.stub), custodians[1].credential)  # type: ignore[arg-type]
    # The expired session's shares are gone: a new session starts from zero.
    assert status(daemon.stub).unseal_progress == 0
    assert daemon.stub.OpenUnsealSession(pb.OpenUnsealSessionRequest()).progress == 0


def test_share_from_another_deployment_is_refused(
    tmp_path: Path,
    pki: DevPki,
    daemon: InProcessDaemon,
    custodians: list[Custodian],
) -> None:
    """Alice is custodian of two deployments; her share of the other one is refused."""
    with in_process_daemon(tmp_path / "other", pki) as other:
        ceremony(other, custodians, threshold=3)
        session = daemon.stub.OpenUnsealSession(pb.OpenUnsealSessionRequest())

        class Mixed:
            """The other deployment's share, sent to this daemon's session."""

            def __getattr__(self, name: str) -> object:
                return getattr(other.stub, name)

            def OpenUnsealSession(self, request: object) -> pb.UnsealSession:
                return session

            def SubmitShare(self, request: object) -> pb.UnsealProgress:
                return daemon.stub.SubmitShare(request)

        refused(
            daemon,
            lambda: actions.submit_share(Mixed(), custodians[0].credential),  # type: ignore[arg-type]
            code=grpc.StatusCode.INVALID_ARGUMENT,
            match="custodian alice",
        )


def test_non_custodian_is_refused(daemon: InProcessDaemon, others: list[Custodian]) -> None:
    with pytest.raises(KeyquorumError, match="not on the roster"):
        actions.submit_share(daemon.stub, others[0].credential)


# -- seal ------------------------------------------------------------------------


def unseal(d: InProcessDaemon, custodians: list[Custodian]) -> None:
    for c in custodians[:THRESHOLD]:
        submit(d, c)
    assert not status(d.stub).sealed


def test_seal_wipes_the_master_key_buffer(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    unseal(daemon, custodians)
    buf = daemon.daemon.master_key_buffer_for_test()
    assert buf is not None
    assert any(buf)
    actions.seal(
        daemon.stub,
        custodians[6],
        lambda _t: custodians[6].credential,
        reason="test",
        now=daemon.clock.now,
    )
    assert buf == bytearray(len(buf))
    assert daemon.daemon.master_key_buffer_for_test() is None
    assert status(daemon.stub).sealed


def test_seal_request_replayed_is_refused(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    unseal(daemon, custodians)
    captured: list[pb.SealRequest] = []

    class Recorder:
        def __getattr__(self, name: str) -> object:
            return getattr(daemon.stub, name)

        def Seal(self, request: pb.SealRequest) -> pb.SealResponse:
            captured.append(request)
            return daemon.stub.Seal(request)

    actions.seal(
        Recorder(),  # type: ignore[arg-type]
        custodians[0],
        lambda _t: custodians[0].credential,
        reason="x",
        now=daemon.clock.now,
    )
    unseal(daemon, custodians)
    refused(
        daemon,
        lambda: daemon.stub.Seal(captured[0]),
        code=grpc.StatusCode.ALREADY_EXISTS,
        match="already used",
    )


def test_seal_request_replayed_after_restart_is_refused(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    """Single use is a rule of the log, not of one process's memory."""
    captured: list[pb.SealRequest] = []
    clock = FakeClock()
    with in_process_daemon(tmp_path / "data", pki, clock=clock) as d:
        ceremony(d, custodians)
        unseal(d, custodians)

        class Recorder:
            def __getattr__(self, name: str) -> object:
                return getattr(d.stub, name)

            def Seal(self, request: pb.SealRequest) -> pb.SealResponse:
                captured.append(request)
                return d.stub.Seal(request)

        actions.seal(
            Recorder(),  # type: ignore[arg-type]
            custodians[0],
            lambda _t: custodians[0].credential,
            reason="x",
            now=clock.now,
        )
    with in_process_daemon(tmp_path / "data", pki, clock=clock) as d:
        unseal(d, custodians)
        refused(
            d,
            lambda: d.stub.Seal(captured[0]),
            code=grpc.StatusCode.ALREADY_EXISTS,
            match="already used",
        )
        assert not status(d.stub).sealed


def test_stale_seal_request_is_refused(
    daemon: InProcessDaemon, custodians: list[Custodian]
) -> None:
    unseal(daemon, custodians)
    with pytest.raises(KeyquorumError, match="too far"):
        actions.seal(
            daemon.stub,
            custodians[0],
            lambda _t: custodians[0].credential,
            reason="old",
            now=daemon.clock.now - 3600,
        )
    assert not status(daemon.stub).sealed


def test_forged_seal_is_refused(daemon: InProcessDaemon, custodians: list[Custodian]) -> None:
    unseal(daemon, custodians)
    req = pb.SealRequest(
        custodian=custodians[0].fingerprint,
        requested_at=daemon.clock.now,
        reason="forged",
        signature=custodians[1].credential.sign("seal", b"anything").to_bytes(),
    )
    with pytest.raises(grpc.RpcError) as info:
        daemon.stub.Seal(req)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert not status(daemon.stub).sealed


# -- restart and tampering -----------------------------------------------------


def test_restart_starts_sealed_and_unseals_again(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    with in_process_daemon(tmp_path / "data", pki) as d:
        ceremony(d, custodians)
        unseal(d, custodians)
        size = status(d.stub).log_size
    with in_process_daemon(tmp_path / "data", pki) as d:
        s = status(d.stub)
        assert s.sealed
        assert s.initialized
        # The shutdown seal was logged.
        assert s.log_size == size + 1
        unseal(d, custodians[2:])


def _edit_entry(db: Path, seq: int, old: bytes, new: bytes) -> None:
    con = sqlite3.connect(db)
    try:
        # A database administrator is not stopped by the store's triggers.
        triggers = con.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall()
        for (trigger,) in triggers:
            con.execute(f"DROP TRIGGER {trigger}")
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
            if "seq" in cols and "entry" in cols:
                (raw,) = con.execute(f"SELECT entry FROM {table} WHERE seq=?", (seq,)).fetchone()
                assert old in raw
                con.execute(
                    f"UPDATE {table} SET entry=? WHERE seq=?", (raw.replace(old, new, 1), seq)
                )
                con.commit()
                return
        raise AssertionError(f"no log table in {tables}")
    finally:
        con.close()


def test_tampered_log_stops_the_daemon_naming_the_entry(
    tmp_path: Path, pki: DevPki, custodians: list[Custodian]
) -> None:
    with in_process_daemon(tmp_path / "data", pki) as d:
        ceremony(d, custodians)
        unseal(d, custodians)
    db = tmp_path / "data" / "keyquorum.sqlite"
    _edit_entry(db, 1, b'"replica":"test-1"', b'"replica":"test-X"')
    store = SqliteStore.open(db)
    try:
        with pytest.raises(LogIntegrityError, match="entry 1"):
            Daemon(
                store,
                data_dir=tmp_path / "data",
                replica="test-1",
                limits=DEFAULT_LIMITS,
                clock=FakeClock(),
            )
    finally:
        store.close()
