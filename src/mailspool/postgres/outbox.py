"""Mail queued in the application's own database transaction (the outbox).

:func:`enqueue` inserts the message row, ready, on the connection the
application is already using, together with a ``NOTIFY`` to the
processors; nothing is committed here.  The row is part of whatever the
application commits: its order, its sign-up, its password reset, and the
mail about it commit together or not at all, with no two-phase commit and
no window.  The notification is delivered at the commit, so a processor
sees the row at once; a rollback leaves no row and wakes no one.

The connection may be

* a psycopg connection (or any DB-API connection to PostgreSQL whose
  driver takes ``%(name)s`` parameters);
* Django's ``django.db.connection`` (its cursor takes the same);
* a SQLAlchemy ``Session`` (or ``scoped_session``) or ``Connection``: with
  zope.sqlalchemy the session is joined to the ``transaction`` package's
  transaction, so the row commits with ``transaction.commit()`` (the
  session is marked changed, as zope.sqlalchemy asks of a plain INSERT).

:class:`OutboxDelivery` wraps it as a mail delivery (``send(fromaddr,
toaddrs, message)``), given a function that returns the connection or
session in use.  Neither imports a database driver: they use the object
they are given.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable, Iterable, Sequence
from email.message import Message
from typing import Any

from mailspool.message import Prepared, prepare
from mailspool.postgres.rows import insert_params, insert_sql, new_id
from mailspool.postgres.schema import DEFAULT_SCHEMA, quote_ident
from mailspool.priority import Priority, parse_priority

__all__ = ["OutboxDelivery", "enqueue", "enqueue_prepared"]


def _timestamp(when: float | datetime.datetime | None) -> float | None:
    if when is None or isinstance(when, (int, float)):
        return when
    if when.tzinfo is None:
        when = when.astimezone()  # a naive datetime is local time
    return when.timestamp()


def _is_sqlalchemy(conn: Any) -> bool:
    return type(conn).__module__.startswith("sqlalchemy.")


def _session(conn: Any) -> Any:
    """A scoped session's current session; anything else as it is."""
    from sqlalchemy.orm import scoped_session

    return conn() if isinstance(conn, scoped_session) else conn


def _mark_changed(conn: Any) -> None:
    """Tell zope.sqlalchemy, when it is used, that the session wrote something.

    A session it joined to a transaction commits only when it knows of a
    change, and it learns of ORM changes only: a plain INSERT must be told.
    """
    try:
        from zope.sqlalchemy import mark_changed
    except ImportError:
        return
    from sqlalchemy.orm import Session

    if isinstance(conn, Session):
        mark_changed(conn)


def enqueue(
    conn: Any,
    fromaddr: str,
    toaddrs: Iterable[str] | str,
    message: bytes | str | Message,
    *,
    not_before: float | datetime.datetime | None = None,
    msgid_domain: str | None = None,
    schema: str = DEFAULT_SCHEMA,
    priority: str | Priority | None = None,
) -> str:
    """Queue a message in the transaction open on ``conn``; commit it yourself.

    Args:
        conn: a DB-API connection to PostgreSQL (psycopg, Django's
            ``connection``) or a SQLAlchemy ``Session`` / ``Connection``.
        fromaddr: the envelope sender.
        toaddrs: the recipients; a single string is one address.
        message: ``bytes``, ``str`` or ``email.message.Message``.
        not_before: keep the message until this time (``time.time()``
            value or datetime; naive means local time).
        msgid_domain: the domain of a generated Message-Id.
        schema: the queue's schema (default ``mailspool``).
        priority: ``"urgent"``, ``"normal"`` (the default) or ``"bulk"``.

    Returns:
        The Message-Id, without angle brackets.

    Raises:
        InvalidAddress: a bad sender or recipient, or no recipients.
        InvalidMessage: a malformed Message-Id or an over-long line.
        ValueError: ``priority`` names no class.
        Whatever the driver raises when the insert fails (the
        application's transaction is then the application's to roll back).
    """
    cls = parse_priority(priority)
    prepared = prepare(fromaddr, toaddrs, message, msgid_domain=msgid_domain)
    if cls is not Priority.NORMAL:
        prepared = dataclasses.replace(prepared, priority=cls)
    enqueue_prepared(conn, [prepared], not_before=_timestamp(not_before), schema=schema)
    return prepared.message_id


def enqueue_prepared(
    conn: Any,
    batch: Sequence[Prepared],
    *,
    not_before: float | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> None:
    """:func:`enqueue` for messages already prepared (:func:`mailspool.message.prepare`).

    One row per message and one notification, in the transaction open on
    ``conn``; nothing is committed.
    """
    if not batch:
        return
    now = time.time()
    later = not_before if not_before is not None and not_before > now else None
    state = "ready" if later is None else "deferred"
    channel = f"mailspool.{schema}"
    rows = [
        {**insert_params(new_id(), state, p, queued_at=now, not_before=later), "channel": channel}
        for p in batch
    ]
    table = f"{quote_ident(schema)}.message"
    # The notification rides on each INSERT (one statement, one round trip
    # less); PostgreSQL delivers identical ones of a transaction once.
    notify = " RETURNING pg_notify({}, '')"
    if _is_sqlalchemy(conn):
        from sqlalchemy import text

        conn = _session(conn)
        statement = text(insert_sql(table, "named") + notify.format(":channel"))
        for params in rows:
            conn.execute(statement, params)
        _mark_changed(conn)
    else:
        insert = insert_sql(table) + notify.format("%(channel)s")
        with conn.cursor() as cur:
            for params in rows:
                cur.execute(insert, params)


class OutboxDelivery:
    """A mail delivery that queues in the application's database transaction.

    Args:
        connection: returns the connection or session the application is
            using now (e.g. ``lambda: DBSession()`` for a scoped SQLAlchemy
            session joined by zope.sqlalchemy, ``lambda:
            django.db.connection``, or a psycopg connection's getter).
        schema: the queue's schema.
        msgid_domain: the domain of generated Message-Ids.

    ``send()`` inserts at once; the row commits or rolls back with that
    connection's transaction.
    """

    def __init__(
        self,
        connection: Callable[[], Any],
        *,
        schema: str = DEFAULT_SCHEMA,
        msgid_domain: str | None = None,
    ) -> None:
        quote_ident(schema)  # refuse a bad name now, not at the first send
        self.connection = connection
        self.schema = schema
        self.msgid_domain = msgid_domain

    def send(
        self,
        fromaddr: str,
        toaddrs: Iterable[str] | str,
        message: bytes | str | Message,
        *,
        not_before: float | datetime.datetime | None = None,
    ) -> str:
        """Queue ``message`` in the current transaction; returns its Message-Id."""
        return enqueue(
            self.connection(),
            fromaddr,
            toaddrs,
            message,
            not_before=not_before,
            msgid_domain=self.msgid_domain,
            schema=self.schema,
        )
