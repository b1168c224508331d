"""The daemon's Prometheus metrics, in one registry of their own.

Scraped from a separate plain-HTTP port (`server run --metrics-listen
HOST:PORT`, hsm/services/metrics_http.py) that carries nothing secret, so
it can sit on an operators' network without client certificates. Names
(README.md lists them; tests/test_metrics.py checks each is exported):

- `keyquorum_rpc_requests_total{service,method,code}` and
  `keyquorum_rpc_duration_seconds{service,method,code}` (histogram): every
  gRPC call on both listeners, by status code name ("OK" for success),
  timed in the server's handler (a stream until its last message), told by
  every listener's admission (`RpcMetrics.observe`, hsm/services/admission.py;
  worker processes send theirs to the daemon).
- `keyquorum_keyservice_requests_total{backend,tenant,operation,outcome}`:
  KeyService items; a batch counts each of its items (`record`, the data
  plane's `UsageSink`).
- `keyquorum_sealed`, `keyquorum_initialized`, `keyquorum_unseal_shares`
  (received in the open unseal session), `keyquorum_unseal_threshold`.
- `keyquorum_log_entries`, `keyquorum_log_append_duration_seconds`
  (histogram; `keyquorum_log_append_failures_total` counts appends that
  raised), `keyquorum_checkpoint_age_seconds` (since the newest signed
  checkpoint was stored; before one is published by this process, since
  the newest entry it covers was appended), `keyquorum_replica_lag_entries`
  (entries in the store this replica has not applied yet).
- `keyquorum_tenant_activation_remaining_seconds{tenant}`: for each active
  tenant, seconds until its activation ends.
- `keyquorum_encryptions_reserved{tenant,version}` against
  `keyquorum_encryption_limit` (2^32, NIST SP 800-38D): encryptions
  reserved per tenant key version, an upper bound of those used.
- `keyquorum_store_up`: 1 if the last scrape could read the daemon's
  state and its store, 0 if not (e.g. PostgreSQL down).
- `process_*` (CPU, memory, descriptors, start time) and `python_info`.

Labels are bounded: `service` and `method` only for methods a server
registered; `code` a gRPC status name; `backend` a name from a verified
client certificate; `tenant` is "-" unless the backend was granted that
tenant (so a caller cannot fill the label space with made-up names), or a
tenant of the log; `operation` one of KeyService's eight methods. No
metric carries a context, a plaintext or a key. State gauges are read at
scrape time through the daemon's public methods, never on the call path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import Counter as _Counter
from prometheus_client.registry import Collector

from keyquorum.hsm.services.status import code_for
from keyquorum.hsm.stores.observed import AppendObserver
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.limits import DEFAULT_LIMITS

if TYPE_CHECKING:
    from keyquorum.hsm.daemon import Daemon
    from keyquorum.hsm.services.metrics_http import MetricsServer
    from keyquorum.hsm.stores.base import Store

log = logging.getLogger(__name__)

REQUESTS: Final = "keyquorum_keyservice_requests"
SEALED: Final = "keyquorum_sealed"
RPC_REQUESTS: Final = "keyquorum_rpc_requests"
RPC_DURATION: Final = "keyquorum_rpc_duration_seconds"
APPEND_DURATION: Final = "keyquorum_log_append_duration_seconds"
APPEND_FAILURES: Final = "keyquorum_log_append_failures"
#: Handler times: KeyService calls take well under a millisecond, exports seconds.
RPC_BUCKETS: Final = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip
#: A durable append is an fsync (SQLite) or a commit round trip (PostgreSQL).
APPEND_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
#: Prefix of the store's encryption counters (hsm/dataplane/counters.py).
_COUNTER_PREFIX: Final = "enc/"


class Metrics(AppendObserver):
    """The metrics of one daemon, in a registry of their own."""

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
        self._append_duration = Histogram(
            APPEND_DURATION,
            "Seconds one durable log append took (entries and, where due, salts)",
            buckets=APPEND_BUCKETS,
            registry=self.registry,
        )
        self._append_failures = Counter(
            APPEND_FAILURES, "Log appends that raised (nothing committed)", registry=self.registry
        )
        self.rpc = RpcMetrics(self.registry)
        self._lock = threading.Lock()
        self._children: dict[tuple[str, str, str, str], _Counter] = {}
        self._checkpoint_at: float | None = None

    # -- the data plane's usage sink ---------------------------------------------------

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,  # noqa: ARG002 (the UsageSink protocol; metrics never see it)
    ) -> None:
        """Count one item."""
        self.record_outcome(
            backend, tenant, operation, "OK" if error is None else code_for(error).name, None
        )

    def record_outcome(
        self,
        backend: str,
        tenant: str,
        operation: str,
        outcome: str,
        context: bytes | None,  # noqa: ARG002 (the OutcomeSink protocol; metrics never see it)
    ) -> None:
        """Count one item whose outcome is already a code name (a worker's record)."""
        labels = (backend, tenant, operation, outcome)
        child = self._children.get(labels)
        if child is None:
            with self._lock:
                child = self._children.setdefault(labels, self._requests.labels(*labels))
        child.inc()

    def set_sealed(self, sealed: bool) -> None:
        self._sealed.set(1 if sealed else 0)

    # -- the store's appends (hsm/stores/observed.py) ------------------------------------

    def appended(self, seconds: float, ok: bool) -> None:
        if ok:
            self._append_duration.observe(seconds)
        else:
            self._append_failures.inc()

    def checkpoint_published(self, at: float) -> None:
        self._checkpoint_at = at

    # -- the daemon's state, read at scrape time ---------------------------------------

    def watch(
        self, daemon: Daemon, store: Store, *, clock: Callable[[], float] = time.time
    ) -> None:
        """Export `daemon`'s state (seal, unseal, log, tenants, counters) and the process's."""
        daemon.add_seal_observer(self.set_sealed)
        self.registry.register(
            DaemonCollector(daemon, store, lambda: self._checkpoint_at, clock=clock)
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)

    def serve(
        self, host: str, port: int, *, health: Callable[[], tuple[int, str]] | None = None
    ) -> MetricsServer:
        """Serve /metrics (and /health when given) over HTTP on host:port (0: any free port)."""
        from keyquorum.hsm.services.metrics_http import MetricsServer

        return MetricsServer.start(host, port, self.registry, health=health)


class DaemonCollector(Collector):
    """Gauges read from the daemon's public state when Prometheus scrapes."""

    def __init__(
        self,
        daemon: Daemon,
        store: Store,
        checkpoint_at: Callable[[], float | None],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._daemon = daemon
        self._store = store
        self._checkpoint_at = checkpoint_at
        self._clock = clock
        self._limit = DEFAULT_LIMITS.encryption_limit

    def describe(self) -> Iterable[Metric]:
        return []  # no descriptions up front: `register` must not call collect()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("keyquorum_store_up", "1 if this scrape read the daemon's state")
        try:
            families = list(self._families())
        except KeyquorumError as e:
            log.warning("metrics: cannot read the daemon's state: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        now = self._clock()
        # The store's size before status(), which applies what other replicas appended.
        stored = self._store.size()
        applied = self._daemon.log_size
        status = self._daemon.status()
        yield _gauge("keyquorum_initialized", "1 once the ceremony has run", status.initialized)
        yield _gauge(
            "keyquorum_unseal_shares",
            "Valid shares received in the open unseal session",
            status.unseal_progress,
        )
        yield _gauge("keyquorum_unseal_threshold", "Shares an unseal needs", status.threshold)
        yield _gauge("keyquorum_log_entries", "Entries in the quorum log", status.log_size)
        yield _gauge(
            "keyquorum_replica_lag_entries",
            "Entries in the store that this replica had not applied at the scrape",
            max(0, stored - applied),
        )
        published = self._checkpoint_at()
        if published is None and status.checkpoint:
            published = float(self._daemon.state.time)
        if published is not None:
            yield _gauge(
                "keyquorum_checkpoint_age_seconds",
                "Seconds since the newest signed checkpoint was stored",
                max(0.0, now - published),
            )
        remaining = GaugeMetricFamily(
            "keyquorum_tenant_activation_remaining_seconds",
            "Seconds until each active tenant's activation ends",
            labels=["tenant"],
        )
        if status.initialized:
            for tenant in self._daemon.tenants():
                if tenant.active_until is not None:
                    remaining.add_metric([tenant.name], max(0.0, tenant.active_until - now))
        yield remaining
        reserved = GaugeMetricFamily(
            "keyquorum_encryptions_reserved",
            "Encryptions reserved per tenant key version (an upper bound of those used)",
            labels=["tenant", "version"],
        )
        for name, value in self._store.counters().items():
            labels = _counter_labels(name)
            if labels is not None:
                reserved.add_metric(list(labels), value)
        yield reserved
        yield _gauge(
            "keyquorum_encryption_limit",
            "Encryptions one tenant key version may make (NIST SP 800-38D, random nonces)",
            self._limit,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _counter_labels(name: str) -> tuple[str, str] | None:
    """(tenant, version) of a counter named `enc/<tenant>/v<version>`."""
    if not name.startswith(_COUNTER_PREFIX):
        return None
    tenant, sep, version = name[len(_COUNTER_PREFIX) :].rpartition("/v")
    if not sep or not tenant or not version.isdigit():
        return None
    return tenant, version


_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class RpcMetrics:
    """Counts and times every call of the listeners it observes, by method and code.

    `observe` is the listeners' observer (hsm/services/admission.py): told each
    call's method, status code name and seconds when the call ends. Worker
    processes send theirs to the daemon's (hsm/services/workers.py).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            RPC_REQUESTS,
            "gRPC calls by service, method and status code name",
            ["service", "method", "code"],
            registry=registry,
        )
        self._duration = Histogram(
            RPC_DURATION,
            "Seconds a gRPC call spent in its handler, by service, method and status code name",
            ["service", "method", "code"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self._lock = threading.Lock()
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        """One call of `method` (`/package.Service/Method`) that ended with `code`."""
        key = (method, code)
        children = self._children.get(key)
        if children is None:
            service, _, name = method.lstrip("/").rpartition("/")
            with self._lock:
                children = self._children.setdefault(
                    key,
                    (
                        self._requests.labels(service, name, code),
                        self._duration.labels(service, name, code),
                    ),
                )
        children[0].inc()
        children[1].observe(seconds)
