"""A socket pair that one side rings and a ``select()`` loop hears.

What every wake-up in mailspool is made of: the processor's own
(:class:`~mailspool.processor.wakeup.Waiter`), the in-memory queue's waker,
the PostgreSQL listener's.  Ringing writes one byte without blocking, so it
is safe in a signal handler and from any thread (no lock, no logging); a
full buffer means the bell is ringing already.  The listening side selects
on :meth:`Bell.fileno` and calls :meth:`Bell.drain` before it looks, so that
nothing rung after the drain is missed.
"""

from __future__ import annotations

import contextlib
import socket

__all__ = ["Bell"]


class Bell:
    """Readable (:meth:`fileno`) from the first :meth:`ring` until :meth:`drain`."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    def fileno(self) -> int:
        """The descriptor to select on for reading."""
        return self._r.fileno()

    def ring(self) -> None:
        """Make it readable; safe in a signal handler."""
        with contextlib.suppress(OSError):  # full (already ringing) or closed
            self._w.send(b"\0")

    def drain(self) -> None:
        """Forget the rings so far: not readable until the next one."""
        with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
            while self._r.recv(4096):
                pass

    def close(self) -> None:
        """Close both ends."""
        self._r.close()
        self._w.close()
