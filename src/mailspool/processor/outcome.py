"""What one delivery attempt means for each recipient, and how it is told.

The relay answers per recipient, so a message's fate is decided per
recipient too: :func:`classify` sorts the recipients still pending into
sent, failed and deferred from what the mailer returned or raised, and
:meth:`Verdict.expired` turns the deferred ones into failures once the
message is too old.  :func:`report` then builds the single log line and
the events that tell the world, :class:`Done` is what became of one
message, and :class:`Summary` counts what a pass did.  All of it is pure:
values in, values out; the spool and the relay stay in
:mod:`mailspool.processor.sender`.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from mailspool.errors import (
    ConnectionFailed,
    DeliveryError,
    SMTPTimeout,
    is_transient,
    rate_refusal,
)
from mailspool.events import MailDeferred, MailEvent, MailFailed, MailSent
from mailspool.smtp.mailer import Reply, SendResult

__all__ = [
    "NOTHING",
    "Done",
    "Reason",
    "Report",
    "Summary",
    "Verdict",
    "classify",
    "human",
    "one_line",
    "per_second",
    "report",
    "too_fast",
    "trouble_kind",
    "when",
]

#: A recipient's failure: the relay's code (None when there was no reply) and text.
Reason = tuple[int | None, str]

_REPLY_MAX = 300  # characters of a relay reply in a log line
_NO_REPLY: Reason = (None, "the relay gave no reply for this recipient")


@dataclass(frozen=True)
class Verdict:
    """One attempt's outcome per recipient, before it is written to the spool.

    Attributes:
        sent: accepted recipients, in envelope order; never sent to again.
        failed: recipient -> reason, for good.
        deferred: recipient -> reason, to be tried again.
    """

    sent: tuple[str, ...] = ()
    failed: Mapping[str, Reason] = field(default_factory=lambda: MappingProxyType({}))
    deferred: Mapping[str, Reason] = field(default_factory=lambda: MappingProxyType({}))

    def expired(self, give_up_after: float) -> Verdict:
        """The same verdict with every deferred recipient failed as expired.

        Args:
            give_up_after: the give-up time in seconds, for the reason text.
        """
        limit = human(give_up_after)
        failed = dict(self.failed)
        for addr, (code, text) in self.deferred.items():
            failed[addr] = (code, f"expired: not delivered within {limit}; last: {text}")
        return Verdict(self.sent, MappingProxyType(failed), MappingProxyType({}))


#: The phases of a mail transaction (``DeliveryError.phase``).
_TRANSACTION = frozenset({"mail", "rcpt", "data"})


def too_fast(exc: BaseException) -> bool:
    """True when ``exc`` is the relay saying "too fast" at ``MAIL FROM``
    (:func:`~mailspool.errors.rate_refusal` tells which replies are)."""
    if getattr(exc, "phase", "") != "mail":
        return False
    code = getattr(exc, "code", None)
    enhanced = getattr(exc, "enhanced", None)
    return rate_refusal(
        code if isinstance(code, int) else None,
        str(enhanced) if enhanced else None,
        str(getattr(exc, "text", "") or ""),
    )


def trouble_kind(exc: BaseException) -> str:
    """Whose trouble a failed attempt is, by the phase and the evidence.

    Returns:
        ``"rate"``: the relay said "too fast" (:func:`too_fast`): slow down,
        the message goes back untouched.  ``"relay"``: the session could not
        be opened or used at all (connect, greeting, EHLO, STARTTLS, AUTH,
        or a refusal about our configuration such as 530): pause the relay.
        ``"session"``: the session broke in the transaction (connection
        lost, no reply, a timeout, a 421 after ``MAIL``): the message's bad
        luck unless the relay turns out to be gone, or it keeps happening.
        ``"message"``: a reply about this message (4xx or 5xx).
    """
    if too_fast(exc):
        return "rate"
    error = exc if isinstance(exc, DeliveryError) else None
    code = error.code if error is not None else None
    in_transaction = error is not None and code == 421 and error.phase in _TRANSACTION
    if error is not None and error.about_relay and not in_transaction:
        return "relay"
    if in_transaction or isinstance(exc, (ConnectionFailed, SMTPTimeout)):
        return "session"
    if isinstance(exc, OSError) and code is None:
        return "session"
    return "message"


def per_second(rate: float) -> str:
    """A rate as an operator reads it: ``40/s``, ``50/min``."""
    if rate >= 1:
        return f"{rate:.3g}/s"
    return f"{rate * 60:.3g}/min"


def classify(
    pending: Sequence[str], result: SendResult | None, exc: BaseException | None
) -> Verdict:
    """Sort the pending recipients by what the relay said.

    Args:
        pending: the recipients this attempt was for.
        result: what the mailer returned, or the ``.result`` an error
            carried: the refusals at RCPT when none was accepted; for an
            error at or after DATA, that refusal's reply for each recipient
            accepted at RCPT and the RCPT refusals with their own replies
            (:func:`~mailspool.result.with_result`), so a 554 to the data
            never fails a recipient greylisted at RCPT.
        exc: the error, if any.  It applies only to the recipients without
            a reply of their own (the session was lost, or a mailer raised
            without a ``.result``): failed or deferred as
            :func:`~mailspool.errors.is_transient` decides.

    Returns:
        The :class:`Verdict`: 2xx -> sent, 5xx -> failed, anything else
        (4xx, no reply) -> deferred.
    """
    default: Reason | None = None
    permanent = False
    if exc is not None:
        error = exc if isinstance(exc, DeliveryError) else None
        code = error.code if error is not None else None
        text = (error.text if error is not None else None) or str(exc) or type(exc).__name__
        default = (code, text)
        permanent = not is_transient(exc)
    accepted = set(result.accepted) if result is not None and exc is None else set()
    refused: Mapping[str, Reply] = result.refused if result is not None else {}
    sent: list[str] = []
    failed: dict[str, Reason] = {}
    deferred: dict[str, Reason] = {}
    for addr in pending:
        if addr in accepted:
            sent.append(addr)
        elif addr in refused:
            reply = refused[addr]
            (failed if 500 <= reply.code < 600 else deferred)[addr] = (reply.code, reply.text)
        elif default is not None:
            (failed if permanent else deferred)[addr] = default
        else:
            deferred[addr] = _NO_REPLY
    return Verdict(tuple(sent), MappingProxyType(failed), MappingProxyType(deferred))


class Report:
    """How an attempt is told: one log line at one level, and the events.

    The line is written out when first read (``str()`` of the report gives
    it too), so a logger that drops its level never pays for it.
    """

    __slots__ = ("_line", "_make", "events", "level")

    def __init__(self, level: int, line: Callable[[], str], events: tuple[MailEvent, ...]) -> None:
        self.level = level
        self.events = events
        self._make = line
        self._line: str | None = None

    @property
    def line(self) -> str:
        if self._line is None:
            self._line = self._make()
        return self._line

    def __str__(self) -> str:
        return self.line


def report(
    id: str,
    message_id: str | None,
    sender: str,
    verdict: Verdict,
    *,
    reply: Reply | None = None,
    error: BaseException | None = None,
    retry_at: float | None = None,
    attempt: int = 1,
) -> Report:
    """The log line and the events for a settled attempt.

    Args:
        id: the spool id.
        message_id: the Message-Id (a legacy file may have none).
        sender: the envelope sender.
        verdict: what happened to each recipient.
        reply: the relay's reply after the data, if it got that far.
        error: the error the attempt ended with, if any.
        retry_at: when the deferred recipients are tried again.
        attempt: which attempt this was (1 for the first).

    Returns:
        ERROR when a recipient failed, WARNING when one was deferred,
        INFO when all were sent; ``MailSent``, ``MailFailed`` and
        ``MailDeferred`` events for the recipients each concerns.
    """
    parts: list[str] = []  # after the part for the sent ones
    events: list[MailEvent] = []
    if verdict.sent:
        events.append(MailSent(message_id, sender, verdict.sent, reply=reply))
    if verdict.failed:
        text = "; ".join(f"{a}: {_reason(r)}" for a, r in verdict.failed.items())
        parts.append(f"failed for {text}")
        reasons = dict(verdict.failed)
        events.append(
            MailFailed(message_id, sender, tuple(reasons), text, error=error, reasons=reasons)
        )
    if verdict.deferred:
        text = "; ".join(f"{a}: {_reason(r)}" for a, r in verdict.deferred.items())
        until = f"until {when(retry_at)} " if retry_at is not None else ""
        parts.append(f"deferred {until}(attempt {attempt}) for {text}")
        events.append(
            MailDeferred(
                message_id, sender, tuple(verdict.deferred), text, retry_at=retry_at, error=error
            )
        )
    level = (
        logging.ERROR if verdict.failed else logging.WARNING if verdict.deferred else logging.INFO
    )

    def line() -> str:
        told = parts
        if verdict.sent:
            shown = f" ({one_line(str(reply))})" if reply is not None else ""
            told = [f"sent to {', '.join(verdict.sent)}{shown}", *parts]
        return f"mail {id} <{message_id or ''}> from {sender}: {'; '.join(told)}"

    return Report(level, line, tuple(events))


@dataclass(frozen=True)
class Done:
    """What became of one message, and the events to dispatch for it.

    ``outcome`` is ``"sent"``, ``"deferred"``, ``"failed"``,
    ``"quarantined"``, or None when nothing was attempted (taken by someone
    else, relay paused, stopping) and the message stays where it was, or
    when its outcome is waiting to be written (the spool is full).
    """

    outcome: str | None
    events: tuple[MailEvent, ...] = ()
    #: Not attempted, but to be tried again in this pass (the relay said
    #: "too fast", or refused one connection more than it takes).
    again: bool = False
    #: deferred or failed, but some recipients accepted it in this attempt
    partly: bool = False
    #: deferred after a one-off fault: to be tried again in this pass, this
    #: many seconds from now (None: by a later pass, when it is due)
    retry_in: float | None = None
    #: that fault lost the reply after the final dot (it may have been sent)
    lost: bool = False


#: Nothing attempted, nothing to dispatch: one shared instance (a frozen
#: dataclass costs a call per field to make, and this one is made often).
NOTHING = Done(None)


@dataclass(frozen=True)
class Summary:
    """What one pass (or a whole drain) did, counted in messages.

    ``sent``: every recipient accepted, the message left the queue;
    ``deferred``: some recipient is waiting for a retry; ``failed``: none
    pending and some failed (the message is in the failed area);
    ``quarantined``: unreadable files moved aside.  ``relay_paused``: the
    relay was unavailable at the end; nothing was failed for it.
    ``unwritten``: outcomes the spool could not record yet (it is full), kept
    claimed and written again on the next pass.
    ``partly``: of the deferred and failed, the messages that some of
    their recipients accepted in that attempt (partly delivered); a detail
    of those two counts, left out when summaries are compared.
    ``a + b`` adds the counts and keeps ``b``'s ``relay_paused`` and
    ``unwritten`` (the later state).
    """

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    quarantined: int = 0
    relay_paused: bool = False
    unwritten: int = 0
    partly: int = field(default=0, compare=False)

    @property
    def total(self) -> int:
        """How many messages were settled or quarantined."""
        return self.sent + self.deferred + self.failed + self.quarantined

    def __add__(self, other: Summary) -> Summary:
        return Summary(
            self.sent + other.sent,
            self.deferred + other.deferred,
            self.failed + other.failed,
            self.quarantined + other.quarantined,
            other.relay_paused,
            other.unwritten,
            self.partly + other.partly,
        )


def one_line(text: str) -> str:
    """``text`` on one line (lines joined with `` / ``), at most 300 characters."""
    text = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= _REPLY_MAX else text[: _REPLY_MAX - 3] + "..."


def _reason(r: Reason) -> str:
    return one_line(f"{r[0]} {r[1]}" if r[0] is not None else r[1])


def human(seconds: float) -> str:
    """A duration as an operator writes it: ``5d``, ``1h``, ``30s``."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def when(t: float) -> str:
    """A ``time.time()`` value as a UTC timestamp for a log line."""
    try:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%SZ"
        )
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f}"
