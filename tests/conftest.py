"""Shared pytest fixtures: the PostgreSQL servers of tests/pg.py."""

from tests.pg import pg_cluster, pg_dsn, pg_restartable, pg_server

__all__ = ["pg_cluster", "pg_dsn", "pg_restartable", "pg_server"]
