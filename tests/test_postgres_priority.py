"""The PostgreSQL queue keeps a message's class: outbox, import, the schema's migration."""

# ruff: noqa: F811  (the fixtures from _pg are parameters)
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from _pg import pg_database, pg_url, queue, sql  # noqa: F401
from _relays import enqueue
from mailspool.maildir.spool import Spool
from mailspool.priority import Priority

if TYPE_CHECKING:
    from mailspool.postgres import PostgresQueue

psycopg = pytest.importorskip("psycopg")

MSG = b"Subject: reset\r\n\r\nyour code\r\n"


def test_the_outbox_takes_a_priority(pg_url: str, queue: PostgresQueue) -> None:
    from mailspool.postgres.connect import parse_target

    with psycopg.connect(parse_target(pg_url).conninfo) as conn:
        queue.enqueue(conn, "shop@example.org", ["a@example.org"], MSG, priority="urgent")
        queue.enqueue(conn, "shop@example.org", ["b@example.org"], MSG)
        with pytest.raises(ValueError, match="priority 'now' is not one of"):
            queue.enqueue(conn, "shop@example.org", ["c@example.org"], MSG, priority="now")
        conn.commit()
    assert sorted(e.priority for e in queue.entries()) == ["normal", "urgent"]
    assert [e.priority for e in queue.entries() if e.id == next(iter(queue.due()))] == ["urgent"]


def test_an_import_keeps_each_message_class(tmp_path: Path, queue: PostgresQueue) -> None:
    from mailspool.postgres.importer import import_spool

    spool = Spool(tmp_path / "spool")
    enqueue(spool, 2, priority=Priority.BULK)
    enqueue(spool, 1, priority=Priority.URGENT)
    enqueue(spool, 1)
    import_spool(spool, queue)
    assert sorted(e.priority for e in queue.entries()) == ["bulk", "bulk", "normal", "urgent"]


def test_rows_of_the_first_schema_are_normal_after_the_upgrade(pg_url: str) -> None:
    from mailspool.postgres import PostgresQueue
    from mailspool.postgres.connect import parse_target
    from mailspool.postgres.schema import MIGRATIONS, apply_migrations, quote_ident

    target = parse_target(pg_url)
    schema = quote_ident(target.schema)
    with psycopg.connect(target.conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.schema_version (version integer NOT NULL)")
        conn.execute(MIGRATIONS[0].format(schema=schema))
        conn.execute(f"INSERT INTO {schema}.schema_version VALUES (1)")
        conn.execute(
            f"INSERT INTO {schema}.message (id, state, sender, recipients, data) "
            "VALUES ('1.M1P1Q1R0.old', 'ready', 'a@example.org', "
            '\'[["b@example.org", "pending", null, null]]\', %s)',
            (MSG,),
        )
    with psycopg.connect(target.conninfo, autocommit=True) as conn:
        assert apply_migrations(conn, target.schema, create=False) == [2, 3]  # `db upgrade`
    upgraded = PostgresQueue(pg_url)
    try:
        assert [(e.id, e.priority) for e in upgraded.entries()] == [("1.M1P1Q1R0.old", "normal")]
        assert list(upgraded.due()) == ["1.M1P1Q1R0.old"]
    finally:
        upgraded.close()
