"""Pickup in milliseconds: a connection that LISTENs for the queue's NOTIFY.

Every commit that makes mail ready (publish(), enqueue() in the
application's transaction, retry and release) sends ``NOTIFY`` on the
queue's channel in the same transaction, so PostgreSQL delivers it when,
and only if, the mail is committed.

A :class:`Listener` is the processor's :class:`~mailspool.queue.Waker`:
one extra connection per processor, LISTENing in a thread of its own,
which writes a byte to a socket pair for each batch of notifications.  The
processor's loop sleeps in ``select()`` on that socket, whose descriptor
never changes; the thread makes the connection again when it is lost (a
restarted server), and wakes the loop then too, since notifications sent
meanwhile were lost.  It logs that at debug level only: the processor
itself says, in one line each, when its queue goes down and comes back.
A notification only means "look now": what is due is read from the
table, and the processor's polling interval stays the safety net.
"""

from __future__ import annotations

import logging
import selectors
import threading
from typing import Any

import psycopg
from psycopg import sql

from mailspool.bell import Bell
from mailspool.errors import QueueUnavailable, SpoolError, SpoolIOError
from mailspool.postgres.connect import Target

__all__ = ["Listener"]

log = logging.getLogger("mailspool.processor")

#: How often (seconds) the listening thread checks whether to stop.
POLL = 1.0
#: Seconds between attempts to make a lost connection again.
RECONNECT = 2.0


class Listener:
    """LISTEN on a queue's channel; readable (``fileno()``) when notified.

    Args:
        target: the queue's database.
        channel: the channel name (``mailspool.<schema>``).
    """

    kind = "LISTEN/NOTIFY"

    def __init__(self, target: Target, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._bell = Bell()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mailspool-listen", daemon=True)
        self._thread.start()

    def _connect(self) -> psycopg.Connection[Any]:
        conn = self.target.connect(autocommit=True)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.Error as exc:
            conn.close()
            why = " ".join(str(exc).split())
            raise SpoolIOError(f"cannot listen on {self.channel}: {why}") from exc
        return conn

    def _run(self) -> None:
        lost = False
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except SpoolError as exc:
                if not lost:  # the processor says when its queue is down; this is a detail
                    level = logging.DEBUG if isinstance(exc, QueueUnavailable) else logging.WARNING
                    log.log(level, "%s; polling until it is back", exc)
                lost = True
                self._stop.wait(RECONNECT)
                continue
            if lost:
                log.debug("listening on %s again", self.channel)
                self._bell.ring()  # what was notified meanwhile is lost: look now
                lost = False
            self._listening.set()
            try:
                with conn:
                    while not self._stop.is_set():
                        if any(True for _ in conn.notifies(timeout=POLL)):
                            self._bell.ring()
            except psycopg.Error as exc:
                if not self._stop.is_set():
                    why = " ".join(str(exc).split())
                    log.debug("lost the connection listening on %s: %s", self.channel, why)
                    lost = True
            finally:
                self._listening.clear()

    def ready(self, timeout: float) -> bool:
        """Wait until the listener is LISTENing (what is committed after that wakes it)."""
        return self._listening.wait(timeout)

    # -- the Waker protocol ---------------------------------------------------------

    def fileno(self) -> int:
        """Readable when a notification arrived since the last drain()."""
        return self._bell.fileno()

    def drain(self) -> None:
        """Forget the notifications received so far."""
        self._bell.drain()

    def close(self) -> None:
        """Stop listening; the thread closes its connection within :data:`POLL` seconds."""
        self._stop.set()
        self._bell.close()

    # -- for direct use -------------------------------------------------------------

    def wait(self, timeout: float) -> bool:
        """Block until notified or ``timeout`` seconds pass; True when notified.

        Consumes the notifications (as drain()).
        """
        with selectors.DefaultSelector() as sel:
            sel.register(self._bell.fileno(), selectors.EVENT_READ)
            woken = bool(sel.select(max(0.0, timeout)))
        self.drain()
        return woken

    def __enter__(self) -> Listener:
        self.ready(10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
