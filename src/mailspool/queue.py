"""The queue seam: what every queue backend offers, and the data that crosses it.

The processor, the command and the deliveries reach a queue only through
:class:`QueueBackend` and the :class:`QueueClaim` it hands out.  Backends:
:mod:`mailspool.maildir` (a directory, the default), :mod:`mailspool.memory`
(in the process, for applications' own tests).  A backend knows nothing of
SMTP; the processor knows nothing of files or rows.

The records and the per-recipient rules below are pure (no I/O), so every
backend settles an attempt the same way: :func:`settle_record` turns one
attempt's outcome per recipient into the message's next record and outcome.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mailspool.message import Envelope, Prepared

__all__ = [
    "FAILED",
    "PENDING",
    "SENT",
    "STATUSES",
    "WAITING",
    "Census",
    "OperatorMoves",
    "Outcome",
    "QueueBackend",
    "QueueClaim",
    "QueueEntry",
    "RecipientStatus",
    "Record",
    "RecordFields",
    "Staged",
    "State",
    "Waker",
    "age_order",
    "all_sent",
    "is_postgres_url",
    "open_queue",
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


#: The states whose messages still wait to be sent (what ``oldest()`` looks at).
WAITING = ("ready", "in_flight", "deferred", "held")


@dataclass(frozen=True)
class Census:
    """How many messages each state holds and when its oldest was queued:
    what ``status``, ``check`` and the metrics need, in one look at the queue.

    ``counts`` has the keys of :meth:`QueueBackend.counts`; ``oldest`` the
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


class OperatorMoves:
    """The operator's four moves, for a backend that carries each out in its
    own ``_admin(action, id)`` (``action`` one of the lifecycle's ``retry``,
    ``hold``, ``unhold``, ``delete``)."""

    __slots__ = ()

    def _admin(self, action: str, id: str) -> None:
        raise NotImplementedError

    def retry(self, id: str) -> None:
        """Make a deferred, failed or quarantined message ready now.

        Failed recipients become pending again (their last reply is kept).

        Raises:
            KeyError: no such message.
            SpoolError: the message is in a state that cannot be retried.
        """
        self._admin("retry", id)

    def hold(self, id: str) -> None:
        """Keep a ready or deferred message out of the processor's way.

        Raises:
            KeyError: no such message.
            SpoolError: the message is being sent or in another state.
        """
        self._admin("hold", id)

    def release(self, id: str) -> None:
        """Make a held message ready again.

        Raises:
            KeyError: no such message.
            SpoolError: the message is not held.
        """
        self._admin("unhold", id)

    def delete(self, id: str) -> None:
        """Remove a message for good (not while it is being sent).

        Raises:
            KeyError: no such message.
            SpoolError: the message is being sent.
        """
        self._admin("delete", id)


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
    out: list[RecipientStatus] = []
    for r in record.recipients:
        a = r.address
        if r.status != PENDING:
            out.append(r)
        elif a in sent_set:
            out.append(RecipientStatus(a, SENT, *(reply or (None, None))))
        elif a in failed:
            out.append(RecipientStatus(a, FAILED, *failed[a]))
        elif a in deferred:
            out.append(RecipientStatus(a, PENDING, *deferred[a]))
        else:
            out.append(r)
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


# --- the seam ---------------------------------------------------------------------------


class Staged(Protocol):
    """A message written by :meth:`QueueBackend.stage_many`, not yet visible."""

    @property
    def id(self) -> str: ...

    @property
    def message_id(self) -> str: ...


class Waker(Protocol):
    """Something the processor's loop can ``select()`` on: readable means "look now"."""

    #: What it is, for the processor's first log line (``"inotify"``...).
    kind: str

    def fileno(self) -> int: ...

    def drain(self) -> None:
        """Consume what made it readable."""

    def close(self) -> None: ...


@runtime_checkable
class QueueClaim(Protocol):
    """One message held for sending by one holder; settle it, or it goes back.

    A claim dies with its holder (a killed process's messages are free at
    once).  Leaving the ``with`` block without settle(), defer() or
    quarantine() releases the message untouched.
    """

    id: str
    envelope: Envelope  # the sender and the recipients still pending
    data: bytes  # the message as it goes on the wire

    @property
    def message_id(self) -> str | None: ...

    @property
    def attempts(self) -> int: ...

    @property
    def queued_at(self) -> float: ...

    @property
    def not_before(self) -> float | None: ...

    @property
    def due_since(self) -> float: ...

    @property
    def held(self) -> bool: ...

    @property
    def legacy(self) -> bool: ...

    @property
    def recipients(self) -> tuple[RecipientStatus, ...]: ...

    def settle(
        self,
        *,
        sent: Iterable[str] = (),
        failed: Mapping[str, tuple[int | None, str]] | None = None,
        deferred: Mapping[str, tuple[int | None, str]] | None = None,
        retry_at: float | None = None,
        reply: tuple[int, str] | None = None,
    ) -> str:
        """Record one attempt per recipient; ``"removed"``, ``"deferred"`` or ``"failed"``.

        ``reply``: the relay's (code, text) after the data, kept with the
        sent recipients of a message that stays queued.
        """

    def defer(self, retry_at: float, reason: str, *, count_attempt: bool = True) -> None:
        """Put the whole message back until ``retry_at``."""

    def release(self) -> None:
        """Give the message back untouched."""

    def quarantine(self, reason: str) -> None:
        """Set a message that cannot be sent aside, with the reason."""

    def __enter__(self) -> QueueClaim: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class QueueBackend(Protocol):
    """A queue of messages: enqueue, claim, settle, and the operator's view.

    Enqueueing is two-phase, driven by the delivery's transaction data
    manager: :meth:`stage_many` when the transaction votes (durable, not yet
    visible), :meth:`publish` when it finishes, :meth:`discard` when it
    aborts.
    """

    @property
    def location(self) -> str:
        """Where the queue is, for logs and messages (never a password)."""

    # -- enqueue --------------------------------------------------------------------

    def stage(self, prepared: Prepared, *, not_before: float | None = None) -> Staged: ...

    def stage_many(self, batch: Sequence[tuple[Prepared, float | None]]) -> Sequence[Staged]: ...

    def publish(self, staged: Sequence[Any]) -> None:
        """Make what :meth:`stage_many` returned visible, durably."""

    def discard(self, staged: Sequence[Any]) -> None:
        """Forget what :meth:`stage_many` returned; never raises."""

    # -- processing -----------------------------------------------------------------

    def due(self, now: float | None = None) -> Iterator[str]:
        """The ids that can be claimed now (abandoned claims first)."""

    def next_due(self) -> float | None:
        """When the next deferred message is due, if any."""

    def claim(self, id: str) -> QueueClaim | None:
        """Hold message ``id`` for sending; None when taken, gone or unreadable."""

    def sweep(self, now: float | None = None) -> int:
        """Recover what crashed holders left behind; how many were recovered."""

    def quarantined_last(self, id: str) -> bool:
        """Whether this thread's last claim that came back empty set ``id``
        aside in quarantine (otherwise it was taken or finished elsewhere).
        Asked after every lost claim, so it must not cost a round trip."""

    def claimed_elsewhere(self) -> bool:
        """Whether other holders have claims now (then the loop looks again soon)."""

    def waker(self) -> Waker | None:
        """What wakes a sleeping processor when mail arrives; None to poll."""

    # -- the operator's view ----------------------------------------------------------

    def state(self, id: str) -> str | None: ...

    def counts(self, now: float | None = None) -> dict[str, int]: ...

    def oldest(
        self, states: tuple[str, ...] = ("ready", "in_flight", "deferred", "held")
    ) -> float | None: ...

    def census(self, now: float | None = None) -> Census:
        """:meth:`counts` (with ``now`` as there) and the oldest per state, in one look."""

    def entries(self, state: str | None = None) -> Iterator[QueueEntry]: ...

    def oldest_entries(self, limit: int, state: str | None = None) -> list[QueueEntry]:
        """The ``limit`` oldest messages (of one state, or all), in :func:`age_order`;
        read without holding or reading every message of a large queue."""

    def get(self, id: str) -> QueueEntry: ...

    def message(self, id: str) -> bytes: ...

    def retry(self, id: str) -> None: ...

    def hold(self, id: str) -> None: ...

    def release(self, id: str) -> None: ...

    def delete(self, id: str) -> None: ...


def age_order(entry: QueueEntry) -> tuple[bool, float, str]:
    """The sort key of listings: oldest queued first, unreadable ones last, by id."""
    return (entry.queued_at is None, entry.queued_at or 0.0, entry.id)


def is_postgres_url(value: str) -> bool:
    """Whether ``value`` names a PostgreSQL queue rather than a spool directory."""
    return value.startswith(("postgresql://", "postgres://"))


def open_queue(
    where: str | os.PathLike[str] | QueueBackend, *, create: bool = True
) -> QueueBackend:
    """The backend for ``where``: a backend as it is, or a directory's Maildir spool.

    Args:
        where: a :class:`QueueBackend`, or the path of a spool directory.
        create: for a path, create the spool when it is missing.

    Raises:
        SpoolError: the spool does not exist (``create=False``) or cannot be
            created.
    """
    if isinstance(where, (str, os.PathLike)):
        from mailspool.maildir.spool import Spool  # the default backend

        return Spool(where, create=create)
    return where
