"""The ``mail:`` ZCML directives, loaded with zope.configuration, sending for real."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
from zope.component import getUtility
from zope.component.globalregistry import base
from zope.configuration import xmlconfig
from zope.configuration.exceptions import ConfigurationError

from _relays import wait_for
from mailspool import QueuedMailDelivery, QueueProcessor, SendmailMailer, SMTPMailer
from mailspool.integrations.zope import NO_THREAD_ENV, processor_threads, stop_processor_threads
from mailspool.interfaces import IMailDelivery, IMailer

MESSAGE = b"Subject: from zope\r\nFrom: site@example.org\r\n\r\nhello\r\n"

HEAD = """<configure xmlns="http://namespaces.zope.org/zope"
                   xmlns:mail="http://namespaces.zope.org/mail">
  <include package="mailspool.integrations.zope" file="{file}" />
"""


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A clean global component registry; no processor thread left behind."""
    monkeypatch.delenv(NO_THREAD_ENV, raising=False)
    yield
    stop_processor_threads()
    base.__init__("base")  # what zope.component's test clean-up does


def load(body: str, file: str = "meta.zcml") -> None:
    xmlconfig.string(HEAD.format(file=file) + body + "</configure>")


def smtp(relay: Any, extra: str = 'no_tls="true"') -> str:
    return (
        f'<mail:smtpMailer name="smtp" hostname="{relay.host}" port="{relay.port}" '
        f'timeout="5" {extra} />\n'
    )


def test_queued_delivery_commits_into_the_queue(relay: Any, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    load(
        smtp(relay)
        + f'<mail:queuedDelivery mailer="smtp" queuePath="{queue}" processorThread="false" />'
    )
    delivery = getUtility(IMailDelivery, "Mail")
    assert isinstance(delivery, QueuedMailDelivery)
    assert delivery.queuePath == str(queue)
    assert processor_threads() == ()

    with transaction.manager:
        delivery.send("site@example.org", ["jane@example.org"], MESSAGE)
    txn = transaction.begin()
    delivery.send("site@example.org", ["joe@example.org"], MESSAGE)
    txn.abort()
    assert len(os.listdir(queue / "new")) == 1

    mailer = getUtility(IMailer, "smtp")
    with QueueProcessor(queue, mailer) as processor:
        processor.drain()
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]


def test_the_processor_thread_delivers_after_commit(relay: Any, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    load(smtp(relay) + f'<mail:queuedDelivery name="notify" mailer="smtp" queuePath="{queue}" />')
    (thread,) = processor_threads()
    assert thread.is_alive()
    with transaction.manager:
        getUtility(IMailDelivery, "notify").send("site@example.org", "jane@example.org", MESSAGE)
    assert wait_for(lambda: len(relay.messages) == 1)
    stop_processor_threads()
    assert not thread.is_alive()


def test_the_environment_keeps_the_thread_from_starting(
    relay: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(NO_THREAD_ENV, "1")
    queue = tmp_path / "queue"
    load(smtp(relay) + f'<mail:queuedDelivery mailer="smtp" queuePath="{queue}" />')
    assert processor_threads() == ()
    with transaction.manager:
        getUtility(IMailDelivery, "Mail").send("site@example.org", "jane@example.org", MESSAGE)
    assert len(os.listdir(queue / "new")) == 1
    assert relay.messages == []


def test_direct_delivery_sends_at_commit_only(relay: Any) -> None:
    load(smtp(relay) + '<mail:directDelivery name="direct" mailer="smtp" />')
    delivery = getUtility(IMailDelivery, "direct")
    txn = transaction.begin()
    delivery.send("site@example.org", ["joe@example.org"], MESSAGE)
    txn.abort()
    with transaction.manager:
        delivery.send("site@example.org", ["jane@example.org"], MESSAGE)
    getUtility(IMailer, "smtp").close()
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]


def test_implicit_tls_means_tls_not_no_tls(smtp_relay: Any) -> None:
    # zope.sendmail's handler binds implicit_tls to no_tls: clear text to an SMTPS port.
    relay = smtp_relay(tls="implicit")
    load(smtp(relay, f'implicit_tls="true" ca_file="{relay.ca_file}"'))
    mailer = getUtility(IMailer, "smtp")
    assert isinstance(mailer, SMTPMailer)
    assert (mailer.tls, mailer.timeout, mailer.connect_timeout) == ("implicit", 5.0, 5.0)
    with transaction.manager:
        from mailspool import DirectMailDelivery

        DirectMailDelivery(mailer).send("site@example.org", "jane@example.org", MESSAGE)
    mailer.close()
    assert len(relay.messages) == 1


def test_the_secure_default_and_the_explicit_choices(relay: Any) -> None:
    load(
        '<mail:smtpMailer name="default" />'
        '<mail:smtpMailer name="plain" no_tls="true" />'
        '<mail:smtpMailer name="chosen" tls="none" />'
        '<mail:smtpMailer name="smtps" implicit_tls="true" />'
        '<mail:smtpMailer name="sendmail-like" hostname="mx.example.org" force_tls="true" />'
        '<mail:sendmailMailer name="local" path="/usr/sbin/sendmail" />'
    )
    tls = {name: getUtility(IMailer, name).tls for name in ("default", "plain", "chosen")}
    assert tls == {"default": "starttls", "plain": "none", "chosen": "none"}
    assert getUtility(IMailer, "default").port == 25
    assert getUtility(IMailer, "smtps").port == 465
    assert getUtility(IMailer, "sendmail-like").hostname == "mx.example.org"
    local = getUtility(IMailer, "local")
    assert isinstance(local, SendmailMailer)
    assert local.path == "/usr/sbin/sendmail"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ('<mail:smtpMailer name="x" no_tls="true" force_tls="true" />', "contradict"),
        ('<mail:smtpMailer name="x" tls="sometimes" />', "sometimes"),
        ('<mail:smtpMailer name="x" port="many" />', "many"),
        ('<mail:smtpMailer name="x" no_tls="true" username="u" password="p" />', "clear text"),
        ('<mail:directDelivery mailer="nowhere" />', "mailer 'nowhere' is not defined"),
        ('<mail:directDelivery mailer="x" permission="zope.SendMail" />', "zope.security"),
        ('<mail:smtpMailer name="x" /><mail:smtpMailer name="x" port="26" />', "onflict"),
    ],
)
def test_bad_configuration_is_named(body: str, error: str) -> None:
    if "permission" in body:
        body = '<mail:smtpMailer name="x" />' + body
    with pytest.raises(ConfigurationError, match=error):
        load(body)


def test_configure_zcml_is_shipped_and_registers_no_mailer() -> None:
    load('<mail:smtpMailer name="smtp" no_tls="true" />', file="configure.zcml")
    assert getUtility(IMailer, "smtp").tls == "none"


def test_the_queued_delivery_takes_a_priority(relay: Any, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    load(
        smtp(relay)
        + f'<mail:queuedDelivery mailer="smtp" queuePath="{queue}" processorThread="false" />'
    )
    delivery = getUtility(IMailDelivery, "Mail")
    with transaction.manager:
        delivery.send("site@example.org", ["jane@example.org"], MESSAGE, priority="urgent")
    assert len(os.listdir(queue / "urgent")) == 1
