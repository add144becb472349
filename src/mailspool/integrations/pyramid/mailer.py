"""``Mailer``: pyramid_mailer's mailer, sending through mailspool's deliveries.

=========================  ====================================================
``send(message)``          at commit, straight to the relay
                           (:class:`~mailspool.DirectMailDelivery`)
``send_to_queue(message)`` at commit, into the queue at ``queue_path``
                           (:class:`~mailspool.QueuedMailDelivery`): durable,
                           retried; the recommended one
``send_immediately(...)``  now, whatever the transaction does
``send_sendmail(...)``,    the same two through the local sendmail binary
``send_immediately_sendmail(...)``
=========================  ====================================================

The settings (:func:`settings_kwargs`) are pyramid_mailer's, read under a
prefix (``mail.`` by default).  One differs in its default: without
``mail.tls`` the relay must offer STARTTLS with a valid certificate, where
pyramid_mailer sent in clear text; ``mail.tls = false`` is the one explicit
choice for a local relay without TLS.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import transaction as _transaction
from zope.interface import Interface, implementer

from mailspool import (
    DirectMailDelivery,
    QueuedMailDelivery,
    QueueProcessorThread,
    SendmailMailer,
    SendResult,
    SMTPMailer,
)
from mailspool.errors import DeliveryError
from mailspool.integrations.pyramid.message import Message

__all__ = ["IPyramidMailer", "Mailer", "settings_kwargs"]

log = logging.getLogger(__name__)

_TRUE = ("true", "yes", "on", "1", "y", "t")
_FALSE = ("false", "no", "off", "0", "n", "f")
_MODES = ("starttls", "implicit", "none")
#: setting name -> how its text is read
_SETTINGS = {
    "host": str,
    "port": int,
    "username": str,
    "password": str,
    "tls": "tls",
    "ssl": bool,
    "keyfile": str,
    "certfile": str,
    "ca_file": str,
    "verify_certificates": bool,
    "timeout": float,
    "queue_path": str,
    "queue_processor": bool,
    "default_sender": str,
    "debug": int,
    "sendmail_app": str,
}


class IPyramidMailer(Interface):  # type: ignore[misc]
    """The mailer of a Pyramid registry (``request.mailer``)."""


def _value(key: str, kind: Any, raw: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if kind is str:
        return text
    if kind in (bool, "tls"):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        if kind == "tls" and text.lower() in _MODES:
            return text.lower()
        choices = "true or false" + (", starttls, implicit or none" if kind == "tls" else "")
        raise ValueError(f"{key} must be {choices}; got {raw!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{key} must be a number; got {raw!r}") from None


def settings_kwargs(settings: Mapping[str, Any], prefix: str = "mail.") -> dict[str, Any]:
    """The :class:`Mailer` arguments that the settings under ``prefix`` give.

    Empty values count as not given; other settings under the prefix are
    left alone (the prefix may be shared).

    Raises:
        ValueError: naming the setting, for a value that cannot be read, or
            for ``sendmail_template`` (mailspool always runs
            ``sendmail -i -f SENDER -- RECIPIENT...``).
    """
    if settings.get(prefix + "sendmail_template"):
        raise ValueError(
            f"{prefix}sendmail_template is not supported: the sendmail binary is run "
            "as 'sendmail -i -f SENDER -- RECIPIENT...'"
        )
    kwargs: dict[str, Any] = {}
    for name, kind in _SETTINGS.items():
        raw = settings.get(prefix + name)
        if raw is None or raw == "":
            continue
        kwargs[name] = _value(prefix + name, kind, raw)
    if not (kwargs.get("username") or kwargs.get("password")):
        kwargs.pop("username", None)
        kwargs.pop("password", None)
    return kwargs


@implementer(IPyramidMailer)
class Mailer:
    """Sends :class:`Message` objects; one per Pyramid registry.

    Args:
        host, port, username, password: the relay (``port`` defaults to 25,
            or 465 with ``ssl``).
        tls: ``None`` (default): verified STARTTLS required; ``False``: no
            TLS (a trusted local relay); ``True``: STARTTLS; or a mode name.
        ssl: TLS from the first byte (SMTPS); ``tls`` is then not used.
        keyfile, certfile: a client certificate for the relay.
        ca_file, verify_certificates: as for :class:`~mailspool.SMTPMailer`.
        timeout: seconds to connect and for each reply of the relay.
        queue_path: the queue directory for :meth:`send_to_queue`.
        queue_processor: also deliver the queue from a thread of this
            process (:class:`~mailspool.QueueProcessorThread`), woken by
            each commit; otherwise run ``mailspool run``.
        default_sender: the From of messages that have no ``sender``.
        transaction_manager: the manager whose transaction :meth:`send`
            and :meth:`send_to_queue` join (default ``transaction.manager``).
        debug: pyramid_mailer's SMTP debug level (a warning only: see
            :class:`~mailspool.SMTPMailer`'s ``debug_smtp``).
        sendmail_app: the sendmail binary (default ``/usr/sbin/sendmail``).
        smtp_mailer, sendmail_mailer: ready mailers instead of the settings.
    """

    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: bool | str | None = None,
        ssl: bool = False,
        keyfile: str | None = None,
        certfile: str | None = None,
        ca_file: str | None = None,
        verify_certificates: bool = True,
        timeout: float | None = None,
        queue_path: str | os.PathLike[str] | None = None,
        queue_processor: bool = False,
        default_sender: str | None = None,
        transaction_manager: Any = None,
        debug: int = 0,
        sendmail_app: str | None = None,
        smtp_mailer: Any = None,
        sendmail_mailer: Any = None,
    ) -> None:
        if smtp_mailer is None:
            timeouts: dict[str, Any] = {}
            if timeout is not None:
                timeouts = {"connect_timeout": timeout, "timeout": timeout}
            smtp_mailer = SMTPMailer(
                host,
                port,
                username,
                password,
                tls=None if ssl else tls,  # type: ignore[arg-type]  # checked by SMTPMailer
                ssl=ssl,
                keyfile=keyfile,
                certfile=certfile,
                ca_file=ca_file,
                verify_certificates=verify_certificates,
                debug_smtp=debug,
                **timeouts,
            )
        self.smtp_mailer = smtp_mailer
        self.sendmail_mailer = sendmail_mailer or SendmailMailer(
            sendmail_app or "/usr/sbin/sendmail"
        )
        self.queue_path = os.fspath(queue_path) if queue_path is not None else None
        self.default_sender = default_sender
        self.transaction_manager = transaction_manager or _transaction.manager
        self.processor_thread: Any = None
        if queue_processor:
            if self.queue_path is None:
                raise ValueError("queue_processor needs queue_path")
            self.processor_thread = QueueProcessorThread(
                mailer=self.smtp_mailer, queue_path=self.queue_path
            )
        self._direct: DirectMailDelivery | None = None
        self._queued: QueuedMailDelivery | None = None
        self._sendmail: DirectMailDelivery | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None, prefix: str = "mail.") -> Mailer:
        """A mailer made from Pyramid settings (see :func:`settings_kwargs`)."""
        return cls(**settings_kwargs(settings or {}, prefix))

    def bind(self, *, default_sender: str | None = None, transaction_manager: Any = None) -> Mailer:
        """This mailer with another default sender or transaction manager.

        The relay settings, mailers and queue are shared.
        """
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        if default_sender is not None:
            bound.default_sender = default_sender
        if transaction_manager is not None and transaction_manager is not self.transaction_manager:
            bound.transaction_manager = transaction_manager
            bound._direct = bound._queued = bound._sendmail = None
        return bound

    def _args(self, message: Message) -> tuple[str, list[str], Any]:
        message.sender = message.sender or self.default_sender
        email_message = message.to_message()
        return message.sender or "", message.send_to, email_message

    @property
    def direct_delivery(self) -> DirectMailDelivery:
        """The delivery :meth:`send` uses."""
        if self._direct is None:
            self._direct = DirectMailDelivery(
                self.smtp_mailer, transaction_manager=self.transaction_manager
            )
        return self._direct

    @property
    def queue_delivery(self) -> QueuedMailDelivery | None:
        """The delivery :meth:`send_to_queue` uses (``None`` without ``queue_path``)."""
        if self._queued is None and self.queue_path is not None:
            wake = self.processor_thread.wake if self.processor_thread is not None else None
            self._queued = QueuedMailDelivery(
                self.queue_path, transaction_manager=self.transaction_manager, on_commit=wake
            )
        return self._queued

    def send(self, message: Message) -> str:
        """Send ``message`` to the relay when the transaction commits; return its Message-Id."""
        return self.direct_delivery.send(*self._args(message))

    def send_to_queue(self, message: Message, *, priority: str | None = None) -> str:
        """Queue ``message`` when the transaction commits; return its Message-Id.

        ``priority``: ``"urgent"``, ``"normal"`` (the default) or ``"bulk"``.

        Raises:
            RuntimeError: no ``queue_path`` was configured.
            ValueError: ``priority`` names no class.
        """
        delivery = self.queue_delivery
        if delivery is None:
            raise RuntimeError("send_to_queue needs a queue: set mail.queue_path")
        return delivery.send(*self._args(message), priority=priority)

    def send_immediately(self, message: Message, fail_silently: bool = False) -> SendResult | None:
        """Send ``message`` now, outside any transaction.

        With ``fail_silently`` a delivery failure is logged and ``None``
        returned; bad input still raises.
        """
        return self._now(self.smtp_mailer, message, fail_silently)

    def send_sendmail(self, message: Message) -> str:
        """Like :meth:`send`, through the local sendmail binary."""
        if self._sendmail is None:
            self._sendmail = DirectMailDelivery(
                self.sendmail_mailer, transaction_manager=self.transaction_manager
            )
        return self._sendmail.send(*self._args(message))

    def send_immediately_sendmail(
        self, message: Message, fail_silently: bool = False
    ) -> SendResult | None:
        """Like :meth:`send_immediately`, through the local sendmail binary."""
        return self._now(self.sendmail_mailer, message, fail_silently)

    def _now(self, mailer: Any, message: Message, fail_silently: bool) -> SendResult | None:
        args = self._args(message)
        try:
            result: SendResult = mailer.send(*args)
        except DeliveryError as exc:
            if not fail_silently:
                raise
            log.warning("mail to %s not sent: %s", ", ".join(args[1]), exc)
            return None
        return result
