"""A queue in the process's memory, for applications' own tests.

:class:`MemoryQueue` implements the queue seam (:class:`~mailspool.queue.QueueBackend`)
with a dictionary and a lock: the real deliveries and the real processor run
against it, with no directory to create and nothing left behind.  Nothing in
it survives the process, so it is never the queue of a production system::

    queue = MemoryQueue()
    delivery = QueuedMailDelivery(queue)
    processor = QueueProcessor(queue, mailer)
    with transaction.manager:
        delivery.send("app@example.org", ["jane@example.org"], message)
    processor.process_once()

Messages are settled per recipient by the same rules as the Maildir spool
(:func:`~mailspool.queue.settle_record`), and move between the same states.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mailspool.bell import Bell
from mailspool.errors import MessageStateError, NoSuchMessage
from mailspool.message import Envelope, Prepared
from mailspool.priority import PRIORITIES, Priority, interleave
from mailspool.queue import (
    FAILED,
    PENDING,
    Census,
    OperatorMoves,
    QueueEntry,
    RecipientStatus,
    Record,
    RecordFields,
    State,
    age_order,
    all_sent,
    settle_record,
)

__all__ = ["MemoryQueue"]

_ALL = frozenset(State)

#: The operator's moves: action -> (the states it may start from, where it ends;
#: None when the message goes).  The same moves as the Maildir spool's.
_MOVES: Mapping[str, tuple[frozenset[State], State | None]] = {
    "retry": (frozenset({State.DEFERRED, State.FAILED, State.QUARANTINED}), State.READY),
    "hold": (frozenset({State.READY, State.DEFERRED}), State.HELD),
    "unhold": (frozenset({State.HELD}), State.READY),
    "delete": (_ALL - {State.IN_FLIGHT}, None),
}

_serial = itertools.count(1)


@dataclass(frozen=True)
class _Staged:
    """A message prepared for the queue, not yet visible (see :meth:`MemoryQueue.publish`)."""

    id: str
    message_id: str
    record: Record
    data: bytes
    priority: Priority = Priority.NORMAL


@dataclass
class _Item:
    record: Record
    data: bytes
    state: State
    next_at: float | None  # when a deferred message is due
    priority: Priority = Priority.NORMAL


class _Waker(Bell):
    """Rung after each publish: wakes a processor sleeping on this queue."""

    kind = "in-memory queue"

    def __init__(self, queue: MemoryQueue) -> None:
        super().__init__()
        self._queue = queue

    def close(self) -> None:
        self._queue._forget(self)
        super().close()


class MemoryQueue(OperatorMoves):
    """A queue that lives in this process only; see the module's documentation.

    Args:
        name: shown in logs and in :attr:`location`.
        clock: the time source for queued times and due times.
    """

    def __init__(self, name: str = "memory", *, clock: Any = time.time) -> None:
        self._name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, _Item] = {}  # insertion order: oldest first
        self._wakers: list[_Waker] = []

    @property
    def location(self) -> str:
        """``memory:NAME``."""
        return f"memory:{self._name}"

    def __repr__(self) -> str:
        return f"<MemoryQueue {self._name} {len(self._items)} message(s)>"

    # -- enqueue --------------------------------------------------------------------

    def stage(self, prepared: Prepared, *, not_before: float | None = None) -> _Staged:
        """Prepare one message for :meth:`publish`; it is not visible yet."""
        now = self._clock()
        env = prepared.envelope
        later = not_before if not_before is not None and not_before > now else None
        record = Record(
            env.sender,
            tuple(RecipientStatus(r) for r in env.recipients),
            now,
            message_id=prepared.message_id,
            not_before=later,
        )
        id = f"{int(now * 1e6):x}.{next(_serial)}"
        return _Staged(id, prepared.message_id, record, bytes(prepared.data), prepared.priority)

    def stage_many(self, batch: Sequence[tuple[Prepared, float | None]]) -> list[_Staged]:
        """:meth:`stage` for several messages."""
        return [self.stage(p, not_before=nb) for p, nb in batch]

    def publish(self, staged: Sequence[Any]) -> None:
        """Make staged messages visible, and wake the processors waiting on it."""
        with self._lock:
            for s in staged:
                later = s.record.not_before
                state = State.DEFERRED if later is not None else State.READY
                self._items[s.id] = _Item(s.record, s.data, state, later, s.priority)
            wakers = list(self._wakers)
        for w in wakers:
            w.ring()

    def discard(self, staged: Sequence[Any]) -> None:
        """Forget staged messages (nothing was visible)."""

    # -- processing -----------------------------------------------------------------

    def due(self, now: float | None = None) -> Iterator[str]:
        """The ids that can be claimed: per class, ready messages then deferred
        ones whose time has come; the classes interleaved by the rule of
        :mod:`mailspool.priority`."""
        now = self._clock() if now is None else now
        return interleave({p: functools.partial(self._due_class, p, now) for p in PRIORITIES})

    def _due_class(self, priority: Priority, now: float) -> list[str]:
        with self._lock:
            mine = [(i, it) for i, it in self._items.items() if it.priority is priority]
            ready = [i for i, it in mine if it.state is State.READY]
            later = [i for i, it in mine if self._due_deferred(it, now)]
        return ready + later

    @staticmethod
    def _due_deferred(item: _Item, now: float) -> bool:
        return item.state is State.DEFERRED and (item.next_at is None or item.next_at <= now)

    def next_due(self) -> float | None:
        """When the first deferred message becomes due."""
        with self._lock:
            times = [
                it.next_at
                for it in self._items.values()
                if it.state is State.DEFERRED and it.next_at is not None
            ]
        return min(times) if times else None

    def claim(self, id: str) -> _Claim | None:
        """Hold ``id`` for sending; None when it is taken, gone, held or finished."""
        with self._lock:
            item = self._items.get(id)
            if item is None or item.state not in (State.READY, State.DEFERRED):
                return None
            item.state = State.IN_FLIGHT
            return _Claim(self, id, item)

    def sweep(self, now: float | None = None) -> int:
        """Nothing to recover: a claim here lives and dies with its process."""
        return 0

    def quarantined_last(self, id: str) -> bool:
        """Never: a claim here cannot find a damaged message to set aside."""
        return False

    def claimed_elsewhere(self) -> bool:
        """Whether some message is being sent now."""
        with self._lock:
            return any(it.state is State.IN_FLIGHT for it in self._items.values())

    def waker(self) -> _Waker:
        """A waker made readable by every :meth:`publish`."""
        w = _Waker(self)
        with self._lock:
            self._wakers.append(w)
        return w

    def _forget(self, waker: _Waker) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._wakers.remove(waker)

    # -- the operator's view ----------------------------------------------------------

    def state(self, id: str) -> str | None:
        """The message's state, or None when there is no such message."""
        with self._lock:
            item = self._items.get(id)
            return None if item is None else item.state.value

    def counts(self, now: float | None = None) -> dict[str, int]:
        """How many messages each state holds; with ``now``, due deferred ones count as ready."""
        out = {s.value: 0 for s in State}
        with self._lock:
            for it in self._items.values():
                if now is not None and self._due_deferred(it, now):
                    out[State.READY.value] += 1
                else:
                    out[it.state.value] += 1
        return out

    def oldest(
        self, states: tuple[str, ...] = ("ready", "in_flight", "deferred", "held")
    ) -> float | None:
        """When the oldest message in one of ``states`` was queued."""
        with self._lock:
            times = [it.record.queued_at for it in self._items.values() if it.state in states]
        return min(times) if times else None

    def census(self, now: float | None = None) -> Census:
        """:meth:`counts` and the oldest message of each state."""
        with self._lock:
            oldest: dict[str, float | None] = {s.value: None for s in State}
            for it in self._items.values():
                t, key = it.record.queued_at, it.state.value
                if oldest[key] is None or t < (oldest[key] or 0.0):
                    oldest[key] = t
        return Census(self.counts(now), oldest)

    def entries(self, state: str | None = None) -> Iterator[QueueEntry]:
        """One entry per message (of one state, or all), oldest first."""
        if state is not None and state not in {s.value for s in State}:
            raise ValueError(f"unknown state {state!r}; one of {sorted(s.value for s in State)}")
        with self._lock:
            listed = [self._entry(i, it) for i, it in self._items.items()]
        return iter([e for e in listed if state is None or e.state == state])

    def oldest_entries(self, limit: int, state: str | None = None) -> list[QueueEntry]:
        """The ``limit`` oldest entries (of one state, or all), oldest first."""
        return heapq.nsmallest(limit, self.entries(state), key=age_order)

    @staticmethod
    def _entry(id: str, item: _Item) -> QueueEntry:
        r = item.record
        return QueueEntry(
            id,
            item.state.value,
            r.message_id,
            r.sender,
            r.recipients,
            r.queued_at,
            r.attempts,
            item.next_at if item.state is State.DEFERRED else None,
            len(item.data),
            r.last_error,
            priority=item.priority.value,
        )

    def get(self, id: str) -> QueueEntry:
        """Everything known about one message; NoSuchMessage when there is none."""
        with self._lock:
            return self._entry(id, self._item(id))

    def message(self, id: str) -> bytes:
        """The message as it would be sent; NoSuchMessage when there is none."""
        with self._lock:
            return self._item(id).data

    def _item(self, id: str) -> _Item:
        item = self._items.get(id)
        if item is None:
            raise NoSuchMessage(id)
        return item

    def _admin(self, action: str, id: str) -> None:
        sources, target = _MOVES[action]
        with self._lock:
            item = self._items.get(id)
            if item is None:
                raise NoSuchMessage(id)
            if item.state not in sources:
                state = item.state.value
                if action == "unhold":  # in the words of `mailspool release`, as the spool says it
                    raise MessageStateError(f"not held (it is {state}): nothing to release")
                raise MessageStateError(f"cannot {action} a message that is {state}")
            if target is None:
                del self._items[id]
                return
            if action == "retry":
                item.record = replace(
                    item.record,
                    recipients=tuple(
                        RecipientStatus(r.address, PENDING, r.code, r.text)
                        if r.status == FAILED
                        else r
                        for r in item.record.recipients
                    ),
                )
            item.state, item.next_at = target, None

    # -- what a claim writes back ----------------------------------------------------

    def _settled(self, id: str, record: Record, state: State | None, at: float | None) -> None:
        with self._lock:
            if state is None:
                self._items.pop(id, None)
                return
            item = self._items[id]
            item.record, item.state, item.next_at = record, state, at


class _Claim(RecordFields):
    """A message of a :class:`MemoryQueue` held for sending (the seam's ``QueueClaim``)."""

    def __init__(self, queue: MemoryQueue, id: str, item: _Item) -> None:
        self._queue = queue
        self._record = item.record
        self._done: str | None = None
        self.id = id
        self.data = item.data
        self.envelope = Envelope(item.record.sender, item.record.pending)

    @property
    def held(self) -> bool:
        """True until settled, deferred, released or quarantined."""
        return self._done is None

    def __repr__(self) -> str:
        return f"<memory claim {self.id} {self._done or 'held'}>"

    def _finish(self, how: str) -> None:
        if self._done is not None:
            raise MessageStateError(f"cannot {how} {self.id}: already {self._done}")
        self._done = how

    def settle(
        self,
        *,
        sent: Iterable[str] = (),
        failed: Mapping[str, tuple[int | None, str]] | None = None,
        deferred: Mapping[str, tuple[int | None, str]] | None = None,
        retry_at: float | None = None,
        reply: tuple[int, str] | None = None,
    ) -> str:
        """Record one attempt per recipient; ``"removed"``, ``"deferred"`` or ``"failed"``."""
        if self._done is not None:
            raise MessageStateError(f"cannot settle {self.id}: already {self._done}")
        sent = tuple(sent)
        if not failed and not deferred and all_sent(self._record, sent):
            record, outcome = self._record, "removed"
        else:
            record, outcome = settle_record(self._record, sent, failed, deferred, reply)
        if outcome == "removed":
            self._queue._settled(self.id, record, None, None)
        elif outcome == "deferred":
            at = self._queue._clock() if retry_at is None else retry_at
            self._queue._settled(self.id, record, State.DEFERRED, at)
        else:
            self._queue._settled(self.id, record, State.FAILED, None)
        self._done = outcome
        return outcome

    def defer(self, retry_at: float, reason: str, *, count_attempt: bool = True) -> None:
        """Put the whole message back until ``retry_at``, with ``reason`` as its last error."""
        self._finish("deferred")
        record = replace(
            self._record,
            attempts=self._record.attempts + (1 if count_attempt else 0),
            last_error=reason,
        )
        self._queue._settled(self.id, record, State.DEFERRED, retry_at)

    def release(self) -> None:
        """Give the message back, ready and untouched."""
        self._finish("released")
        self._queue._settled(self.id, self._record, State.READY, None)

    def quarantine(self, reason: str) -> None:
        """Set the message aside for good, with ``reason``."""
        self._finish("quarantined")
        record = replace(self._record, last_error=reason)
        self._queue._settled(self.id, record, State.QUARANTINED, None)

    def __enter__(self) -> _Claim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done is None:
            self.release()


if TYPE_CHECKING:  # the seam's promise, checked by mypy
    from mailspool.queue import QueueBackend, QueueClaim

    _backend: QueueBackend = MemoryQueue()
    _claim: QueueClaim = _Claim(
        MemoryQueue(), "", _Item(Record("", (), 0.0), b"", State.READY, None)
    )
