"""Fixtures for the PostgreSQL backend's tests: a real server, a database per run.

The server is ``MAILSPOOL_TEST_POSTGRES`` (a libpq URL of a database the
tests may connect to as a user allowed to create databases), by default
``postgresql://postgres@127.0.0.1:5432/test``.  Each test run creates a
database of its own (``mailspool_test_<random>``) and drops it at the end,
and each test gets a schema of its own in it, so parallel runs never meet.
When the server cannot be reached, every test that needs it is skipped,
saying so.

Import the fixtures into a test module::

    from _pg import pg_url, queue  # noqa: F401
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from mailspool.postgres import PostgresQueue

try:
    import psycopg
except ImportError:  # the tests that need it skip, saying so
    psycopg = None

SERVER = os.environ.get("MAILSPOOL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
_schemas = itertools.count(1)


def _with_db(url: str, dbname: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{dbname}"


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a database made for this test run (dropped at the end)."""
    if psycopg is None:
        pytest.skip("psycopg is not installed (pip install 'mailspool[postgres]')")
    try:
        admin = psycopg.connect(SERVER, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        pytest.skip(f"PostgreSQL not reachable at {SERVER}: {' '.join(str(exc).split())}")
    name = f"mailspool_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_db(SERVER, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """A queue URL naming a schema of this test's own (not created yet)."""
    return f"{pg_database}?schema=t{next(_schemas)}_{secrets.token_hex(3)}"


@pytest.fixture
def queue(pg_url: str) -> Iterator[PostgresQueue]:
    """A fresh, initialised queue."""
    from mailspool.postgres import PostgresQueue

    q = PostgresQueue(pg_url, create=True)
    try:
        yield q
    finally:
        q.close()


def sql(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own; the rows, if any."""
    from mailspool.postgres.connect import parse_target

    with psycopg.connect(parse_target(url).conninfo, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []
