"""mailspool.testing: the in-memory mailer applications use in their own tests."""

from __future__ import annotations

import pytest
import transaction
from zope.interface.verify import verifyObject

from mailspool import DirectMailDelivery
from mailspool.errors import (
    AuthenticationError,
    InvalidAddress,
    PermanentError,
    RecipientsRefused,
    TransientError,
)
from mailspool.interfaces import IMailer
from mailspool.message import make_envelope
from mailspool.smtp.mailer import Reply
from mailspool.testing import InMemoryMailer, Outbox, SentMessage

MSG = "Message-Id: <abc.123@example.org>\nSubject: Welcome\n\nHello,\nworld.\n"


def test_records_what_would_have_been_sent() -> None:
    mailer = InMemoryMailer()
    assert verifyObject(IMailer, mailer)
    result = mailer.send("Me <me@example.org>", ["a@example.org", "b@example.org"], MSG)
    assert result.accepted == ("a@example.org", "b@example.org")
    assert dict(result.refused) == {} and result.reply == Reply(250, "2.0.0 OK (in memory)")
    [sent] = mailer.outbox
    assert isinstance(sent, SentMessage)
    assert sent.sender == "me@example.org"
    assert sent.recipients == ("a@example.org", "b@example.org")
    assert sent.message_id == "abc.123@example.org"
    assert sent.data.count(b"\n") == sent.data.count(b"\r\n")  # as it would go on the wire
    assert sent.message["Subject"] == "Welcome"
    assert sent.message.get_content() == "Hello,\nworld.\n"
    assert mailer.outbox.to("b@example.org") == [sent]
    assert mailer.outbox.to("c@example.org") == []


def test_validates_input_like_the_real_mailers() -> None:
    mailer = InMemoryMailer()
    with pytest.raises(InvalidAddress):
        mailer.send("me@example.org", ["a@example.org\nBcc: x@y.org"], MSG)
    with pytest.raises(InvalidAddress):
        mailer.vote("me@example.org", [], MSG)
    assert mailer.outbox == []


def test_message_without_message_id() -> None:
    mailer = InMemoryMailer()
    mailer.send("me@example.org", ["a@example.org"], b"Subject: x\r\n\r\nbody\r\n")
    assert mailer.outbox[0].message_id is None


def test_fail_next_raises_then_recovers() -> None:
    mailer = InMemoryMailer()
    mailer.fail_next(times=2)
    for _ in range(2):
        with pytest.raises(TransientError) as info:
            mailer.send("me@example.org", ["a@example.org"], MSG)
        assert info.value.code == 451
    mailer.send("me@example.org", ["a@example.org"], MSG)
    assert len(mailer.outbox) == 1


def test_fail_next_with_a_given_error_and_on_vote() -> None:
    mailer = InMemoryMailer()
    boom = PermanentError("5.7.1 policy", code=554)
    mailer.fail_next(boom, on="vote")
    with pytest.raises(PermanentError) as info:
        mailer.vote("me@example.org", ["a@example.org"], MSG)
    assert info.value is boom
    mailer.vote("me@example.org", ["a@example.org"], MSG)
    mailer.abort()
    assert (mailer.votes, mailer.aborts) == (2, 1)
    with pytest.raises(ValueError):
        mailer.fail_next(on="commit")  # type: ignore[arg-type]


def test_refused_recipients_are_reported_like_a_relay_would() -> None:
    mailer = InMemoryMailer()
    mailer.refuse("gone@example.org")
    mailer.refuse("busy@example.org", 450, "4.2.1 busy")
    result = mailer.send("me@example.org", ["ok@example.org", "gone@example.org"], MSG)
    assert result.accepted == ("ok@example.org",)
    assert dict(result.refused) == {"gone@example.org": Reply(550, "5.1.1 mailbox unavailable")}
    assert mailer.outbox[0].recipients == ("ok@example.org",)
    with pytest.raises(RecipientsRefused) as info:
        mailer.send("me@example.org", ["gone@example.org", "busy@example.org"], MSG)
    assert info.value.transient  # one of them was a 4xx
    assert set(info.value.result.refused) == {"gone@example.org", "busy@example.org"}
    assert len(mailer.outbox) == 1


def test_reset_forgets_everything() -> None:
    mailer = InMemoryMailer()
    mailer.refuse("gone@example.org")
    mailer.fail_next()
    mailer.vote("me@example.org", ["a@example.org"], MSG)
    mailer.reset()
    mailer.send("me@example.org", ["gone@example.org"], MSG)
    assert len(mailer.outbox) == 1 and mailer.votes == 0


def test_connection_shaped_fast_path_and_shared_outbox() -> None:
    outbox = Outbox()
    mailer = InMemoryMailer(outbox)
    envelope = make_envelope("me@example.org", ["a@example.org"])
    with mailer.connect() as conn:
        assert conn.alive
        conn.send(envelope, b"Subject: x\nbare lf\n")
        assert conn.transactions == 1
    assert not conn.alive
    with pytest.raises(ValueError):
        conn.send(envelope, b"x\r\n")
    assert outbox[0].data == b"Subject: x\r\nbare lf\r\n"


def test_works_as_the_mailer_of_a_direct_delivery() -> None:
    mailer = InMemoryMailer()
    manager = transaction.TransactionManager(explicit=True)
    delivery = DirectMailDelivery(mailer, transaction_manager=manager)
    with manager:
        message_id = delivery.send("me@example.org", ["a@example.org"], "Subject: hi\n\nhello\n")
        assert mailer.outbox == []  # nothing before the commit
    assert [sent.message_id for sent in mailer.outbox] == [message_id]
    assert mailer.votes == 1
    manager.begin()
    delivery.send("me@example.org", ["a@example.org"], "Subject: no\n\nno\n")
    manager.abort()
    assert len(mailer.outbox) == 1


def test_refusals_are_raised_as_smtp_mailer_raises_them() -> None:
    mailer = InMemoryMailer()
    mailer.refuse("crowd@example.org", 552, "5.5.3 too many recipients")
    mailer.refuse("gate@example.org", 530, "5.7.0 authentication required")
    # 552 at RCPT counts as 452 (RFC 5321 4.5.3.1.10), as SMTPMailer records it.
    result = mailer.send("me@example.org", ["ok@example.org", "crowd@example.org"], MSG)
    assert result.refused["crowd@example.org"] == Reply(452, "5.5.3 too many recipients")
    with pytest.raises(RecipientsRefused) as refused:
        mailer.send("me@example.org", ["crowd@example.org"], MSG)
    assert refused.value.transient and refused.value.code == 452
    assert refused.value.recipient == "crowd@example.org"
    # A refusal about the relay itself is raised as such, not as refused recipients.
    with pytest.raises(AuthenticationError) as info:
        mailer.send("me@example.org", ["gate@example.org"], MSG)
    assert info.value.about_relay


def test_connection_send_takes_smtp_connections_keywords() -> None:
    mailer = InMemoryMailer()
    envelope = make_envelope("me@example.org", ["a@example.org"])
    with mailer.connect() as conn:
        conn.send(envelope, MSG, retry_stale=False)
    assert len(mailer.outbox) == 1
