"""What cosigning adds to each checkpoint, with one and with three witnesses.

A daemon over a SQLite store (real files, WAL, synchronous=FULL) whose log
names 1 or 3 witnesses (added by the quorum); each round appends one signed
proposal (a full governance append: replay, log key signature over the tree
head, entry and checkpoint in one transaction) and then every witness takes
its look (cli/witness.py `step`, in this process, against the audit
service's core `AuditLog`): reads the latest checkpoint, checks its
signature and the consistency proof from the last one it cosigned, writes
its state file durably, cosigns, and the daemon checks and merges the
cosignature into the stored note (a second durable write) and records the
witnessed checkpoint. The baseline is the same append with nobody
cosigning, in the same run, rounds alternating. No gRPC: the network's
share depends on where the witnesses are, the rest is measured here.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import Row
from keyquorum.cli.witness import WitnessState, save_state, step
from keyquorum.hsm.daemon import Daemon
from keyquorum.hsm.daemon.ceremony import CeremonyGate
from keyquorum.hsm.services.audit_service import AuditLog
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum import statements
from keyquorum.quorum.checkpoint import NoteSigner
from keyquorum.quorum.credentials import CustodianCredential
from keyquorum.quorum.limits import Limits
from keyquorum.quorum.note import SignatureType
from keyquorum.quorum.operations import typed_parameters

CUSTODIANS = 3
CODE = "BENC-HMAR-KCOD-E000"


class _Source:
    """The audit service's answers, in process (what `audit witness` asks over gRPC)."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit

    def latest(self) -> tuple[int, str]:
        return self._audit.checkpoint(0)

    def entries(self, start: int, end: int) -> Iterator[bytes]:
        return (raw for _, raw in self._audit.entries(start, end))

    def inclusion(self, index: int, size: int) -> tuple[list[bytes], bytes, str]:
        _, proof, entry, note = self._audit.inclusion(index, size)
        return proof, entry, note

    def consistency(self, size1: int, size2: int) -> tuple[list[bytes], str]:
        _, proof, note = self._audit.consistency(size1, size2)
        return proof, note

    def add_cosignature(self, note: str) -> str:
        return self._audit.add_cosignature(note, "keyquorum://auditor/bench")[1]


class _Deployment:
    """A daemon whose log names `witnesses` witnesses (m = all of them)."""

    def __init__(self, directory: Path, witnesses: int) -> None:
        self.directory = directory
        self.store = SqliteStore.in_directory(directory)
        self.now = int(time.time())
        self.daemon = Daemon(
            self.store,
            data_dir=directory,
            replica="bench",
            limits=Limits(proposals_per_minute=10**6, proposal_burst=10**6,
                          max_open_proposals=10**6, max_open_proposals_per_proposer=10**6),
            clock=lambda: self.now,
            sweep_seconds=None,
            follow_seconds=None,
            ceremony=CeremonyGate(code=CODE),
        )  # fmt: skip
        self.creds = [CustodianCredential.generate(f"c{i}") for i in range(CUSTODIANS)]
        self.daemon.init_ceremony(
            "bench", 2, [c.public().to_bytes() for c in self.creds], code=CODE
        )
        self.audit = AuditLog(self.store, self.daemon)
        self.source = _Source(self.audit)
        self.witnesses: list[tuple[NoteSigner, Path, WitnessState]] = []
        for i in range(witnesses):
            signer = NoteSigner.generate(f"w{i}.bench", sig_type=SignatureType.COSIGNATURE_V1)
            self._quorum("add-witness", {"witness": signer.verifier_key(),
                                         "witness_threshold": str(i + 1)})  # fmt: skip
            state = WitnessState(self.daemon.state.log_key)
            path = directory / f"w{i}.state"
            save_state(path, state)
            self.witnesses.append((signer, path, state))
        self.n = 0

    def propose(self, operation: str, params: dict[str, str]) -> bytes:
        proposer = self.creds[0]
        pid = os.urandom(16)
        typed = typed_parameters(list(params.items()))
        statement = statements.proposal_statement(
            deployment="bench", proposer=proposer.public(), proposal_id=pid,
            operation=operation, parameters=dict(typed), expires_at=self.now + 3600,
        )  # fmt: skip
        signature = proposer.sign(statement.domain, statement.message()).to_bytes()
        self.daemon.propose(
            operation, list(params.items()), proposal_id=pid, expires_at=self.now + 3600,
            proposer=proposer.fingerprint, signature=signature,
        )  # fmt: skip
        return pid

    def _quorum(self, operation: str, params: dict[str, str]) -> None:
        pid = self.propose(operation, params)
        view = self.daemon.get_proposal(pid)
        text = view.approve_statement
        for c in self.creds[:2]:
            signature = c.sign("approve", text.encode()).to_bytes()
            self.daemon.approve(pid, c.fingerprint, signature)

    def append(self) -> None:
        self.n += 1
        self.propose("create-tenant", {"tenant": f"t{self.n}"})

    def cosign_all(self) -> None:
        for i, (signer, path, last) in enumerate(self.witnesses):

            def remember(new: WitnessState, path: Path = path) -> None:
                save_state(path, new)

            now, _ = step(self.source, signer, last, self.now, remember)
            self.witnesses[i] = (signer, path, now)

    def close(self) -> None:
        self.daemon.seal_for_shutdown()
        self.store.close()


def _row(witnesses: int, per_round: int, rounds: int) -> Row:
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        cosigned = _Deployment(Path(a), witnesses)
        plain = _Deployment(Path(b), 0)
        try:
            cosigned.cosign_all()  # from the add-witness checkpoint on
            with_time = without_time = 0.0
            for _ in range(rounds):
                began = time.perf_counter()
                for _ in range(per_round):
                    cosigned.append()
                    cosigned.cosign_all()
                with_time += time.perf_counter() - began
                began = time.perf_counter()
                for _ in range(per_round):
                    plain.append()
                without_time += time.perf_counter() - began
            if not cosigned.daemon.witnessed_checkpoint():
                raise RuntimeError("the witnesses' cosignatures were not recorded")
        finally:
            cosigned.close()
            plain.close()
    total = per_round * rounds
    added_ms = (with_time - without_time) / total * 1e3
    return Row(
        f"append + cosignatures of {witnesses} witness(es) per checkpoint "
        f"(+{added_ms:.2f} ms per checkpoint)",
        total / with_time,
        "the same append, no witness",
        total / without_time,
        "checkpoints/s",
    )


def run(quick: bool) -> list[Row]:
    per_round, rounds = (20, 2) if quick else (100, 5)
    return [_row(1, per_round, rounds), _row(3, per_round, rounds)]
