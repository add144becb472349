"""The queue's tables, versioned: ordered migrations and the code that applies them.

The schema lives in one PostgreSQL schema (``mailspool`` unless told
otherwise) so that it never mixes with the application's tables:

* ``schema_version`` -- one row, the number of the last migration applied;
* ``relay_state`` -- what the processors learned about each relay (its
  pace, a pause and why), the latest word per relay, for ``status``;
* ``message`` -- one row per message.  Its ``state`` column is the state
  of the Maildir spool's lifecycle (ready, deferred, held, failed,
  quarantined), plus ``staged`` (written, not yet committed by the
  two-phase enqueue: never listed, never sent) and ``sent`` (kept for
  audit when the queue is told to keep sent rows).  "In flight" is not a
  column: a row is in flight while a processor's transaction holds its
  lock (see :mod:`mailspool.postgres.claim`).

:data:`MIGRATIONS` is the whole history, oldest first.  The missing ones
are applied in one transaction together with the new version number, under
an advisory lock so that two ``db upgrade`` never run the same migration at
once: an upgrade that fails half-way leaves the schema as it was.  A
migration once released is never edited: a change is a new one.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "DEFAULT_SCHEMA",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SchemaError",
    "apply_migrations",
    "check_schema_name",
    "current_version",
    "quote_ident",
]

#: The PostgreSQL schema the tables are in unless another is given.
DEFAULT_SCHEMA = "mailspool"

#: Every migration in order; ``{schema}`` is the quoted schema name.
MIGRATIONS: tuple[str, ...] = (
    # 1: the message table and what the queue's questions need.
    """
    CREATE TABLE {schema}.message (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id text NOT NULL UNIQUE,
        state text NOT NULL CHECK (
            state IN ('staged', 'ready', 'deferred', 'held', 'failed', 'quarantined', 'sent')
        ),
        message_id text,
        sender text NOT NULL,
        recipients jsonb NOT NULL,
        data bytea NOT NULL,
        queued_at timestamptz NOT NULL DEFAULT now(),
        not_before timestamptz,
        due_at timestamptz NOT NULL DEFAULT now(),
        attempts integer NOT NULL DEFAULT 0,
        last_error text,
        legacy boolean NOT NULL DEFAULT false,
        finished_at timestamptz
    );
    -- due(): the messages that can be claimed, oldest due first.
    CREATE INDEX message_due ON {schema}.message (due_at, seq)
        WHERE state IN ('ready', 'deferred');
    -- counts(), next_due(), oldest() and sweep(): per state.
    CREATE INDEX message_state ON {schema}.message (state, due_at);
    CREATE INDEX message_queued ON {schema}.message (state, queued_at);
    """,
    # 2: what processors learned about their relay (pace, pause), for
    # `mailspool status` on any host: one row per relay, the latest word.
    """
    CREATE TABLE {schema}.relay_state (
        relay text PRIMARY KEY,
        state jsonb NOT NULL,
        written_at timestamptz NOT NULL DEFAULT now()
    );
    """,
    # 3: priority classes (mailspool.priority): 0 urgent, 1 normal, 2 bulk.
    # A constant default adds the column without rewriting the table; due()
    # reads each class by the new index, which replaces the old one.
    """
    ALTER TABLE {schema}.message
        ADD COLUMN priority smallint NOT NULL DEFAULT 1 CHECK (priority IN (0, 1, 2));
    CREATE INDEX message_due_priority ON {schema}.message (priority, due_at, seq)
        WHERE state IN ('ready', 'deferred');
    DROP INDEX {schema}.message_due;
    """,
)

#: The version a fully migrated schema has.
SCHEMA_VERSION = len(MIGRATIONS)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


class SchemaError(Exception):
    """The database's schema is missing, too old or newer than this code."""


def check_schema_name(name: str) -> str:
    """Return ``name`` if it can name a schema (letters, digits, ``_``).

    Raises:
        ValueError: naming what is wrong.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"schema: {name!r} is not a plain name (letters, digits and _, at most 63)"
        )
    return name


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + check_schema_name(name).replace('"', '""') + '"'


def _lock_key(schema: str) -> int:
    # A stable 63-bit key per schema for pg_advisory_xact_lock().
    h = 1469598103934665603
    for b in f"mailspool-schema:{schema}".encode():
        h = ((h ^ b) * 1099511628211) & 0x7FFF_FFFF_FFFF_FFFF
    return h


def current_version(conn: psycopg.Connection[Any], schema: str) -> int | None:
    """The schema's version; None when ``db init`` never ran there."""
    q = quote_ident(schema)
    cur = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{q}.schema_version",)).fetchone()
    if not cur or not cur[0]:
        return None
    row = conn.execute(f"SELECT max(version) FROM {q}.schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def apply_migrations(conn: psycopg.Connection[Any], schema: str, *, create: bool) -> list[int]:
    """Bring the schema up to :data:`SCHEMA_VERSION`.

    Args:
        conn: an autocommit connection (each migration is its own transaction).
        schema: the schema's name.
        create: create the schema when it does not exist (``db init``);
            otherwise a missing schema raises (``db upgrade``).

    Returns:
        The numbers of the migrations applied (empty: already current).

    Raises:
        SchemaError: no schema and not ``create``, or the schema is newer
            than this code.
    """
    q = quote_ident(schema)
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(schema),))
        version = current_version(conn, schema)
        if version is None:
            if not create:
                raise SchemaError(f"schema {schema}: not initialised (run 'mailspool db init')")
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
            conn.execute(f"CREATE TABLE {q}.schema_version (version integer NOT NULL)")
            version = 0
        if version > SCHEMA_VERSION:
            raise SchemaError(
                f"schema {schema}: version {version} is newer than this mailspool "
                f"knows ({SCHEMA_VERSION}); upgrade mailspool"
            )
        for number in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[number - 1].format(schema=q))
            conn.execute(f"INSERT INTO {q}.schema_version (version) VALUES (%s)", (number,))
            applied.append(number)
    return applied
