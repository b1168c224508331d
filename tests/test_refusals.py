"""The refusal log (hsm/services/refusals.py) and the observed store's reports.

A refusal line names the method, the custodian only when on the roster (in
the people's form, the full fingerprint only in the JSON line's own field), the
code and the error's kind, never the error's own message (which may quote
the request); a flood is cut to a burst and then one line a second, and
the next line says how many were left out. The `ObservedStore` reports each
append's time or failure and each stored checkpoint, and passes every other
call through.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from keyquorum.hsm.logs import JsonFormatter
from keyquorum.hsm.services import refusals
from keyquorum.hsm.services.metrics import Metrics
from keyquorum.hsm.services.refusals import RefusalLog
from keyquorum.hsm.stores.base import leaf_hash
from keyquorum.hsm.stores.observed import AppendObserver, ObservedStore
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import AppendConflictError, NotFoundError, SignatureError
from keyquorum.quorum.note import NoteSigner
from keyquorum.quorum.people import display_fingerprint

FINGERPRINT = "066f425b5b4561959fa1c2b7d0e4a8f3c5e9d1b2a4c6e8f0a1b3c5d7e9f1a2b3"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "keyquorum.custodian"]


def test_a_refusal_names_the_kind_never_the_message(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(name_of=lambda fp: "alice" if fp == FINGERPRINT else None)
    with caplog.at_level(logging.INFO, logger="keyquorum.custodian"):
        log.record("Seal", FINGERPRINT, SignatureError("sig of 'ATTACKER-TEXT' is bad"))
        log.record("Seal", "ATTACKER-NAME", SignatureError("x"))
        log.record("GetProposal", "", NotFoundError("unknown proposal 'ATTACKER-ID'"))
    got = lines(caplog)
    assert got == [
        f"refused Seal from custodian alice ({display_fingerprint(FINGERPRINT)}) "
        "(PERMISSION_DENIED): "
        "SignatureError: A signature does not verify under the key it claims",
        "refused Seal from custodian unknown (PERMISSION_DENIED): "
        "SignatureError: A signature does not verify under the key it claims",
        "refused GetProposal from custodian - (NOT_FOUND): "
        "NotFoundError: The thing asked for does not exist (an unknown proposal id)",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING, logging.INFO]
    assert "ATTACKER" not in caplog.text
    # No 16-hex prefix in the text; the full fingerprint only in the record's field.
    assert FINGERPRINT[:16] not in caplog.text
    assert [getattr(r, "fingerprint", None) for r in caplog.records] == [FINGERPRINT, None, None]
    line = json.loads(JsonFormatter().format(caplog.records[0]))
    assert line["fingerprint"] == FINGERPRINT
    assert FINGERPRINT not in line["message"]


def test_a_flood_is_cut_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RefusalLog(clock=clock)
    with caplog.at_level(logging.INFO, logger="keyquorum.custodian"):
        for _ in range(refusals.BURST + 500):
            log.record("SubmitShare", "", SignatureError("x"))
        # Another method and code has its own budget.
        log.record("Approve", "", SignatureError("x"))
        clock.now += refusals.INTERVAL
        log.record("SubmitShare", "", SignatureError("x"))
    got = lines(caplog)
    assert len(got) == refusals.BURST + 2
    assert got[refusals.BURST].startswith("refused Approve")
    assert got[-1].endswith("[500 more SubmitShare PERMISSION_DENIED refusals not logged]")


class Recorder(AppendObserver):
    def __init__(self) -> None:
        self.appends: list[bool] = []
        self.checkpoints: list[float] = []

    def appended(self, seconds: float, ok: bool) -> None:
        assert seconds >= 0
        self.appends.append(ok)

    def checkpoint_published(self, at: float) -> None:
        self.checkpoints.append(at)


def test_the_observed_store_reports_appends_and_checkpoints(tmp_path: Path) -> None:
    recorder = Recorder()
    with SqliteStore.in_directory(tmp_path) as inner:
        store = ObservedStore(inner, recorder, wall_clock=lambda: 1234.0)
        record = (0, leaf_hash(b"entry"), b"entry")
        signed = NoteSigner.generate("keyquorum/observed").sign_checkpoint(1, leaf_hash(b"entry"))
        store.append([record], expected_size=0, checkpoint=signed)
        with pytest.raises(AppendConflictError):
            store.append([record], expected_size=0, checkpoint=signed)
        # An append stores its checkpoint in its transaction: that is the report.
        assert recorder.appends == [True, False]
        assert recorder.checkpoints == [1234.0]
        store.put_checkpoint(1, signed)
        assert recorder.checkpoints == [1234.0, 1234.0]
        # Everything else passes through.
        assert store.size() == 1
        assert store.read(0, 1) == [b"entry"]
        assert store.latest_checkpoint() == (1, signed)
        assert store.checkpoint_at(1) == signed
        assert store.head() == (1, (1, signed))
        assert store.reserve_block("enc/t/v1", 10, 100) == (0, 10)
        assert store.counters() == {"enc/t/v1": 10}
        assert repr(store) == repr(inner)


def test_metrics_count_failed_appends(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    metrics = Metrics()
    metrics.appended(0.002, True)
    metrics.appended(0.5, False)
    text = generate_latest(metrics.registry).decode()
    assert "keyquorum_log_append_duration_seconds_count 1.0" in text
    assert "keyquorum_log_append_failures_total 1.0" in text
