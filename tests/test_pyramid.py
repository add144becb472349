"""Pyramid: a real app with pyramid_tm, driven by WebTest, mailing to a real relay."""

from __future__ import annotations

import email
import email.policy
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response
from webtest import TestApp

from _relays import wait_for
from mailspool import QueueProcessor
from mailspool.errors import InvalidMessage, RelayUnavailable
from mailspool.integrations.pyramid import Attachment, Mailer, Message, get_mailer

SENDER = "shop@example.org"


class Boom(Exception):
    pass


def _message(request: Any) -> Message:
    return Message(subject="Your order", recipients=["jane@example.org"], body="Thanks!")


def queue(request: Any) -> Response:
    request.mailer.send_to_queue(_message(request))
    return Response("queued")


def queue_then_fail(request: Any) -> Response:
    request.mailer.send_to_queue(_message(request))
    raise Boom("after send_to_queue")


def direct(request: Any) -> Response:
    get_mailer(request).send(_message(request))
    return Response("sent at commit")


def direct_then_fail(request: Any) -> Response:
    request.mailer.send(_message(request))
    raise Boom("after send")


def immediately_then_fail(request: Any) -> Response:
    request.mailer.send_immediately(_message(request))
    raise Boom("after send_immediately")


def rich(request: Any) -> Response:
    message = Message(
        subject="Invoice",
        recipients=["jane@example.org"],
        cc=["accounts@example.org"],
        bcc=["archive@example.org"],
        body="Your invoice is attached.",
        html="<p>Your invoice is <b>attached</b>.</p>",
        extra_headers={"X-Order": "42"},
        attachments=[Attachment("invoice.pdf", data=b"%PDF-1.4 fake")],
    )
    request.mailer.send_to_queue(message)
    return Response("queued")


def failed(exc: Boom, request: Any) -> Response:
    return Response("failed", status=500)


VIEWS: dict[str, Callable[[Any], Response]] = {
    f.__name__: f
    for f in (queue, queue_then_fail, direct, direct_then_fail, immediately_then_fail, rich)
}

AppFactory = Callable[..., tuple[TestApp, Any]]


@pytest.fixture
def make_app(relay: Any, tmp_path: Path) -> Iterator[AppFactory]:
    """A Pyramid app whose mailer reaches ``relay`` and queues into tmp_path/queue."""
    mailers: list[Any] = []

    def make(include: str = "mailspool.integrations.pyramid", **extra: str) -> tuple[TestApp, Any]:
        settings = {
            "mail.host": relay.host,
            "mail.port": str(relay.port),
            "mail.tls": "false",
            "mail.timeout": "5",
            "mail.queue_path": str(tmp_path / "queue"),
            "mail.default_sender": SENDER,
            **extra,
        }
        with Configurator(settings=settings) as config:
            config.include("pyramid_tm")
            config.include(include)
            for name, view in VIEWS.items():
                config.add_route(name, "/" + name)
                config.add_view(view, route_name=name)
            config.add_exception_view(failed, context=Boom)
            app = config.make_wsgi_app()
        mailer = get_mailer(app.registry)
        mailers.append(mailer)
        return TestApp(app), mailer

    yield make
    for mailer in mailers:
        thread = getattr(mailer, "processor_thread", None)
        if thread is not None:
            thread.stop()
        if hasattr(mailer, "smtp_mailer"):
            mailer.smtp_mailer.close()


def _queued(tmp_path: Path) -> list[str]:
    new = tmp_path / "queue" / "new"
    return os.listdir(new) if new.exists() else []


def _deliver(tmp_path: Path, mailer: Mailer) -> None:
    with QueueProcessor(tmp_path / "queue", mailer.smtp_mailer) as processor:
        processor.drain()


def test_a_view_that_succeeds_queues_and_the_processor_delivers(
    make_app: AppFactory, relay: Any, tmp_path: Path
) -> None:
    app, mailer = make_app()
    assert app.get("/queue").text == "queued"
    assert len(_queued(tmp_path)) == 1
    assert relay.messages == []
    _deliver(tmp_path, mailer)
    (received,) = relay.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER, ["jane@example.org"])
    assert b"Subject: Your order" in received.content


def test_a_view_that_raises_after_send_to_queue_queues_nothing(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, _ = make_app()
    app.get("/queue_then_fail", status=500)
    assert _queued(tmp_path) == []


def test_send_goes_to_the_relay_at_commit_and_not_on_failure(
    make_app: AppFactory, relay: Any
) -> None:
    app, _ = make_app()
    app.get("/direct_then_fail", status=500)
    assert relay.messages == []
    app.get("/direct")
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]


def test_send_immediately_does_not_wait_for_the_transaction(
    make_app: AppFactory, relay: Any
) -> None:
    app, _ = make_app()
    app.get("/immediately_then_fail", status=500)
    assert len(relay.messages) == 1


def test_html_cc_bcc_headers_and_attachments(
    make_app: AppFactory, relay: Any, tmp_path: Path
) -> None:
    app, mailer = make_app()
    app.get("/rich")
    _deliver(tmp_path, mailer)
    (received,) = relay.messages
    assert received.rcpt_tos == ["jane@example.org", "accounts@example.org", "archive@example.org"]
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert parsed["Cc"] == "accounts@example.org"
    assert parsed["Bcc"] is None
    assert parsed["X-Order"] == "42"
    assert parsed.get_content_type() == "multipart/mixed"
    text = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert text is not None and text.get_content().strip() == "Your invoice is attached."
    assert html is not None and "<b>attached</b>" in html.get_content()
    (attachment,) = parsed.iter_attachments()
    assert attachment.get_filename() == "invoice.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == b"%PDF-1.4 fake"


def test_the_processor_thread_of_the_app_delivers(make_app: AppFactory, relay: Any) -> None:
    app, mailer = make_app(**{"mail.queue_processor": "true"})
    assert mailer.processor_thread.is_alive()
    app.get("/queue")
    assert wait_for(lambda: len(relay.messages) == 1)


def test_the_testing_mailer_keeps_an_outbox(make_app: AppFactory, relay: Any) -> None:
    app, mailer = make_app("mailspool.integrations.pyramid.testing")
    app.get("/direct")
    app.get("/queue")
    assert [m.subject for m in mailer.outbox] == ["Your order"]
    assert [m.sender for m in mailer.queue] == [SENDER]
    assert relay.messages == []


def test_settings_and_the_secure_default() -> None:
    mailer = Mailer.from_settings({"mail.host": "mx.example.org", "mail.port": "587"})
    assert (mailer.smtp_mailer.host, mailer.smtp_mailer.port) == ("mx.example.org", 587)
    assert mailer.smtp_mailer.tls == "starttls"  # pyramid_mailer would have sent in clear text
    assert Mailer.from_settings({"mail.ssl": "true"}).smtp_mailer.tls == "implicit"
    assert Mailer.from_settings({"mail.ssl": "yes", "mail.tls": "false"}).smtp_mailer.port == 465
    assert Mailer.from_settings({"mail.tls": "none"}).smtp_mailer.tls == "none"
    custom = Mailer.from_settings({"shop.tls": "off"}, prefix="shop.")
    assert custom.smtp_mailer.tls == "none"
    empty_auth = Mailer.from_settings({"mail.username": "", "mail.password": ""})
    assert empty_auth.smtp_mailer.username is None


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"mail.tls": "maybe"}, "mail.tls must be true or false, starttls, implicit or none"),
        ({"mail.port": "smtp"}, "mail.port must be a number; got 'smtp'"),
        ({"mail.sendmail_template": "x"}, "mail.sendmail_template is not supported"),
        ({"mail.queue_processor": "true"}, "queue_processor needs queue_path"),
        ({"mail.tls": "false", "mail.username": "u", "mail.password": "p"}, "clear text"),
    ],
)
def test_bad_settings_are_named(settings: dict[str, str], error: str) -> None:
    with Configurator(settings=settings) as config, pytest.raises(ConfigurationError, match=error):
        config.include("mailspool.integrations.pyramid")


def test_a_message_that_cannot_be_sent_fails_in_the_view() -> None:
    mailer = Mailer(tls=False, default_sender=SENDER)
    with pytest.raises(InvalidMessage, match="no recipients"):
        mailer.send(Message(subject="x", body="y"))
    with pytest.raises(InvalidMessage, match="line break in the Subject"):
        mailer.send(
            Message(subject="x\nBcc: evil@example.org", recipients=["a@example.org"], body="y")
        )
    with pytest.raises(InvalidMessage, match="body or html"):
        mailer.send(Message(subject="x", recipients=["a@example.org"]))
    with pytest.raises(RuntimeError, match=r"mail\.queue_path"):
        mailer.send_to_queue(Message(recipients=["a@example.org"], body="y"))
    transaction.abort()


def test_send_immediately_fail_silently_when_the_relay_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mailer = Mailer(host="127.0.0.1", port=port, tls=False, timeout=5, default_sender=SENDER)
    message = Message(subject="x", recipients=["jane@example.org"], body="y")
    with pytest.raises(RelayUnavailable):
        mailer.send_immediately(message)
    assert mailer.send_immediately(message, fail_silently=True) is None
    assert "mail to jane@example.org not sent" in caplog.text


def test_send_to_queue_takes_a_priority(tmp_path: Path) -> None:
    mailer = Mailer(queue_path=tmp_path / "queue")
    message = Message(
        subject="News", sender=SENDER, recipients=["jane@example.org"], body="This week"
    )
    with transaction.manager:
        mailer.send_to_queue(message, priority="bulk")
    with pytest.raises(ValueError, match="priority 'soon' is not one of"):
        mailer.send_to_queue(message, priority="soon")
    transaction.abort()
    assert len(os.listdir(tmp_path / "queue" / "bulk")) == 1
    assert _queued(tmp_path) == []
