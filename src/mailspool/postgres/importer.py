"""Moving a Maildir spool into a PostgreSQL queue, without losing or doubling a message.

Each message is taken in turn: claimed in the spool (a ready or deferred
one; a message in flight is left for a later run), inserted with its
spool id as the row's unique id, committed, and only then removed from
the spool.  A crash at any point leaves the message in the spool, in the
table, or in both; in both, the next run finds the row by its id, inserts
nothing and removes the file.  So running the import again until nothing
is left is always safe.

Stop the processors that drain the spool first: a processor that takes a
message between a crash of the import and its next run would send it
while it also waits in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailspool.errors import SpoolError
from mailspool.maildir.spool import Spool
from mailspool.postgres.queue import PostgresQueue
from mailspool.postgres.rows import insert_sql, row_params
from mailspool.priority import parse_priority
from mailspool.queue import QueueEntry, Record

__all__ = ["ImportSummary", "import_spool"]

#: The order states are imported in: the waiting ones first.
ORDER = ("ready", "deferred", "held", "failed", "quarantined")


@dataclass
class ImportSummary:
    """What an import did."""

    imported: int = 0  # inserted and removed from the spool
    already: int = 0  # found in the table already (an earlier run): removed from the spool
    left: int = 0  # still in the spool: being sent, or unreadable

    @property
    def moved(self) -> int:
        """Messages that left the spool."""
        return self.imported + self.already


def _record(entry: QueueEntry) -> Record:
    assert entry.queued_at is not None
    return Record(
        sender=entry.sender,
        recipients=entry.recipients,
        queued_at=entry.queued_at,
        attempts=entry.attempts,
        message_id=entry.message_id,
        last_error=entry.last_error,
        legacy=entry.legacy,
    )


def import_spool(
    spool: Spool,
    queue: PostgresQueue,
    *,
    report: Callable[[str, str], None] | None = None,
) -> ImportSummary:
    """Move every message of ``spool`` into ``queue``, keeping its state.

    Args:
        spool: the Maildir spool to empty.
        queue: the PostgreSQL queue to fill.
        report: called with (id, why) for each message left in the spool.

    Returns:
        The counts.

    Raises:
        SpoolError: the spool or the database failed (what was moved so
            far stays moved; run again).
    """
    summary = ImportSummary()
    sql = insert_sql(queue.table, once=True)
    for state in ORDER:
        for entry in list(spool.entries(state)):
            why = _one(spool, queue, sql, entry, summary)
            if why is not None:
                summary.left += 1
                if report is not None:
                    report(entry.id, why)
    for entry in spool.entries("in_flight"):
        summary.left += 1
        if report is not None:
            report(entry.id, "being sent")
    if summary.imported:
        with queue._main() as conn:  # wake the processors of the queue
            conn.execute("SELECT pg_notify(%s, '')", (queue.channel,))
    return summary


def _one(
    spool: Spool, queue: PostgresQueue, sql: str, entry: QueueEntry, summary: ImportSummary
) -> str | None:
    """Move one message; the reason when it stays in the spool."""
    if entry.queued_at is None or not entry.sender:
        return f"cannot be read: {entry.last_error or 'damaged'}"
    claim = None
    if entry.state in ("ready", "deferred"):
        claim = spool.claim(entry.id)  # no processor may send it while it moves
        if claim is None:
            return None if spool.state(entry.id) is None else "being sent"
        record = Record(
            sender=claim.envelope.sender,
            recipients=claim.recipients,
            queued_at=claim.queued_at,
            attempts=claim.attempts,
            message_id=claim.message_id,
            last_error=entry.last_error,
            legacy=claim.legacy,
            not_before=claim.not_before,
        )
        data = claim.data
    else:
        try:
            data = spool.message(entry.id)
        except KeyError:
            return None  # deleted meanwhile
        except (ValueError, SpoolError) as exc:
            return f"cannot be read: {exc}"
        record = _record(entry)
    try:
        params = row_params(
            entry.id,
            entry.state,
            record,
            data,
            due_at=entry.next_attempt,
            priority=parse_priority(entry.priority),
        )
        with queue._main() as conn:
            inserted = conn.execute(sql, params).rowcount
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    if inserted:
        summary.imported += 1
    else:
        summary.already += 1
    if claim is not None:
        outcome = claim.settle(sent=claim.envelope.recipients)  # its file goes
        if outcome == "removed":
            return None
    spool.delete(entry.id)
    return None
