"""What a mailer reports: one SMTP reply, and what became of a message per recipient.

Every mailer (SMTP, sendmail, in memory) returns a :class:`SendResult`, and
the queue processor settles each recipient of a spooled message from it.
These small immutable values live apart from the SMTP code so that the other
mailers, the processor and an application's tests need not import it.

:func:`all_refused` builds the one error raised when no recipient was
accepted, so that every mailer raises it the same way; :func:`with_result`
gives an error raised after ``RCPT`` (``DATA`` refused, the session lost
during the data) the outcome of each recipient, so that the refusal is
applied to the recipients it answered for and to no other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from mailspool.errors import DeliveryError, RecipientsRefused, enhanced_code, error_for_reply
from mailspool.message import MessageInput

__all__ = ["MessageInput", "Reply", "SendResult", "all_refused", "with_result"]


@dataclass(frozen=True)
class Reply:
    """One SMTP reply.

    Attributes:
        code: the three-digit reply code.
        text: the reply text (lines of a multi-line reply joined by ``\\n``).
    """

    code: int
    text: str

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code (``"5.1.1"``) or ``None``."""
        return enhanced_code(self.text)

    @property
    def transient(self) -> bool:
        """True for a 4xx reply: trying again later may succeed."""
        return 400 <= self.code < 500

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True)
class SendResult:
    """What became of one message, recipient by recipient.

    Attributes:
        accepted: the recipients the relay took (2xx at ``RCPT`` and a 2xx
            reply after the data).
        refused: recipient -> :class:`Reply` for every recipient refused at
            ``RCPT``, 4xx and 5xx alike.  A 552 there is recorded as 452
            (RFC 5321 4.5.3.1.10: too many recipients, try the rest later).
        reply: the reply after the final dot; ``None`` when no data was sent.
            In the ``.result`` of an error raised at or after ``DATA``
            (:func:`with_result`): the reply that refused the message
            (``DATA`` or the final dot), ``None`` when the session failed
            without one.
    """

    accepted: tuple[str, ...]
    refused: Mapping[str, Reply] = field(default_factory=lambda: MappingProxyType({}))
    reply: Reply | None = None


def all_refused(recipients: Sequence[str], refused: Mapping[str, Reply]) -> DeliveryError:
    """The error for a message whose every recipient was refused at ``RCPT``.

    Args:
        recipients: the envelope recipients, in order.
        refused: recipient -> :class:`Reply`, one for each of ``recipients``.

    Returns:
        A :class:`~mailspool.errors.RecipientsRefused` carrying a
        :class:`SendResult` with every reply (transient when any refusal was
        a 4xx); but when a refusal is about the relay or our configuration
        (a 530 "authentication required" answered to each ``RCPT``), that
        error instead, so that the processor pauses rather than fails.
    """
    errors = {
        rcpt: error_for_reply(reply.code, reply.text, recipient=rcpt, phase="rcpt")
        for rcpt, reply in refused.items()
    }
    for error in errors.values():
        if error.about_relay:
            return error
    n = len(refused)
    text = "; ".join(f"{rcpt}: {reply}" for rcpt, reply in refused.items())
    single = next(iter(refused.values())) if n == 1 else None
    return RecipientsRefused(
        f"{'the recipient was' if n == 1 else f'all {n} recipients were'} refused: {text}",
        result=SendResult((), MappingProxyType(dict(refused)), None),
        transient=any(e.transient for e in errors.values()),
        code=single.code if single else None,
        recipient=recipients[0] if n == 1 and recipients else None,
    )


def with_result(
    error: DeliveryError,
    recipients: Sequence[str],
    accepted: Sequence[str],
    refused: Mapping[str, Reply],
) -> DeliveryError:
    """Give an error raised at or after ``DATA`` the outcome of each recipient.

    Only the recipients accepted at ``RCPT`` were in the transaction that
    ``DATA`` began, so a refusal there (or after the final dot) answers for
    them alone; a recipient refused at ``RCPT`` (greylisted with a 450, say)
    keeps its own reply and must not be failed by a 554 given to the others.

    Args:
        error: the classified error; it gets a ``result`` attribute (a
            :class:`SendResult`; the same one ``RecipientsRefused`` has).
        recipients: the envelope recipients, in order.
        accepted: the recipients accepted at ``RCPT``.
        refused: recipient -> :class:`Reply` of each refusal at ``RCPT``.

    Returns:
        ``error``, whose ``result`` has ``accepted=()``; in ``refused`` every
        recipient accepted at ``RCPT`` with the error's reply (none when the
        error carries no reply code, e.g. the connection was lost: the error
        itself then applies to them), and every ``RCPT`` refusal with its
        own reply, in envelope order; ``reply`` the error's reply or ``None``.
    """
    reply = Reply(error.code, error.text) if error.code is not None else None
    taken = set(accepted)
    outcome: dict[str, Reply] = {}
    for rcpt in recipients:
        if rcpt in refused:
            outcome[rcpt] = refused[rcpt]
        elif rcpt in taken and reply is not None:
            outcome[rcpt] = reply
    # DeliveryError.result, as RecipientsRefused's: every recipient's reply.
    error.result = SendResult((), MappingProxyType(outcome), reply)
    return error
