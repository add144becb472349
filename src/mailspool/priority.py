"""Priority classes, and the order in which a queue hands out due mail (no I/O).

A message is sent with one of three classes: ``urgent`` (a password reset,
a login code), ``normal`` (the default, and every message queued before
classes existed) or ``bulk`` (newsletters, digests).  Every backend keeps the
class with the message, and lists what is due through :func:`interleave`,
so all of them follow one rule.

The rule (:func:`preferred`): the due listing is a sequence of picks.  Pick
``n`` goes to ``bulk`` when ``n % 16 == 15``, else to ``normal`` when
``n % 4 == 3``, else to ``urgent``; a class with nothing due gives its pick
to the first class in (urgent, normal, bulk) order that has some.  So when
every class has mail waiting, urgent gets 12 picks in 16, normal 3 and bulk
1: a higher class goes first, and a lower one is never starved.  When only
one class has mail it gets every pick.

Mail that arrives while a long listing runs: a class found empty is looked
at again before a pick once :func:`relook_after` has passed since its last
look, and only while a lower class is being served (a higher class arriving
is what matters; lower ones wait for the next pass anyway).  The wait grows
with what a look cost, so a costly look (a huge directory) takes at most a
small share of the time.  Ids listed again by such a look are dropped if the
listing handed them out recently (a bounded memory of them), so a message
queued for sending but not yet claimed is not handed out twice.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping

__all__ = [
    "BULK_EVERY",
    "NORMAL_EVERY",
    "PRIORITIES",
    "Priority",
    "interleave",
    "parse_priority",
    "preferred",
    "relook_after",
]


class Priority(str, enum.Enum):
    """A message's class: the value is its name everywhere (spool, table, command)."""

    URGENT = "urgent"
    NORMAL = "normal"
    BULK = "bulk"

    def __str__(self) -> str:
        return self.value

    @property
    def rank(self) -> int:
        """0 for urgent, 1 for normal, 2 for bulk: the order they are served in."""
        return _RANK[self]


#: The classes, highest first.
PRIORITIES: tuple[Priority, ...] = (Priority.URGENT, Priority.NORMAL, Priority.BULK)
_RANK = {p: i for i, p in enumerate(PRIORITIES)}

#: Every this many picks, one goes to bulk (when it has mail).
BULK_EVERY = 16
#: Every this many picks, one goes to normal (when it has mail; bulk's come first).
NORMAL_EVERY = 4

#: The shortest wait (seconds) before an empty class is looked at again.
RELOOK_MIN = 0.05
#: A look may cost at most this share of the time between looks.
RELOOK_SHARE = 0.05
#: How many recently handed-out ids a listing remembers, per class (more than
#: a processor queues ahead of its senders).
RECENT_MAX = 512


def parse_priority(value: str | Priority | None) -> Priority:
    """The :class:`Priority` named by ``value`` (None means normal).

    Raises:
        ValueError: ``value`` names no class; the message lists the classes.
    """
    if value is None:
        return Priority.NORMAL
    if isinstance(value, Priority):
        return value
    if isinstance(value, str):
        try:
            return Priority(value.strip().lower())
        except ValueError:
            pass
    names = ", ".join(p.value for p in PRIORITIES)
    raise ValueError(f"priority {value!r} is not one of {names}")


def preferred(n: int) -> Priority:
    """The class pick ``n`` (0, 1, 2...) of a listing goes to, when it has mail."""
    if n % BULK_EVERY == BULK_EVERY - 1:
        return Priority.BULK
    if n % NORMAL_EVERY == NORMAL_EVERY - 1:
        return Priority.NORMAL
    return Priority.URGENT


def relook_after(cost: float) -> float:
    """Seconds to wait before looking at an empty class again, when a look cost ``cost``."""
    return max(RELOOK_MIN, cost / RELOOK_SHARE)


class _Source:
    """One class's listing: the open iterator, or when to look at it again."""

    def __init__(self, open_: Callable[[], Iterable[str]], clock: Callable[[], float]) -> None:
        self._open = open_
        self._clock = clock
        self._it: Iterator[str] | None = iter(open_())
        self._ahead: str | None = None  # read by a relook, not handed out yet
        self._relook_at = 0.0
        self._relisted = False
        self._recent: deque[str] = deque()
        self._recent_set: set[str] = set()

    @property
    def live(self) -> bool:
        """Whether the listing may still hand out ids without a relook."""
        return self._ahead is not None or self._it is not None

    def take(self) -> str | None:
        """The next id, or None (then the source is empty until relooked)."""
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            return ahead
        while self._it is not None:
            id = next(self._it, None)
            if id is None:
                self.close()
                return None
            if self._relisted and id in self._recent_set:
                continue
            self._remember(id)
            return id
        return None

    def _remember(self, id: str) -> None:
        if len(self._recent) == RECENT_MAX:
            self._recent_set.discard(self._recent.popleft())
        self._recent.append(id)
        self._recent_set.add(id)

    def close(self) -> None:
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()

    def relook(self) -> None:
        """Open the listing again if it is empty and its time has come."""
        if self.live:
            return
        began = self._clock()
        if began < self._relook_at:
            return
        self._it = iter(self._open())
        self._relisted = True
        self._ahead = self.take()
        done = self._clock()
        self._relook_at = done + relook_after(done - began)


def interleave(
    listings: Mapping[Priority, Callable[[], Iterable[str]]],
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[str]:
    """Merge one listing per class into the due order of the module's rule.

    Args:
        listings: class -> a function that opens that class's listing of due
            ids (called again to look for new arrivals; it is closed, if it
            has a ``close()``, when exhausted or when this iterator is).
        clock: a monotonic clock, for the waits between looks.

    Yields:
        Ids, each class's in its listing's order; ends when every class's
        listing is exhausted.
    """
    sources = {p: _Source(listings[p], clock) for p in PRIORITIES if p in listings}
    # Worked out once, not per id: for each preferred class, the sources in
    # the order a pick tries them, each with the higher classes' sources.
    above = {p: [sources[q] for q in PRIORITIES[: p.rank] if q in sources] for p in sources}
    orders = {
        want: [(sources[p], above[p]) for p in dict.fromkeys((want, *PRIORITIES)) if p in sources]
        for want in PRIORITIES
    }
    period = math.lcm(BULK_EVERY, NORMAL_EVERY)  # preferred(n) repeats with this period
    picks = itertools.cycle([orders[preferred(n)] for n in range(period)])
    try:
        while True:
            id = _pick(next(picks))
            if id is None:
                return
            yield id
    finally:
        for s in sources.values():
            s.close()


def _pick(order: list[tuple[_Source, list[_Source]]]) -> str | None:
    """The next id for a pick that tries the sources in ``order`` (the preferred
    class's first), each with those of the higher classes; None when every
    source is empty."""
    for s, above in order:
        if s.live:  # served: a higher class may have got mail meanwhile
            for a in above:
                a.relook()
            break
    for s, _ in order:
        if s.live:  # one that is not hands out nothing
            id = s.take()
            if id is not None:
                return id
    return None
