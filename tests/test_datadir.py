"""The data directory's lock and its one store file (hsm/datadir.py).

In process: the lock is exclusive, names its holder's pid, goes with the
process however it ends, and a directory where a daemon ran is not given a
new empty store. As an operator sees it: a second `server run` on the same
directory is refused while the first serves, naming the first's pid, and
starts once the first has stopped (or was killed).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keyquorum.hsm.daemon.logkey import KEY_FILE
from keyquorum.hsm.datadir import LOCK_FILE, DataDirectory
from keyquorum.hsm.pki import DevPki, make_dev_pki
from keyquorum.hsm.stores import sqlite
from keyquorum.hsm.stores.sqlite import SqliteStore
from keyquorum.quorum.errors import StateError, StorageError
from tests.harness import server_command, start_daemon_process


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return make_dev_pki(tmp_path_factory.mktemp("pki"))


HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from keyquorum.hsm.datadir import DataDirectory
    d = DataDirectory.lock(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
    """
)


def hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process holding the directory's lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_creates_a_private_directory_and_records_the_pid(tmp_path: Path) -> None:
    with DataDirectory.lock(tmp_path / "data") as d:
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "data" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        assert (tmp_path / "data" / LOCK_FILE).stat().st_mode & 0o777 == 0o600
        assert d.locked
    assert not d.locked


def test_a_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    holder = hold_lock(tmp_path / "data")
    try:
        with pytest.raises(StateError) as info:
            DataDirectory.lock(tmp_path / "data")
        assert f"in use by another keyquorum daemon (pid {holder.pid})" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the killed holder's lock: no stale lock to clean up.
    with DataDirectory.lock(tmp_path / "data"):
        pass


def test_the_lock_is_released_on_release(tmp_path: Path) -> None:
    first = DataDirectory.lock(tmp_path)
    first.release()
    first.release()  # twice is harmless
    with DataDirectory.lock(tmp_path):
        pass


def test_a_daemons_directory_without_its_store_is_refused(tmp_path: Path) -> None:
    with DataDirectory.lock(tmp_path) as d:
        d.require_store(sqlite.FILE_NAME)  # an empty directory: a new deployment
        (tmp_path / KEY_FILE).write_text("key")
        with pytest.raises(StorageError, match=f"holds {KEY_FILE} .* but no store"):
            d.require_store(sqlite.FILE_NAME)
        SqliteStore.in_directory(tmp_path).close()
        d.require_store(sqlite.FILE_NAME)


def test_the_store_has_one_name_and_readers_never_create_it(tmp_path: Path) -> None:
    assert sqlite.FILE_NAME == "keyquorum.sqlite"
    with pytest.raises(StorageError, match="no keyquorum store"):
        SqliteStore.in_directory(tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []
    SqliteStore.in_directory(tmp_path).close()
    assert (tmp_path / "keyquorum.sqlite").is_file()
    SqliteStore.in_directory(tmp_path, create=False).close()


def test_a_second_daemon_on_the_same_directory_is_refused(tmp_path: Path, pki: DevPki) -> None:
    first = start_daemon_process(tmp_path / "data", pki)
    try:
        second = subprocess.run(
            server_command(tmp_path / "data", pki, tmp_path / "second.ready"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last == (
            f"error: the data directory {tmp_path / 'data'} is in use by another keyquorum "
            f"daemon (pid {first.proc.pid}); stop it first or give another --data-dir"
        )
        assert not (tmp_path / "second.ready").exists()
        # The first one still serves.
        assert first.proc.poll() is None
    finally:
        assert first.stop() == 0
    # Stopped: the directory is free again, and so after a kill -9.
    again = start_daemon_process(tmp_path / "data", pki)
    again.stop(signal.SIGKILL)
    start_daemon_process(tmp_path / "data", pki).stop()
