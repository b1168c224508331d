"""Shared pytest fixtures: the PostgreSQL servers of tests/pg.py, and a
private configuration directory for the session and for every test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import pg_cluster, pg_dsn, pg_restartable, pg_server

__all__ = ["pg_cluster", "pg_dsn", "pg_restartable", "pg_server"]


@pytest.fixture(autouse=True, scope="session")
def _private_config_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The custodian CLI remembers checkpoints under $XDG_CONFIG_HOME; tests
    (and the daemons they start, which inherit the environment) must never
    write into the real home directory."""
    home = tmp_path_factory.mktemp("xdg-config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def _config_home_per_test(
    _private_config_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """What a CLI pins and remembers (per deployment: the log key, the last
    checkpoint) stays with the test that made it: tests reuse deployment names
    for different logs, which a pinning CLI rightly refuses."""
    home = tmp_path_factory.mktemp("xdg-config-test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(home))
        yield home
