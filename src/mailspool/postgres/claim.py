"""A message held for sending in PostgreSQL: a row lock in an open transaction.

Theory of operation
-------------------
``claim()`` takes a connection of its own from the queue's pool, begins a
transaction and locks the message's row with ``SELECT ... FOR UPDATE SKIP
LOCKED``; the transaction stays open while the message is sent.  Another
processor's claim skips the locked row (claim() returns None there), and
the operator's repairs refuse it (``FOR UPDATE NOWAIT``).  Settling writes
the outcome in that same transaction and commits it: the new state and the
end of the claim are one commit, so there is no moment at which the
message is neither claimed nor in its new state.

If the process dies, its sessions end and PostgreSQL rolls their
transactions back: the locks go with them, and the message is claimable
again at once (as soon as the server sees the connection close; when a
host vanishes without closing it, after the TCP keepalive settings of the
server).  Nothing is written when a message is claimed, so an abandoned
claim leaves nothing to clean up.

The claim also takes a transaction-level advisory lock keyed by the table
and the row.  It guards nothing: it makes the claim visible in
``pg_locks``, which is how counts() and entries() tell "in flight".

If the claim's connection breaks before the outcome is written, the lock is
gone.  settle() then tries once more on a new connection, taking the row
again only if no one else holds it and it is exactly as it was claimed;
otherwise the claim ends ("lost", :class:`~mailspool.errors.ClaimLost`) and
the message is sent again by whoever takes it: the window docs/postgres.md
names.  While the database cannot be reached at all, settle() raises
:class:`~mailspool.errors.QueueUnavailable` and the claim stays unsettled:
the processor keeps the outcome and writes it when the database is back.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg

from mailspool.errors import ClaimLost, MessageStateError, QueueUnavailable, SpoolIOError
from mailspool.maildir.fileformat import MAX_TEXT
from mailspool.maildir.lifecycle import OUTCOME_ACTION, next_area
from mailspool.message import Envelope
from mailspool.postgres.rows import RECORD_COLUMNS, encode_recipients, lock_key, record_from_row
from mailspool.queue import RecipientStatus, Record, RecordFields, all_sent, settle_record

if TYPE_CHECKING:
    from mailspool.postgres.admin import PostgresAdmin

__all__ = ["PostgresClaim"]

_INTRANS = psycopg.pq.TransactionStatus.INTRANS
_INERROR = psycopg.pq.TransactionStatus.INERROR
#: For the claim's transaction only: its commit returns before the WAL flush.
_NO_FLUSH = "SET LOCAL synchronous_commit TO off"


def _back_to_savepoint(conn: psycopg.Connection[Any]) -> None:
    """After a failed outcome: keep the claim's transaction, and so its lock."""
    if conn.broken or conn.info.transaction_status != _INERROR:
        return  # gone with the connection, or the COMMIT itself failed
    try:
        conn.execute("ROLLBACK TO SAVEPOINT outcome")
    except psycopg.Error:
        conn.close()  # the session's end drops the lock: due again at once


class PostgresClaim(RecordFields):
    """A message held for sending; settle it, or it goes back to ready.

    The same surface as :class:`mailspool.maildir.claim.Claim`: use it as a
    context manager (leaving the block without settle(), defer() or
    quarantine() releases the message untouched).  A claim belongs to the
    process that made it.

    Attributes:
        id: the queue id.
        envelope: sender and the recipients still pending (only those).
        data: the message as it goes on the wire (CRLF line endings).
        source: the state it was claimed from (ready or deferred).
    """

    __slots__ = (
        "_conn",
        "_done",
        "_pid",
        "_queue",
        "_record",
        "_seq",
        "data",
        "envelope",
        "id",
        "source",
    )

    def __init__(
        self,
        queue: PostgresAdmin,
        conn: psycopg.Connection[Any],
        row: tuple[Any, ...],
    ) -> None:
        self._queue = queue
        self._conn: psycopg.Connection[Any] | None = conn
        self._pid = os.getpid()
        self._seq: int = row[0]
        self._record = record_from_row(row)
        self._done: str | None = None
        self.id: str = row[1]
        self.source: str = row[2]
        self.data: bytes = bytes(row[11])
        self.envelope = Envelope(self._record.sender, self._record.pending)

    @property
    def held(self) -> bool:
        """True while this claim holds the message in this process."""
        return self._done is None and self._pid == os.getpid()

    def __repr__(self) -> str:
        return f"<PostgresClaim {self.id} {self._done or 'held'}>"

    def __enter__(self) -> PostgresClaim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done is None and self._pid == os.getpid():
            self.release()

    def __del__(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None and getattr(self, "_done", "x") is None and self._pid == os.getpid():
            conn.close()  # the session's end drops the lock: due again at once

    # -- writing the outcome -----------------------------------------------------

    def _start(self, action: str) -> None:
        if self._done is not None:
            raise MessageStateError(f"cannot {action} {self.id}: already {self._done}")
        if self._pid != os.getpid():
            raise MessageStateError(f"cannot {action} {self.id}: claimed by process {self._pid}")
        next_area(action, "cur")  # the lifecycle allows it from "in flight"

    def _finish(self, outcome: str) -> None:
        self._done = outcome
        conn, self._conn = self._conn, None
        if conn is not None:
            self._queue._pool.put(conn)

    def _connection(self, action: str) -> psycopg.Connection[Any]:
        """The claim's connection, its transaction still open, or the row taken again."""
        conn = self._conn
        if conn is not None and not conn.broken and conn.info.transaction_status == _INTRANS:
            return conn
        if conn is not None:
            conn.close()
            self._conn = None
        queue = self._queue
        conn = queue._get()
        held_elsewhere = False
        try:
            row = conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM {queue.table} WHERE seq = %s "
                "AND state IN ('ready', 'deferred') FOR UPDATE NOWAIT",
                (self._seq,),
            ).fetchone()
        except psycopg.errors.LockNotAvailable:
            row, held_elsewhere = None, True
        except psycopg.Error as exc:
            cls = QueueUnavailable if conn.broken else SpoolIOError
            conn.close()
            raise cls(f"cannot {action} {self.id}: {queue.why(exc)}") from exc
        if row is None or record_from_row(row) != self._record:
            conn.rollback()
            queue._pool.put(conn)
            self._done = "lost"
            now = (
                "another processor holds the message now and sends it again"
                if held_elsewhere
                else "the message was settled or changed by another processor or an operator"
            )
            raise ClaimLost(
                f"cannot {action} {self.id}: its claim ended with its database "
                f"connection, and {now}"
            )
        conn.execute(queue.lock_sql, (queue.lock_class, lock_key(self._seq)))
        self._conn = conn
        return conn

    def _write(
        self,
        action: str,
        outcome: str,
        sql: str,
        params: tuple[Any, ...],
        *,
        flush: bool = True,
    ) -> None:
        """Run ``sql`` in the claim's transaction and commit it: the claim ends.

        With ``flush`` False the commit does not wait for the server's WAL
        flush (``synchronous_commit`` off for this transaction only): what
        a crash of the server in the next few hundred milliseconds can
        undo is then only this outcome, never another row.
        """
        self._start(action)
        # One round trip: the outcome in a savepoint (a failed statement
        # keeps the lock: rolled back to it below), then the commit; bound
        # on the client, since only the simple protocol takes several
        # statements at once.
        script = f"SAVEPOINT outcome; {'' if flush else _NO_FLUSH + '; '}{sql}; " + (
            "RELEASE SAVEPOINT outcome; COMMIT"
        )
        for retry in (True, False):
            conn = self._connection(action)
            try:
                psycopg.ClientCursor(conn).execute(script, params)
            except psycopg.Error as exc:
                if retry and conn.broken:  # found broken only now: take the row again
                    continue
                _back_to_savepoint(conn)
                why = self._queue.why(exc)
                cls = QueueUnavailable if conn.broken else SpoolIOError
                raise cls(f"cannot {action} {self.id}: {why}") from exc
            break
        self._finish(outcome)

    def _update(
        self, record: Record, state: str, due_at: float | None
    ) -> tuple[str, tuple[Any, ...]]:
        sql = (
            f"UPDATE {self._queue.table} SET state = %s, recipients = CAST(%s AS jsonb), "
            "attempts = %s, last_error = %s, "
            "due_at = coalesce(to_timestamp(%s), due_at) WHERE seq = %s"
        )
        last = record.last_error[:MAX_TEXT] if record.last_error else None
        params = (
            state,
            encode_recipients(record.recipients),
            record.attempts,
            last,
            due_at,
            self._seq,
        )
        return sql, params

    def settle(
        self,
        *,
        sent: Iterable[str] = (),
        failed: Mapping[str, tuple[int | None, str]] | None = None,
        deferred: Mapping[str, tuple[int | None, str]] | None = None,
        retry_at: float | None = None,
        reply: tuple[int, str] | None = None,
    ) -> str:
        """Record one attempt's outcome per recipient (as :meth:`Claim.settle`).

        Returns:
            ``"removed"`` (all accepted: the row is deleted, or kept as
            ``sent`` when the queue keeps sent rows), ``"deferred"`` (due
            again at ``retry_at``, default now) or ``"failed"``.

        Raises:
            ValueError: an address is not a pending recipient of this message.
            SpoolError: already settled, or the database could not take the
                outcome (the claim is still held; settle again or release).
        """
        if self._done is not None:
            raise MessageStateError(f"cannot settle {self.id}: already {self._done}")
        sent = tuple(sent)
        if not failed and not deferred and all_sent(self._record, sent):
            record = replace(
                self._record,
                recipients=tuple(
                    RecipientStatus(r.address, "sent") for r in self._record.recipients
                ),
                attempts=self._record.attempts + 1,
            )
            outcome = "removed"
        else:
            record, outcome = settle_record(self._record, sent, failed, deferred, reply)
        action = OUTCOME_ACTION[outcome]
        if outcome == "removed":
            if self._queue.keep_sent is None:
                sql = f"DELETE FROM {self._queue.table} WHERE seq = %s"
                params: tuple[Any, ...] = (self._seq,)
            else:
                sql, params = self._update(record, "sent", None)
                sql = sql.replace("WHERE seq", ", finished_at = now() WHERE seq")
        elif outcome == "deferred":
            sql, params = self._update(
                record, "deferred", time.time() if retry_at is None else retry_at
            )
        else:
            sql, params = self._update(record, "failed", None)
        # A message sent to every recipient is settled without waiting for
        # the WAL flush, as the spool unlinks its file without an fsync: a
        # crash of the server just after it brings the row back, sent again
        # (window (a) of docs/guarantees.md).  A partial outcome waits.
        self._write(action, outcome, sql, params, flush=outcome != "removed")
        return outcome

    def defer(self, retry_at: float, reason: str, *, count_attempt: bool = True) -> None:
        """Put the whole message back until ``retry_at``; no recipient changes.

        Raises:
            SpoolError: already settled, or the database could not take it.
        """
        record = replace(
            self._record,
            attempts=self._record.attempts + (1 if count_attempt else 0),
            last_error=reason,
        )
        sql, params = self._update(record, "deferred", retry_at)
        self._write("defer", "deferred", sql, params)

    def release(self) -> None:
        """Give the message back untouched: ready at once, attempts unchanged.

        Raises:
            SpoolError: already settled.
        """
        self._start("release")
        conn = self._conn
        if conn is None or conn.broken:
            self._finish("released")  # the lock went with the connection
            return
        try:
            if self.source == "deferred":
                conn.execute(
                    f"UPDATE {self._queue.table} SET state = 'ready', due_at = now() "
                    "WHERE seq = %s",
                    (self._seq,),
                )
                conn.commit()
            else:
                conn.rollback()
        except psycopg.Error:
            conn.close()  # the session's end drops the lock all the same
        self._finish("released")

    def quarantine(self, reason: str) -> None:
        """Set the message aside with ``reason``; it is never sent.

        Raises:
            SpoolError: already settled, or the database could not take it.
        """
        sql = (
            f"UPDATE {self._queue.table} SET state = 'quarantined', last_error = %s WHERE seq = %s"
        )
        self._write("quarantine", "quarantined", sql, (reason[:MAX_TEXT], self._seq))
