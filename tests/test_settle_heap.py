"""`settle_heap` (hsm/services/server.py): start-up's objects leave the collector's walks.

Unfrozen, a full collection walks every start-up object under the
interpreter lock (12-23 ms, a stall of every call in flight);
`keyquorum server run` freezes them once its servers run. Checked here: the objects alive are
frozen, garbage made afterwards is still collected, and the daemon process
does it (its log says how many objects).
"""

from __future__ import annotations

import gc
import re
import weakref
from pathlib import Path

from keyquorum.hsm.pki import make_dev_pki
from keyquorum.hsm.services.server import settle_heap
from tests.harness import start_daemon_process


class _Node:
    def __init__(self) -> None:
        self.me = self


def test_settle_heap_freezes_what_is_alive_and_later_cycles_are_still_collected() -> None:
    try:
        gc.unfreeze()
        alive = [_Node() for _ in range(1000)]
        frozen = settle_heap()
        assert frozen == gc.get_freeze_count()
        assert frozen >= len(alive)
        later = _Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None  # a cycle made after the freeze is collected as before
        walked = len(gc.get_objects(generation=2))
        assert walked < frozen  # the frozen objects are in no generation the collector walks
    finally:
        gc.unfreeze()


def test_server_run_freezes_its_start_up_objects(tmp_path: Path) -> None:
    proc = start_daemon_process(tmp_path / "data", make_dev_pki(tmp_path / "pki"))
    assert proc.stop() == 0
    output = proc.output()
    found = re.search(r"start-up objects frozen for the garbage collector: (\d+)", output)
    assert found is not None, output
    assert int(found.group(1)) > 10_000
