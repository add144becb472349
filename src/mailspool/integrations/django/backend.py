"""A Django email backend that writes mail into a mailspool spool when the database commits.

Theory of operation
-------------------
``send_messages()`` does everything that can be checked at once: each
message is turned into an envelope (sender, recipients with Cc and Bcc) and
wire bytes, and validated by :func:`mailspool.message.prepare`.  A bad
address or an unsendable message raises there -- or, with ``fail_silently``,
the message is left out of the count -- before anything is registered.

The valid messages are then handed to ``django.db.transaction.on_commit``
of the database ``MAILSPOOL_DATABASE`` (default ``"default"``), in one
callback:

* inside ``atomic()`` the callback runs when the outermost block commits,
  and never if it (or the savepoint that held the send) rolls back;
* outside ``atomic()`` (autocommit) Django runs it at once, so the mail is
  in the spool when ``send_mail()`` returns.

The callback writes the batch durably (tmp/, fsync, rename into new/, fsync
of the directory) through a :class:`~mailspool.QueuedMailDelivery` and its
own transaction, which no application code shares.

The window that remains
-----------------------
Django's commit and the spool write are two steps, not one two-phase commit:
the database commits first, then the callback writes the mail.  If the
process dies between the two (SIGKILL, power loss, the container stopped),
the database holds the commit and the mail is lost; nothing records that it
was meant to go.  If the write itself fails (a full disk, a spool made
read-only), the commit has happened all the same: the error is logged with
the Message-Ids and recipients (``CRITICAL``) and raised out of the
``atomic()`` block (with ``fail_silently``, logged only).  Storing the
message in the application's own database transaction, as the PostgreSQL
queue does, is what closes this window.

With a PostgreSQL queue
-----------------------
When ``MAILSPOOL_QUEUE_PATH`` is a ``postgresql://`` URL (the queue's, as
``mailspool run --queue`` takes it), there is no callback: the rows are
inserted at once through Django's own connection of ``MAILSPOOL_DATABASE``,
in the current transaction (in a savepoint of it with ``fail_silently``),
into the URL's ``schema`` (:func:`mailspool.postgres.outbox.enqueue_prepared`).
They commit with the ``atomic()`` block, or are gone with its rollback; no
window remains.  That database must be the one the queue is in.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import urllib.parse
from collections.abc import Sequence
from typing import Any

import django
import transaction as _transaction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.mail.backends.base import BaseEmailBackend
from django.db import transaction as db_transaction

from mailspool import QueuedMailDelivery
from mailspool.errors import InvalidAddress, SpoolError
from mailspool.message import Prepared, parse_mailbox, prepare
from mailspool.priority import parse_priority
from mailspool.queue import is_postgres_url

__all__ = ["EmailBackend", "message_envelope"]

log = logging.getLogger(__name__)

# One delivery per spool, all sharing a transaction manager of their own
# (thread-local), so that the application's use of the ``transaction``
# package, if any, never meets this backend's.
_manager = _transaction.ThreadTransactionManager()
_deliveries: dict[str, QueuedMailDelivery] = {}
_deliveries_lock = threading.Lock()


def _delivery(path: str) -> QueuedMailDelivery:
    with _deliveries_lock:
        delivery = _deliveries.get(path)
        if delivery is None:
            delivery = QueuedMailDelivery(path, transaction_manager=_manager)
            _deliveries[path] = delivery
        return delivery


def _envelope_address(address: str) -> str:
    """The bare mailbox of ``address``; an internationalised domain in its ASCII form.

    As Django's SMTP backend does, a domain that is not ASCII is written in
    IDNA when the local part is ASCII, so that the relay need not offer
    SMTPUTF8; an address that is not ASCII in its local part stays as it is.
    """
    mailbox = parse_mailbox(address)
    local, _, domain = mailbox.rpartition("@")
    if domain.isascii() or not local.isascii():
        return mailbox
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        raise InvalidAddress(address, f"domain {domain!r} has no IDNA form") from None


def message_envelope(email_message: Any) -> tuple[str, list[str], Any]:
    """Sender, recipients (To, Cc and Bcc) and message data of a Django ``EmailMessage``.

    Raises:
        InvalidAddress: a bad sender or recipient.
        ValueError: Django refused to build the message (``BadHeaderError``).
    """
    sender = _envelope_address(email_message.from_email)
    recipients = [_envelope_address(a) for a in email_message.recipients()]
    message = email_message.message()
    if django.VERSION < (6, 0):
        # Django's MIME classes generate themselves with their own arguments.
        return sender, recipients, message.as_bytes(linesep="\r\n")
    return sender, recipients, message  # an email.message.EmailMessage


def _pg_schema(queue_path: str) -> str | None:
    """The schema named by a ``postgresql://`` queue URL; None for a spool path.

    Raises:
        ImproperlyConfigured: the URL's schema is not a plain name.
    """
    if not is_postgres_url(queue_path):
        return None
    from mailspool.postgres.schema import DEFAULT_SCHEMA, check_schema_name

    query = urllib.parse.parse_qs(urllib.parse.urlsplit(queue_path).query)
    try:
        return check_schema_name(query.get("schema", [DEFAULT_SCHEMA])[0])
    except ValueError as exc:
        raise ImproperlyConfigured(f"MAILSPOOL_QUEUE_PATH: {exc}") from None


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]
    """``EMAIL_BACKEND = "mailspool.integrations.django.EmailBackend"``.

    Also a ``BACKEND`` of Django's ``MAILERS`` (Django 6.1 and later), with
    ``queue_path`` and ``database`` as its ``OPTIONS``.

    Args:
        fail_silently: leave out a message that cannot be queued instead of
            raising; a failed write of the spool after the commit is logged
            instead of raised.
        queue_path: the spool (default: ``settings.MAILSPOOL_QUEUE_PATH``),
            or a PostgreSQL queue's ``postgresql://`` URL.
        database: the database alias whose transaction the mail joins
            (default: ``settings.MAILSPOOL_DATABASE``, or ``"default"``).
        priority: the class of the mail this backend queues: ``"urgent"``,
            ``"normal"`` (the default) or ``"bulk"``, e.g.
            ``get_connection(priority="bulk")`` for a newsletter.
        kwargs: what Django passes on (``alias``; ``auth_user`` and
            ``auth_password`` from ``send_mail()``, which mean nothing here).

    Raises:
        ImproperlyConfigured: no spool is set, or ``priority`` names no class.
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        queue_path: str | os.PathLike[str] | None = None,
        database: str | None = None,
        priority: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fail_silently = fail_silently
        try:
            self.priority = parse_priority(priority)
        except ValueError as exc:
            raise ImproperlyConfigured(f"mailspool EmailBackend: {exc}") from None
        if queue_path is None:
            queue_path = getattr(settings, "MAILSPOOL_QUEUE_PATH", None)
        if not queue_path:
            raise ImproperlyConfigured(
                "MAILSPOOL_QUEUE_PATH is not set: name the spool directory mail is queued in"
            )
        self.queue_path = os.fspath(queue_path)
        self.database = database or getattr(settings, "MAILSPOOL_DATABASE", None) or "default"
        #: The PostgreSQL queue's schema when the queue is a URL; None for a spool.
        self.pg_schema = _pg_schema(self.queue_path)

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        """Queue the messages when the database transaction commits (at once in autocommit).

        Returns:
            How many messages were accepted: validated, with at least one
            recipient.  A message without recipients is skipped, as by
            Django's SMTP backend.

        Raises:
            InvalidAddress, InvalidMessage, ValueError: a message cannot be
                sent (unless ``fail_silently``); then none of the batch is
                queued.
            SpoolError: the spool cannot be created or opened, or, in
                autocommit, written (unless ``fail_silently``).
        """
        if not email_messages:
            return 0
        batch: list[Prepared] = []
        for email_message in email_messages:
            if not email_message.recipients():
                continue
            try:
                sender, recipients, data = message_envelope(email_message)
                prepared = prepare(sender, recipients, data)
                batch.append(dataclasses.replace(prepared, priority=self.priority))
            except ValueError as exc:  # InvalidAddress/Message and UnicodeError are ValueErrors
                if not self.fail_silently:
                    raise
                log.warning("mail not queued: %s", exc)
        if not batch:
            return 0
        if self.pg_schema is not None:
            return self._insert(batch, self.pg_schema)
        try:
            delivery = _delivery(self.queue_path)  # creates the spool: fails here, not later
        except (SpoolError, OSError) as exc:
            if not self.fail_silently:
                raise
            log.error("%d message(s) not queued: %s", len(batch), exc)
            return 0
        db_transaction.on_commit(lambda: self._write(delivery, batch), using=self.database)
        return len(batch)

    def _insert(self, batch: list[Prepared], schema: str) -> int:
        """Insert the batch into the PostgreSQL queue, in the current transaction."""
        from django.db import connections

        from mailspool.postgres.outbox import enqueue_prepared

        # A savepoint only where the error is swallowed, so that the
        # application's transaction goes on without the mail; otherwise
        # the error rolls back the application's atomic() block, as a
        # failed Model.save() does (savepoint=False there too), and two
        # round trips are saved on every send.
        try:
            with db_transaction.atomic(using=self.database, savepoint=self.fail_silently):
                enqueue_prepared(connections[self.database], batch, schema=schema)
        except Exception as exc:  # the driver's: the savepoint (if any) is rolled back
            if not self.fail_silently:
                raise
            log.error("%d message(s) not queued: %s", len(batch), exc)
            return 0
        return len(batch)

    def _write(self, delivery: QueuedMailDelivery, batch: list[Prepared]) -> None:
        """The on_commit callback: write the batch into the spool, durably."""
        try:
            with _manager:
                for p in batch:
                    delivery.send(
                        p.envelope.sender, p.envelope.recipients, p.data, priority=p.priority
                    )
        except Exception:
            which = "; ".join(
                f"{p.message_id} to {', '.join(p.envelope.recipients)}" for p in batch
            )
            level = logging.ERROR if self.fail_silently else logging.CRITICAL
            log.log(
                level,
                "the database committed but %d message(s) could not be queued in %s: %s",
                len(batch),
                self.queue_path,
                which,
                exc_info=True,
            )
            if not self.fail_silently:
                raise
