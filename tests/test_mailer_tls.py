"""SMTPMailer's security: TLS required and verified, AUTH only under TLS, secrets kept."""

from __future__ import annotations

import logging
import ssl
import traceback
from typing import Any

import pytest

from mailspool import SMTPMailer
from mailspool.errors import AuthenticationError, RelayUnavailable, TLSFailure

MSG = b"Subject: tls\r\n\r\nHello.\r\n"
FROM = "sender@example.org"


def _all_text(exc: BaseException) -> str:
    """Everything an exception could show: its text, repr, args, chain and traceback."""
    parts = ["".join(traceback.format_exception(type(exc), exc, exc.__traceback__))]
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args), repr(vars(seen))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


# --- certificates ------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_self_signed_relay_is_refused_by_default(
    smtp_relay: Any, mailer_for: Any, tls: str
) -> None:
    relay = smtp_relay(tls=tls)
    mailer = mailer_for(relay, ca_file=None)  # trust the system's CAs only
    with pytest.raises(TLSFailure) as info:
        mailer.send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay and info.value.transient
    assert "certificate" in str(info.value) and "ca_file" in str(info.value)
    assert "MAIL" not in relay.commands and relay.messages == []


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_relay_is_accepted_with_its_ca(smtp_relay: Any, mailer_for: Any, tls: str) -> None:
    relay = smtp_relay(tls=tls)
    mailer = mailer_for(relay)  # ca_file=relay.ca_file
    assert mailer.send(FROM, ["a@example.org"], MSG).accepted == ("a@example.org",)
    mailer.send(FROM, ["b@example.org"], MSG)
    assert relay.connections == 1 and len(relay.messages) == 2
    expected = ["EHLO", "STARTTLS", "EHLO", "MAIL"] if tls == "starttls" else ["EHLO", "MAIL"]
    assert relay.commands[: len(expected)] == expected


def test_verification_can_be_turned_off_explicitly(
    smtp_relay: Any, mailer_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay = smtp_relay(tls="starttls")
    with caplog.at_level(logging.WARNING, logger="mailspool.mailer"):
        mailer = mailer_for(relay, ca_file=None, verify_certificates=False)
    assert "verification is OFF" in caplog.text
    assert mailer.send(FROM, ["a@example.org"], MSG).accepted == ("a@example.org",)
    assert "STARTTLS" in relay.commands


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_certificate_for_another_name_names_the_host_to_use(
    smtp_relay: Any, mailer_for: Any, tls: str
) -> None:
    relay = smtp_relay(tls=tls, cert_names=["mail.example.org"])
    with pytest.raises(TLSFailure) as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    text = str(info.value)
    assert "is for mail.example.org, not 127.0.0.1" in text
    assert "--host mail.example.org" in text
    assert "trust its CA" not in text  # the CA is trusted: ca_file is no help
    assert relay.messages == [] and "MAIL" not in relay.commands


def test_certificate_for_another_name_from_an_untrusted_ca_still_asks_for_the_ca(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay(tls="starttls", cert_names=["mail.example.org"])
    with pytest.raises(TLSFailure) as info:
        mailer_for(relay, ca_file=None).send(FROM, ["a@example.org"], MSG)
    assert "ca_file" in str(info.value) and "--host" not in str(info.value)


def test_implicit_tls_against_a_plain_relay_fails_as_tls(relay: Any, mailer_for: Any) -> None:
    with pytest.raises(TLSFailure, match="handshake"):
        mailer_for(relay, tls="implicit").send(FROM, ["a@example.org"], MSG)


def test_unreadable_ca_file_is_refused_at_once(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="ca_file"):
        SMTPMailer("relay.example.org", ca_file=str(tmp_path / "missing.pem"))


# --- STARTTLS is required, not opportunistic -------------------------------------------


def test_stripped_starttls_stops_before_auth(smtp_relay: Any, mailer_for: Any) -> None:
    # A man in the middle removes STARTTLS and the relay offers AUTH in clear:
    # the mailer must neither fall back to plain text nor send the password.
    relay = smtp_relay(tls="starttls", auth=True, auth_require_tls=False, ehlo_strip=["STARTTLS"])
    mailer = mailer_for(relay)
    with pytest.raises(TLSFailure, match="does not offer STARTTLS") as info:
        mailer.send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay
    assert relay.commands == ["EHLO"]  # no STARTTLS, no AUTH, no MAIL
    assert relay.auth_attempts == []
    assert relay.messages == []


def test_tls_none_must_be_chosen_to_send_in_clear(relay: Any, mailer_for: Any) -> None:
    with pytest.raises(TLSFailure):
        mailer_for(relay, tls="starttls").send(FROM, ["a@example.org"], MSG)
    assert mailer_for(relay, tls="none").send(FROM, ["a@example.org"], MSG).accepted


# --- AUTH -------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_auth_over_tls_works(smtp_relay: Any, mailer_for: Any, tls: str) -> None:
    relay = smtp_relay(tls=tls, auth=True, auth_required=True)
    mailer = mailer_for(relay)
    mailer.send(FROM, ["a@example.org"], MSG)
    mailer.send(FROM, ["b@example.org"], MSG)
    assert [login for _, login in relay.auth_attempts] == ["mailer"]
    assert relay.commands.count("AUTH") == 1
    assert len(relay.messages) == 2


def test_auth_without_tls_needs_explicit_permission(smtp_relay: Any) -> None:
    relay = smtp_relay(auth=True, auth_require_tls=False)
    with pytest.raises(ValueError, match="allow_plaintext_auth"):
        SMTPMailer(**relay.mailer_kwargs(allow_plaintext_auth=False))
    mailer = SMTPMailer(**relay.mailer_kwargs(allow_plaintext_auth=True))
    try:
        assert mailer.send(FROM, ["a@example.org"], MSG).accepted
    finally:
        mailer.close()
    assert [login for _, login in relay.auth_attempts] == ["mailer"]


def test_wrong_password_is_an_authentication_error_without_the_password(
    smtp_relay: Any, mailer_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay = smtp_relay(tls="starttls", auth=True)
    secret = "Wr0ng-but-secret-Pa55"
    mailer = mailer_for(relay, password=secret)
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as info:
        mailer.send(FROM, ["a@example.org"], MSG)
    error = info.value
    assert error.code == 535 and error.about_relay and error.transient
    assert len(relay.auth_attempts) == 1  # one try, not one per mechanism
    assert secret not in _all_text(error)
    assert secret not in caplog.text
    assert relay.messages == [] and "MAIL" not in relay.commands


def test_password_is_never_shown(
    smtp_relay: Any, mailer_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay = smtp_relay(tls="starttls", auth=True)
    with caplog.at_level(logging.DEBUG):
        mailer = mailer_for(relay)
        mailer.send(FROM, ["a@example.org"], MSG)
        with mailer.connect() as conn:
            shown = [repr(mailer), str(mailer), repr(conn), repr(vars(conn))]
    assert relay.password is not None
    assert "password=<hidden>" in repr(mailer)
    for text in [*shown, caplog.text]:
        assert relay.password not in text


def test_non_ascii_password_is_refused_at_once_without_showing_it() -> None:
    secret = "pässwörd-secret"
    with pytest.raises(ValueError, match="ASCII") as info:
        SMTPMailer("relay.example.org", username="mailer", password=secret)
    assert secret not in _all_text(info.value)


def test_relay_without_auth_is_a_configuration_error(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(tls="starttls", auth=True, ehlo_strip=["AUTH"])
    with pytest.raises(AuthenticationError, match="does not offer AUTH") as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay
    assert "AUTH" not in relay.commands


def test_relay_requiring_auth_we_lack_is_a_configuration_error(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay(tls="starttls", auth=True, auth_required=True)
    mailer = mailer_for(relay, username=None, password=None)
    with pytest.raises(AuthenticationError) as info:
        mailer.send(FROM, ["a@example.org"], MSG)
    assert info.value.code == 530 and info.value.about_relay


@pytest.mark.parametrize(
    ("reply", "kind"),
    [("454 4.7.0 TLS not available", TLSFailure), ("421 4.3.2 closing", RelayUnavailable)],
)
def test_refused_starttls(
    smtp_relay: Any, mailer_for: Any, reply: str, kind: type[Exception]
) -> None:
    relay = smtp_relay(tls="starttls", auth=True, replies={"STARTTLS": reply})
    with pytest.raises(kind) as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    assert info.value.code == int(reply[:3])  # type: ignore[attr-defined]
    assert info.value.about_relay  # type: ignore[attr-defined]
    assert relay.commands == ["EHLO", "STARTTLS"]  # nothing after, no AUTH


def test_no_auth_mechanism_in_common(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(tls="starttls", auth=True, auth_exclude_mechanism=["PLAIN", "LOGIN"])
    with pytest.raises(AuthenticationError, match="no AUTH mechanism in common") as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay
    assert relay.auth_attempts == []


def test_login_mechanism_when_plain_is_not_offered(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(tls="starttls", auth=True, auth_exclude_mechanism=["PLAIN"])
    assert mailer_for(relay).send(FROM, ["a@example.org"], MSG).accepted
    assert relay.auth_attempts == [("LOGIN", "mailer")]


# --- what the README shows, and the ports users type ------------------------------------


def test_readme_submission_example_is_starttls_with_verified_certificates() -> None:
    mailer = SMTPMailer("smtp.example.org", 587, username="app", password="secret")
    assert (mailer.host, mailer.port, mailer.tls) == ("smtp.example.org", 587, "starttls")
    assert mailer.verify_certificates and not mailer.allow_plaintext_auth
    assert mailer.ssl_context is not None
    assert mailer.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert mailer.ssl_context.check_hostname
    assert "secret" not in repr(mailer)


def test_positional_port_with_starttls_and_auth_against_a_relay(smtp_relay: Any) -> None:
    # The README's form, against a real submission-like relay: host and port
    # positional, credentials, STARTTLS by default (only the CA is ours).
    relay = smtp_relay(tls="starttls", auth=True, auth_required=True)
    assert relay.username is not None and relay.password is not None
    mailer = SMTPMailer(
        "localhost", relay.port, username=relay.username, password=relay.password,
        ca_file=relay.ca_file, local_hostname="client.test",
    )  # fmt: skip
    try:
        assert mailer.send(FROM, ["a@example.org"], MSG).accepted == ("a@example.org",)
    finally:
        mailer.close()
    assert relay.commands[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]


def test_port_465_with_starttls_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mailspool.mailer"):
        SMTPMailer("smtp.example.org", 465)
    assert "tls='implicit'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mailspool.mailer"):
        SMTPMailer("smtp.example.org", 465, tls="implicit")
        SMTPMailer("smtp.example.org", 587)
    assert caplog.text == ""


# --- ssl_context: used as given, but never a silent way to turn checks off ---------------


def test_a_ready_ssl_context_is_used(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(tls="starttls")
    context = ssl.create_default_context(cafile=relay.ca_file)
    mailer = mailer_for(relay, ca_file=None, ssl_context=context)
    assert mailer.ssl_context is context
    assert mailer.send(FROM, ["a@example.org"], MSG).accepted


def test_an_unverifying_ssl_context_needs_the_named_switch(
    smtp_relay: Any, mailer_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verify_certificates=False"):
        SMTPMailer("relay.example.org", ssl_context=loose)
    no_names = ssl.create_default_context()
    no_names.check_hostname = False
    with pytest.raises(ValueError, match="verify_certificates=False"):
        SMTPMailer("relay.example.org", ssl_context=no_names)
    relay = smtp_relay(tls="starttls")
    with caplog.at_level(logging.WARNING, logger="mailspool.mailer"):
        mailer = mailer_for(relay, ca_file=None, ssl_context=loose, verify_certificates=False)
    assert "verification is OFF" in caplog.text
    assert mailer.send(FROM, ["a@example.org"], MSG).accepted


def test_contradictory_tls_options_are_refused(ca_file: str) -> None:
    with pytest.raises(ValueError, match="ca_file or ssl_context"):
        SMTPMailer("relay.example.org", ca_file=ca_file, ssl_context=ssl.create_default_context())
    with pytest.raises(ValueError, match="checks certificates"):
        SMTPMailer(
            "relay.example.org", ssl_context=ssl.create_default_context(), verify_certificates=False
        )
