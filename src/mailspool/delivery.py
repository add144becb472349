"""Transactional deliveries: mail goes out only if the transaction commits.

Theory of operation
-------------------
``send()`` validates everything at once (a bad address raises here, never at
commit), then records the prepared message in a data manager joined to the
current transaction of the delivery's transaction manager: one data manager
per delivery and transaction, holding every message sent in it.

The two-phase commit of the ``transaction`` package then drives it:

* ``tpc_vote`` does whatever can fail.  The queued delivery writes each
  message to ``tmp/`` in the spool and fsyncs it, several at once when the
  transaction holds many (:meth:`mailspool.spool.Spool.stage_many`).  A
  full disk, a read-only spool or a permission error aborts the transaction
  here, leaving nothing visible.  The direct delivery opens and checks its
  connection to the relay.
* ``tpc_finish`` "should never fail".  The queued delivery renames the files
  into ``new/`` and fsyncs the directory once for the batch: only now is the
  mail visible, and durable.  The one exception to "never fail": if that
  directory fsync reports an I/O error, the mail is not known to be on disk,
  and ``commit()`` raises rather than claim it is (a failed fsync is a failed
  commit, never retried).  The direct delivery sends; a failure is logged and
  reported by an event, never raised out of the commit.
* ``abort``/``tpc_abort`` remove whatever was written to ``tmp/``.

Savepoints record how many messages were sent before them; rolling back
drops exactly the later ones.  Events are dispatched after the commit, with
the finished transaction detached from its manager (see :mod:`mailspool.events`).
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import transaction as _transaction
from zope.interface import implementer

from mailspool.backends import open_queue
from mailspool.errors import DeliveryError, RecipientsRefused
from mailspool.events import MailEvent, MailFailed, MailQueued, MailSent, notify_after_commit
from mailspool.interfaces import IDirectMailDelivery, IMailer, IQueuedMailDelivery
from mailspool.message import MessageInput, Prepared, prepare
from mailspool.priority import Priority, parse_priority
from mailspool.queue import QueueBackend, Staged
from mailspool.smtp.result import SendResult
from mailspool.smtp.seams import AbortingMailer, EnvelopeMailer, Mailer, VotingMailer

__all__ = ["DirectMailDelivery", "QueuedMailDelivery"]

log = logging.getLogger(__name__)


# Data managers holding mail whose transaction has not ended, to warn at exit
# about the classic mistake of never committing.  The exit hook is installed
# by the first delivery made, not at import.
_open_managers: weakref.WeakSet[_MailDataManager] = weakref.WeakSet()
_exit_hook = threading.Lock()
_exit_hooked = False


def _hook_exit() -> None:
    global _exit_hooked
    with _exit_hook:
        if not _exit_hooked:
            atexit.register(_warn_uncommitted)
            _exit_hooked = True


def _warn_uncommitted() -> None:
    pending = [dm for dm in list(_open_managers) if dm.messages]
    for dm in pending:
        log.warning(
            "process exits with %d message(s) joined to a transaction that never "
            "ended (commit() was not called): they were not sent: %s",
            len(dm.messages),
            ", ".join(p.message_id for p, _ in dm.messages),
        )


class _Savepoint:
    def __init__(self, dm: _MailDataManager) -> None:
        self._dm = dm
        self._length = len(dm.messages)

    def rollback(self) -> None:
        del self._dm.messages[self._length :]


class _MailDataManager:
    """Joins one transaction on behalf of one delivery; holds its messages."""

    def __init__(self, delivery: _Delivery, transaction_manager: Any) -> None:
        self.delivery = delivery
        self.transaction_manager = transaction_manager
        self.messages: list[tuple[Prepared, float | None]] = []
        self.staged: Sequence[Staged] = ()
        self.results: list[MailEvent] = []
        self.took = 0.0  # seconds spent writing the messages into the spool
        _open_managers.add(self)

    # -- IDataManager ---------------------------------------------------------

    def sortKey(self) -> str:
        # "~" sorts after the usual keys: vote after databases, so nothing is
        # written to the spool for a transaction that another resource vetoes.
        return f"~mailspool.{id(self):x}"

    def abort(self, txn: Any) -> None:
        self._discard()

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        self.delivery._vote(self)

    def tpc_finish(self, txn: Any) -> None:
        try:
            self.delivery._finish(self)
        finally:
            self.messages = []
            _open_managers.discard(self)

    def tpc_abort(self, txn: Any) -> None:
        self._discard()

    def savepoint(self) -> _Savepoint:
        return _Savepoint(self)

    def _discard(self) -> None:
        try:
            self.delivery._abort(self)
        finally:
            self.messages = []
            self.staged = ()
            _open_managers.discard(self)


class _Delivery:
    """What both deliveries share: validation and joining the transaction."""

    def __init__(self, *, transaction_manager: Any = None, msgid_domain: str | None = None):
        self.transaction_manager = transaction_manager or _transaction.manager
        self.msgid_domain = msgid_domain
        if not _exit_hooked:
            _hook_exit()

    def _join(self, prepared: Prepared, not_before: float | None) -> str:
        txn = self.transaction_manager.get()
        try:
            dm: _MailDataManager = txn.data(self)
        except KeyError:
            dm = _MailDataManager(self, self.transaction_manager)
            txn.join(dm)
            txn.set_data(self, dm)
            notify_after_commit(txn, lambda: self._events(dm))
        dm.messages.append((prepared, not_before))
        return prepared.message_id

    def _prepare(
        self, fromaddr: str, toaddrs: Iterable[str] | str, message: MessageInput
    ) -> Prepared:
        return prepare(fromaddr, toaddrs, message, msgid_domain=self.msgid_domain)

    # Hooks for the data manager.
    def _vote(self, dm: _MailDataManager) -> None:
        raise NotImplementedError

    def _finish(self, dm: _MailDataManager) -> None:
        raise NotImplementedError

    def _abort(self, dm: _MailDataManager) -> None:
        raise NotImplementedError

    def _events(self, dm: _MailDataManager) -> Sequence[MailEvent]:
        events, dm.results = dm.results, []
        return events


def _timestamp(when: float | datetime.datetime | None) -> float | None:
    if when is None or isinstance(when, (int, float)):
        return when
    if when.tzinfo is None:
        when = when.astimezone()  # a naive datetime is local time
    return when.timestamp()


@implementer(IQueuedMailDelivery)
class QueuedMailDelivery(_Delivery):
    """Writes mail durably into a queue when the transaction commits.

    Args:
        spool_path: the spool directory (created, mode 0700, if missing), a
            PostgreSQL queue's ``postgresql://`` URL, or any
            :class:`~mailspool.queue.QueueBackend` (e.g. the in-memory queue
            of :mod:`mailspool.memory` in an application's tests); see
            :func:`mailspool.backends.open_queue`.
        transaction_manager: the manager whose current transaction ``send()``
            joins; default ``transaction.manager`` (thread-local).
        msgid_domain: the domain of generated Message-Ids (default: this
            host's name).
        on_commit: called with no arguments after a commit that queued mail,
            e.g. ``processor.wake`` to have an in-process processor pick the
            mail up at once.
    """

    def __init__(
        self,
        spool_path: str | os.PathLike[str] | QueueBackend,
        *,
        transaction_manager: Any = None,
        msgid_domain: str | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(transaction_manager=transaction_manager, msgid_domain=msgid_domain)
        self.spool = open_queue(spool_path)
        self.on_commit = on_commit

    @property
    def queuePath(self) -> str:
        return self.spool.location

    def send(
        self,
        fromaddr: str,
        toaddrs: Iterable[str] | str,
        message: MessageInput,
        *,
        not_before: float | datetime.datetime | None = None,
        priority: str | Priority | None = None,
    ) -> str:
        """Queue ``message`` for delivery when the current transaction commits.

        Args:
            fromaddr: the envelope sender (a display name is allowed and
                dropped from the envelope).
            toaddrs: the recipients; a single string is one address.
            message: ``bytes``, ``str`` or ``email.message.Message``.
            not_before: keep the message in the queue until this time (a
                ``time.time()`` value or a datetime; naive means local time).
            priority: ``"urgent"``, ``"normal"`` (the default) or ``"bulk"``:
                the processor takes urgent mail first and bulk mail last,
                without starving it (see :mod:`mailspool.priority`).

        Returns:
            The Message-Id, without angle brackets.

        Raises:
            InvalidAddress: a bad sender or recipient, or no recipients.
            InvalidMessage: a malformed Message-Id or an over-long line.
            ValueError: ``priority`` names no class.
        """
        cls = parse_priority(priority)
        prepared = self._prepare(fromaddr, toaddrs, message)
        if cls is not Priority.NORMAL:
            prepared = dataclasses.replace(prepared, priority=cls)
        return self._join(prepared, _timestamp(not_before))

    def _vote(self, dm: _MailDataManager) -> None:
        # On failure stage_many() removes every file of the batch and
        # raises SpoolError; tpc_abort then has nothing left to remove.
        began = time.monotonic()
        dm.staged = self.spool.stage_many(dm.messages)
        dm.took = time.monotonic() - began

    def _finish(self, dm: _MailDataManager) -> None:
        staged, dm.staged = dm.staged, ()
        began = time.monotonic()
        try:
            self.spool.publish(staged)
        except Exception as exc:
            # Only a broken disk gets here (the renames stay inside the spool;
            # the directory fsync reported an I/O error).  A failed fsync is a
            # failed commit: the caller must not be told the mail is safe.
            # What was renamed is visible and will be sent; what was not
            # stays in tmp/, never sent.
            log.critical(
                "committed mail may not be durable: moving it into the queue failed "
                "(%s); messages: %s",
                exc,
                ", ".join(s.id for s in staged),
            )
            raise
        took = dm.took + time.monotonic() - began
        queued = [
            MailQueued(p.message_id, p.envelope.sender, p.envelope.recipients)
            for p, _ in dm.messages
        ]
        if queued:
            queued[0].enqueue_seconds = took
        dm.results.extend(queued)
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:
                log.exception("on_commit callback failed")

    def _abort(self, dm: _MailDataManager) -> None:
        staged, dm.staged = dm.staged, ()
        if staged:
            self.spool.discard(staged)


@implementer(IDirectMailDelivery)
class DirectMailDelivery(_Delivery):
    """Hands mail to a mailer when the transaction commits.

    The relay is checked at vote (an unreachable relay aborts the
    transaction); the mail is sent at the end of the commit.  A failure then
    cannot undo the commit: it is logged and reported by a
    :class:`~mailspool.events.MailFailed` event.  There is no retry: use
    :class:`QueuedMailDelivery` when mail must not be lost.

    Args:
        mailer: an ``IMailer``, such as :class:`~mailspool.SMTPMailer`.
        transaction_manager: as for :class:`QueuedMailDelivery`.
        msgid_domain: as for :class:`QueuedMailDelivery`.
    """

    def __init__(
        self,
        mailer: Mailer,
        *,
        transaction_manager: Any = None,
        msgid_domain: str | None = None,
    ) -> None:
        super().__init__(transaction_manager=transaction_manager, msgid_domain=msgid_domain)
        if not IMailer.providedBy(mailer) and not isinstance(mailer, Mailer):
            raise TypeError(f"mailer must provide IMailer, got {mailer!r}")
        self.mailer = mailer

    def send(
        self,
        fromaddr: str,
        toaddrs: Iterable[str] | str,
        message: MessageInput,
        *,
        priority: str | Priority | None = None,
    ) -> str:
        """Send ``message`` when the current transaction commits.

        Returns the Message-Id (without angle brackets).  Raises
        ``InvalidAddress``/``InvalidMessage`` at once for bad input.
        ``priority`` is checked (ValueError when it names no class) and
        otherwise has no effect: every message goes out at the commit.
        """
        parse_priority(priority)
        return self._join(self._prepare(fromaddr, toaddrs, message), None)

    def _vote(self, dm: _MailDataManager) -> None:
        if isinstance(self.mailer, VotingMailer) and dm.messages:
            first = dm.messages[0][0]
            self.mailer.vote(first.envelope.sender, first.envelope.recipients, first.data)

    def _finish(self, dm: _MailDataManager) -> None:
        for prepared, _ in dm.messages:
            dm.results.extend(self._send_one(prepared))

    def _send_one(self, prepared: Prepared) -> list[MailEvent]:
        env = prepared.envelope
        mid = prepared.message_id
        try:
            # The mailer's send() would validate the envelope and normalise the
            # data again; this delivery's send() did both: take the fast path.
            result: object
            if isinstance(self.mailer, EnvelopeMailer):
                result = self.mailer.send_envelope(env, prepared.data)
            else:
                result = self.mailer.send(env.sender, env.recipients, prepared.data)
        except Exception as exc:  # the commit boundary: never raise out of it
            log.error("mail %s to %s was not sent: %s", mid, ", ".join(env.recipients), exc)
            # RecipientsRefused, and any error at or after DATA, carry each
            # recipient's reply; the error itself answers for those without
            # one (the session was lost after RCPT).
            reasons: dict[str, tuple[int | None, str]] = {}
            if isinstance(exc, DeliveryError) and exc.result is not None:
                carried = _reasons(exc.result) if isinstance(exc.result, SendResult) else {}
                why = (exc.code, exc.text or str(exc))
                reasons = {a: carried.get(a, why) for a in env.recipients}
            if not isinstance(exc, (DeliveryError, RecipientsRefused)):
                log.debug("unexpected error sending %s", mid, exc_info=True)
            return [
                MailFailed(mid, env.sender, env.recipients, str(exc), error=exc, reasons=reasons)
            ]
        events: list[MailEvent] = []
        # Not a SendResult (a classic IMailer returns None): every recipient taken.
        sent = result if isinstance(result, SendResult) else SendResult(tuple(env.recipients))
        accepted = tuple(sent.accepted)
        if accepted:
            log.info("mail %s sent to %s", mid, ", ".join(accepted))
            events.append(MailSent(mid, env.sender, accepted))
        if sent.refused:
            reasons = _reasons(sent)
            text = "; ".join(f"{a}: {c} {t}" for a, (c, t) in reasons.items())
            log.error("mail %s refused for %s", mid, text)
            events.append(MailFailed(mid, env.sender, tuple(reasons), text, reasons=reasons))
        return events

    def _abort(self, dm: _MailDataManager) -> None:
        if isinstance(self.mailer, AbortingMailer):
            try:
                self.mailer.abort()
            except Exception:
                log.debug("mailer abort failed", exc_info=True)


def _reasons(result: SendResult) -> dict[str, tuple[int | None, str]]:
    return {addr: (r.code, r.text) for addr, r in result.refused.items()}
