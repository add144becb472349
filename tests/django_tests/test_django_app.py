"""The Django integration in a running project: a view through the test client,
Django's own TestCase and locmem, and the ``mailspool_run`` management command."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core import mail
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, TestCase, override_settings

from django_tests.conftest import BACKEND
from django_tests.shop.models import Order
from mailspool.testing import queued_messages


def test_a_view_that_succeeds_queues_its_mail(spool: Path) -> None:
    response = Client().post("/order/", {"email": "jane@example.org"})
    assert response.status_code == 200
    assert Order.objects.filter(email="jane@example.org").count() == 1
    [queued] = queued_messages(spool)
    assert queued.recipients == ("jane@example.org",)
    assert queued.message["Subject"] == "Your order"


def test_a_view_that_fails_queues_nothing_but_the_admins_report(spool: Path) -> None:
    # ATOMIC_REQUESTS rolls the order and its mail back; Django then reports
    # the error to the ADMINS (outside the rolled-back transaction).
    client = Client(raise_request_exception=False)
    response = client.post("/order/", {"email": "jane@example.org", "fail": "1"})
    assert response.status_code == 500
    assert Order.objects.count() == 0
    queued = queued_messages(spool)
    assert [m.recipients for m in queued] == [("ops@example.org",)]
    assert "Internal Server Error: /order/" in queued[0].message["Subject"]


class LocmemStillWorks(TestCase):
    """An application's tests keep Django's locmem outbox (the test runner sets it)."""

    def test_outbox(self) -> None:
        response = self.client.post("/order/", {"email": "jane@example.org"})
        assert response.status_code == 200
        assert len(mail.outbox) == 1
        assert mail.outbox[0].to == ["jane@example.org"]


class OnCommitInATestCase(TestCase):
    """With mailspool's backend, a TestCase (one transaction per test) captures the commit."""

    def test_capture_on_commit_callbacks(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        spool = Path(tmp.name) / "spool"
        with override_settings(EMAIL_BACKEND=BACKEND, MAILSPOOL_QUEUE_PATH=str(spool)):
            with self.captureOnCommitCallbacks(execute=False) as callbacks:
                self.client.post("/order/", {"email": "jane@example.org"})
            assert len(callbacks) == 1
            assert queued_messages(spool) == []  # not committed yet
            callbacks[0]()
            assert [m.recipients for m in queued_messages(spool)] == [("jane@example.org",)]


def test_mailspool_run_once_delivers_with_the_django_settings(
    spool: Path, smtp_relay: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    relay = smtp_relay()
    mail.send_mail("Order", "Thanks", None, ["jane@example.org"])
    settings_relay = {"host": relay.host, "port": relay.port, "tls": "none", "timeout": "5s"}
    with override_settings(MAILSPOOL_RELAY=settings_relay):
        call_command("mailspool_run", "--once")
    assert "1 sent, 0 deferred, 0 failed" in capsys.readouterr().out
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]
    assert queued_messages(spool) == []


def test_mailspool_run_names_the_bad_django_setting(spool: Path) -> None:
    with (
        override_settings(MAILSPOOL_RELAY={"port": "smtp"}),
        pytest.raises(
            CommandError, match=r"port: not an integer: 'smtp' \(from MAILSPOOL_RELAY\['port'\]\)"
        ),
    ):
        call_command("mailspool_run", "--once")
    with (
        override_settings(MAILSPOOL_RELAY={"hostname": "x"}),
        pytest.raises(CommandError, match=r"MAILSPOOL_RELAY\['hostname'\]: is not a setting"),
    ):
        call_command("mailspool_run", "--once")


def test_mailspool_run_reports_an_undelivered_pass(
    spool: Path, smtp_relay: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    mail.send_mail("Order", "Thanks", None, ["jane@example.org"])
    # Nothing listens on the relay's port once it is stopped: the relay is
    # unavailable and the message stays queued.
    relay = smtp_relay()
    relay.stop()
    with (
        override_settings(MAILSPOOL_RELAY={"host": relay.host, "port": relay.port, "tls": "none"}),
        pytest.raises(CommandError) as info,
    ):
        call_command("mailspool_run", "--once")
    assert info.value.returncode == 1
    assert len(queued_messages(spool)) == 1


def test_mailspool_run_needs_an_existing_spool(tmp_path: Path) -> None:
    missing = tmp_path / "never-written"
    with (
        override_settings(MAILSPOOL_QUEUE_PATH=str(missing)),
        pytest.raises(CommandError, match=r"^queue: .*never-written: not found"),
    ):
        call_command("mailspool_run", "--once")
    with pytest.raises(CommandError, match=r"^queue: .*elsewhere: not found"):
        call_command("mailspool_run", "--once", "--queue", str(tmp_path / "elsewhere"))
    assert not missing.exists()
