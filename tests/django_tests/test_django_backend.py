"""The Django email backend: mail is queued when Django's transaction commits, and only then."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from django.core import mail
from django.db import transaction
from django.test import override_settings

from django_tests.conftest import BACKEND
from django_tests.shop.models import Order
from mailspool.errors import InvalidAddress, SpoolError
from mailspool.integrations.django import EmailBackend
from mailspool.maildir.spool import Spool
from mailspool.testing import queued_messages


def test_autocommit_queues_at_once(spool: Path) -> None:
    sent = mail.send_mail(
        "Hello", "Body text", None, ["Jane <jane@example.org>"], fail_silently=False
    )
    assert sent == 1
    [queued] = queued_messages(spool)
    assert queued.sender == "shop@example.org"
    assert queued.recipients == ("jane@example.org",)
    assert queued.message["Subject"] == "Hello"
    assert queued.message["From"] == "Shop <shop@example.org>"
    assert queued.message.get_content().strip() == "Body text"


def test_atomic_queues_only_when_the_block_commits(spool: Path) -> None:
    with transaction.atomic():
        Order.objects.create(email="jane@example.org")
        assert mail.send_mail("Order", "Thanks", None, ["jane@example.org"]) == 1
        assert queued_messages(spool) == []
    assert [m.recipients for m in queued_messages(spool)] == [("jane@example.org",)]


def test_rollback_queues_nothing(spool: Path) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        Order.objects.create(email="jane@example.org")
        mail.send_mail("Order", "Thanks", None, ["jane@example.org"])
        raise RuntimeError("boom")
    assert Order.objects.count() == 0
    assert queued_messages(spool) == []


def test_a_rolled_back_savepoint_drops_only_its_mail(spool: Path) -> None:
    with transaction.atomic():
        mail.send_mail("Kept", "x", None, ["kept@example.org"])
        with pytest.raises(RuntimeError), transaction.atomic():
            mail.send_mail("Dropped", "x", None, ["dropped@example.org"])
            raise RuntimeError("inner")
    assert [m.message["Subject"] for m in queued_messages(spool)] == ["Kept"]


def test_email_message_cc_bcc_and_alternatives(spool: Path) -> None:
    msg = mail.EmailMultiAlternatives(
        "Report",
        "plain",
        "Reports <reports@example.org>",
        to=["a@example.org"],
        cc=["b@example.org"],
        bcc=["hidden@example.org"],
    )
    msg.attach_alternative("<p>html</p>", "text/html")
    msg.attach("data.csv", "a,b\n1,2\n", "text/csv")
    assert msg.send() == 1
    [queued] = queued_messages(spool)
    assert queued.sender == "reports@example.org"
    assert queued.recipients == ("a@example.org", "b@example.org", "hidden@example.org")
    assert queued.message["Bcc"] is None  # the envelope has it, the header does not
    assert b"hidden@example.org" not in queued.data
    assert queued.message.get_content_type() == "multipart/mixed"
    types = [p.get_content_type() for p in queued.message.walk()]
    assert "text/html" in types
    assert "text/csv" in types


def test_send_mass_mail_queues_each(spool: Path) -> None:
    datatuple = [(f"n{i}", "x", "shop@example.org", [f"r{i}@example.org"]) for i in range(3)]
    assert mail.send_mass_mail(datatuple) == 3
    assert sorted(m.recipients[0] for m in queued_messages(spool)) == [
        "r0@example.org",
        "r1@example.org",
        "r2@example.org",
    ]


def test_mail_admins(spool: Path) -> None:
    mail.mail_admins("Disk", "is full")
    [queued] = queued_messages(spool)
    assert queued.sender == "server@example.org"
    assert queued.recipients == ("ops@example.org",)
    assert queued.message["Subject"] == "[Django] Disk"


def test_mail_managers(spool: Path) -> None:
    with override_settings(MANAGERS=[("Sales", "sales@example.org")]):
        mail.mail_managers("Order", "a new one")
    assert [m.recipients for m in queued_messages(spool)] == [("sales@example.org",)]


def test_bad_address_raises_at_send_and_nothing_is_queued(spool: Path) -> None:
    with transaction.atomic(), pytest.raises(InvalidAddress, match="not an address"):
        mail.send_mass_mail(
            [
                ("ok", "x", None, ["good@example.org"]),
                ("bad", "x", None, ["not an address"]),
            ]
        )
    assert queued_messages(spool) == []


def test_fail_silently_leaves_out_only_the_bad_message(spool: Path) -> None:
    sent = mail.send_mass_mail(
        [("ok", "x", None, ["good@example.org"]), ("bad", "x", None, ["a@b@c"])],
        fail_silently=True,
    )
    assert sent == 1
    assert [m.recipients for m in queued_messages(spool)] == [("good@example.org",)]


def test_no_recipients_is_not_an_error(spool: Path) -> None:
    assert mail.send_mail("Nobody", "x", None, []) == 0
    assert queued_messages(spool) == []


def test_internationalised_domain_goes_into_the_envelope_as_idna(spool: Path) -> None:
    mail.send_mail("Hej", "x", None, ["jane@bücher.example"])
    [queued] = queued_messages(spool)
    assert queued.recipients == ("jane@xn--bcher-kva.example",)
    # A domain that mixes right-to-left and left-to-right letters has none.
    with pytest.raises(InvalidAddress, match="has no IDNA form"):
        mail.send_mail("Hej", "x", None, ["jane@\u05d0a.example"])


def test_spool_that_cannot_be_created_fails_at_send(tmp_path: Path, spool: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    backend = EmailBackend(queue_path=blocker / "spool")
    msg = mail.EmailMessage("x", "x", None, ["a@example.org"])
    with transaction.atomic(), pytest.raises(SpoolError, match="cannot create spool"):
        backend.send_messages([msg])
    silent = EmailBackend(fail_silently=True, queue_path=blocker / "spool")
    assert silent.send_messages([msg]) == 0


def _break(spool: Path) -> None:
    shutil.rmtree(spool / "tmp")
    (spool / "tmp").write_text("tmp/ is not a directory any more")


def test_write_failure_after_the_commit_is_raised_and_logged(
    spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The window the backend documents: the database has committed when the
    # spool turns out to be unwritable.
    caplog.set_level(logging.ERROR, "mailspool")
    with pytest.raises(SpoolError), transaction.atomic():
        Order.objects.create(email="jane@example.org")
        mail.send_mail("Order", "x", None, ["jane@example.org"])
        _break(spool)
    assert Order.objects.count() == 1
    [record] = caplog.records
    assert record.levelno == logging.CRITICAL
    assert "the database committed but 1 message(s) could not be queued" in record.getMessage()
    assert "jane@example.org" in record.getMessage()


def test_write_failure_after_the_commit_with_fail_silently_is_logged(
    spool: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "mailspool")
    with transaction.atomic():
        mail.send_mail("Order", "x", None, ["jane@example.org"], fail_silently=True)
        _break(spool)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]


@pytest.mark.skipif(not hasattr(mail, "mailers"), reason="Django's MAILERS came in 6.1")
def test_a_mailer_of_django_mailers(spool: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-spool"
    mailers = {
        "default": {"BACKEND": BACKEND, "OPTIONS": {"queue_path": str(spool)}},
        "bulk": {"BACKEND": BACKEND, "OPTIONS": {"queue_path": str(other)}},
    }
    with override_settings(MAILERS=mailers):
        mail.send_mail("Hi", "x", None, ["jane@example.org"], using="bulk")
    assert queued_messages(spool) == []
    assert [m.recipients for m in queued_messages(other)] == [("jane@example.org",)]


def test_a_connection_with_a_priority_queues_its_class(spool: Path) -> None:
    bulk = mail.get_connection(priority="bulk")
    assert mail.send_mail("News", "This week", None, ["jane@example.org"], connection=bulk) == 1
    assert mail.send_mail("Reset", "Your code", None, ["jane@example.org"]) == 1
    assert sorted(e.priority for e in Spool(spool).entries()) == ["bulk", "normal"]


def test_an_unknown_priority_is_a_configuration_error(spool: Path) -> None:
    from django.core.exceptions import ImproperlyConfigured

    with pytest.raises(ImproperlyConfigured, match="priority 'soon' is not one of"):
        mail.get_connection(priority="soon")
