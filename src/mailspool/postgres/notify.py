"""Pickup in milliseconds: a connection that LISTENs for the queue's NOTIFY.

Every commit that makes mail ready (publish(), enqueue() in the
application's transaction, retry and release) sends ``NOTIFY`` on the
queue's channel in the same transaction, so PostgreSQL delivers it when,
and only if, the mail is committed.  A :class:`Listener` is one extra
connection per processor, idle in ``select()`` until a notification or its
timeout: an idle processor uses no CPU.  A notification only means "look
now": what is due is read from the table, so a lost notification (the
listener reconnecting) costs at most one polling interval.
"""

from __future__ import annotations

import selectors
from typing import Any

import psycopg
from psycopg import sql

from mailspool.errors import SpoolError
from mailspool.postgres.connect import Target

__all__ = ["Listener"]


class Listener:
    """A connection that LISTENs on a queue's channel.

    Args:
        target: the queue's database.
        channel: the channel name (``mailspool.<schema>``).
    """

    def __init__(self, target: Target, channel: str) -> None:
        self.target = target
        self.channel = channel
        self._conn: psycopg.Connection[Any] | None = None
        self._seen = 0

    def _on_notify(self, n: psycopg.Notify) -> None:
        if n.channel == self.channel:
            self._seen += 1

    def connect(self) -> None:
        """Open the connection and LISTEN, unless already done.

        Raises:
            SpoolError: the database cannot be reached.
        """
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return
        conn = self.target.connect(autocommit=True)
        conn.add_notify_handler(self._on_notify)
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        except psycopg.Error as exc:
            conn.close()
            raise SpoolError(f"cannot listen on {self.channel}: {exc}") from exc
        self._conn = conn

    def fileno(self) -> int:
        """The descriptor to wait on (readable when something arrived)."""
        self.connect()
        assert self._conn is not None
        return self._conn.fileno()

    def take(self) -> int:
        """Read what arrived without waiting; the number of notifications since the last take()."""
        conn = self._conn
        if conn is not None and not conn.broken:
            try:
                conn.execute("SELECT 1")  # handles the notifications that arrived
            except psycopg.Error:
                conn.close()
        seen, self._seen = self._seen, 0
        return seen

    def wait(self, timeout: float) -> bool:
        """Block until a notification arrives or ``timeout`` seconds pass.

        Returns:
            True when notified (or the connection was lost: look anyway).
        """
        if self._seen:
            return self.take() > 0
        try:
            fd = self.fileno()
        except SpoolError:
            return True
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            ready = sel.select(max(0.0, timeout))
        if not ready:
            return False
        n = self.take()
        return n > 0 or self._conn is None or self._conn.closed

    def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Listener:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
