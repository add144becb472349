"""Every error mailspool raises, in two families.

* Input errors (:class:`InvalidAddress`, :class:`InvalidMessage`) are
  ``ValueError`` subclasses raised by ``send()`` before anything is joined to
  a transaction.
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

__all__ = [
    "AuthenticationError",
    "ConnectionFailed",
    "DeliveryError",
    "InvalidAddress",
    "InvalidMessage",
    "MailspoolError",
    "MessageTooLarge",
    "PermanentError",
    "RecipientsRefused",
    "RelayUnavailable",
    "SMTPUTF8Required",
    "SMTPTimeout",
    "SpoolCorrupt",
    "SpoolError",
    "TLSFailure",
    "TransientError",
    "enhanced_code",
    "error_for_reply",
    "is_transient",
]

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


class MailspoolError(Exception):
    """The base of every error mailspool raises on purpose."""


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


class DeliveryError(MailspoolError):
    """Delivery failed; carries the relay's reply when there was one.

    Attributes:
        code: the SMTP reply code (``None`` when there was no reply, e.g. a
            refused connection).
        enhanced: the enhanced status code (``"5.1.1"``) or ``None``.
        text: the reply text, or a description of what went wrong.
        recipient: the recipient this error is about, or ``None``.
    """

    #: True when the error says nothing about this message: the relay is
    #: down, refuses us, or our configuration (TLS, AUTH) is wrong.
    about_relay: bool = False
    #: True when trying again later may succeed.
    transient: bool = True

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

    def __init__(self, text: str, *, result: object, transient: bool, **kw: object) -> None:
        self.result = result
        self.transient = transient  # type: ignore[misc]
        super().__init__(text, **kw)  # type: ignore[arg-type]


def error_for_reply(
    code: int, text: str, *, recipient: str | None = None, phase: str = ""
) -> DeliveryError:
    """Turn an SMTP reply into the right error class.

    ``phase`` is the command the reply answered (``"greeting"``, ``"ehlo"``,
    ``"auth"``, ``"starttls"``, ``"mail"``, ``"rcpt"``, ``"data"``).  Replies
    about the relay or our configuration are told apart from replies about
    the message: 421 anywhere, any failure of the greeting or EHLO, 530/535/
    538/454 (authentication or encryption required).
    """
    enh = enhanced_code(text)
    kw: dict[str, object] = {"code": code, "enhanced": enh, "recipient": recipient}
    if code == 421 or phase in ("greeting", "ehlo"):
        return RelayUnavailable(text, **kw)  # type: ignore[arg-type]
    if code in (530, 535, 454) or phase == "auth" or (enh or "").startswith("5.7.8"):
        return AuthenticationError(text, **kw)  # type: ignore[arg-type]
    if code == 538 or phase == "starttls":
        return TLSFailure(text, **kw)  # type: ignore[arg-type]
    if code == 552 and phase == "rcpt":
        # RFC 5321 4.5.3.1.10: 552 on RCPT is treated as 452 (too many recipients).
        return TransientError(text, code=452, enhanced=enh, recipient=recipient)
    if code == 552 or (enh or "") == "5.3.4":
        return MessageTooLarge(text, **kw)  # type: ignore[arg-type]
    if 400 <= code < 500:
        return TransientError(text, **kw)  # type: ignore[arg-type]
    return PermanentError(text, **kw)  # type: ignore[arg-type]


def is_transient(exc: BaseException) -> bool:
    """The one place that decides whether a failure is worth retrying.

    Delivery errors say so themselves; OS-level network errors and timeouts
    are transient; anything else (a bug, a corrupt file) is not.
    """
    if isinstance(exc, DeliveryError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError, OSError))


# --- spool -------------------------------------------------------------------


class SpoolError(MailspoolError, OSError):
    """The spool could not be written or read."""


class SpoolCorrupt(SpoolError):
    """A spool file is truncated, corrupt or not a regular file.

    ``path`` is the file; ``reason`` what is wrong with it.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")
