"""Usage counters for Prometheus, served on a port of their own.

The data plane's usage is not a quorum event (DESIGN.md): it is counted
here per backend, tenant, operation and outcome, and scraped from a
separate plain-HTTP port (`server run --metrics-listen HOST:PORT`) that
carries nothing secret, so it can sit on an operators' network without
client certificates.

Labels are bounded: `backend` is a name from a verified client
certificate; `tenant` is "-" unless the backend was granted that tenant
(so a caller cannot fill the label space with made-up names); `operation`
is one of the service's eight methods' names; `outcome` is "OK" or the
gRPC status code name (`keyquorum.hsm.services.status`, the one mapping). No
metric carries a context, a plaintext or a key.
"""

from __future__ import annotations

import threading
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.metrics import Counter as _Counter

from keyquorum.hsm.services.status import code_for
from keyquorum.quorum.errors import InvalidInputError, KeyquorumError

REQUESTS: Final = "keyquorum_keyservice_requests"
SEALED: Final = "keyquorum_sealed"


class Metrics:
    """The usage counters of one daemon, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._requests = Counter(
            REQUESTS,
            "KeyService items by backend, tenant, operation and outcome (gRPC code name)",
            ["backend", "tenant", "operation", "outcome"],
            registry=self.registry,
        )
        self._sealed = Gauge(SEALED, "1 while this daemon is sealed", registry=self.registry)
        self._sealed.set(1)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, str, str, str], _Counter] = {}

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,  # noqa: ARG002 (the UsageSink protocol; metrics never see it)
    ) -> None:
        """Count one item."""
        outcome = "OK" if error is None else code_for(error).name
        labels = (backend, tenant, operation, outcome)
        child = self._children.get(labels)
        if child is None:
            with self._lock:
                child = self._children.setdefault(labels, self._requests.labels(*labels))
        child.inc()

    def set_sealed(self, sealed: bool) -> None:
        self._sealed.set(1 if sealed else 0)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics over HTTP on host:port (port 0: any free port)."""
        try:
            httpd, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise InvalidInputError(f"cannot serve metrics on {host}:{port}: {e.strerror}") from e
        return MetricsServer(httpd, thread)


class MetricsServer:
    """The running metrics endpoint."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread

    @property
    def port(self) -> int:
        return self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
