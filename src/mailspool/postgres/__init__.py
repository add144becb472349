"""The PostgreSQL queue backend (``pip install 'mailspool[postgres]'``).

:class:`~mailspool.postgres.queue.PostgresQueue` has the operations of the
Maildir spool on a table; claims are row locks held by the processor's own
database session (:mod:`~mailspool.postgres.claim`); the schema is
versioned (:mod:`~mailspool.postgres.schema`); mail can be queued in the
application's own transaction (:mod:`~mailspool.postgres.outbox`) and wakes
the processors by NOTIFY (:mod:`~mailspool.postgres.notify`).  Only this
room imports psycopg, and nothing outside imports this room unless a
PostgreSQL queue is used.  docs/postgres.md tells the whole story.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailspool.postgres.outbox import OutboxDelivery, enqueue
    from mailspool.postgres.queue import PostgresQueue

__all__ = ["OutboxDelivery", "PostgresQueue", "enqueue"]

_PUBLIC = {
    "OutboxDelivery": "mailspool.postgres.outbox",
    "enqueue": "mailspool.postgres.outbox",
    "PostgresQueue": "mailspool.postgres.queue",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mailspool.postgres' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
