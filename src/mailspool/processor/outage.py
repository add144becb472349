"""When the queue itself cannot be reached: wait, look again less and less often.

A queue in a database can be down (a restart, a failover, a network cut)
while the processor runs, or when it starts.  That is no message's fault:
nothing is deferred or failed for it, nothing new is claimed, and the
outcomes already known wait to be written (:mod:`mailspool.processor.sender`).
The processor looks again after 1 s, then 2, 4, ... up to
:data:`MAX_DELAY` (or sooner, when the queue's waker says the database is
back), and says so in one line when the outage begins and one when it ends:
no traceback, however long it lasts.

The backends tell an outage by raising
:class:`~mailspool.errors.QueueUnavailable`; other errors are not waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mailspool.processor.outcome import human, one_line

__all__ = ["FIRST_DELAY", "MAX_DELAY", "Outage"]

log = logging.getLogger("mailspool.processor")

#: Seconds before the first look after an outage began.
FIRST_DELAY = 1.0
#: The longest wait between two looks during an outage, seconds.
MAX_DELAY = 30.0


class Outage:
    """The queue's availability as one processor sees it; thread-safe.

    Args:
        location: the queue, as logged (never a password).
        clock: a monotonic clock, seconds.
    """

    def __init__(
        self,
        location: str,
        *,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.location = location
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # when the outage began; None: no outage
        self._delay = 0.0
        self._next = 0.0  # when to look again
        self._failures = 0  # every failure so far, for mark()/worked()

    def down(self) -> bool:
        """True while the queue is known to be unreachable."""
        return self._since is not None

    def failed(self, exc: BaseException) -> None:
        """The queue could not be reached: begin the outage, or wait longer."""
        with self._lock:
            now = self._clock()
            self._failures += 1
            if self._since is not None:
                if now < self._next:
                    return  # another thread found it down in the same look
                self._delay = min(self._delay * 2, self.max_delay)
                self._next = now + self._delay
                return
            self._since = now
            self._delay = self.first_delay
            self._next = now + self._delay
        log.warning(
            "%s; waiting for the queue (no message is deferred or failed for it), "
            "looking again in %s, then less often (at most every %s)",
            one_line(str(exc)),
            human(self.first_delay),
            human(self.max_delay),
        )

    def mark(self) -> int:
        """A mark to pass to :meth:`worked` after using the queue."""
        return self._failures

    def worked(self, mark: int) -> None:
        """The queue answered, and nothing failed since ``mark``: the outage is over."""
        if self._since is None:
            return  # the common case, once per message listed: no lock
        with self._lock:
            if self._since is None or self._failures != mark:
                return
            lasted = self._clock() - self._since
            self._since = None
        log.info("queue %s is back after %.1fs", self.location, lasted)

    def left(self) -> float:
        """Seconds until the next look (0 when there is no outage)."""
        if self._since is None:
            return 0.0
        return max(0.0, self._next - self._clock())
