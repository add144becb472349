"""The ``mail:`` directives: schemas (the attributes ZCML accepts) and handlers.

The attribute names and meanings are zope.sendmail's; what differs:

* ``smtpMailer`` passes every attribute to :class:`~mailspool.SMTPMailer` by
  name.  zope.sendmail's handler passes ``implicit_tls`` by position into
  the slot of ``no_tls``, so there ``implicit_tls="true"`` turns STARTTLS
  off and talks clear text to the relay instead of TLS; here it means TLS
  from the first byte.  ``no_tls``, ``force_tls``, ``tls``, ``ca_file``,
  ``verify_certificates`` and ``allow_plaintext_auth`` are added (the
  secure default needs no attribute: verified STARTTLS).
* ``queuedDelivery`` starts a :class:`~mailspool.QueueProcessorThread` as
  before (``processorThread="false"`` does not), woken at once by each
  commit that queued mail; the environment variable
  ``MAILSPOOL_NO_PROCESSOR_THREAD=1`` keeps every such thread from starting
  (for test runs and for sites where ``mailspool run`` delivers).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from zope.component import getUtility
from zope.component.zcml import handler
from zope.configuration.exceptions import ConfigurationError
from zope.configuration.fields import Path
from zope.interface import Interface
from zope.schema import ASCIILine, Bool, Choice, Float, Int, TextLine

from mailspool import (
    DirectMailDelivery,
    QueuedMailDelivery,
    QueueProcessorThread,
    SendmailMailer,
    SMTPMailer,
)
from mailspool.interfaces import IMailDelivery, IMailer
from mailspool.smtp.seams import Mailer

__all__ = [
    "NO_THREAD_ENV",
    "IDirectDeliveryDirective",
    "IQueuedDeliveryDirective",
    "ISMTPMailerDirective",
    "ISendmailMailerDirective",
    "directDelivery",
    "processor_threads",
    "queuedDelivery",
    "sendmailMailer",
    "smtpMailer",
    "stop_processor_threads",
]

log = logging.getLogger(__name__)

#: Set to 1 (or yes, true, on) to start no queue processor thread from ZCML.
NO_THREAD_ENV = "MAILSPOOL_NO_PROCESSOR_THREAD"

_started: list[QueueProcessorThread] = []


class IMailerDirective(Interface):  # type: ignore[misc]
    """What every mailer directive has."""

    name = TextLine(title="Name", description="The name of the mailer utility.", required=True)


class ISMTPMailerDirective(IMailerDirective):
    """Registers an SMTP mailer (``IMailer`` utility)."""

    hostname = ASCIILine(title="Host name of the relay", default="localhost", required=False)
    port = Int(
        title="Port of the relay",
        description="Default 25, or 465 with implicit TLS.",
        required=False,
    )
    username = TextLine(title="User name for SMTP AUTH", required=False)
    password = TextLine(title="Password for SMTP AUTH", required=False)
    implicit_tls = Bool(title="TLS from the first byte (SMTPS)", default=False, required=False)
    no_tls = Bool(title="No TLS at all (a trusted local relay)", default=False, required=False)
    force_tls = Bool(title="Require STARTTLS (the default anyway)", default=False, required=False)
    tls = Choice(
        title="TLS mode",
        description="starttls (default), implicit or none; instead of the flags.",
        values=("starttls", "implicit", "none"),
        required=False,
    )
    timeout = Float(
        title="Timeout",
        description="Seconds to connect and for each reply (not the wait after the data).",
        required=False,
    )
    ca_file = Path(title="CA bundle (PEM) to trust instead of the system's", required=False)
    verify_certificates = Bool(title="Check certificates", default=True, required=False)
    allow_plaintext_auth = Bool(title="AUTH without TLS", default=False, required=False)


class ISendmailMailerDirective(IMailerDirective):
    """Registers a mailer that pipes mail to the local sendmail binary."""

    path = Path(title="The sendmail binary", required=False)


class IDeliveryDirective(Interface):  # type: ignore[misc]
    """What every delivery directive has."""

    name = TextLine(title="Name of the delivery utility", default="Mail", required=False)
    mailer = TextLine(title="Name of the mailer utility", required=True)
    permission = TextLine(title="Permission needed to use the delivery", required=False)


class IQueuedDeliveryDirective(IDeliveryDirective):
    """Registers a queued delivery and, unless told not to, a processor thread."""

    queuePath = Path(title="The queue (spool) directory", required=True)
    processorThread = Bool(
        title="Run a queue processor thread in this process", default=True, required=False
    )


class IDirectDeliveryDirective(IDeliveryDirective):
    """Registers a direct delivery (sent at the end of the commit, no retries)."""


def smtpMailer(
    _context: Any,
    name: str,
    hostname: str = "localhost",
    port: int | None = None,
    username: str | None = None,
    password: str | None = None,
    implicit_tls: bool = False,
    no_tls: bool = False,
    force_tls: bool = False,
    tls: str | None = None,
    timeout: float | None = None,
    ca_file: str | None = None,
    verify_certificates: bool = True,
    allow_plaintext_auth: bool = False,
) -> None:
    """The ``mail:smtpMailer`` directive."""
    timeouts: dict[str, Any] = {}
    if timeout is not None:  # zope.sendmail's timeout covers the connection and each reply
        timeouts = {"connect_timeout": timeout, "timeout": timeout}
    try:
        mailer = SMTPMailer(
            hostname=hostname,
            port=port,
            username=username,
            password=password,
            implicit_tls=implicit_tls,
            no_tls=no_tls,
            force_tls=force_tls,
            tls=tls,  # type: ignore[arg-type]  # the schema allows only the three modes
            ca_file=ca_file,
            verify_certificates=verify_certificates,
            allow_plaintext_auth=allow_plaintext_auth,
            **timeouts,
        )
    except ValueError as exc:
        raise ConfigurationError(f"mail:smtpMailer {name!r}: {exc}") from None
    _register_mailer(_context, mailer, name)


def sendmailMailer(_context: Any, name: str, path: str | None = None) -> None:
    """The ``mail:sendmailMailer`` directive."""
    mailer = SendmailMailer(path) if path is not None else SendmailMailer()
    _register_mailer(_context, mailer, name)


def _register_mailer(_context: Any, mailer: Mailer, name: str) -> None:
    _context.action(
        discriminator=("utility", IMailer, name),
        callable=handler,
        args=("registerUtility", mailer, IMailer, name),
    )


def queuedDelivery(
    _context: Any,
    queuePath: str,
    mailer: str,
    permission: str | None = None,
    name: str = "Mail",
    processorThread: bool = True,
) -> None:
    """The ``mail:queuedDelivery`` directive."""

    def create() -> None:
        mailer_object = _get_mailer(mailer)
        thread: QueueProcessorThread | None = None
        if processorThread and not _threads_suppressed():
            thread = QueueProcessorThread(mailer=mailer_object, queue_path=queuePath)
        delivery = QueuedMailDelivery(
            queuePath, on_commit=thread.wake if thread is not None else None
        )
        _register_delivery(_secured(delivery, permission), name)
        if thread is not None:
            thread.start()
            _started.append(thread)

    _context.action(discriminator=("utility", IMailDelivery, name), callable=create, args=())


def directDelivery(
    _context: Any, mailer: str, permission: str | None = None, name: str = "Mail"
) -> None:
    """The ``mail:directDelivery`` directive."""

    def create() -> None:
        delivery = DirectMailDelivery(_get_mailer(mailer))
        _register_delivery(_secured(delivery, permission), name)

    _context.action(discriminator=("utility", IMailDelivery, name), callable=create, args=())


def _register_delivery(delivery: Any, name: str) -> None:
    handler("registerUtility", delivery, IMailDelivery, name)


def _get_mailer(name: str) -> Mailer:
    try:
        mailer: Mailer = getUtility(IMailer, name)
        return mailer
    except LookupError:
        raise ConfigurationError(f"mailer {name!r} is not defined (mail:smtpMailer)") from None


def _secured(delivery: Any, permission: str | None) -> Any:
    """The delivery, behind a security proxy when a permission is required."""
    if permission is None:
        return delivery
    try:
        from zope.component.security import proxify
        from zope.security.checker import CheckerPublic
    except ImportError:
        raise ConfigurationError(
            "permission= needs zope.security, which is not installed"
        ) from None
    wanted = CheckerPublic if permission == "zope.Public" else permission
    return proxify(delivery, provides=IMailDelivery, permission=wanted)


def _threads_suppressed() -> bool:
    value = os.environ.get(NO_THREAD_ENV, "").strip().lower()
    if value in ("1", "yes", "true", "on"):
        log.info("%s is set: no queue processor thread started", NO_THREAD_ENV)
        return True
    return False


def processor_threads() -> tuple[QueueProcessorThread, ...]:
    """The queue processor threads the directives started, in order."""
    return tuple(_started)


def stop_processor_threads(timeout: float | None = None) -> None:
    """Stop every processor thread the directives started (e.g. in a test teardown)."""
    while _started:
        _started.pop().stop(timeout)
