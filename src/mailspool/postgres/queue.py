"""The PostgreSQL queue: the same operations as the Maildir spool, on one table.

:class:`PostgresQueue` has the methods and the meaning of
:class:`mailspool.maildir.spool.Spool`, so the processor, the deliveries and
the command treat both alike:

* enqueue, two-phase (what :class:`~mailspool.QueuedMailDelivery` does at
  vote and at the end of the commit): stage() inserts the row as
  ``staged`` and commits, so a failure shows at vote; publish() turns
  staged rows ready (or deferred) in one short transaction that also
  notifies the processors; discard() deletes them.  A crash between the
  two leaves staged rows that are never sent and that sweep() removes, as
  it removes orphans in the spool's ``tmp/``;
* enqueue in the application's own transaction: enqueue() inserts the row
  ready on the connection the application passes, so it commits or rolls
  back with the application's data (:mod:`mailspool.postgres.outbox`);
* processing: due(), next_due(), claim() (a row lock in a transaction
  held open for the claim's life, :mod:`mailspool.postgres.claim`),
  sweep();
* the operator's view and repairs, from :mod:`mailspool.postgres.admin`.

A process may use one queue from many threads.  The queue's own
connection serves one statement at a time; each claim has a connection of
its own from the pool.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import Message
from typing import TYPE_CHECKING, Any

import psycopg

from mailspool.errors import QueueUnavailable, SpoolError, SpoolIOError
from mailspool.maildir.directory import check_id
from mailspool.maildir.spool import TMP_MAX_AGE
from mailspool.message import Prepared
from mailspool.postgres.admin import PostgresAdmin
from mailspool.postgres.claim import PostgresClaim
from mailspool.postgres.connect import Target
from mailspool.postgres.notify import Listener
from mailspool.postgres.outbox import enqueue as _enqueue
from mailspool.postgres.rows import RECORD_COLUMNS, insert_params, insert_sql, new_id
from mailspool.priority import PRIORITIES, Priority, interleave
from mailspool.queue import QueueBackend

__all__ = ["PostgresQueue", "Staged"]

log = logging.getLogger("mailspool.spool")

#: due() reads this many ids per query.
DUE_BATCH = 1000
#: How often (seconds) due() runs sweep() by itself.
SWEEP_EVERY = 3600.0
#: Seconds a claim's connection is kept in the pool unused.
POOL_IDLE = 60.0


@dataclass(frozen=True)
class Staged:
    """A message inserted by stage() as ``staged``: committed, not yet visible."""

    id: str
    message_id: str
    area: str  # "new" (ready when published) or "deferred"
    not_before: float | None = None


class PostgresQueue(PostgresAdmin):
    """A mail queue in a PostgreSQL database.

    Args:
        dsn: ``postgresql://user@host:port/dbname`` (``?schema=NAME``
            allowed), a libpq ``key=value`` string, or a
            :class:`~mailspool.postgres.connect.Target`.  The password comes
            from ``PGPASSWORD``, ``~/.pgpass`` or the file named by
            ``MAILSPOOL_DB_PASSWORD_FILE``; never put it in the URL.
        schema: the PostgreSQL schema holding the tables (default
            ``mailspool``, or the URL's ``schema``).
        create: create the schema when it does not exist (as ``mailspool
            db init``); otherwise a missing or outdated schema raises.
        keep_sent: keep sent messages this many seconds (state ``sent``,
            invisible to the queue's listings; for audit in SQL), removed
            by sweep() after that (and by due(), at most once an hour).
            None (the default, or the URL's ``keep_sent_days``): a sent
            message's row is deleted when it is settled.
        max_idle: database connections kept open while idle, besides the
            queue's own.
        connect: connect now and check the schema (the default); False
            leaves both to the first use, so that a queue can be made while
            its database is down (a processor then waits for it, see
            docs/postgres.md).

    Raises:
        ValueError: ``dsn`` or ``schema`` is malformed.
        QueueUnavailable: the database cannot be reached (``connect``).
        SpoolError: the database refuses the login, or has no (current)
            schema (``connect``).
    """

    def __init__(
        self,
        dsn: str | Target,
        *,
        schema: str | None = None,
        create: bool = False,
        keep_sent: float | None = None,
        max_idle: int = 2,
        connect: bool = True,
    ) -> None:
        super().__init__(
            dsn,
            schema=schema,
            create=create,
            keep_sent=keep_sent,
            max_idle=max_idle,
            connect=connect,
        )
        self._insert = insert_sql(self.table)
        # The row lock and the advisory lock that shows it in pg_locks, in
        # one round trip: MATERIALIZED, so that the advisory lock is taken
        # only for a row the first part locked (lock_key() in SQL).
        self._claim = (
            f"WITH c AS MATERIALIZED (SELECT {RECORD_COLUMNS} FROM {self.table} "
            "WHERE id = %s AND state IN ('ready', 'deferred') FOR UPDATE SKIP LOCKED) "
            "SELECT c.*, pg_try_advisory_xact_lock(%s, (c.seq %% 2147483648)::int4) FROM c"
        )
        self._next_sweep = time.monotonic() + SWEEP_EVERY  # due()'s next sweep()
        self._lost = 0  # claims that found their row taken since due() last listed
        self._random = random.Random()

    # -- enqueue in the application's transaction --------------------------------------

    def enqueue(
        self,
        conn: Any,
        fromaddr: str,
        toaddrs: Iterable[str] | str,
        message: bytes | str | Message,
        *,
        not_before: float | datetime | None = None,
        msgid_domain: str | None = None,
        priority: str | Priority | None = None,
    ) -> str:
        """Queue a message in the transaction open on ``conn``; see
        :func:`mailspool.postgres.outbox.enqueue`.

        Returns:
            The Message-Id, without angle brackets.
        """
        return _enqueue(
            conn,
            fromaddr,
            toaddrs,
            message,
            not_before=not_before,
            msgid_domain=msgid_domain,
            schema=self.schema,
            priority=priority,
        )

    # -- enqueue, two-phase ---------------------------------------------------------

    def _staged_row(
        self, prepared: Prepared, not_before: float | None
    ) -> tuple[Staged, dict[str, Any]]:
        id = new_id()
        now = time.time()
        later = not_before is not None and not_before > now
        staged = Staged(id, prepared.message_id, "deferred" if later else "new", not_before)
        params = insert_params(
            id, "staged", prepared, queued_at=now, not_before=not_before if later else None
        )
        return staged, params

    def stage(self, prepared: Prepared, *, not_before: float | None = None) -> Staged:
        """Insert a message durably (committed), not yet visible.

        Raises:
            SpoolError: the database failed; nothing is left behind.
        """
        return self.stage_many([(prepared, not_before)])[0]

    def stage_many(self, batch: Sequence[tuple[Prepared, float | None]]) -> list[Staged]:
        """:meth:`stage` for several messages at once: one transaction.

        Raises:
            SpoolError: the database failed; none of the batch is left behind.
        """
        rows = [self._staged_row(p, nb) for p, nb in batch]
        if not rows:
            return []
        with self._main() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(self._insert, [params for _, params in rows])
        return [staged for staged, _ in rows]

    def publish(self, staged: Sequence[Staged]) -> None:
        """Make staged messages visible and wake the processors: one commit.

        Raises:
            SpoolError: the database failed; none of them is visible (they
                stay staged, for discard() or, after a crash, sweep()).
        """
        if not staged:
            return
        ready = [s.id for s in staged if s.area == "new"]
        later = [s.id for s in staged if s.area != "new"]
        with self._main() as conn, conn.transaction():
            for state, ids in (("ready", ready), ("deferred", later)):
                if ids:
                    conn.execute(
                        f"UPDATE {self.table} SET state = %s "
                        "WHERE id = ANY(%s) AND state = 'staged'",
                        (state, ids),
                    )
            conn.execute("SELECT pg_notify(%s, '')", (self.channel,))

    def discard(self, staged: Sequence[Staged]) -> None:
        """Delete staged messages; never raises (sweep() removes what is left)."""
        if not staged:
            return
        try:
            with self._main() as conn:
                conn.execute(
                    f"DELETE FROM {self.table} WHERE id = ANY(%s) AND state = 'staged'",
                    ([s.id for s in staged],),
                )
        except SpoolError:
            pass

    # -- processing ------------------------------------------------------------------

    def due(self, now: float | None = None) -> Iterator[str]:
        """Stream the ids of the messages that can be claimed now: each class
        oldest due first, the classes interleaved by the rule of
        :mod:`mailspool.priority`.

        Messages claimed by someone at the time of each batch are left out;
        an id may still be taken by the time it is claimed (claim() then
        returns None).  At most once an hour (real time) it first runs
        sweep(), so a processor that runs for months removes the staged
        rows of crashed deliveries and the sent rows kept long enough.
        """
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_EVERY
            try:
                self.sweep()
            except SpoolError as exc:
                log.warning("queue %s: cannot sweep: %s", self.location, exc)
        now = time.time() if now is None else now
        return interleave({p: functools.partial(self._due_class, p, now) for p in PRIORITIES})

    def _due_class(self, priority: Priority, now: float) -> Iterator[str]:
        """One class's due ids, oldest due first, :data:`DUE_BATCH` per query."""
        after: tuple[Any, int] | None = None
        while True:
            # The claimed rows are left out by the same statement: one round
            # trip from a wake-up to the first id.
            sql = (
                f"SELECT id, due_at, seq FROM {self.table} WHERE priority = %s "
                "AND state IN ('ready', 'deferred') AND due_at <= to_timestamp(%s) "
                f"AND seq NOT IN ({self.locked_sql})"
            )
            params: tuple[Any, ...] = (priority.rank, now, self.lock_class_oid)
            if after is not None:
                sql += " AND (due_at, seq) > (%s, %s)"
                params += after
            with self._main() as conn:
                rows = conn.execute(
                    f"{sql} ORDER BY due_at, seq LIMIT {DUE_BATCH}", params
                ).fetchall()
            yield from self._spread(ids=[id for id, _, _ in rows])
            if len(rows) < DUE_BATCH:
                return
            after = (rows[-1][1], rows[-1][2])

    def _spread(self, ids: list[str]) -> list[str]:
        """``ids`` in order; rotated to start at a random one after claims were lost.

        Processors sharing the queue list the same messages in the same
        order: following one another through it, each would find most of
        its rows taken (a round trip each, about three per message with
        four processors).  A processor that lost claims since its last
        listing starts the next one elsewhere; one processor alone never
        loses a claim and keeps the oldest-first order.
        """
        if not self._lost or len(ids) < 2:
            return ids  # (an empty class's listing leaves the rotation to the next)
        self._lost = 0
        k = self._random.randrange(len(ids))
        return ids[k:] + ids[:k]

    def next_due(self) -> float | None:
        """The earliest time a deferred message is due, or None."""
        with self._main() as conn:
            row = conn.execute(
                f"SELECT extract(epoch FROM min(due_at))::float8 FROM {self.table} "
                "WHERE state = 'deferred'"
            ).fetchone()
        return None if row is None else row[0]

    def claim(self, id: str) -> PostgresClaim | None:
        """Take a message for sending: no one else can hold it until settled.

        Returns:
            A :class:`~mailspool.postgres.claim.PostgresClaim`, or None when
            the message is held by someone else, is gone (already sent) or
            is not ready or deferred.

        Raises:
            ValueError: ``id`` is not a valid id.
            SpoolError: the database failed.
        """
        check_id(id)
        self.opened()
        conn = self._get()
        try:
            row = conn.execute(self._claim, (id, self.lock_class)).fetchone()
            if row is None:
                self._lost += 1  # taken by another processor (or gone): see _spread()
            else:
                claim = PostgresClaim(self, conn, row[:-1])
                if not claim.envelope.recipients:  # nothing pending: a row written by hand?
                    self._settle_empty(conn, claim)
                    return None
                return claim
            conn.rollback()
        except psycopg.Error as exc:
            cls = QueueUnavailable if conn.broken else SpoolIOError
            conn.close()
            raise cls(f"queue {self.location}: cannot claim {id}: {self.why(exc)}") from exc
        self._pool.put(conn)
        return None

    def _settle_empty(self, conn: psycopg.Connection[Any], claim: PostgresClaim) -> None:
        failed = any(r.status == "failed" for r in claim.recipients)
        if failed:
            conn.execute(f"UPDATE {self.table} SET state = 'failed' WHERE id = %s", (claim.id,))
        else:
            conn.execute(f"DELETE FROM {self.table} WHERE id = %s", (claim.id,))
        conn.commit()
        claim._finish("failed" if failed else "removed")

    def sweep(self, now: float | None = None, *, tmp_max_age: float = TMP_MAX_AGE) -> int:
        """Remove staged rows older than ``tmp_max_age`` (never committed by
        their delivery) and sent rows kept longer than ``keep_sent``.

        Abandoned claims need nothing: their locks ended with their sessions.

        Returns:
            How many rows were removed.
        """
        now = time.time() if now is None else now
        with self._main() as conn:
            done = conn.execute(
                f"DELETE FROM {self.table} WHERE state = 'staged' AND queued_at < to_timestamp(%s)",
                (now - tmp_max_age,),
            ).rowcount
            if self.keep_sent is not None:
                done += conn.execute(
                    f"DELETE FROM {self.table} WHERE state = 'sent' "
                    "AND finished_at < to_timestamp(%s)",
                    (now - self.keep_sent,),
                ).rowcount
        return max(0, done)

    def quarantined_last(self, id: str) -> bool:
        """Never: a claim here finds no damaged message to set aside."""
        return False

    def claimed_elsewhere(self) -> bool:
        """Whether some message is being sent now, by any processor.

        A processor that dies frees its claims but notifies no one, so while
        claims exist the processor's loop looks again soon.  Asked by the
        loop whenever it is about to sleep, it also closes the claims'
        connections idle for a minute: an idle processor keeps two (its own
        and its listener's).
        """
        self._pool.prune(POOL_IDLE)
        try:
            with self._main() as conn:
                return bool(self._locked(conn))
        except SpoolError:
            return False

    # -- waking up -----------------------------------------------------------------

    def waker(self) -> Listener:
        """A :class:`~mailspool.postgres.notify.Listener` on this queue's channel."""
        return Listener(self.target, self.channel)

    listener = waker


if TYPE_CHECKING:  # mypy checks that the queue fits the seam

    def _fits(queue: PostgresQueue) -> QueueBackend:
        return queue
