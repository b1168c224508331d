"""Two replicas against one: Wrap ops/s and log appends/s over one PostgreSQL.

Setup (real processes, as an operator runs them, docs/replicas.md): a
throw-away PostgreSQL cluster (tests/pg.py, or KEYQUORUM_TEST_PG_DSN), two
`keyquorum server run --store postgres` processes kq-a and kq-b, each with
its KeyService mTLS listener; the ceremony through kq-a, the log key
copied to kq-b, both unsealed on their own sessions; tenant created,
granted to the backend and activated by the quorum.

Rows, each against the one-replica figure measured in the same run (rounds
alternate one and two replicas so machine drift hits both):

- Wrap (32-byte data key, two-pair context), THREADS client threads each
  with its own `keyquorum.client.KeyClient`: all to kq-a, against half
  to kq-a and half to kq-b (client-side balancing).
- Log appends (signed proposals: one entry and its checkpoint in one
  store transaction, and the checkpoint file outside it, each durable)
  from THREADS threads: all through replica A, against alternating
  replicas, where appends race for the same log position
  (`AppendConflictError`, re-read, re-decide). These replicas are two
  `Daemon`s in this process over one database (each its own store, pool
  and data directory), the proposals signed before the timing starts, and
  the proposal limits lifted: a deployment's per-proposer rate and open
  bounds (quorum/limits.py) would stop a flood of proposals, which is
  what this row makes.

On the 2-core development VM the two daemons, PostgreSQL and the client
share the same two cores, so a second replica adds availability, not
throughput; the rows say how much it costs.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench.harness import Row
from keyquorum.cli import custodian_actions as actions
from keyquorum.client import KeyClient
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.logkey import KEY_FILE
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.stores.postgres import PostgresStore
from keyquorum.quorum import statements
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.errors import StorageError
from keyquorum.quorum.limits import Limits
from keyquorum.v1 import custodian_pb2_grpc as pb_grpc
from tests.harness import DaemonProcess, ceremony_request, start_daemon_process
from tests.pg import PostgresUnavailableError, server_from_environment

TENANT = "acme-health"
CONTEXT = {"patient": "p-4711", "record": "appointment-2026-05-01"}
PLAINTEXT = bytes(range(32))
THREADS = 8
THRESHOLD = 3


def _replica(root: Path, pki: DevPki, name: str, dsn: str) -> DaemonProcess:
    os.environ["KEYQUORUM_DSN"] = dsn
    try:
        return start_daemon_process(
            root / name, pki, "--store", "postgres", "--replica", name,
            "--listen-mtls", "127.0.0.1:0", "--client-ca", str(pki.ca_cert),
        )  # fmt: skip
    finally:
        del os.environ["KEYQUORUM_DSN"]


def _mtls_port(proc: DaemonProcess) -> int:
    ready = proc.data_dir.parent / f"{proc.data_dir.name}.ready"
    return int(json.loads(ready.read_text())["mtls_port"])


def _govern(stub: pb_grpc.CustodianServiceStub, custodians: list[CustodianCredential]) -> None:
    """Tenant created, granted to the booking backend and activated by the quorum."""
    for operation, params in (
        ("create-tenant", {"tenant": TENANT}),
        ("grant", {"tenant": TENANT, "backend": "booking"}),
        ("activate-tenant", {"tenant": TENANT, "duration_seconds": "86400"}),
    ):
        proposal = actions.propose(
            stub,
            custodians[0].public(),
            lambda _s: custodians[0],
            operation,
            sorted(params.items()),
            now=int(time.time()),
        )
        for c in custodians[:THRESHOLD]:
            fingerprint = c.public().fingerprint
            actions.verdict(stub, proposal.id, fingerprint, lambda _s, c=c: c, verdict="approve")


#: Calls answered UNAVAILABLE ("the log is busy": a replica lost the race for
#: the log MAX_CONFLICT_RETRIES times in a row); clients retry those.
BUSY = [0]


def _rate(workers: list[Callable[[], object]], seconds: float) -> float:
    """Successful calls per second of all `workers` running at once (one thread each)."""
    stop = threading.Event()
    counts = [0] * len(workers)

    def loop(i: int) -> None:
        fn = workers[i]
        while not stop.is_set():
            try:
                fn()
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                BUSY[0] += 1
                continue
            except StorageError:  # the same answer, in process
                BUSY[0] += 1
                continue
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(workers))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _alternate(
    one: Callable[[], float], two: Callable[[], float], rounds: int
) -> tuple[float, float]:
    a, b = [], []
    for _ in range(rounds):
        a.append(one())
        b.append(two())
    return statistics.median(a), statistics.median(b)


def run(quick: bool) -> list[Row]:
    try:
        server_cm = server_from_environment()
        server = server_cm.__enter__()
    except PostgresUnavailableError as e:
        print(f"# bench_replicas skipped: {e}", file=sys.stderr)
        return []
    work = Path(tempfile.mkdtemp(prefix="keyquorum-bench-replicas-"))
    procs: list[DaemonProcess] = []
    clients: list[KeyClient] = []
    try:
        _schema, dsn = server.create_schema("kq_bench")
        pki = make_dev_pki(work / "pki", clients=["backend/booking"])
        custodians = [CustodianCredential.generate(n) for n in ("ann", "ben", "cay", "dan", "eve")]
        a = _replica(work, pki, "kq-a", dsn)
        procs.append(a)
        with a.channel() as channel:
            stub = pb_grpc.CustodianServiceStub(channel)
            request = ceremony_request("bench", THRESHOLD, [], a.ceremony_code())
            request.public_credentials.extend(c.public().to_bytes() for c in custodians)
            stub.InitCeremony(request)
        (work / "kq-b").mkdir()
        shutil.copy(work / "kq-a" / KEY_FILE, work / "kq-b" / KEY_FILE)
        b = _replica(work, pki, "kq-b", dsn)
        procs.append(b)
        for proc in procs:
            with proc.channel() as channel:
                for c in custodians[:THRESHOLD]:
                    actions.submit_share(pb_grpc.CustodianServiceStub(channel), c)
        with a.channel() as channel:
            _govern(pb_grpc.CustodianServiceStub(channel), custodians)
        time.sleep(1.5)  # kq-b follows the activation (docs/replicas.md bound)

        def client(proc: DaemonProcess) -> KeyClient:
            c = KeyClient(
                f"127.0.0.1:{_mtls_port(proc)}",
                ca=pki.ca_cert,
                cert=pki.directory / "backend-booking.crt",
                key=pki.directory / "backend-booking.key",
            )
            clients.append(c)
            return c

        to_a = [client(a) for _ in range(THREADS)]
        spread = [client(a if i % 2 == 0 else b) for i in range(THREADS)]
        for c in [*to_a, *spread]:
            c.wrap(TENANT, PLAINTEXT, CONTEXT)  # connect and warm up

        def wraps(cs: list[KeyClient]) -> list[Callable[[], object]]:
            return [lambda c=c: c.wrap(TENANT, PLAINTEXT, CONTEXT) for c in cs]

        seconds, rounds = (0.5, 2) if quick else (1.5, 5)
        one, two = _alternate(
            lambda: _rate(wraps(to_a), seconds), lambda: _rate(wraps(spread), seconds), rounds
        )
        rows = [
            Row(
                f"Wrap, {THREADS} client threads, 2 replicas (PostgreSQL)",
                two,
                f"Wrap, {THREADS} client threads, 1 replica",
                one,
            )
        ]

        for proc in procs:
            proc.stop()
        procs.clear()
        rows.append(_appends(work, dsn, custodians[0], seconds, rounds))
        return rows
    finally:
        for c in clients:
            c.close()
        for proc in procs:
            proc.stop()
        server_cm.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


def _appends(
    work: Path, dsn: str, proposer: CustodianCredential, seconds: float, rounds: int
) -> Row:
    """Governance appends from THREADS threads: one replica, against two racing."""
    limits = Limits(
        max_open_proposals=10**9,
        max_open_proposals_per_proposer=10**9,
        proposals_per_minute=10**9,
        proposal_burst=10**9,
    )
    daemons = []
    for name in ("kq-a", "kq-b"):
        daemons.append(
            Daemon(
                PostgresStore.open(dsn), data_dir=work / name, replica=name, limits=limits,
                clock=lambda: int(time.time()), sweep_seconds=None, follow_seconds=None,
            )
        )  # fmt: skip
    deployment = daemons[0].state.deployment
    fingerprint = proposer.public().fingerprint
    expires = int(time.time()) + 3600

    def sign(n: int) -> tuple[bytes, str, bytes]:
        pid = n.to_bytes(16, "big")
        statement = statements.proposal_statement(
            deployment=deployment, proposer=proposer.public(), proposal_id=pid,
            operation="create-tenant", parameters={"tenant": f"t{n}"}, expires_at=expires,
        )  # fmt: skip
        return pid, f"t{n}", proposer.sign(statement.domain, statement.message()).to_bytes()

    # Signed before the timing: the rows measure the daemons, not the proposer
    # (more are signed on the way if these run out).
    signed = [sign(n) for n in range(int(2 * rounds * seconds * 500) + 500)]
    taken = [0]
    lock = threading.Lock()

    def proposals(targets: list[Daemon]) -> list[Callable[[], object]]:
        def one_append(daemon: Daemon) -> object:
            with lock:
                n = taken[0]
                taken[0] += 1
            pid, tenant, signature = signed[n] if n < len(signed) else sign(n)
            return daemon.propose(
                "create-tenant", [("tenant", tenant)], proposal_id=pid, expires_at=expires,
                proposer=fingerprint, signature=signature,
            )  # fmt: skip

        chosen = [targets[i % len(targets)] for i in range(THREADS)]
        return [lambda d=d: one_append(d) for d in chosen]

    BUSY[0] = 0
    try:
        one, two = _alternate(
            lambda: _rate(proposals(daemons[:1]), seconds),
            lambda: _rate(proposals(daemons), seconds),
            rounds,
        )
    finally:
        for d in daemons:
            d.seal_for_shutdown()
    return Row(
        f"log append through the daemon, {THREADS} threads, 2 replicas racing "
        f"({BUSY[0]} answered busy)",
        two,
        f"log append, {THREADS} threads, 1 replica",
        one,
        unit="appends/s",
    )


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(row)
