"""A request gRPC cannot parse costs the daemon no log line (hsm/services/admission.py).

Anyone who reaches the custodian port (no client certificate needed) can
send bytes that are not the method's request message. The listeners read
every request as bytes and parse it in admission's code, so a malformed one
is answered INVALID_ARGUMENT and nothing is logged: gRPC's own deserialiser,
which logs a traceback per failure, never runs.
"""

from __future__ import annotations

import logging

import grpc
import pytest

from keyquorum.hsm.services import custodian_service
from keyquorum.hsm.services.admission import AddressPeers
from keyquorum.hsm.services.server import create_server
from keyquorum.quorum.limits import DEFAULT_LIMITS
from tests.harness import FakeClock


@pytest.mark.parametrize(
    "method",
    ["/grpc.health.v1.Health/Check", "/keyquorum.v1.CustodianService/GetProposal"],
    ids=["health", "custodian"],
)
def test_unparseable_requests_are_refused_without_a_log_line(
    tmp_path: object, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    from pathlib import Path

    from keyquorum.hsm.daemon import Daemon
    from keyquorum.hsm.stores.sqlite import SqliteStore

    data = Path(str(tmp_path))
    store = SqliteStore.open(data / "kq.sqlite")
    daemon = Daemon(
        store,
        data_dir=data,
        replica="t",
        limits=DEFAULT_LIMITS,
        clock=FakeClock(),
        sweep_seconds=None,
    )
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=None,
        limits=DEFAULT_LIMITS,
        register=[custodian_service.register(daemon, DEFAULT_LIMITS)],
        service_names=[custodian_service.SERVICE_NAME],
        peers=AddressPeers(),
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(
                method, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            with caplog.at_level(logging.INFO):
                for _ in range(20):
                    with pytest.raises(grpc.RpcError) as info:
                        call(b"\xff\xff\xff", timeout=10)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(grace=None).wait()
        daemon.seal_for_shutdown()
        store.close()
    # `server run` logs at INFO: nothing at INFO or above came from the requests.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == []
