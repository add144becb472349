"""The processor's connections to the relay: reused, and never more than allowed.

Opening an SMTP connection (TCP, greeting, EHLO, STARTTLS, AUTH) costs far
more than sending a small message over it, so connections are kept and
reused.  They live in a pool, not in the sender threads: a thread takes
the connection used last (the one least likely to have timed out), and
gives it back after the message.  That keeps the number of open
connections at the number of messages actually in flight, which is what
lets the processor honour a lowered limit after a 421 "too many
connections": a connection given back beyond the limit is closed, not
kept, whichever thread held it.

Connections unused for :data:`IDLE_TIMEOUT` are closed (relays close idle
clients after a few minutes anyway, often with a 421 the next command
would meet).  The pool opens nothing on its own and decides nothing about
the relay: the processor opens connections one at a time, and pauses the
relay when that fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mailspool.message import Envelope
from mailspool.smtp.result import SendResult
from mailspool.smtp.seams import (
    ConnectingMailer,
    Connection,
    EnvelopeMailer,
    Mailer,
    RelayAddress,
)

__all__ = ["IDLE_TIMEOUT", "Connection", "ConnectionPool", "MailerConnection", "relay_name"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")

#: Seconds a connection may stay unused before it is closed.
IDLE_TIMEOUT = 30.0


class MailerConnection:
    """For a mailer without ``connect()``: each send goes through the mailer."""

    alive = True

    def __init__(self, mailer: Mailer) -> None:
        self._send: Callable[[Envelope, bytes], SendResult]
        if isinstance(mailer, EnvelopeMailer):
            self._send = mailer.send_envelope
        else:
            self._send = lambda envelope, data: _result(
                mailer.send(envelope.sender, envelope.recipients, data), envelope
            )

    def send(self, envelope: Envelope, data: bytes) -> SendResult:
        """Send through the mailer's ``send_envelope``, or else its ``send``."""
        return self._send(envelope, data)

    def close(self) -> None:
        """Nothing to close."""


def _result(result: object, envelope: Envelope) -> SendResult:
    """What a mailer's ``send()`` returned; anything but a SendResult means all taken."""
    if isinstance(result, SendResult):
        return result
    return SendResult(accepted=tuple(envelope.recipients))


def connect(mailer: Mailer) -> Connection:
    """A new connection from ``mailer.connect()``, or an adapter if it has none.

    Raises:
        Whatever ``mailer.connect()`` raises.
    """
    if isinstance(mailer, ConnectingMailer):
        return mailer.connect()
    return MailerConnection(mailer)


def relay_name(mailer: object) -> str:
    """``host:port`` of the mailer's relay, or its class name."""
    if isinstance(mailer, RelayAddress):
        host, port = mailer.host, mailer.port
        if isinstance(host, str) and isinstance(port, int):
            return f"{host}:{port}"
    return type(mailer).__name__


def _close(conn: Connection) -> None:
    try:
        conn.close()
    except Exception:  # closing a broken connection: nothing left to do
        log.debug("closing a connection failed", exc_info=True)


class ConnectionPool:
    """Idle connections to one relay, and a count of all that are open.

    Thread-safe.  A connection is either idle in the pool or held by one
    caller between :meth:`take` (or :meth:`add`) and :meth:`give_back` or
    :meth:`discard`.

    Args:
        idle_timeout: seconds after which an idle connection is closed.
        clock: a monotonic clock in seconds.
    """

    def __init__(
        self, *, idle_timeout: float = IDLE_TIMEOUT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._idle: list[tuple[Connection, float]] = []  # (conn, idle since), newest last
        self._open = 0

    @property
    def open(self) -> int:
        """Connections open: idle ones and those held."""
        return self._open

    def take(self) -> Connection | None:
        """The idle connection used last, if one is alive and fresh; else None.

        Dead or stale idle connections met on the way are closed.
        """
        stale: list[Connection] = []
        found: Connection | None = None
        with self._lock:
            now = self._clock()
            # The oldest first: those idle too long are closed (QUIT) now,
            # before the relay's own idle timeout, even while newer ones are
            # busy enough that the take below never reaches them.
            while self._idle and now - self._idle[0][1] >= self.idle_timeout:
                stale.append(self._idle.pop(0)[0])
                self._open -= 1
            while self._idle:
                conn, since = self._idle.pop()
                if now - since < self.idle_timeout and conn.alive:
                    found = conn
                    break
                stale.append(conn)
                self._open -= 1
        for conn in stale:
            _close(conn)
        return found

    def add(self, conn: Connection) -> None:
        """Count a connection just opened by the caller, who holds it."""
        with self._lock:
            self._open += 1

    def give_back(self, conn: Connection, *, keep: int) -> None:
        """Return a held connection: kept when alive and no more than ``keep`` are open.

        Args:
            conn: the connection, as taken or added.
            keep: how many connections may stay open (the current parallelism).
        """
        with self._lock:
            if conn.alive and self._open <= keep:
                self._idle.append((conn, self._clock()))
                return
            self._open -= 1
        _close(conn)

    def discard(self, conn: Connection) -> None:
        """Close a held connection (it failed, or it is not wanted any more)."""
        with self._lock:
            self._open -= 1
        _close(conn)

    def count_alive(self) -> int:
        """How many connections are open: the held ones and the live idle ones.

        Dead idle connections are closed first, so that a relay that dropped
        them all is not counted as busy.
        """
        dead: list[Connection] = []
        with self._lock:
            live: list[tuple[Connection, float]] = []
            for conn, since in self._idle:
                if conn.alive:
                    live.append((conn, since))
                else:
                    dead.append(conn)
            self._idle = live
            self._open -= len(dead)
            count = self._open
        for conn in dead:
            _close(conn)
        return count

    def close_idle(self) -> float | None:
        """Close the connections idle too long.

        Returns:
            Seconds until the next idle connection expires, or None if none
            is left.
        """
        expired: list[Connection] = []
        with self._lock:
            now = self._clock()
            keep = [(c, s) for c, s in self._idle if now - s < self.idle_timeout]
            expired = [c for c, s in self._idle if now - s >= self.idle_timeout]
            self._idle = keep
            self._open -= len(expired)
            soonest = min((s + self.idle_timeout - now for _, s in keep), default=None)
        for conn in expired:
            _close(conn)
        return soonest

    def close_all(self) -> None:
        """Close every idle connection (held ones are closed when given back)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn, _ in idle:
            _close(conn)
