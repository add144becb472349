"""A mailer for an application's tests: nothing is sent, everything is kept.

``config.include("mailspool.integrations.pyramid.testing")`` registers a
:class:`DummyMailer` instead of the real one; ``request.mailer`` and
``get_mailer(request)`` return it.  As pyramid_mailer's, it keeps what
``send``, ``send_immediately`` and the sendmail variants are given in
``outbox`` and what ``send_to_queue`` is given in ``queue``, at once, with
no transaction.  Each message is validated (and its email built) as the
real mailer would, so a message without a recipient fails here too.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from mailspool.integrations.pyramid import set_mailer
from mailspool.integrations.pyramid.mailer import IPyramidMailer
from mailspool.integrations.pyramid.message import Message

__all__ = ["DummyMailer", "includeme"]


@implementer(IPyramidMailer)
class DummyMailer:
    """Keeps messages in ``outbox`` (sent) and ``queue`` (queued)."""

    def __init__(self, default_sender: str | None = None) -> None:
        self.outbox: list[Message] = []
        self.queue: list[Message] = []
        self.default_sender = default_sender

    def bind(self, **kwargs: Any) -> DummyMailer:
        """This mailer (the same outbox), whatever the options."""
        return self

    def _keep(self, box: list[Message], message: Message) -> None:
        message.sender = message.sender or self.default_sender
        message.to_message()  # validates: bad input fails as it would for real
        box.append(message)

    def send(self, message: Message) -> None:
        """Keep ``message`` in ``outbox``."""
        self._keep(self.outbox, message)

    def send_immediately(self, message: Message, fail_silently: bool = False) -> None:
        """Keep ``message`` in ``outbox``."""
        self._keep(self.outbox, message)

    def send_to_queue(self, message: Message) -> None:
        """Keep ``message`` in ``queue``."""
        self._keep(self.queue, message)

    send_sendmail = send
    send_immediately_sendmail = send_immediately


def includeme(config: Any) -> None:
    """Register a :class:`DummyMailer` (``mail.default_sender`` is honoured)."""
    settings = config.registry.settings or {}
    set_mailer(config, DummyMailer(settings.get("mail.default_sender") or None))
