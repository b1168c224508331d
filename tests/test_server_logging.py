"""gRPC's log line per unparseable request is rate-limited (hsm/services/server.py).

Anyone who reaches the custodian port (no client certificate needed) can
send bytes gRPC cannot parse; gRPC logs a traceback for each. The filter
keeps one line per interval, without the traceback, with a count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import pytest

from keyquorum.hsm.services import server as server_module
from keyquorum.hsm.services.server import UnparseableRequestLog, create_server
from keyquorum.quorum.limits import DEFAULT_LIMITS

GRPC_LOGGER = "grpc._common"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(message: str, with_traceback: bool = True) -> logging.LogRecord:
    try:
        raise ValueError("Error parsing message with type 'grpc.health.v1.HealthCheckRequest'")
    except ValueError:
        import sys

        exc_info = sys.exc_info() if with_traceback else None
    return logging.LogRecord(GRPC_LOGGER, logging.ERROR, __file__, 1, message, None, exc_info)


def test_first_record_passes_without_traceback_then_one_per_interval() -> None:
    clock = Clock()
    log_filter = UnparseableRequestLog(interval=60, clock=clock)
    first = _record("Exception deserializing message!")
    assert log_filter.filter(first)
    assert first.exc_info is None
    assert first.exc_text is None
    assert first.getMessage() == (
        "gRPC could not parse a request (ValueError); 0 more not logged since the last line"
    )
    for _ in range(25):
        clock.now += 2
        assert not log_filter.filter(_record("Exception deserializing message!"))
    clock.now += 60
    later = _record("Exception deserializing message!")
    assert log_filter.filter(later)
    assert "25 more not logged" in later.getMessage()
    assert later.exc_info is None


def test_other_records_pass_unchanged() -> None:
    log_filter = UnparseableRequestLog(interval=60, clock=Clock())
    assert log_filter.filter(_record("Exception deserializing message!"))
    other = _record("Exception serializing message!")
    assert log_filter.filter(other)
    assert other.exc_info is not None
    assert other.getMessage() == "Exception serializing message!"


@pytest.fixture
def fresh_filter() -> Iterator[Clock]:
    """The module's filter replaced by one on a fake clock, for the test's duration."""
    logger = logging.getLogger(GRPC_LOGGER)
    clock = Clock()
    replacement = UnparseableRequestLog(interval=60, clock=clock)
    logger.removeFilter(server_module._UNPARSEABLE)
    logger.addFilter(replacement)
    try:
        yield clock
    finally:
        logger.removeFilter(replacement)
        logger.addFilter(server_module._UNPARSEABLE)


def test_installed_on_grpc_logger() -> None:
    assert server_module._UNPARSEABLE in logging.getLogger(GRPC_LOGGER).filters


def test_a_real_server_logs_one_line_for_many_unparseable_requests(
    fresh_filter: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=None,
        limits=DEFAULT_LIMITS,
        register=[],
        service_names=[],
    )
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with caplog.at_level(logging.ERROR, logger=GRPC_LOGGER):
                for _ in range(20):
                    with pytest.raises(grpc.RpcError) as info:
                        check(b"\xff\xff\xff", timeout=10)
                    assert info.value.code() == grpc.StatusCode.INTERNAL
                fresh_filter.now += 61
                with pytest.raises(grpc.RpcError):
                    check(b"\xff\xff\xff", timeout=10)
    finally:
        server.stop(grace=None).wait()
    records = [r for r in caplog.records if r.name == GRPC_LOGGER]
    assert len(records) == 2
    assert all(r.exc_info is None for r in records)
    assert "19 more not logged" in records[1].getMessage()
    assert "Traceback" not in caplog.text
