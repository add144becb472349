"""The zope.interface declarations of mailspool.

The classic names (``IMailDelivery``, ``IQueuedMailDelivery``, ``IMailer``,
``IMailSentEvent``...) are the ones zope.sendmail and repoze.sendmail users
already register utilities and subscribers for, so that switching is a
matter of changing an import.  The new ones describe what those packages
lacked: the queued event, the deferred event, and the queue seam that the
processor talks to (a Maildir spool today, a database table tomorrow).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = [
    "IDirectMailDelivery",
    "IMailDeferredEvent",
    "IMailDelivery",
    "IMailErrorEvent",
    "IMailEvent",
    "IMailQueue",
    "IMailQueueProcessor",
    "IMailQueuedEvent",
    "IMailSentEvent",
    "IMailer",
    "IQueuedMailDelivery",
    "ISMTPMailer",
    "ISendmailMailer",
]


# --- deliveries --------------------------------------------------------------


class IMailDelivery(Interface):
    """Sends mail when the current transaction commits."""

    def send(fromaddr, toaddrs, message):
        """Send ``message`` from ``fromaddr`` to each of ``toaddrs`` at commit.

        ``message`` is ``bytes``, ``str`` or an ``email.message.Message``.
        Returns the Message-Id (without angle brackets), added if missing.
        Invalid addresses or messages raise ``ValueError`` subclasses here,
        never at commit.  Nothing is sent if the transaction aborts.
        """


class IDirectMailDelivery(IMailDelivery):
    """Hands mail to a mailer when the transaction commits."""

    mailer = Attribute("The IMailer used to send the mail")


class IQueuedMailDelivery(IMailDelivery):
    """Writes mail durably into a spool when the transaction commits."""

    queuePath = Attribute("The path of the spool directory")


# --- mailers -----------------------------------------------------------------


class IMailer(Interface):
    """Sends a message now, with no transaction."""

    def send(fromaddr, toaddrs, message):
        """Send the message; return the per-recipient result.

        Raises a ``mailspool.errors.DeliveryError`` subclass when nothing was
        accepted.
        """

    def vote(fromaddr, toaddrs, message):
        """Check, before a transaction commits, that sending can succeed."""

    def abort():
        """Drop whatever ``vote`` prepared."""


class ISMTPMailer(IMailer):
    """A mailer that speaks SMTP to a relay."""

    hostname = Attribute("The relay's host name")
    port = Attribute("The relay's port")
    username = Attribute("The user name for AUTH, or None")
    tls = Attribute("'starttls' (default, required), 'implicit' or 'none'")


class ISendmailMailer(IMailer):
    """A mailer that pipes messages to a local sendmail binary."""


# --- the queue ---------------------------------------------------------------


class IMailQueue(Interface):
    """What the queue processor needs from a queue, whatever stores it."""

    def due(now=None):
        """Iterate over the ids of the messages to try now."""

    def next_due():
        """The time of the earliest deferred message, or None."""

    def claim(id):
        """Take a message exclusively, or return None if someone else has it.

        The claim dies with its holder.  The claim object settles the
        message per recipient, defers it, or quarantines it.
        """


class IMailQueueProcessor(Interface):
    """Delivers the messages of a queue through a mailer."""

    mailer = Attribute("The IMailer that delivers the messages")
    queuePath = Attribute("The path of the spool directory")

    def process_once(now=None):
        """Make one pass over what is due; return a summary of counts."""

    def start():
        """Run in a background thread."""

    def stop(timeout=None):
        """Finish what is in flight and stop."""


# --- events ------------------------------------------------------------------


class IMailEvent(Interface):
    """Something happened to a message."""

    messageId = Attribute("The Message-Id, without angle brackets")
    message_id = Attribute("The Message-Id, without angle brackets")
    fromaddr = Attribute("The envelope sender")
    toaddrs = Attribute("The envelope recipients this event is about")


class IMailQueuedEvent(IMailEvent):
    """The message was written to the spool (its transaction committed)."""


class IMailSentEvent(IMailEvent):
    """The relay accepted the message for ``toaddrs``."""


class IMailErrorEvent(IMailEvent):
    """The message failed permanently for ``toaddrs``."""

    errorMessage = Attribute("What went wrong, as text")
    error = Attribute("The exception, when there is one")


class IMailDeferredEvent(IMailEvent):
    """Delivery failed for now and will be tried again."""

    errorMessage = Attribute("What went wrong, as text")
    retry_at = Attribute("When the next attempt is due (a time.time() value)")
