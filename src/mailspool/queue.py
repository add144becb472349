"""The queue seam: what every queue backend offers, and the data that crosses it.

The processor, the command and the deliveries reach a queue only through
:class:`QueueBackend` and the :class:`QueueClaim` it hands out.  Backends:
:mod:`mailspool.maildir` (a directory, the default), :mod:`mailspool.memory`
(in the process, for applications' own tests).  A backend knows nothing of
SMTP; the processor knows nothing of files or rows.

The records and the per-recipient rules are pure (no I/O), in
:mod:`mailspool.records`, and re-exported here: every backend settles an
attempt the same way, with :func:`settle_record`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from mailspool.records import (
    FAILED,
    PENDING,
    SENT,
    STATUSES,
    WAITING,
    Census,
    Outcome,
    QueueEntry,
    RecipientStatus,
    Record,
    RecordFields,
    State,
    age_order,
    all_sent,
    settle_record,
)

if TYPE_CHECKING:
    from mailspool.message import Envelope, Prepared

__all__ = [
    "FAILED",
    "PENDING",
    "SENT",
    "STATUSES",
    "WAITING",
    "Census",
    "InDirectory",
    "OperatorMoves",
    "Outcome",
    "QueueBackend",
    "QueueClaim",
    "QueueEntry",
    "RecipientStatus",
    "Record",
    "RecordFields",
    "RelayStateStore",
    "Staged",
    "State",
    "Waker",
    "age_order",
    "all_sent",
    "is_postgres_url",
    "settle_record",
]


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
            NoSuchMessage: no such message (a ``KeyError``).
            MessageStateError: the message is in a state that cannot be retried.
        """
        self._admin("retry", id)

    def hold(self, id: str) -> None:
        """Keep a ready or deferred message out of the processor's way.

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
            MessageStateError: the message is being sent or in another state.
        """
        self._admin("hold", id)

    def release(self, id: str) -> None:
        """Make a held message ready again.

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
            MessageStateError: the message is not held.
        """
        self._admin("unhold", id)

    def delete(self, id: str) -> None:
        """Remove a message for good (not while it is being sent).

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
            MessageStateError: the message is being sent.
        """
        self._admin("delete", id)


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
class InDirectory(Protocol):
    """A queue that lives in a directory (the Maildir spool): the processors
    keep what they learned of the relay, and their stats, beside the mail.
    Other backends have no ``path``; ``isinstance`` tells them apart."""

    @property
    def path(self) -> str: ...


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


@runtime_checkable
class RelayStateStore(Protocol):
    """A queue that keeps what its processors learned about the relay itself
    (a database shared by processors on several hosts).  A queue without it
    keeps that in a file of its directory, if it has one
    (:mod:`mailspool.processor.relayfile`)."""

    def relay_state(self) -> dict[str, Any] | None:
        """The latest state a processor wrote, or None."""

    def set_relay_state(self, state: dict[str, Any]) -> bool:
        """Replace the state of ``state["relay"]``; False when it cannot be written."""


def is_postgres_url(value: str) -> bool:
    """Whether ``value`` names a PostgreSQL queue rather than a spool directory."""
    return value.startswith(("postgresql://", "postgres://"))
