"""A relay without SMTPUTF8: IDN domains as A-labels, UTF-8 headers as RFC 2047 words.

Nothing non-ASCII reaches such a relay raw: an address whose only non-ASCII
part is its domain goes with the domain's IDNA A-label; one with a
non-ASCII local part is refused clearly, before MAIL; UTF-8 header fields
become encoded words while the body and the other headers stay byte for byte.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import re
from typing import Any

import pytest

from mailspool import SMTPMailer
from mailspool.errors import PermanentError, SMTPUTF8Required
from mailspool.message import make_envelope
from mailspool.smtp.esmtp import ascii_address, ascii_headers, mail_parameters, wire_address

FROM = "app@example.org"
NO_UTF8 = {"8bitmime": ""}


def decoded(value: str) -> str:
    return str(email.header.make_header(email.header.decode_header(value)))


# --- the rules ---------------------------------------------------------------------------


def test_an_idn_domain_has_an_a_label_and_a_wide_local_part_has_no_ascii_form() -> None:
    assert ascii_address("user@bücher.example") == "user@xn--bcher-kva.example"
    assert ascii_address("plain@example.org") == "plain@example.org"
    assert ascii_address("zoë@example.org") is None
    assert wire_address("user@bücher.example", ["BODY=8BITMIME"]) == "user@xn--bcher-kva.example"
    assert wire_address("user@bücher.example", ["SMTPUTF8"]) == "user@bücher.example"


def test_mail_parameters_take_an_idn_domain_without_smtputf8() -> None:
    envelope = make_envelope("jörg@example.org", ["user@bücher.example"])
    with pytest.raises(SMTPUTF8Required, match=re.escape("jörg@example.org")) as info:
        mail_parameters(envelope, b"Subject: x\r\n\r\nx\r\n", NO_UTF8, None, "relay:25")
    assert "user@bücher.example" not in str(info.value)  # that one has an ASCII form
    envelope = make_envelope(FROM, ["user@bücher.example"])
    assert mail_parameters(envelope, b"Subject: x\r\n\r\nx\r\n", NO_UTF8, None, "r:25") == []


def test_utf8_headers_become_encoded_words_and_nothing_else_changes() -> None:
    body = "\r\nCrème brûlée, raw 8-bit body\r\n".encode()
    data = (
        "Subject: Grüße aus München\r\n"
        "X-Plain: untouched  spacing\r\n"
        "To: Zoë Ünder <zoe@bücher.example>, plain@example.org\r\n"
        "Comments: a folded\r\n  line with é\r\n"
    ).encode() + body
    out = ascii_headers(data, NO_UTF8, "relay:25")
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.isascii() and b"\r\n" + rest == body  # the body byte for byte
    assert b"X-Plain: untouched  spacing\r\n" in out
    msg = email.message_from_bytes(out, policy=email.policy.compat32)
    assert decoded(msg["Subject"]) == "Grüße aus München"
    assert decoded(msg["Comments"]) == "a folded line with é"
    to = email.utils.getaddresses([msg["To"]])
    assert [(decoded(n), a) for n, a in to] == [
        ("Zoë Ünder", "zoe@xn--bcher-kva.example"),
        ("", "plain@example.org"),
    ]
    assert ascii_headers(data, {"smtputf8": ""}, "relay:25") is data  # an SMTPUTF8 relay


def test_a_header_address_without_ascii_form_or_non_utf8_headers_are_refused() -> None:
    with pytest.raises(PermanentError, match=re.escape("zoë@example.org")):
        ascii_headers("To: zoë@example.org\r\n\r\nx\r\n".encode(), NO_UTF8, "relay:25")
    with pytest.raises(PermanentError, match="not UTF-8"):
        ascii_headers(b"Subject: caf\xe9\r\n\r\nx\r\n", NO_UTF8, "relay:25")


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_protocol_engine_writes_a_labels_without_smtputf8(pipelining: bool) -> None:
    from mailspool.smtp.protocol import Transaction

    envelope = make_envelope("app@bücher.example", ["user@bücher.example"])
    plain = Transaction(envelope, ["BODY=8BITMIME"], pipelining=pipelining)
    assert plain.start().startswith(b"MAIL FROM:<app@xn--bcher-kva.example> BODY=8BITMIME\r\n")
    if pipelining:
        assert b"RCPT TO:<user@xn--bcher-kva.example>\r\n" in plain.start()
    wide = Transaction(envelope, ["SMTPUTF8"], pipelining=pipelining)
    assert wide.start().startswith("MAIL FROM:<app@bücher.example> SMTPUTF8".encode())


# --- against a relay ---------------------------------------------------------------------


def test_an_idn_recipient_goes_as_its_a_label(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(smtputf8=False)
    result = mailer_for(relay).send(FROM, ["user@bücher.example"], b"Subject: x\r\n\r\nhi\r\n")
    assert result.accepted == ("user@bücher.example",)  # told as it was given
    [received] = relay.messages
    assert received.rcpt_tos == ["user@xn--bcher-kva.example"]
    assert "SMTPUTF8" not in received.mail_options


def test_a_wide_local_part_still_fails_clearly_before_mail(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay(smtputf8=False)
    with pytest.raises(SMTPUTF8Required, match=re.escape("zoë@bücher.example")):
        mailer_for(relay).send(FROM, ["zoë@bücher.example"], b"Subject: x\r\n\r\nhi\r\n")
    assert "MAIL" not in relay.commands


def test_a_utf8_subject_reaches_a_relay_without_smtputf8_as_an_encoded_word(
    smtp_relay: Any,
) -> None:
    relay = smtp_relay(smtputf8=False)
    data = "Subject: Grüße\r\nTo: user@bücher.example\r\n\r\nCrème\r\n".encode()
    mailer = SMTPMailer(**relay.mailer_kwargs())
    try:
        conn = mailer.connect()
        envelope = make_envelope(FROM, ["user@bücher.example"])
        conn.send(envelope, data)
        conn.send(envelope, data)  # a second one on the same session
        conn.close()
    finally:
        mailer.close()
    assert len(relay.messages) == 2
    for received in relay.messages:
        head, _, body = received.original_content.partition(b"\r\n\r\n")
        assert head.isascii(), head  # never raw 8-bit headers
        assert body == "Crème\r\n".encode()
        assert "BODY=8BITMIME" in received.mail_options
        msg = email.message_from_bytes(received.original_content, policy=email.policy.compat32)
        assert decoded(msg["Subject"]) == "Grüße"
        assert msg["To"] == "user@xn--bcher-kva.example"
