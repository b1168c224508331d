"""The metrics port: /metrics for Prometheus, /health for load balancers.

Plain HTTP on a port of its own (`server run --metrics-listen`), because it
carries nothing secret and must be reachable without a client certificate:

- `GET /metrics`: the registry in Prometheus' text format (OpenMetrics when
  the scraper asks for it);
- `GET /health`: 200 and `unsealed` when this replica can serve keys, 503
  and `sealed` or `not initialised` otherwise, so a load balancer that
  cannot speak gRPC health over mTLS still stops sending backends to a
  sealed replica;
- any other path: 404; a method other than GET and HEAD: 405.

Capacity: at most `MAX_CONNECTIONS` connections are served at once, each on
a thread of its own; a further one is closed at once, and a client that
sends nothing for `REQUEST_TIMEOUT` seconds is dropped, so a flood or a
slow client on this port holds a bounded number of the daemon's threads
and never delays a gRPC call's thread. Requests are not logged.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from keyquorum.quorum.errors import InvalidInputError

MAX_CONNECTIONS: Final = 8
REQUEST_TIMEOUT: Final = 10.0

Health = Callable[[], tuple[int, str]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    #: A successor process binds the same port during a handover (hsm/upgrade.py).
    allow_reuse_port = True

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        health: Health | None,
        family: socket.AddressFamily,
    ) -> None:
        self.address_family = family
        self.registry = registry
        self.health = health
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # over capacity: closed, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    protocol_version = "HTTP/1.0"
    server_version = "keyquorum"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, *, head: bool) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.server.registry), content_type, head=head)
        elif path == "/health" and self.server.health is not None:
            status, text = self.server.health()
            self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8", head=head)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", head=head)

    def _refuse_method(self) -> None:
        self._send(405, b"method not allowed\n", "text/plain; charset=utf-8", head=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    def _send(self, status: int, body: bytes, content_type: str, *, head: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (a scraper every few seconds is noise)."""


class MetricsServer:
    """The running metrics endpoint."""

    def __init__(self, httpd: _Server, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @classmethod
    def start(
        cls, host: str, port: int, registry: CollectorRegistry, *, health: Health | None = None
    ) -> MetricsServer:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            httpd = _Server((host, port), registry, health, family)
        except OSError as e:
            raise InvalidInputError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}"
            ) from e
        thread = threading.Thread(target=httpd.serve_forever, name="kq-metrics", daemon=True)
        thread.start()
        return cls(httpd, thread)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
