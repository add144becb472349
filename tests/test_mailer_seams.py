"""The typed seams between mailers and their callers (mailspool.smtp.seams).

mailspool's mailers have the capabilities the deliveries and the processor
look for; a classic mailer with nothing but zope.sendmail's ``send()``
(returning ``None``) still works with both, its recipients counted as taken.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import transaction
import zope.event

from conftest import Relay
from mailspool import DirectMailDelivery, QueuedMailDelivery, QueueProcessor, SMTPMailer, Summary
from mailspool.events import MailSent
from mailspool.maildir.spool import Spool
from mailspool.processor.pool import MailerConnection, connect, relay_name
from mailspool.smtp.mailer import SendmailMailer
from mailspool.smtp.seams import (
    AbortingMailer,
    ConnectingMailer,
    Connection,
    EnvelopeMailer,
    Mailer,
    RelayAddress,
    TimedConnection,
    VotingMailer,
)
from mailspool.testing import InMemoryMailer

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


class ClassicMailer:
    """zope.sendmail's IMailer at its smallest: send() and nothing else."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[str], bytes]] = []

    def send(self, fromaddr: str, toaddrs: Sequence[str], message: bytes) -> None:
        self.sent.append((fromaddr, list(toaddrs), message))


@pytest.fixture
def events() -> Iterator[list[object]]:
    seen: list[object] = []
    zope.event.subscribers.append(seen.append)
    try:
        yield seen
    finally:
        zope.event.subscribers.remove(seen.append)


def test_each_mailer_has_the_capabilities_it_claims(relay: Relay) -> None:
    smtp = SMTPMailer(**relay.mailer_kwargs())
    every = (Mailer, EnvelopeMailer, ConnectingMailer, VotingMailer, AbortingMailer)
    assert all(isinstance(smtp, kind) for kind in every)
    assert isinstance(smtp, RelayAddress) and relay_name(smtp) == f"127.0.0.1:{relay.port}"
    with smtp.connect() as conn:
        assert isinstance(conn, Connection) and isinstance(conn, TimedConnection)
    sendmail = SendmailMailer("/usr/sbin/sendmail")
    assert isinstance(sendmail, EnvelopeMailer) and isinstance(sendmail, VotingMailer)
    assert not isinstance(sendmail, ConnectingMailer) and not isinstance(sendmail, RelayAddress)
    assert relay_name(sendmail) == "SendmailMailer"
    memory = InMemoryMailer()
    assert isinstance(memory, ConnectingMailer) and isinstance(connect(memory), Connection)
    classic = ClassicMailer()
    assert isinstance(classic, Mailer)
    assert not any(
        isinstance(classic, kind)
        for kind in (EnvelopeMailer, ConnectingMailer, VotingMailer, AbortingMailer)
    )
    assert isinstance(connect(classic), MailerConnection)


def test_a_processor_delivers_through_a_classic_mailer(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with transaction.manager:
        QueuedMailDelivery(spool).send(
            "app@example.org", ["a@example.org", "b@example.org"], MESSAGE
        )
    mailer = ClassicMailer()
    with QueueProcessor(spool, mailer, watch=False) as p:
        assert p.drain() == Summary(sent=1)
    [(sender, rcpts, data)] = mailer.sent
    assert (sender, rcpts) == ("app@example.org", ["a@example.org", "b@example.org"])
    assert data.endswith(b"\r\nhello\r\n")
    assert list(spool.entries()) == []


def test_a_direct_delivery_through_a_classic_mailer_tells_every_recipient_sent(
    events: list[object],
) -> None:
    mailer = ClassicMailer()
    delivery = DirectMailDelivery(mailer)
    with transaction.manager:
        mid = delivery.send("app@example.org", ["a@example.org", "b@example.org"], MESSAGE)
    assert len(mailer.sent) == 1
    [sent] = [e for e in events if isinstance(e, MailSent)]
    assert sent.messageId == mid and sent.toaddrs == ("a@example.org", "b@example.org")


def test_a_direct_delivery_refuses_what_cannot_send() -> None:
    with pytest.raises(TypeError, match="mailer must provide IMailer"):
        DirectMailDelivery(object())  # type: ignore[arg-type]
