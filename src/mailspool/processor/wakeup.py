"""Where the processor's loop sleeps, and what wakes it.

An idle processor must use no CPU and still see new mail within
milliseconds.  So between passes it blocks in ``select()`` on two things:

* a socket pair (:class:`~mailspool.bell.Bell`): :meth:`Waiter.wake` rings it.  The delivery
  calls it after a commit in the same process, and the signal handlers
  call it (a non-blocking ``send`` is safe there: no lock, no logging);
* the queue's :class:`~mailspool.queue.Waker`, when its backend has one:
  for the Maildir spool an inotify descriptor on ``new/`` and
  ``deferred/`` (:mod:`mailspool.maildir.inotify`), which sees commits
  made by any process.

The caller gives the longest sleep: the time until the next deferred
message is due, or its polling ``interval``, which is the safety net and
the only way to see new mail where the queue has no waker (inotify missing
on other systems, some network file systems, a watch limit reached).  Any event just means "look
now": what changed is read from the spool, never from the event.
"""

from __future__ import annotations

import selectors

from mailspool.bell import Bell
from mailspool.queue import Waker

__all__ = ["Waiter"]


class Waiter:
    """Sleeps until woken, a watched directory changes, or a timeout.

    Args:
        waker: the queue's waker (:meth:`~mailspool.queue.QueueBackend.waker`),
            which the waiter closes; ``None``: wake-ups and timeouts only.
    """

    def __init__(self, waker: Waker | None) -> None:
        self._bell = Bell()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._bell.fileno(), selectors.EVENT_READ)
        self.waker = waker
        if waker is not None:
            self._selector.register(waker.fileno(), selectors.EVENT_READ)

    def wake(self) -> None:
        """Make the current or next wait return; safe in a signal handler."""
        self._bell.ring()

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True when something woke us."""
        return bool(self._selector.select(max(0.0, timeout)))

    def consume(self) -> None:
        """Forget what woke us; called before each pass, so nothing is missed."""
        self._bell.drain()
        if self.waker is not None:
            self.waker.drain()

    def close(self) -> None:
        """Release the sockets, the selector and the waker."""
        self._selector.close()
        self._bell.close()
        if self.waker is not None:
            self.waker.close()
