"""The Flask extension: mail sent during a request is queued only if the request succeeds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import transaction
from flask import Flask, abort, redirect, request

from mailspool.errors import InvalidAddress
from mailspool.integrations.flask import Mailspool
from mailspool.maildir.spool import Spool
from mailspool.testing import queued_messages


def make_app(spool: Path, **config: Any) -> tuple[Flask, Mailspool]:
    app = Flask("shop")
    app.config.update(
        MAILSPOOL_QUEUE_PATH=str(spool),
        MAILSPOOL_DEFAULT_SENDER="Shop <shop@example.org>",
        **config,
    )
    mail = Mailspool()
    mail.init_app(app)

    @app.post("/order")
    def order() -> Any:
        to = request.form["email"]
        mail.send_mail("Your order", "Thanks!", to=[to], bcc=["audit@example.org"])
        outcome = request.form.get("then")
        if outcome == "raise":
            raise RuntimeError("payment service down")
        if outcome == "400":
            abort(400)
        if outcome == "redirect":
            return redirect("/done")
        return "ordered"

    return app, mail


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def test_a_request_that_succeeds_queues_its_mail(spool: Path) -> None:
    app, _ = make_app(spool)
    response = app.test_client().post("/order", data={"email": "jane@example.org"})
    assert response.status_code == 200
    [queued] = queued_messages(spool)
    assert queued.sender == "shop@example.org"
    assert queued.recipients == ("jane@example.org", "audit@example.org")
    assert queued.message["To"] == "jane@example.org"
    assert queued.message["Bcc"] is None
    assert queued.message["Subject"] == "Your order"


def test_a_redirect_commits_too(spool: Path) -> None:
    app, _ = make_app(spool)
    client = app.test_client()
    response = client.post("/order", data={"email": "jane@example.org", "then": "redirect"})
    assert response.status_code == 302
    assert len(queued_messages(spool)) == 1


@pytest.mark.parametrize("testing", [False, True], ids=["500", "propagated"])
def test_a_request_that_raises_queues_nothing(spool: Path, testing: bool) -> None:
    app, _ = make_app(spool, TESTING=testing)
    client = app.test_client()
    if testing:  # the exception reaches the caller; the teardown aborts
        with pytest.raises(RuntimeError):
            client.post("/order", data={"email": "jane@example.org", "then": "raise"})
    else:  # Flask answers 500 and runs after_request with it
        response = client.post("/order", data={"email": "jane@example.org", "then": "raise"})
        assert response.status_code == 500
    assert queued_messages(spool) == []
    # Nothing of the failed request is left to join the next one.
    assert client.post("/order", data={"email": "bob@example.org"}).status_code == 200
    assert [m.recipients[0] for m in queued_messages(spool)] == ["bob@example.org"]


def test_a_4xx_response_queues_nothing(spool: Path) -> None:
    app, _ = make_app(spool)
    response = app.test_client().post("/order", data={"email": "jane@example.org", "then": "400"})
    assert response.status_code == 400
    assert queued_messages(spool) == []


def test_a_bad_address_fails_in_the_view(spool: Path) -> None:
    app, _ = make_app(spool, TESTING=True)
    with pytest.raises(InvalidAddress, match="jane@"):
        app.test_client().post("/order", data={"email": "jane@"})
    assert queued_messages(spool) == []


def test_a_spool_that_cannot_be_written_fails_the_request(spool: Path) -> None:
    app, _ = make_app(spool)
    shutil.rmtree(spool / "tmp")
    (spool / "tmp").write_text("tmp/ is not a directory any more")
    response = app.test_client().post("/order", data={"email": "jane@example.org"})
    assert response.status_code == 500
    (spool / "tmp").unlink()
    (spool / "tmp").mkdir()
    assert queued_messages(spool) == []


def test_outside_a_request_mail_transaction_commits(spool: Path) -> None:
    app, mail = make_app(spool)
    with app.app_context():
        with mail.transaction():
            mail.send(None, "jane@example.org", b"Subject: cron\r\n\r\nnightly\r\n")
            assert queued_messages(spool) == []
        with pytest.raises(RuntimeError), mail.transaction():
            mail.send(None, "bob@example.org", b"Subject: lost\r\n\r\nx\r\n")
            raise RuntimeError("the job failed")
    assert [m.message["Subject"] for m in queued_messages(spool)] == ["cron"]


def test_mail_transaction_is_refused_inside_a_request(spool: Path) -> None:
    app, mail = make_app(spool, TESTING=True)

    @app.get("/nested")
    def nested() -> str:
        mail.send(None, "jane@example.org", b"Subject: first\r\n\r\nx\r\n")
        with mail.transaction():  # would abort the request's transaction
            pass
        return "unreachable"

    with pytest.raises(RuntimeError, match="inside a request"):
        app.test_client().get("/nested")
    assert queued_messages(spool) == []


def test_without_managed_transactions_the_app_commits(spool: Path) -> None:
    app, _ = make_app(spool, MAILSPOOL_MANAGE_TRANSACTION=False)
    transaction.begin()
    try:
        response = app.test_client().post("/order", data={"email": "jane@example.org"})
        assert response.status_code == 200
        assert queued_messages(spool) == []
        transaction.commit()
    finally:
        transaction.abort()
    assert len(queued_messages(spool)) == 1


def test_no_sender_at_all_is_refused(spool: Path) -> None:
    app = Flask("bare")
    app.config["MAILSPOOL_QUEUE_PATH"] = str(spool)
    mail = Mailspool(app)
    with app.app_context(), mail.transaction(), pytest.raises(InvalidAddress, match="no sender"):
        mail.send_mail("x", "y", to="jane@example.org")


def test_init_app_needs_the_queue_path() -> None:
    with pytest.raises(RuntimeError, match="MAILSPOOL_QUEUE_PATH is not set"):
        Mailspool(Flask("bare"))


def test_flask_mailspool_run_once(spool: Path, smtp_relay: Callable[..., Any]) -> None:
    relay = smtp_relay()
    app, mail = make_app(
        spool, MAILSPOOL_RELAY={"host": relay.host, "port": relay.port, "tls": "none"}
    )
    with app.app_context(), mail.transaction():
        mail.send_mail("Hi", "there", to="jane@example.org")
    result = app.test_cli_runner().invoke(args=["mailspool", "run", "--once"])
    assert result.exit_code == 0, result.output
    assert "1 sent, 0 deferred, 0 failed" in result.output
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]


def test_flask_mailspool_run_names_the_bad_setting(spool: Path) -> None:
    app, _ = make_app(spool, MAILSPOOL_RELAY={"tls": "maybe"})
    result = app.test_cli_runner().invoke(args=["mailspool", "run", "--once"])
    assert result.exit_code == 1
    assert "tls: must be one of starttls, implicit, none" in result.output
    assert "(from MAILSPOOL_RELAY['tls'])" in result.output


def test_send_and_send_mail_take_a_priority(spool: Path) -> None:
    app, mail = make_app(spool)
    with app.app_context(), mail.transaction():
        mail.send(None, "jane@example.org", b"Subject: reset\r\n\r\nx\r\n", priority="urgent")
        mail.send_mail("News", "x", to="bob@example.org", priority="bulk")
        with pytest.raises(ValueError, match="priority 'later' is not one of"):
            mail.send(None, "jane@example.org", b"Subject: x\r\n\r\nx\r\n", priority="later")
    assert sorted(os.listdir(spool / "urgent") + os.listdir(spool / "bulk")) == sorted(
        e.id for e in Spool(spool).entries()
    )
    assert sorted(e.priority for e in Spool(spool).entries()) == ["bulk", "urgent"]
