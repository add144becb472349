"""What a mailer reports: one SMTP reply, and what became of a message per recipient.

Every mailer (SMTP, sendmail, in memory) returns a :class:`SendResult`, and
the queue processor settles each recipient of a spooled message from it.
These small immutable values live apart from the SMTP code so that the other
mailers, the processor and an application's tests need not import it.

:func:`all_refused` builds the one error raised when no recipient was
accepted, so that every mailer raises it the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from types import MappingProxyType

from mailspool.errors import DeliveryError, RecipientsRefused, enhanced_code, error_for_reply

__all__ = ["MessageInput", "Reply", "SendResult", "all_refused"]

#: What ``send()`` accepts as a message.
MessageInput = bytes | str | Message


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
