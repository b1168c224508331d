"""Counts shared by the processes serving one port (hsm/services/shared_counts.py).

Each test opens the daemon's mapping as workers do, one view per column;
the last ones run real processes on the inherited descriptor. Invariants:
no peer's calls pass `max_calls_per_peer` and no port's pass `max_calls`
over all columns, not even while processes race; the sketch never counts
a peer's calls as fewer than they are; a dead worker's column is zeroed;
`--rate-limit` holds over all columns with RateLimiter's contract.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyquorum.hsm.services.shared_counts import BUCKETS, SharedCounts, SharedRateLimiter
from keyquorum.quorum.errors import InvalidInputError, LimitExceededError

COLUMNS = 3


@pytest.fixture
def views() -> Iterator[list[SharedCounts]]:
    daemon = SharedCounts.create(COLUMNS)
    workers = [SharedCounts(daemon.fd, COLUMNS, c, daemon.key) for c in range(COLUMNS)]
    yield workers
    for view in workers:
        view.close()
    os.fstat(daemon.fd)  # a worker's view leaves the daemon's descriptor open
    daemon.close()
    with pytest.raises(OSError):
        os.fstat(daemon.fd)


def refused(view: SharedCounts, key: str, per_peer: int, total: int) -> str:
    with pytest.raises(LimitExceededError) as info:
        view.enter(key, per_peer, total)
    return str(info.value)


def test_a_peer_cap_holds_over_every_column(views: list[SharedCounts]) -> None:
    a, b, c = views
    a.enter("sha256:aa", 3, 100)
    b.enter("sha256:aa", 3, 100)
    c.enter("sha256:aa", 3, 100)
    for view in views:
        assert "max_calls_per_peer" in refused(view, "sha256:aa", 3, 100)
    # Another peer is not held back by this one.
    a.enter("sha256:bb", 3, 100)
    b.leave("sha256:aa")
    c.enter("sha256:aa", 3, 100)
    assert a.calls_of("sha256:aa") == 3
    assert a.calls() == 4


def test_the_port_cap_holds_over_every_column(views: list[SharedCounts]) -> None:
    a, b, c = views
    a.enter("sha256:aa", 2, 3)
    b.enter("sha256:bb", 2, 3)
    c.enter("sha256:cc", 2, 3)
    message = refused(a, "sha256:dd", 2, 3)
    assert "max_calls" in message
    assert "max_calls_per_peer" not in message
    c.leave("sha256:cc")
    a.enter("sha256:dd", 2, 3)


def test_a_dead_workers_column_is_zeroed(views: list[SharedCounts]) -> None:
    a, b, _ = views
    for _ in range(2):
        b.enter("sha256:aa", 2, 10)
    assert "max_calls_per_peer" in refused(a, "sha256:aa", 2, 10)
    daemon_view = SharedCounts(a.fd, COLUMNS, None, a.key)
    daemon_view.clear_column(1)
    assert a.calls() == 0
    assert a.calls_of("sha256:aa") == 0
    a.enter("sha256:aa", 2, 10)
    with pytest.raises(InvalidInputError, match="counts no calls"):
        daemon_view.enter("sha256:aa", 2, 10)
    daemon_view.close()


def test_the_daemon_picks_a_new_bucket_key_each_start() -> None:
    first, second = SharedCounts.create(1), SharedCounts.create(1)
    try:
        assert first.key != second.key
        keys = [f"sha256:{i:064x}" for i in range(64)]
        assert [first.buckets(k) for k in keys] != [second.buckets(k) for k in keys]
    finally:
        first.close()
        second.close()


def test_a_mapping_of_another_shape_is_refused(views: list[SharedCounts]) -> None:
    a = views[0]
    with pytest.raises(InvalidInputError, match="wrong size"):
        SharedCounts(a.fd, COLUMNS + 1, 0, a.key)
    with pytest.raises(InvalidInputError, match="column"):
        SharedCounts(a.fd, COLUMNS, COLUMNS, a.key)
    with pytest.raises(InvalidInputError, match="bytes"):
        SharedCounts(a.fd, COLUMNS, 0, b"short")


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, COLUMNS - 1), st.integers(0, 199), st.booleans()),
        max_size=300,
    )
)
def test_the_sketch_never_counts_a_peer_below_its_calls(
    steps: list[tuple[int, int, bool]],
) -> None:
    """Random enters and leaves of 200 peers over three columns: the sketch's
    count of each is at least its true count, and no true count passes the cap."""
    daemon = SharedCounts.create(COLUMNS)
    views = [SharedCounts(daemon.fd, COLUMNS, c, daemon.key) for c in range(COLUMNS)]
    # A tiny sketch's worth of collisions: the keys' buckets are forced into 8.
    for view in views:
        for peer in range(200):
            first = peer % 8
            view._memo[f"p{peer}"] = (first, (first + 1 + peer % 3) % 8)
    held: dict[tuple[int, int], int] = {}
    cap = 3
    try:
        for column, peer, enter in steps:
            key = f"p{peer}"
            if enter:
                try:
                    views[column].enter(key, cap, 10_000)
                except LimitExceededError:
                    continue
                held[column, peer] = held.get((column, peer), 0) + 1
            elif held.get((column, peer)):
                views[column].leave(key)
                held[column, peer] -= 1
            true = sum(held.get((c, peer), 0) for c in range(COLUMNS))
            assert true <= cap
            assert views[0].calls_of(key) >= true
    finally:
        for view in views:
            view.close()
        daemon.close()


def test_buckets_are_two_distinct_ones_in_range(views: list[SharedCounts]) -> None:
    for i in range(2000):
        first, second = views[0].buckets(f"sha256:{i:064x}")
        assert first != second
        assert 0 <= first < BUCKETS
        assert 0 <= second < BUCKETS


# -- the rate limit ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_holds_over_every_column(views: list[SharedCounts]) -> None:
    clock = Clock()
    limiters = [SharedRateLimiter(view, 4, clock=clock) for view in views]
    for i in range(4):
        limiters[i % COLUMNS].take("keyquorum://backend/booking")
    for limiter in limiters:
        with pytest.raises(LimitExceededError, match="over its rate limit of 4"):
            limiter.take("keyquorum://backend/booking")
    # Another backend has its own bucket.
    limiters[0].take("keyquorum://backend/messaging", 4)
    clock.now += 0.5  # two tokens back
    limiters[1].take("keyquorum://backend/booking", 2)
    with pytest.raises(LimitExceededError):
        limiters[2].take("keyquorum://backend/booking")
    limiters[2].give_back("keyquorum://backend/booking", 1)
    limiters[0].take("keyquorum://backend/booking")


def test_a_clock_read_before_anothers_take_repays_nothing_twice(
    views: list[SharedCounts],
) -> None:
    """One process read its clock at 100.0, another took tokens at 100.5 first:
    the later take must not move the bucket's time back to 100.0, or the half
    second between would be repaid again."""
    early, late = Clock(), Clock()
    early.now, late.now = 100.0, 100.5
    first = SharedRateLimiter(views[0], 4, clock=early)
    second = SharedRateLimiter(views[1], 4, clock=late)
    second.take("b", 2)
    first.take("b", 1)  # its clock says 100.0; the debt is now 3, as of 100.5
    late.now = 100.75  # one token repaid since 100.5: a debt of 2, two tokens free
    with pytest.raises(LimitExceededError):
        second.take("b", 3)
    second.take("b", 2)


def test_the_rate_limits_contract_is_the_single_process_ones(views: list[SharedCounts]) -> None:
    clock = Clock()
    limiter = SharedRateLimiter(views[0], 10, burst=20, clock=clock)
    assert limiter.rate == 10
    with pytest.raises(LimitExceededError, match="exceed the per-backend burst of 20"):
        limiter.take("b", 21)
    limiter.take("b", 20)
    with pytest.raises(LimitExceededError):
        limiter.take("b")
    clock.now += 100  # never more than the burst comes back
    limiter.give_back("b", 5)
    limiter.take("b", 20)
    with pytest.raises(LimitExceededError):
        limiter.take("b")
    with pytest.raises(InvalidInputError):
        limiter.take("b", 0)
    with pytest.raises(InvalidInputError):
        limiter.give_back("b", 0)
    with pytest.raises(InvalidInputError):
        SharedRateLimiter(views[0], 0)
    with pytest.raises(InvalidInputError):
        SharedRateLimiter(views[0], 0.5)


# -- real processes ------------------------------------------------------------------

#: Each process enters and leaves one peer's calls as fast as it can and checks,
#: under the lock, that the count over all processes never passed the cap.
RACER = """
import sys
from keyquorum.hsm.services.shared_counts import SharedCounts
from keyquorum.quorum.errors import LimitExceededError
fd, columns, column, key, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \\
    bytes.fromhex(sys.argv[4]), int(sys.argv[5])
view = SharedCounts(fd, columns, column, key)
held = admitted = 0
for i in range(rounds):
    try:
        view.enter("sha256:racer", 2, 3)
        held += 1
        admitted += 1
    except LimitExceededError:
        pass
    with view.locked():
        if view.calls_of("sha256:racer") > 2 or view.calls() > 3:
            print("over", view.calls_of("sha256:racer"), view.calls())
            sys.exit(1)
    if held and (i % 3 == 0 or held > 1):
        view.leave("sha256:racer")
        held -= 1
print(admitted)
"""


def test_racing_processes_never_pass_a_cap() -> None:
    """Three processes race for a peer cap of 2 on the inherited descriptor."""
    daemon = SharedCounts.create(COLUMNS)
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    RACER,
                    str(daemon.fd),
                    str(COLUMNS),
                    str(column),
                    daemon.key.hex(),
                    "4000",
                ],
                pass_fds=(daemon.fd,),
                stdout=subprocess.PIPE,
                text=True,
            )
            for column in range(COLUMNS)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0] * COLUMNS, outputs
        assert all(int(out) > 0 for out in outputs), outputs
    finally:
        daemon.close()


def test_a_killed_process_leaves_no_lock_behind() -> None:
    """A worker killed while holding the lock (SIGKILL) releases it with its death."""
    daemon = SharedCounts.create(1)
    view = SharedCounts(daemon.fd, 1, 0, daemon.key)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from keyquorum.hsm.services.shared_counts import SharedCounts\n"
            "v = SharedCounts(int(sys.argv[1]), 1, 0, bytes.fromhex(sys.argv[2]))\n"
            "with v.locked():\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
            str(daemon.fd),
            daemon.key.hex(),
        ],
        pass_fds=(daemon.fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        holder.kill()
        holder.wait(30)
        view.enter("sha256:aa", 1, 1)  # would block for good if the lock outlived it
        assert view.calls() == 1
    finally:
        holder.kill()
        view.close()
        daemon.close()
