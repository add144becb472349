"""What crosses the queue seam: states, a message's record, and the rules on it.

Pure values and functions, no I/O, shared by every backend
(:mod:`mailspool.queue` re-exports them, where callers import them): the
:class:`State` of a message and the :class:`Outcome` of a settled attempt;
:class:`Record`, a message's envelope part with each recipient's
:class:`RecipientStatus`; :class:`QueueEntry`, what a listing shows.
:func:`settle_record` turns one attempt's outcome per recipient into the
message's next record and outcome, so every backend settles an attempt the
same way.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

__all__ = [
    "FAILED",
    "PENDING",
    "SENT",
    "STATUSES",
    "WAITING",
    "Census",
    "Outcome",
    "QueueEntry",
    "RecipientStatus",
    "Record",
    "RecordFields",
    "State",
    "age_order",
    "all_sent",
    "settle_record",
]


class State(str, enum.Enum):
    """Where a message stands in a queue (the value is its name in listings)."""

    READY = "ready"
    IN_FLIGHT = "in_flight"
    DEFERRED = "deferred"
    HELD = "held"
    FAILED = "failed"
    QUARANTINED = "quarantined"

    def __str__(self) -> str:
        return self.value


class Outcome(str, enum.Enum):
    """What became of a claimed message once an attempt was settled."""

    REMOVED = "removed"  # every recipient accepted: gone from the queue
    DEFERRED = "deferred"  # some recipient still pending: tried again later
    FAILED = "failed"  # none pending, some refused for good: kept with the reasons

    def __str__(self) -> str:
        return self.value


#: A recipient's status: still to be sent to, accepted, refused for good.
PENDING, SENT, FAILED = "pending", "sent", "failed"
STATUSES = frozenset({PENDING, SENT, FAILED})


# --- values ----------------------------------------------------------------


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient and where its delivery stands.

    ``status`` is ``"pending"``, ``"sent"`` or ``"failed"``; ``code`` and
    ``text`` are the last reply about it (a pending recipient keeps the
    reason of its last deferral).
    """

    address: str
    status: str = PENDING
    code: int | None = None
    text: str | None = None


@dataclass(frozen=True)
class Record:
    """The envelope part of a spool file.

    ``queued_at`` is when the message was committed; ``not_before`` the
    time it was scheduled for when that was later (``send(...,
    not_before=...)``), else None.
    """

    sender: str
    recipients: tuple[RecipientStatus, ...]
    queued_at: float
    attempts: int = 0
    message_id: str | None = None
    last_error: str | None = None
    legacy: bool = False
    not_before: float | None = None

    @property
    def pending(self) -> tuple[str, ...]:
        """The recipients still to be sent to."""
        return tuple(r.address for r in self.recipients if r.status == PENDING)

    @property
    def due_since(self) -> float:
        """Since when the message has been due: the later of ``queued_at`` and
        ``not_before``.  ``give_up_after`` counts from here, so a message
        scheduled further ahead than that does not expire before its time.
        """
        if self.not_before is None:
            return self.queued_at
        return max(self.queued_at, self.not_before)


@dataclass(frozen=True)
class QueueEntry:
    """What a queue knows about one message, for listings and the command."""

    id: str
    state: str
    message_id: str | None
    sender: str
    recipients: tuple[RecipientStatus, ...]
    queued_at: float | None
    attempts: int
    next_attempt: float | None
    size: int
    last_error: str | None
    legacy: bool = False
    priority: str = "normal"  # "urgent", "normal" or "bulk" (mailspool.priority)


def age_order(entry: QueueEntry) -> tuple[bool, float, str]:
    """The sort key of listings: oldest queued first, unreadable ones last, by id."""
    return (entry.queued_at is None, entry.queued_at or 0.0, entry.id)


#: The states whose messages still wait to be sent (what ``oldest()`` looks at).
WAITING = ("ready", "in_flight", "deferred", "held")


@dataclass(frozen=True)
class Census:
    """How many messages each state holds and when its oldest was queued:
    what ``status``, ``check`` and the metrics need, in one look at the queue.

    ``counts`` has the keys of ``QueueBackend.counts()``; ``oldest`` the
    same keys, each the ``queued_at`` of that state's oldest message (None
    when empty or unknown).
    """

    counts: Mapping[str, int]
    oldest: Mapping[str, float | None]

    def oldest_of(self, states: Iterable[str] = WAITING) -> float | None:
        """When the oldest message in one of ``states`` was queued."""
        times = [t for s in states if (t := self.oldest.get(s)) is not None]
        return min(times) if times else None


class RecordFields:
    """A claim's fields, read from the :class:`Record` it holds as ``_record``.

    For backends whose claim keeps the message's record (both do).
    """

    __slots__ = ()
    _record: Record

    @property
    def message_id(self) -> str | None:
        """The Message-Id without angle brackets, if known."""
        return self._record.message_id

    @property
    def attempts(self) -> int:
        """Delivery attempts so far."""
        return self._record.attempts

    @property
    def queued_at(self) -> float:
        """When the message entered the queue (a ``time.time()`` value)."""
        return self._record.queued_at

    @property
    def not_before(self) -> float | None:
        """The time it was scheduled for, when later than ``queued_at``."""
        return self._record.not_before

    @property
    def due_since(self) -> float:
        """Since when it has been due (the later of ``queued_at`` and
        ``not_before``): ``give_up_after`` counts from here."""
        return self._record.due_since

    @property
    def legacy(self) -> bool:
        """Whether it was read from a zope.sendmail / repoze.sendmail file."""
        return self._record.legacy

    @property
    def recipients(self) -> tuple[RecipientStatus, ...]:
        """Every recipient with its state."""
        return self._record.recipients


# --- the per-recipient rules every backend applies --------------------------------------


def all_sent(record: Record, sent: Iterable[str]) -> bool:
    """Whether ``sent`` leaves nothing pending and nothing failed.

    The common case of a settle: :func:`settle_record` would return
    ``"removed"``, and the file goes to the trash without a new record
    being built.

    Args:
        record: the message's record before the attempt.
        sent: recipients the relay accepted (and no other outcome given).

    Returns:
        True when ``sent`` names exactly the pending recipients and no
        recipient failed before.
    """
    pending = set()
    for r in record.recipients:
        if r.status == PENDING:
            pending.add(r.address)
        elif r.status == FAILED:
            return False
    return pending == set(sent)


def settle_record(
    record: Record,
    sent: Iterable[str] = (),
    failed: Mapping[str, tuple[int | None, str]] | None = None,
    deferred: Mapping[str, tuple[int | None, str]] | None = None,
    reply: tuple[int, str] | None = None,
) -> tuple[Record, Outcome]:
    """Apply one attempt's per-recipient outcome; return (record, outcome).

    Outcome ``"removed"`` when every recipient was accepted, ``"deferred"``
    when some recipient is still pending (including pending recipients not
    named at all), ``"failed"`` when none is pending and some failed.  Sent
    recipients stay sent forever; the attempt count goes up by one.

    Args:
        record: the message's record before the attempt.
        sent: recipients the relay accepted.
        failed: recipient -> (code, text) of a permanent refusal.
        deferred: recipient -> (code, text) of a temporary one.
        reply: the relay's (code, text) after the data (its queue id),
            kept with each sent recipient.

    Returns:
        The new record and the outcome (a key of :data:`OUTCOME_ACTION`).

    Raises:
        ValueError: an address is not a pending recipient, or is given twice.
    """
    failed = failed or {}
    deferred = deferred or {}
    sent_set = set(sent)
    pending = set(record.pending)
    named = [*sent_set, *failed, *deferred]
    if len(named) != len(set(named)):
        raise ValueError("a recipient is given more than one outcome")
    unknown = set(named) - pending
    if unknown:
        raise ValueError(f"not pending recipients of this message: {sorted(unknown)!r}")
    out = [_recipient(r, sent_set, failed, deferred, reply) for r in record.recipients]
    outcome: Outcome
    if any(r.status == PENDING for r in out):
        outcome, why = Outcome.DEFERRED, next(iter(deferred.values()), None)
    elif any(r.status == FAILED for r in out):
        outcome, why = Outcome.FAILED, next(iter(failed.values()), None)
    else:
        outcome, why = Outcome.REMOVED, None
    last_error = record.last_error
    if why is not None:
        last_error = why[1] if why[0] is None else f"{why[0]} {why[1]}"
    new = replace(
        record, recipients=tuple(out), attempts=record.attempts + 1, last_error=last_error
    )
    return new, outcome


def _recipient(
    r: RecipientStatus,
    sent: set[str],
    failed: Mapping[str, tuple[int | None, str]],
    deferred: Mapping[str, tuple[int | None, str]],
    reply: tuple[int, str] | None,
) -> RecipientStatus:
    """One recipient's status after the attempt."""
    a = r.address
    if r.status != PENDING:
        return r
    if a in sent:
        return RecipientStatus(a, SENT, *(reply or (None, None)))
    if a in failed:
        return RecipientStatus(a, FAILED, *failed[a])
    if a in deferred:
        return RecipientStatus(a, PENDING, *deferred[a])
    return r
