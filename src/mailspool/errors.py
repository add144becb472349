"""Every error mailspool raises, in two families.

* Input errors (:class:`InvalidAddress`, :class:`InvalidMessage`) are
  ``ValueError`` subclasses raised by ``send()`` before anything is joined to
  a transaction.
* Queue errors (:class:`SpoolError`) split the same way: the queue could
  not be read or written (:class:`SpoolIOError`, an ``OSError``: a disk, a
  directory, a database refusing; :class:`QueueUnavailable` when it cannot
  be reached for now; worth retrying), or the operation makes no sense as
  asked: :class:`NoSuchMessage` (also a ``KeyError``),
  :class:`MessageStateError` (retry a message that is being sent, settle
  a claim twice), :class:`ClaimLost`, :class:`SpoolCorrupt`.  Those are
  not ``OSError``: retrying them changes nothing.
* Delivery errors (:class:`DeliveryError`) carry the relay's reply: the
  three-digit ``code``, the enhanced status code (RFC 3463) and the text, and
  the recipient where the error is about one.  They split into
  :class:`TransientError` (try again later) and :class:`PermanentError`
  (do not).  Errors about the relay or our own configuration rather than the
  message have ``about_relay = True``: the queue processor pauses the relay
  for those instead of failing messages.

:func:`is_transient` is the one place that decides retry-or-fail.
"""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import smtplib

__all__ = [
    "AuthenticationError",
    "ClaimLost",
    "ConnectionFailed",
    "DeliveryError",
    "InvalidAddress",
    "InvalidMessage",
    "MailspoolError",
    "MessageStateError",
    "MessageTooLarge",
    "NoSuchMessage",
    "PermanentError",
    "QueueUnavailable",
    "RecipientsRefused",
    "RelayUnavailable",
    "SMTPTimeout",
    "SMTPUTF8Required",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolIOError",
    "TLSFailure",
    "TransientError",
    "enhanced_code",
    "error_for_reply",
    "is_transient",
    "rate_refusal",
    "reply_text",
]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


_OSERROR_FIELDS = ("errno", "strerror", "filename", "filename2")


def _rebuild(
    cls: type[MailspoolError], args: tuple[Any, ...], state: dict[str, Any]
) -> MailspoolError:
    exc = cls.__new__(cls)
    exc.args = args
    for name, value in state.items():
        setattr(exc, name, value)
    return exc


class MailspoolError(Exception):
    """The base of every error mailspool raises on purpose."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle by state, not by calling __init__ again: the subclasses'
        # constructors take arguments that ``args`` lacks, and errors cross
        # process boundaries (multiprocessing, process pools).  An OSError
        # keeps errno, strerror and filename outside ``args`` and __dict__.
        state = dict(vars(self))
        if isinstance(self, OSError):
            fields = ((name, getattr(self, name)) for name in _OSERROR_FIELDS)
            state.update((name, value) for name, value in fields if value is not None)
        return (_rebuild, (type(self), self.args, state))


# --- input -----------------------------------------------------------------


class InvalidAddress(MailspoolError, ValueError):
    """An address given to ``send()`` is not a usable RFC 5321 mailbox.

    ``address`` is the offending value exactly as given.
    """

    def __init__(self, address: object, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"invalid address {address!r}: {reason}")


class InvalidMessage(MailspoolError, ValueError):
    """The message cannot be sent as given (malformed Message-Id, long lines...)."""


# --- delivery ----------------------------------------------------------------


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text, if any."""
    m = _ENHANCED.match(text.strip())
    return m.group(0) if m else None


#: Reply codes a relay uses to say "too fast" (with the codes or texts below).
_RATE_CODES = frozenset({421, 450, 451, 452, 454})
_RATE_ENHANCED = ("4.3.2", "4.5.3")
_RATE_TEXT = re.compile(r"\brate\b|throttl|too many|slow down|try again later", re.IGNORECASE)


def rate_refusal(code: int | None, enhanced: str | None, text: str) -> bool:
    """True when a reply to ``MAIL FROM`` is the relay saying "too fast".

    That is a 421, 450, 451, 452 or 454 with an enhanced code 4.7.x, 4.3.2
    or 4.5.3, or a text that speaks of a rate, throttling, "too many", "slow
    down" or "try again later" (Postfix's anvil: ``450 4.7.1 Error: too much
    mail from ...``; Amazon SES: ``454 Throttling failure``; Gmail: ``421
    4.7.0 ... try again later``).  An authentication failure is never one.
    """
    if code not in _RATE_CODES or "authenticat" in text.lower():
        return False
    enhanced = enhanced or ""
    return (
        enhanced.startswith("4.7.")
        or enhanced in _RATE_ENHANCED
        or _RATE_TEXT.search(text) is not None
    )


class DeliveryError(MailspoolError):
    """Delivery failed; carries the relay's reply when there was one.

    Attributes:
        code: the SMTP reply code (``None`` when there was no reply, e.g. a
            refused connection).
        enhanced: the enhanced status code (``"5.1.1"``) or ``None``.
        text: the reply text, or a description of what went wrong.
        recipient: the recipient this error is about, or ``None``.
        result: for a failure during a mail transaction, every recipient's
            reply (a :class:`mailspool.result.SendResult`), else ``None``.
    """

    #: Set on failures during a mail transaction: each recipient's reply.
    result: object | None = None
    #: True when the error says nothing about this message: the relay is
    #: down, refuses us, or our configuration (TLS, AUTH) is wrong.
    about_relay: bool = False
    #: True when the session was lost after the message's final dot: the
    #: relay may have taken it (the lost-reply window).
    maybe_sent: bool = False
    #: True when trying again later may succeed.
    transient: bool = True
    #: The command the reply answered (``"mail"``, ``"rcpt"``, ``"data"``,
    #: ``"greeting"``...), as given to :func:`error_for_reply`; ``""`` when
    #: unknown or when there was no reply.
    phase: str = ""

    def __init__(
        self,
        text: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        recipient: str | None = None,
    ) -> None:
        self.code = code
        self.text = text
        self.enhanced = enhanced if enhanced is not None else enhanced_code(text)
        self.recipient = recipient
        super().__init__(self._describe())

    def _describe(self) -> str:
        parts = []
        if self.code is not None:
            parts.append(str(self.code))
        parts.append(self.text)
        msg = " ".join(parts)
        if self.recipient is not None:
            msg = f"{self.recipient}: {msg}"
        return msg


class TransientError(DeliveryError):
    """A 4xx reply, a network failure or a timeout: try again later."""

    transient = True


class PermanentError(DeliveryError):
    """A 5xx reply about this message or recipient: do not try again."""

    transient = False


class ConnectionFailed(TransientError, ConnectionError):
    """The connection could not be made, or was lost."""


class SMTPTimeout(TransientError, TimeoutError):
    """The relay did not answer in time."""


class RelayUnavailable(TransientError):
    """The relay refuses to work for now (421, a 5xx greeting, can't connect)."""

    about_relay = True


class AuthenticationError(TransientError):
    """AUTH failed or was required (530, 535, 454): a configuration problem.

    Transient for the message: it is not the message's fault, and fixing the
    configuration makes it deliverable.
    """

    about_relay = True


class TLSFailure(TransientError):
    """TLS could not be set up: no STARTTLS offered, bad certificate, 538."""

    about_relay = True


class SMTPUTF8Required(PermanentError):
    """The message needs SMTPUTF8 and the relay does not offer it."""


class MessageTooLarge(PermanentError):
    """The message is larger than the relay's advertised SIZE, or 552 5.3.4."""


class RecipientsRefused(DeliveryError):
    """No recipient was accepted.

    ``result`` holds every recipient's reply (a :class:`mailspool.mailer.SendResult`).
    ``transient`` is True when at least one refusal was a 4xx.
    """

    def __init__(
        self,
        text: str,
        *,
        result: object,
        transient: bool,
        code: int | None = None,
        enhanced: str | None = None,
        recipient: str | None = None,
    ) -> None:
        self.result = result
        self.transient = transient
        super().__init__(text, code=code, enhanced=enhanced, recipient=recipient)


# Enhanced codes that say the message is too big (RFC 3463 3.4/3.3).
_TOO_LARGE = ("5.3.4", "5.2.3")


def error_for_reply(
    code: int, text: str, *, recipient: str | None = None, phase: str = ""
) -> DeliveryError:
    """Turn an SMTP reply into the right error class.

    Replies about the relay or our configuration are told apart from replies
    about the message, in this order:

    * 421 anywhere, or any failure of the greeting or EHLO/HELO:
      :class:`RelayUnavailable` (a 5xx greeting too, as Postfix does).
    * any failure of STARTTLS, or 538 (encryption required):
      :class:`TLSFailure`.
    * any failure of AUTH, 530 (authentication required), 535 or enhanced
      code 5.7.8 (bad credentials), 454 except at RCPT (temporary
      authentication failure; at RCPT it refuses that recipient only):
      :class:`AuthenticationError`.
    * 552 at RCPT counts as 452 (RFC 5321 4.5.3.1.10): a
      :class:`TransientError` with ``code`` 452.
    * other 4xx: :class:`TransientError`.
    * 552 without an enhanced code or with 5.3.4/5.2.3, and any 5xx with
      5.3.4 or 5.2.3 (message too big): :class:`MessageTooLarge`.
    * other 5xx: :class:`PermanentError`.
    * any other code (a reply where none was expected): :class:`TransientError`,
      since only a 5xx says that trying again is useless.

    Args:
        code: the three-digit reply code.
        text: the reply text (an enhanced status code at its start is read).
        recipient: the recipient the reply is about, if any.
        phase: the command the reply answered (``"greeting"``, ``"ehlo"``,
            ``"helo"``, ``"starttls"``, ``"auth"``, ``"mail"``, ``"rcpt"``,
            ``"data"``), or ``""`` when unknown.

    Returns:
        The error (not raised).
    """
    enh = enhanced_code(text)

    def make(cls: type[DeliveryError], reply_code: int = code) -> DeliveryError:
        error = cls(text, code=reply_code, enhanced=enh, recipient=recipient)
        error.phase = phase
        return error

    if code == 421 or phase in ("greeting", "ehlo", "helo"):
        return make(RelayUnavailable)
    if code == 538 or phase == "starttls":
        return make(TLSFailure)
    if phase == "auth" or code in (530, 535) or enh == "5.7.8" or (code == 454 and phase != "rcpt"):
        return make(AuthenticationError)
    if code == 552 and phase == "rcpt":
        return make(TransientError, 452)
    if 400 <= code < 500:
        return make(TransientError)
    if 500 <= code < 600:
        if enh in _TOO_LARGE or (code == 552 and enh is None):
            return make(MessageTooLarge)
        return make(PermanentError)
    return make(TransientError)


def _smtplib_phase(smtp: Any, exc: smtplib.SMTPResponseException) -> str:
    """What an smtplib reply error answered, for error_for_reply's ``phase``."""
    for cls, phase in (
        (smtp.SMTPConnectError, "greeting"),
        (smtp.SMTPHeloError, "ehlo"),
        (smtp.SMTPAuthenticationError, "auth"),
        (smtp.SMTPSenderRefused, "mail"),
        (smtp.SMTPDataError, "data"),
    ):
        if isinstance(exc, cls):
            return phase
    return ""


def reply_text(value: object) -> str:
    """A reply's text as ``str`` (bytes decoded as UTF-8, undecodable ones replaced)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def is_transient(exc: BaseException) -> bool:
    """The one place that decides whether a failure is worth retrying.

    Delivery errors say so themselves.  ``smtplib`` errors are judged by
    their reply like :func:`error_for_reply` judges ours (a refused
    recipient list is transient when any refusal is).  OS-level errors
    (network, timeouts, TLS, a full disk, :class:`SpoolIOError`) are.
    Anything else (a bug, bad input, a queue error that is not about I/O)
    is not.

    Args:
        exc: the exception that stopped a delivery.

    Returns:
        True when trying again later may succeed.
    """
    if isinstance(exc, DeliveryError):
        return exc.transient
    # An smtplib error exists only once smtplib is imported: this module does
    # not import it (with ssl and email, a tenth of every command's start).
    smtp: Any = sys.modules.get("smtplib")
    if smtp is not None and isinstance(exc, smtp.SMTPRecipientsRefused):
        return any(
            error_for_reply(code, reply_text(text), phase="rcpt").transient
            for code, text in exc.recipients.values()
        )
    if smtp is not None and isinstance(exc, smtp.SMTPResponseException):
        phase = _smtplib_phase(smtp, exc)
        reply = error_for_reply(exc.smtp_code, reply_text(exc.smtp_error), phase=phase)
        return reply.transient
    return isinstance(exc, OSError)


# --- spool -------------------------------------------------------------------


class SpoolError(MailspoolError):
    """The queue refused or failed an operation: the base of the queue's errors.

    Catch this for any of them.  Only :class:`SpoolIOError` is also an
    ``OSError`` (and transient); the others are mistakes that retrying
    does not mend.
    """


class SpoolIOError(SpoolError, OSError):
    """The queue could not be read or written: a disk, a directory, a database out of reach.

    An ``OSError`` (``errno`` set where the system gave one), and transient
    for :func:`is_transient`.
    """


class NoSuchMessage(SpoolError, KeyError):
    """No message with this id is in the queue (any more).

    Also a ``KeyError``, as the queue's operator verbs raised before it.
    ``id`` is the id asked for.
    """

    def __init__(self, id: str) -> None:
        self.id = id
        super().__init__(id)

    def __str__(self) -> str:
        return f"no such message: {self.id}"


class MessageStateError(SpoolError):
    """The message is not in a state that allows this: retrying a message that
    is being sent, releasing one that is not held, settling a claim twice."""


class QueueUnavailable(SpoolIOError, ConnectionError):
    """The queue cannot be reached for now (its database is down or restarting).

    Nothing is wrong with the queue or the message: a processor waits and
    tries again, and fails no message for it.  A queue that refuses for a
    reason of its own configuration raises another :class:`SpoolIOError`
    (a login refused) or a plain :class:`SpoolError` (no schema).
    """


class ClaimLost(SpoolError):
    """A claim ended before its outcome could be written: the message was taken
    by another holder (or changed) meanwhile, so the outcome is not recorded
    and whoever holds the message now sends it again."""


class SpoolCorrupt(SpoolError):
    """A spool file is truncated, corrupt or not a regular file.

    ``path`` is the file; ``reason`` what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
