"""One pass of the queue processor: what is queued, what is in flight, what was done.

The dispatcher hands the due ids of one pass to the sender threads through
a :class:`Pass`, which keeps a few of them queued ahead and never lets more
be in flight than the relay allows; the pass ends when nothing is queued,
in flight, or waiting for a quick retry in this pass (a one-off fault).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

__all__ = ["QUEUED_MIN", "Pass"]

#: The dispatcher queues at least this many ids ahead (twice the
#: connections when more), and is woken when half of them are started: with
#: one connection, once per four messages rather than after every message.
QUEUED_MIN = 8


class Pass:
    """The bookkeeping of one pass: what is queued, what is in flight, what was done.

    The dispatcher keeps a few ids queued ahead of the sender threads, and
    is woken only when that surplus runs low, not after every message: each
    wake-up is a hand-off of the interpreter lock.  A queued id is not in
    flight: a sender thread starts it only when :meth:`start` finds a free
    slot, so never more are in flight than the relay allows.
    """

    def __init__(self, now: float, ahead: int) -> None:
        self.now = now
        self.cond = threading.Condition()
        self.queued = 0  # handed to the sender threads, not yet started
        self.in_flight = 0
        #: The dispatcher queues up to ``high`` ids, then sleeps until no
        #: more than ``low`` are left.
        self.high = max(QUEUED_MIN, 2 * ahead)
        self.low = self.high // 2
        self.dispatcher_waits = False
        self.starters_wait = 0  # sender threads waiting for a free slot
        self.counts = dict.fromkeys(("sent", "deferred", "failed", "quarantined", "partly"), 0)
        #: Messages to try again in this pass after a one-off fault:
        #: (when, on the monotonic clock; a tie-breaker; id; partly delivered).
        self.later: list[tuple[float, int, str, bool]] = []
        #: Attempts made in this pass at the messages tried again.
        self.tries: dict[str, int] = {}
        #: Those of them whose reply was lost after the final dot once.
        self.lost: set[str] = set()
        self._order = itertools.count()
        self.mark = 0  # the queue's outage mark when the listing began (see outage.py)

    def queue(self, blocked: Callable[[float], bool]) -> bool:
        """Wait until another id may be queued; False when none may be (``blocked``)."""
        with self.cond:
            while True:
                if blocked(self.now):
                    return False
                if self.queued < self.high:
                    self.queued += 1
                    return True
                self.dispatcher_waits = True
                try:
                    self.cond.wait()
                finally:
                    self.dispatcher_waits = False

    def start(self, allowed: Callable[[float], int], blocked: Callable[[float], bool]) -> bool:
        """Wait for a free slot, then count a queued id as in flight.

        Returns:
            False (at once) when ``blocked``: the id must not be started.
            Either way :meth:`done` is to be called for it.
        """
        with self.cond:
            try:
                while True:
                    if blocked(self.now):
                        return False
                    if self.in_flight < allowed(self.now):
                        return True
                    self.starters_wait += 1
                    try:
                        self.cond.wait()
                    finally:
                        self.starters_wait -= 1
            finally:
                self.queued -= 1
                self.in_flight += 1
                if self.dispatcher_waits and self.queued <= self.low:
                    self.cond.notify_all()

    def requeue(self, blocked: Callable[[float], bool]) -> bool:
        """Count a message started in this pass as queued again; False when ``blocked``."""
        with self.cond:
            if blocked(self.now):
                return False
            self.queued += 1
            return True

    def done(self, outcome: str | None, partly: bool = False) -> None:
        with self.cond:
            self.in_flight -= 1
            if outcome in self.counts:
                self.counts[outcome] += 1
            self.counts["partly"] += partly
            if self.starters_wait or (self.in_flight == 0 and self.queued == 0):
                self.cond.notify_all()

    def settled(self) -> bool:
        """True when nothing is queued, in flight or to be tried again
        (call with ``cond`` held)."""
        return self.in_flight == 0 and self.queued == 0 and not self.later

    def retry_later(self, id: str, delay: float, partly: bool, lost: bool = False) -> None:
        """Try ``id`` again in this pass, ``delay`` seconds from now (see :meth:`due`);
        ``lost``: its reply was lost after the final dot."""
        with self.cond:
            self.tries[id] = self.tries.get(id, 0) + 1
            if lost:
                self.lost.add(id)
            heapq.heappush(self.later, (time.monotonic() + delay, next(self._order), id, partly))
            self.cond.notify_all()  # the dispatcher may wait without a time limit

    def due(self) -> list[tuple[str, bool]]:
        """Wait until the pass is settled or a message is to be tried again;
        return those (id, partly delivered) whose time has come (none: settled)."""
        with self.cond:
            while True:
                if self.settled():
                    return []
                if self.later:
                    wait = self.later[0][0] - time.monotonic()
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
                else:
                    self.cond.wait()
            now = time.monotonic()
            out = []
            while self.later and self.later[0][0] <= now:
                _, _, id, partly = heapq.heappop(self.later)
                out.append((id, partly))
            return out

    def count(self, outcome: str | None, partly: bool = False) -> None:
        """Count an outcome settled outside the sender threads."""
        with self.cond:
            if outcome in self.counts:
                self.counts[outcome] += 1
            self.counts["partly"] += partly
