"""Mail events, and their dispatch outside the application's transaction.

Subscribers register with ``zope.event`` (or ``zope.component``'s
``@adapter``/``subscriber`` machinery) for the interfaces in
:mod:`mailspool.interfaces`.

Why dispatch is careful: a subscriber often wants to record the outcome in
the application's database, in a transaction of its own.  zope.sendmail
notifies from inside ``tpc_finish``, where that is impossible.  Here the
deliveries notify from an after-commit hook *after detaching the finished
transaction from its manager*, so a subscriber can call
``transaction.begin()``/``commit()`` (or use ``with transaction.manager:``)
as if no transaction were running.  A subscriber that raises is logged and
never turns a successful commit, or the queue processor, into a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import zope.event
from zope.interface import implementer

from mailspool.interfaces import (
    IMailDeferredEvent,
    IMailErrorEvent,
    IMailQueuedEvent,
    IMailSentEvent,
)

if TYPE_CHECKING:
    from mailspool.smtp.result import Reply

__all__ = [
    "Attempt",
    "MailDeferred",
    "MailError",
    "MailEvent",
    "MailFailed",
    "MailQuarantined",
    "MailQueued",
    "MailSent",
    "notify",
    "notify_after_commit",
]

log = logging.getLogger(__name__)


class Attempt(NamedTuple):
    """The facts of one settled delivery attempt, without any address.

    The processor attaches one to each event of an attempt (``event.attempt``)
    for metrics and structured logs.  A named tuple: made for every message,
    it must cost next to nothing.

    Attributes:
        queue_id: the spool id.
        message_id: the Message-Id (None for a legacy file without one).
        domains: the domains of the attempt's recipients, sorted, once each.
        outcome: ``"sent"``, ``"deferred"`` or ``"failed"``: the message's.
        reason: the class of the reply that decided it: ``"2xx"``,
            ``"4xx"``, ``"5xx"``, ``"expired"`` (too old to try again) or
            ``"no_reply"`` (a timeout, a lost connection, an error).
        code: that reply's code, when there was one.
        relay: ``host:port`` of the relay.
        smtp_seconds: how long the SMTP transaction took (None: not measured).
        since_commit: seconds from the commit that queued it to this outcome.
        attempt: which attempt this was (1 for the first).
    """

    queue_id: str
    message_id: str | None
    domains: tuple[str, ...]
    outcome: str
    reason: str
    code: int | None
    relay: str
    smtp_seconds: float | None
    since_commit: float
    attempt: int


class MailEvent:
    """Base of all mail events: which message, from whom, to whom.

    ``attempt`` is the :class:`Attempt` that caused the event, when the
    queue processor dispatched it (None otherwise).
    """

    attempt: Attempt | None = None

    def __init__(self, message_id: str | None, fromaddr: str, toaddrs: Sequence[str]) -> None:
        self.message_id = message_id
        self.fromaddr = fromaddr
        self.toaddrs = tuple(toaddrs)

    @property
    def messageId(self) -> str | None:
        return self.message_id

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.message_id} to {', '.join(self.toaddrs)}>"


@implementer(IMailQueuedEvent)
class MailQueued(MailEvent):
    """The message is in the spool: its transaction committed.

    ``enqueue_seconds``: on the first event of a commit, the seconds that
    commit spent writing its messages durably into the spool; None on the
    others.
    """

    enqueue_seconds: float | None = None


class MailQuarantined(MailEvent):
    """The processor found the spool file ``queue_id`` unreadable and moved it
    to ``quarantine/``; nothing is known of its message."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(None, "", ())
        self.queue_id = queue_id

    def __repr__(self) -> str:
        return f"<MailQuarantined {self.queue_id}>"


@implementer(IMailSentEvent)
class MailSent(MailEvent):
    """The relay accepted the message for ``toaddrs``.

    ``reply`` is the relay's reply after the data, a
    :class:`~mailspool.smtp.result.Reply` (``str()`` of it: ``"250 2.0.0 Ok:
    queued as 4XyZ"``, the relay's queue id, to find the message in its
    log), or None when not known.
    """

    def __init__(
        self,
        message_id: str | None,
        fromaddr: str,
        toaddrs: Sequence[str],
        *,
        reply: Reply | None = None,
    ) -> None:
        super().__init__(message_id, fromaddr, toaddrs)
        self.reply = reply


@implementer(IMailErrorEvent)
class MailFailed(MailEvent):
    """The message failed permanently for ``toaddrs``.

    ``reasons`` maps each recipient to its ``(code, text)``; ``error`` is the
    exception when there was one.
    """

    def __init__(
        self,
        message_id: str | None,
        fromaddr: str,
        toaddrs: Sequence[str],
        errorMessage: str,
        *,
        error: BaseException | None = None,
        reasons: dict[str, tuple[int | None, str]] | None = None,
    ) -> None:
        super().__init__(message_id, fromaddr, toaddrs)
        self.errorMessage = errorMessage
        self.error = error
        self.reasons = dict(reasons or {})


#: The classic name for the error event.
MailError = MailFailed


@implementer(IMailDeferredEvent)
class MailDeferred(MailEvent):
    """Delivery failed for now; the next attempt is due at ``retry_at``."""

    def __init__(
        self,
        message_id: str | None,
        fromaddr: str,
        toaddrs: Sequence[str],
        errorMessage: str,
        *,
        retry_at: float | None = None,
        error: BaseException | None = None,
    ) -> None:
        super().__init__(message_id, fromaddr, toaddrs)
        self.errorMessage = errorMessage
        self.retry_at = retry_at
        self.error = error


def notify(events: Iterable[MailEvent]) -> None:
    """Dispatch events; a failing subscriber is logged, never raised."""
    for event in events:
        try:
            zope.event.notify(event)
        except Exception:
            log.exception("a subscriber failed on %r", event)


def _detach(txn: Any) -> None:
    """Make ``txn``'s manager forget it, so subscribers may begin a new one.

    The ``transaction`` package calls after-commit hooks while the finished
    transaction is still its manager's current one; beginning another there
    would abort the finished one and then fail in its clean-up.  Freeing it
    from the manager first (as the package itself does a moment later) and
    clearing the back-reference makes the clean-up skip that step.
    """
    manager = getattr(txn, "_manager", None)
    if manager is None or getattr(manager, "_txn", None) is not txn:
        return
    try:
        manager.free(txn)
    except Exception:  # pragma: no cover - an unknown transaction version
        log.debug("could not detach %r from its manager", txn, exc_info=True)
        return
    setattr(txn, "_manager", None)  # noqa: B010 - private by name only


def notify_after_commit(
    txn: Any, events: Sequence[MailEvent] | Callable[[], Sequence[MailEvent]]
) -> None:
    """Arrange for ``events`` to be dispatched once ``txn`` has committed.

    ``events`` is a sequence, or a callable returning one (evaluated after
    the commit, so it can report what happened during it).  Nothing is
    dispatched if the transaction aborts.
    """

    def hook(status: bool) -> None:
        if not status or not zope.event.subscribers:
            return  # nobody listens: nothing to make, detach or dispatch
        evs = events() if callable(events) else events
        if not evs:
            return
        _detach(txn)
        notify(evs)

    txn.addAfterCommitHook(hook)
