"""Code written for zope.sendmail, repoze.sendmail and pyramid_mailer runs unchanged.

The constructor arguments those packages' ``SMTPMailer`` takes, and
zope.sendmail's ``QueueProcessorThread`` calls, against real relays.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import transaction

from _relays import wait_for
from mailspool import QueuedMailDelivery, QueueProcessorThread, SMTPMailer
from mailspool.errors import TLSFailure
from mailspool.smtp.compat import tls_mode

MESSAGE = b"Subject: moved over\r\nFrom: app@example.org\r\n\r\nhello\r\n"
SHORT = {"connect_timeout": 5.0, "timeout": 5.0, "data_timeout": 5.0}


def _send(mailer: SMTPMailer) -> None:
    try:
        mailer.send("app@example.org", ["jane@example.org"], MESSAGE)
    finally:
        mailer.close()


def test_zope_style_no_tls_sends_in_clear_to_a_local_relay(relay: Any) -> None:
    mailer = SMTPMailer(hostname=relay.host, port=relay.port, no_tls=True, **SHORT)
    assert (mailer.host, mailer.tls) == ("127.0.0.1", "none")
    _send(mailer)
    assert relay.messages[0].rcpt_tos == ["jane@example.org"]
    assert "STARTTLS" not in relay.commands


def test_without_flags_verified_starttls_is_required(relay: Any) -> None:
    # zope.sendmail would have sent this in clear text; mailspool refuses.
    mailer = SMTPMailer(hostname=relay.host, port=relay.port, **SHORT)
    with pytest.raises(TLSFailure, match="does not offer STARTTLS"):
        _send(mailer)
    assert relay.messages == []


def test_force_tls_and_positional_credentials(smtp_relay: Any) -> None:
    relay = smtp_relay(tls="starttls", auth=True)
    mailer = SMTPMailer(
        relay.host,
        relay.port,
        relay.username,
        relay.password,
        force_tls=True,
        ca_file=relay.ca_file,
        **SHORT,
    )
    assert mailer.tls == "starttls"
    _send(mailer)
    assert relay.auth_attempts == [("PLAIN", relay.username)]
    assert len(relay.messages) == 1


@pytest.mark.parametrize("flag", ["implicit_tls", "ssl"])
def test_implicit_tls_and_ssl_mean_smtps(smtp_relay: Any, flag: str) -> None:
    relay = smtp_relay(tls="implicit")
    mailer = SMTPMailer(
        hostname=relay.host, port=relay.port, ca_file=relay.ca_file, **{flag: True}, **SHORT
    )
    assert mailer.tls == "implicit"
    _send(mailer)
    assert len(relay.messages) == 1


def test_pyramid_style_tls_booleans(relay: Any) -> None:
    assert SMTPMailer(tls=True).tls == "starttls"
    plain = SMTPMailer(relay.host, relay.port, tls=False, **SHORT)
    assert plain.tls == "none"
    _send(plain)
    assert len(relay.messages) == 1


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"no_tls": True, "force_tls": True}, "no_tls and force_tls contradict"),
        ({"tls": "none", "force_tls": True}, "tls='none' contradicts force_tls=True"),
        ({"tls": "starttls", "ssl": True}, "tls='starttls' contradicts ssl=True"),
        ({"tls": "sometimes"}, "tls must be one of"),
        ({"host": "a.example", "hostname": "b.example"}, "differ: give one of them"),
        ({"certfile": "/nonexistent.pem", "no_tls": True}, "needs TLS"),
        ({"keyfile": "/nonexistent.key"}, "keyfile needs certfile"),
        ({"certfile": "/nonexistent.pem"}, "cannot load the client certificate"),
        ({"no_tls": True, "username": "u", "password": "p"}, "clear text"),
    ],
)
def test_contradictions_are_refused(kwargs: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        SMTPMailer(**kwargs)


def test_no_tls_is_ignored_next_to_implicit_tls_as_before() -> None:
    assert tls_mode(None, no_tls=True, ssl=True) == "implicit"
    assert tls_mode(None) == "starttls"
    assert tls_mode("none", no_tls=True) == "none"


def test_client_certificate_loads_and_mail_goes_through(
    smtp_relay: Any, smtp_ca: Any, tmp_path: Path
) -> None:
    ca, _ = smtp_ca
    cert = ca.issue_cert("client.test")
    certfile, keyfile = tmp_path / "client.pem", tmp_path / "client.key"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    relay = smtp_relay(tls="starttls")
    mailer = SMTPMailer(
        relay.host,
        relay.port,
        ca_file=relay.ca_file,
        certfile=certfile,
        keyfile=keyfile,
        **SHORT,
    )
    assert mailer.ssl_context is not None
    _send(mailer)
    assert len(relay.messages) == 1


def test_debug_smtp_warns_instead_of_printing_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="mailspool"):
        SMTPMailer(debug_smtp=1)
    assert "debug_smtp is ignored" in caplog.text


def test_queue_processor_thread_zope_style(relay: Any, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    mailer = SMTPMailer(hostname=relay.host, port=relay.port, no_tls=True, **SHORT)
    thread = QueueProcessorThread()
    thread.setMailer(mailer)
    thread.setQueuePath(queue)
    delivery = QueuedMailDelivery(queue, on_commit=thread.wake)
    thread.start()
    try:
        assert thread.is_alive()
        with transaction.manager:
            delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
        assert wait_for(lambda: len(relay.messages) == 1)
    finally:
        thread.stop()
        thread.join()
    assert not thread.is_alive()
    assert list((queue / "new").iterdir()) == []


def test_queue_processor_thread_run_once(relay: Any, tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    delivery = QueuedMailDelivery(queue)
    with transaction.manager:
        delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
        delivery.send("app@example.org", ["joe@example.org"], MESSAGE)
    thread = QueueProcessorThread(
        mailer=SMTPMailer(relay.host, relay.port, no_tls=True, **SHORT), queue_path=queue
    )
    thread.run(forever=False)
    assert sorted(m.rcpt_tos[0] for m in relay.messages) == [
        "jane@example.org",
        "joe@example.org",
    ]


def test_queue_processor_thread_needs_mailer_and_path(tmp_path: Path) -> None:
    thread = QueueProcessorThread()
    with pytest.raises(RuntimeError, match="needs a mailer"):
        thread.start()
    thread.setMailer(SMTPMailer(no_tls=True))
    with pytest.raises(RuntimeError, match="needs a queue path"):
        thread.start()
    with pytest.raises(ValueError, match="interval"):
        QueueProcessorThread(0)
