"""A message row and what the queue makes of it (no I/O).

The recipients column is a JSON array of ``[address, status, code, text]``
per recipient, in the envelope's order.  Times are ``timestamptz`` in the
table and ``time.time()`` floats in Python; the queries read them as
``extract(epoch ...)::float8``.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

from mailspool.maildir.directory import host_label
from mailspool.maildir.fileformat import MAX_TEXT
from mailspool.message import Prepared
from mailspool.priority import PRIORITIES, Priority
from mailspool.queue import QueueEntry, RecipientStatus, Record

__all__ = [
    "ENTRY_COLUMNS",
    "RECORD_COLUMNS",
    "encode_recipients",
    "entry_from_row",
    "insert_params",
    "insert_sql",
    "lock_key",
    "new_id",
    "record_from_row",
    "row_params",
]


_counter = itertools.count(1)


def new_id() -> str:
    """A message id shaped like a Maildir spool's names (time first, then
    process, counter, random bits and host), so that ``mailspool list``
    shows both alike and an imported message keeps its name."""
    us = time.time_ns() // 1000
    return (
        f"{us // 1_000_000}.M{us % 1_000_000}P{os.getpid()}Q{next(_counter)}"
        f"R{secrets.randbits(32):08x}.{host_label()}"
    )


def _epoch(column: str) -> str:
    return f"extract(epoch FROM {column})::float8"


#: The columns a claim reads, in :func:`record_from_row`'s order.
RECORD_COLUMNS = (
    "seq, id, state, sender, recipients, "
    f"{_epoch('queued_at')}, attempts, message_id, last_error, legacy, "
    f"{_epoch('not_before')}, data"
)

#: The columns a listing reads, in :func:`entry_from_row`'s order (no data).
ENTRY_COLUMNS = (
    "seq, id, state, sender, recipients, "
    f"{_epoch('queued_at')}, attempts, message_id, last_error, legacy, "
    f"{_epoch('not_before')}, {_epoch('due_at')}, octet_length(data), priority"
)


def lock_key(seq: int) -> int:
    """The second key of the advisory lock a claim takes on message ``seq``.

    The first key is the message table's oid, so two queues in one database
    never share a lock; this one wraps after 2**31 messages (then a listing
    may show the wrong row in flight, nothing more: the claim itself is
    the row lock).
    """
    return seq % 2147483648


def encode_recipients(recipients: Sequence[RecipientStatus]) -> str:
    """The recipients column's JSON text."""
    return json.dumps([[r.address, r.status, r.code, r.text] for r in recipients])


def _recipients(value: Any) -> tuple[RecipientStatus, ...]:
    items = json.loads(value) if isinstance(value, (str, bytes)) else value
    return tuple(RecipientStatus(str(a), str(s), c, t) for a, s, c, t in items)


def record_from_row(row: Sequence[Any]) -> Record:
    """The :class:`Record` of a row read with :data:`RECORD_COLUMNS`."""
    return Record(
        sender=row[3],
        recipients=_recipients(row[4]),
        queued_at=row[5],
        attempts=row[6],
        message_id=row[7],
        last_error=row[8],
        legacy=row[9],
        not_before=row[10],
    )


def entry_from_row(row: Sequence[Any], in_flight: bool) -> QueueEntry:
    """The :class:`QueueEntry` of a row read with :data:`ENTRY_COLUMNS`."""
    state = "in_flight" if in_flight else row[2]
    return QueueEntry(
        id=row[1],
        state=state,
        message_id=row[7],
        sender=row[3],
        recipients=_recipients(row[4]),
        queued_at=row[5],
        attempts=row[6],
        next_attempt=row[11] if state == "deferred" else None,
        size=row[12],
        last_error=row[8],
        legacy=row[9],
        priority=PRIORITIES[row[13]].value,
    )


def insert_sql(table: str, style: str = "pyformat", *, once: bool = False) -> str:
    """The INSERT of one message into ``table`` (a quoted name).

    ``style`` is the parameter style: ``pyformat`` (psycopg, Django) or
    ``named`` (SQLAlchemy's ``text()``).  With ``once``, a message whose id
    is already there is left as it is (an import run again).
    """
    names = (
        "id",
        "state",
        "message_id",
        "sender",
        "recipients",
        "data",
        "queued_at",
        "not_before",
        "due_at",
        "attempts",
        "last_error",
        "legacy",
        "priority",
    )

    def p(name: str) -> str:
        return f"%({name})s" if style == "pyformat" else f":{name}"

    values = [
        *(p(n) for n in names[:4]),
        f"CAST({p('recipients')} AS jsonb)",
        p("data"),
        *(f"to_timestamp({p(n)})" for n in names[6:9]),
        *(p(n) for n in names[9:]),
    ]
    conflict = " ON CONFLICT (id) DO NOTHING" if once else ""
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(values)}){conflict}"


def row_params(
    id: str,
    state: str,
    record: Record,
    data: bytes,
    *,
    due_at: float | None = None,
    priority: Priority = Priority.NORMAL,
) -> dict[str, Any]:
    """The parameters of :func:`insert_sql` for one message's whole record.

    Args:
        id: the message's queue id.
        state: its state (``staged``, ``ready``, ``deferred``, ``held``...).
        record: its envelope, recipients, attempts, times, last error.
        data: the message as it goes on the wire.
        due_at: when it is due (default: ``record.due_since``).
        priority: its class.
    """
    last_error = record.last_error
    return {
        "id": id,
        "state": state,
        "message_id": record.message_id or None,
        "sender": record.sender,
        "recipients": encode_recipients(record.recipients),
        "data": bytes(data),
        "queued_at": record.queued_at,
        "not_before": record.not_before,
        "due_at": record.due_since if due_at is None else due_at,
        "attempts": record.attempts,
        "last_error": last_error[:MAX_TEXT] if last_error else None,
        "legacy": record.legacy,
        "priority": priority.rank,
    }


def insert_params(
    id: str,
    state: str,
    prepared: Prepared,
    *,
    queued_at: float,
    not_before: float | None,
) -> dict[str, Any]:
    """The parameters of :func:`insert_sql` for a new message.

    Args:
        id: the message's queue id.
        state: ``staged``, ``ready`` or ``deferred``.
        prepared: the message.
        queued_at: when it is queued.
        not_before: when it is due, if later than ``queued_at``.
    """
    env = prepared.envelope
    record = Record(
        sender=env.sender,
        recipients=tuple(RecipientStatus(a) for a in env.recipients),
        queued_at=queued_at,
        message_id=prepared.message_id,
        not_before=not_before if not_before is not None and not_before > queued_at else None,
    )
    return row_params(id, state, record, prepared.data, priority=prepared.priority)
