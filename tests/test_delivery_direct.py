"""DirectMailDelivery against a real relay on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import transaction
import zope.event
from zope.interface.verify import verifyObject

from mailspool import DirectMailDelivery, SMTPMailer
from mailspool.errors import DeliveryError, InvalidAddress
from mailspool.events import MailEvent, MailFailed, MailSent
from mailspool.interfaces import IDirectMailDelivery

MSG = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: direct\r\n\r\nhello\r\n"


@pytest.fixture
def tm() -> transaction.TransactionManager:
    return transaction.TransactionManager()


@pytest.fixture
def events() -> Any:
    seen: list[MailEvent] = []

    def subscriber(event: object) -> None:
        if isinstance(event, MailEvent):
            seen.append(event)

    zope.event.subscribers.append(subscriber)
    yield seen
    zope.event.subscribers.remove(subscriber)


def test_provides_the_classic_interface(relay: Any, tm: Any) -> None:
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    assert verifyObject(IDirectMailDelivery, d)


def test_commit_sends_and_abort_does_not(relay: Any, tm: Any, events: list[MailEvent]) -> None:
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    tm.begin()
    d.send("a@example.org", ["b@example.org"], MSG)
    tm.abort()
    assert relay.messages == []
    tm.begin()
    mid = d.send("a@example.org", ["b@example.org", "c@example.org"], MSG)
    assert relay.messages == []  # nothing before the commit
    tm.commit()
    assert len(relay.messages) == 1
    assert relay.messages[0].rcpt_tos == ["b@example.org", "c@example.org"]
    assert f"<{mid}>".encode() in relay.messages[0].content
    assert [type(e) for e in events] == [MailSent]
    assert events[0].message_id == mid
    assert events[0].toaddrs == ("b@example.org", "c@example.org")


def test_savepoint_rollback_drops_later_messages(relay: Any, tm: Any) -> None:
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    txn = tm.begin()
    d.send("a@example.org", ["first@example.org"], MSG)
    sp = txn.savepoint()
    d.send("a@example.org", ["second@example.org"], MSG)
    sp.rollback()
    tm.commit()
    assert [m.rcpt_tos for m in relay.messages] == [["first@example.org"]]


def test_unreachable_relay_aborts_the_transaction_at_vote(tm: Any, events: list[Any]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    mailer = SMTPMailer("127.0.0.1", port, tls="none", connect_timeout=2.0)
    d = DirectMailDelivery(mailer, transaction_manager=tm)
    tm.begin()
    d.send("a@example.org", ["b@example.org"], MSG)
    with pytest.raises(DeliveryError):
        tm.commit()
    tm.abort()
    assert events == []


def test_a_refusal_after_vote_never_raises_out_of_commit(
    smtp_relay: Any, tm: Any, events: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    class RefuseData:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "554 5.6.0 content rejected"

    relay = smtp_relay(RefuseData())
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    tm.begin()
    mid = d.send("a@example.org", ["b@example.org"], MSG)
    tm.commit()  # must not raise
    assert relay.messages == []
    assert len(events) == 1
    (event,) = events
    assert isinstance(event, MailFailed)
    assert event.message_id == mid
    assert "content rejected" in event.errorMessage
    assert mid in caplog.text


def test_partial_refusal_reports_both(smtp_relay: Any, tm: Any, events: list[Any]) -> None:
    class RefuseOne:
        async def handle_RCPT(
            self, server: Any, session: Any, envelope: Any, address: str, options: Any
        ) -> str:
            if address.startswith("nobody"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    relay = smtp_relay(RefuseOne())
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    tm.begin()
    d.send("a@example.org", ["b@example.org", "nobody@example.org"], MSG)
    tm.commit()
    assert relay.messages[0].rcpt_tos == ["b@example.org"]
    sent = [e for e in events if isinstance(e, MailSent)]
    failed = [e for e in events if isinstance(e, MailFailed)]
    assert sent[0].toaddrs == ("b@example.org",)
    assert failed[0].toaddrs == ("nobody@example.org",)
    assert failed[0].reasons["nobody@example.org"][0] == 550


def test_bad_input_raises_at_send(relay: Any, tm: Any) -> None:
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    tm.begin()
    with pytest.raises(InvalidAddress, match=r"b@x\.org\\nBcc"):
        d.send("a@example.org", ["b@x.org\nBcc: all@x.org"], MSG)
    tm.commit()
    assert relay.messages == []


def test_subscriber_can_commit_its_own_transaction(relay: Any) -> None:
    d = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()))
    done: list[str] = []

    def subscriber(event: object) -> None:
        if isinstance(event, MailSent) and not done:
            with transaction.manager:
                done.append(d.send("a@example.org", ["audit@example.org"], MSG))

    zope.event.subscribers.append(subscriber)
    try:
        with transaction.manager:
            d.send("a@example.org", ["b@example.org"], MSG)
    finally:
        zope.event.subscribers.remove(subscriber)
    assert [m.rcpt_tos for m in relay.messages] == [["b@example.org"], ["audit@example.org"]]


def test_forgotten_commit_is_warned_about_at_exit(tmp_path: Any) -> None:
    script = textwrap.dedent(
        f"""
        import logging
        logging.basicConfig(level=logging.WARNING)
        from mailspool import QueuedMailDelivery
        d = QueuedMailDelivery({str(tmp_path / "spool")!r})
        d.send("a@example.org", ["b@example.org"], b"Subject: x\\r\\n\\r\\nforgotten\\r\\n")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "never ended" in proc.stderr
    assert "commit() was not called" in proc.stderr
    assert list((tmp_path / "spool" / "new").iterdir()) == []


def test_a_mailer_with_only_send_is_used_through_send(tm: Any, events: list[Any]) -> None:
    class SendOnly:
        """The classic IMailer: send(fromaddr, toaddrs, message) and nothing else."""

        def __init__(self) -> None:
            self.calls: list[tuple[str, tuple[str, ...], bytes]] = []

        def send(self, fromaddr: str, toaddrs: Any, message: bytes) -> None:
            self.calls.append((fromaddr, tuple(toaddrs), message))

    mailer = SendOnly()
    d = DirectMailDelivery(mailer, transaction_manager=tm)
    tm.begin()
    mid = d.send("a@example.org", ["b@example.org"], MSG)
    tm.commit()
    [(fromaddr, toaddrs, data)] = mailer.calls
    assert (fromaddr, toaddrs) == ("a@example.org", ("b@example.org",))
    assert f"<{mid}>".encode() in data
    assert [type(e) for e in events] == [MailSent]
