"""A KeyService on a real mTLS listener over an in-process daemon, and its tenants.

`key_plane` serves the daemon's data plane as `keyquorum server run` does
(client certificates required, health watching the seal); `ready_tenant`
makes a tenant usable through three quorums; `served` is a whole
deployment (ceremony, unseal, two tenants granted to the booking backend)
with a usage sink counting what the data plane served.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyquorum.cli import custodian_actions as actions
from keyquorum.client import AsyncKeyClient, KeyClient
from keyquorum.hsm import tls
from keyquorum.hsm.dataplane import DataPlane, UsageSink
from keyquorum.hsm.dataplane.ratelimit import RateLimiter
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.services import key_service
from keyquorum.hsm.services.admission import CertificatePeers
from keyquorum.hsm.services.server import Listener, create_server
from keyquorum.quorum.errors import KeyquorumError
from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
from tests.custodian_steps import K, ceremony, run, unseal
from tests.harness import Custodian, FakeClock, InProcessDaemon, in_process_daemon

TENANT = "acme-health"
SECOND = "second-tenant"
BOOKING = "backend/booking"
MESSAGING = "backend/messaging"
AUDITOR = "auditor/alice"
CONTEXT = {"patient": "p-4711 Erika Mustermann", "doctor": "dr-0815"}
#: A plaintext no error message, log line or metric may ever contain.
MARKER = b"PLAINTEXT-MARKER-" + bytes(range(16)) + b"-END"


@dataclass
class KeyPlane:
    """A KeyService on an mTLS listener over an in-process daemon."""

    d: InProcessDaemon
    plane: DataPlane
    server: Listener
    port: int
    pki: DevPki

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, who: str = BOOKING, **kw: object) -> KeyClient:
        files = self.pki.client(who)
        return KeyClient(
            self.target,
            ca=self.pki.ca_cert,
            cert=files.cert,
            key=files.key,
            attempts=1,
            **kw,  # type: ignore[arg-type]
        )


@contextmanager
def key_plane(
    d: InProcessDaemon,
    dev_pki: DevPki,
    *,
    limits: Limits = DEFAULT_LIMITS,
    usage: tuple[UsageSink, ...] = (),
    rate_limit: RateLimiter | None = None,
) -> Iterator[KeyPlane]:
    plane = DataPlane(d.daemon, d.store, limits=limits, usage=usage, rate_limit=rate_limit)
    server, port = create_server(
        host="127.0.0.1",
        port=0,
        credentials=tls.server_credentials(
            dev_pki.server_cert,
            dev_pki.server_key,
            client_ca=dev_pki.ca_cert,
            require_client_auth=True,
        ),
        limits=DEFAULT_LIMITS,
        register=[key_service.register(plane)],
        service_names=[key_service.SERVICE_NAME],
        peers=CertificatePeers(),
    )
    key_service.watch_health(d.daemon, server)
    server.start()
    try:
        yield KeyPlane(d, plane, server, port, dev_pki)
    finally:
        server.stop(grace=None).wait()


def make_pki(directory: Path) -> DevPki:
    """A development PKI with certificates for both backends and the auditor."""
    return make_dev_pki(directory, clients=[BOOKING, MESSAGING, AUDITOR])


def ready_tenant(
    d: InProcessDaemon,
    custodians: list[Custodian],
    tenant: str,
    *,
    backend: str = "booking",
    activate: bool = True,
) -> None:
    """Create `tenant`, grant it to `backend` and (by default) activate it: three quorums."""
    run(d, custodians, "create-tenant", tenant=tenant)
    run(d, custodians, "grant", tenant=tenant, backend=backend)
    if activate:
        run(d, custodians, "activate-tenant", tenant=tenant, duration_seconds=3600)


class Calls:
    """A usage sink: what the daemon's data plane served, per operation."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: collections.Counter[str] = collections.Counter()

    def record(
        self,
        backend: str,
        tenant: str,
        operation: str,
        error: KeyquorumError | None,
        context: bytes | None,
    ) -> None:
        with self._lock:
            self.ops[operation] += 1

    def __getitem__(self, op: str) -> int:
        with self._lock:
            return self.ops[op]


@dataclass
class Served:
    """A deployment serving the booking backend two tenants; `calls` counts what it served."""

    kp: KeyPlane
    custodians: list[Custodian]
    calls: Calls

    @property
    def d(self) -> InProcessDaemon:
        return self.kp.d

    def client(self, **kw: Any) -> KeyClient:
        files = self.kp.pki.client(BOOKING)
        return KeyClient(
            self.kp.target, ca=self.kp.pki.ca_cert, cert=files.cert, key=files.key, **kw
        )

    def aclient(self, **kw: Any) -> AsyncKeyClient:
        files = self.kp.pki.client(BOOKING)
        return AsyncKeyClient(
            self.kp.target, ca=self.kp.pki.ca_cert, cert=files.cert, key=files.key, **kw
        )

    def seal(self) -> None:
        c = self.custodians[6]
        actions.seal(self.d.stub, c, lambda _t: c.credential, reason="test", now=self.d.clock.now)


@contextmanager
def served(
    base: Path, pki: DevPki, custodians: list[Custodian], replica: str = "test-1"
) -> Iterator[Served]:
    calls = Calls()
    with in_process_daemon(base, pki, clock=FakeClock(), replica=replica) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:K])
        ready_tenant(d, custodians, TENANT)
        ready_tenant(d, custodians, SECOND)
        with key_plane(d, pki, usage=(calls,)) as kp:
            yield Served(kp, custodians, calls)
