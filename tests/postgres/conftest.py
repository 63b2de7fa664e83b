"""Fixtures of the PostgreSQL tests: the session's shared server (a fresh database per
test) and, for the tests that take a server away, a server of the test's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres.server import PostgresServer, shared


@pytest.fixture(scope="session")
def pg_server() -> PostgresServer:
    return shared()


@pytest.fixture
def pg_dsn(pg_server: PostgresServer) -> str:
    """The DSN of a fresh, empty database."""
    return pg_server.new_database()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of this test's own, started; its port stays across stop() and start()."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()
