"""Tests for mailspool.message: inputs, line endings, Message-Id, Date, addresses."""

from __future__ import annotations

import email
import email.policy
import email.utils
import os
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mailspool.message as message_module
from mailspool.errors import InvalidAddress, InvalidMessage
from mailspool.message import (
    MAX_LINE,
    Envelope,
    Prepared,
    make_envelope,
    make_msgid,
    needs_8bit,
    parse_mailbox,
    prepare,
    to_wire,
)

FROM = "sender@example.org"
TO = ["rcpt@example.org"]

# RFC 5322 3.6.4 msg-id, without obsolete forms: "<" dot-atom-text "@"
# (dot-atom-text / no-fold-literal) ">".  Written independently of message.py.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
RFC5322_MSGID = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@(?:{_ATOM}(?:\.{_ATOM})*|\[[\x21-\x5a\x5e-\x7e]*\]))>\Z"
)


def no_bare_cr_or_lf(data: bytes) -> bool:
    rest = data.replace(b"\r\n", b"")
    return b"\r" not in rest and b"\n" not in rest


def header_values(data: bytes, name: str) -> list[str]:
    """All values of header ``name``, parsed by the email package."""
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    return [str(v) for v in parsed.get_all(name, [])]


# --- inputs ------------------------------------------------------------------


def test_bytes_input_already_crlf_is_unchanged() -> None:
    data = b"Subject: hi\r\n\r\nbody\r\n"
    assert to_wire(data) == data


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_bytes_like_input(kind: Any) -> None:
    assert to_wire(kind(b"Subject: hi\n\nbody\n")) == b"Subject: hi\r\n\r\nbody\r\n"


def test_str_input_is_utf8() -> None:
    data = to_wire("Subject: héllo\n\nwörld ☃\n")
    assert data == "Subject: héllo\r\n\r\nwörld ☃\r\n".encode()
    assert needs_8bit(data)


def test_str_with_surrogateescape_gives_back_the_original_bytes() -> None:
    raw = b"Subject: x\r\n\r\nlatin-1 \xe9\r\n"
    assert to_wire(raw.decode("utf-8", "surrogateescape")) == raw


def test_str_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="not valid Unicode"):
        to_wire("Subject: x\n\n\ud800\n")


def test_legacy_message_input() -> None:
    msg = Message()
    msg["Subject"] = "hello"
    msg["From"] = "Jane <jane@example.org>"
    msg.set_payload("line one\nFrom the start\n.dot\n")
    data = to_wire(msg)
    assert no_bare_cr_or_lf(data)
    # "From " is not mangled (that is for mbox files) and the dot is not
    # stuffed (the SMTP client does that).
    assert data.endswith(b"\r\n\r\nline one\r\nFrom the start\r\n.dot\r\n")
    assert data.startswith(b"Subject: hello\r\nFrom: Jane <jane@example.org>\r\n")


def test_email_message_with_non_ascii_headers_is_rfc2047_encoded() -> None:
    msg = EmailMessage()
    msg["Subject"] = "Grüße aus Köln ☃"
    msg["From"] = "Jörg Müller <joerg@example.org>"
    msg["To"] = '"Doe, Jane" <jane@example.org>'
    msg.set_content("Hallo\n")
    data = to_wire(msg)
    assert data.isascii()  # the default policy encodes, no SMTPUTF8 needed
    assert no_bare_cr_or_lf(data)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "Grüße aus Köln ☃"
    assert parsed["From"].addresses[0].display_name == "Jörg Müller"
    assert parsed["To"].addresses[0].display_name == "Doe, Jane"
    assert parsed.get_content().splitlines() == ["Hallo"]


def test_email_message_with_smtputf8_policy_keeps_utf8_headers() -> None:
    msg = EmailMessage(policy=email.policy.SMTPUTF8)
    msg["Subject"] = "Grüße"
    msg.set_content("x\n")
    data = to_wire(msg)
    assert "Subject: Grüße\r\n".encode() in data
    assert no_bare_cr_or_lf(data)


def test_email_message_with_attachment_round_trips() -> None:
    payload = bytes(range(256)) * 40
    msg = EmailMessage()
    msg["Subject"] = "Rapport für März"
    msg.set_content("See the attachment.\n")
    msg.add_attachment(
        payload, maintype="application", subtype="octet-stream", filename="daten.bin"
    )
    prepared = prepare(FROM, TO, msg)
    assert no_bare_cr_or_lf(prepared.data)
    assert max(map(len, prepared.data.split(b"\r\n"))) <= MAX_LINE
    parsed = email.message_from_bytes(prepared.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    attachments = list(parsed.iter_attachments())
    assert len(attachments) == 1
    assert attachments[0].get_filename() == "daten.bin"
    assert attachments[0].get_content() == payload
    assert parsed["Subject"] == "Rapport für März"
    assert parsed["Message-Id"] == f"<{prepared.message_id}>"


def test_message_object_is_not_changed_by_prepare() -> None:
    msg = EmailMessage()
    msg["Subject"] = "x"
    msg.set_content("y\n")
    before = msg.as_bytes()
    prepare(FROM, TO, msg)
    assert msg.as_bytes() == before
    assert "Message-Id" not in msg and "Date" not in msg


@pytest.mark.parametrize("value", [None, 42, ["Subject: x"], {"Subject": "x"}])
def test_unsupported_type_is_refused(value: Any) -> None:
    with pytest.raises(InvalidMessage, match=type(value).__name__):
        to_wire(value)


@pytest.mark.parametrize("value", [b"", "", b"\r\n\r\n", " \n\t\n"])
def test_empty_message_is_refused(value: bytes | str) -> None:
    with pytest.raises(InvalidMessage, match="empty"):
        to_wire(value)


def test_unserialisable_message_is_refused_as_invalid() -> None:
    msg = Message()
    msg["Subject"] = "x\r\nBcc: victim@example.org"  # compat32 stores it as is
    msg.set_payload("y")
    with pytest.raises(InvalidMessage, match="header injection"):
        to_wire(msg)


# --- line endings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (b"A: 1\nB: 2\n\nx\ny\n", b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n"),
        (b"A: 1\rB: 2\r\rx\ry\r", b"A: 1\r\nB: 2\r\n\r\nx\r\ny\r\n"),
        (b"A: 1\r\nB: 2\n\rx\r\r\ny", b"A: 1\r\nB: 2\r\n\r\nx\r\n\r\ny\r\n"),
        (b"A: 1\n\n\n\n", b"A: 1\r\n\r\n\r\n\r\n"),
        (b"A: 1\r\n\r\nno final newline", b"A: 1\r\n\r\nno final newline\r\n"),
        # As many CRs as LFs, but not in pairs: still bare line breaks.
        (b"A: 1\n\rB: 2\n\r\n\rx\n\r", b"A: 1\r\n\r\nB: 2\r\n\r\n\r\nx\r\n\r\n"),
    ],
    ids=["bare-LF", "bare-CR", "mixed", "blank-lines", "no-final-newline", "LF-CR-balanced"],
)
def test_line_endings_become_crlf(given: bytes, expected: bytes) -> None:
    assert to_wire(given) == expected
    assert to_wire(given.decode()) == expected


def test_leading_dots_are_left_for_the_smtp_client() -> None:
    data = to_wire(b"Subject: x\n\n.\n..two\n.leading\n")
    assert data == b"Subject: x\r\n\r\n.\r\n..two\r\n.leading\r\n"


def test_dot_transparency_through_a_real_relay(relay: Any) -> None:
    # ``relay`` is the plain aiosmtpd relay from conftest.py.
    body = ".\n..\n.leading dot\nplain\n. \n"
    data = prepare(FROM, TO, f"Subject: dots\n\n{body}").data
    with smtplib.SMTP(relay.host, relay.port, timeout=10) as client:
        client.sendmail(FROM, TO, data)
    (received,) = relay.messages
    assert no_bare_cr_or_lf(received.original_content)
    assert received.content.split(b"\r\n\r\n", 1)[1] == body.replace("\n", "\r\n").encode()


# --- long lines and NUL ------------------------------------------------------


def test_line_of_998_octets_is_accepted() -> None:
    line = b"x" * MAX_LINE
    assert to_wire(b"Subject: x\n\n" + line + b"\n") == b"Subject: x\r\n\r\n" + line + b"\r\n"


@pytest.mark.parametrize("as_str", [False, True])
def test_line_over_998_octets_is_refused_naming_the_line(as_str: bool) -> None:
    data = b"Subject: x\n\nshort\n" + b"y" * 999 + b"\nshort\n"
    with pytest.raises(InvalidMessage, match=r"line 4 is 999 octets long") as info:
        to_wire(data.decode() if as_str else data)
    assert isinstance(info.value, ValueError)


def test_long_line_counts_octets_not_characters() -> None:
    line = "é" * 500  # 1,000 octets in UTF-8
    with pytest.raises(InvalidMessage, match="line 3 is 1000 octets long"):
        to_wire(f"Subject: x\n\n{line}\n")


def test_long_header_line_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="line 1 is"):
        to_wire(b"X-Long: " + b"z" * 1000 + b"\n\nbody\n")


def test_line_numbers_count_bare_cr_as_line_breaks() -> None:
    with pytest.raises(InvalidMessage, match="line 3 is 1000"):
        to_wire(b"A: 1\r\rb" + b"c" * 999 + b"\r")


def test_nul_byte_is_refused_naming_the_line() -> None:
    with pytest.raises(InvalidMessage, match="line 3 contains a NUL byte"):
        to_wire(b"Subject: x\n\nnul \x00 here\n")


def test_legacy_message_with_long_line_is_reencoded_not_broken() -> None:
    text = "word " * 300 + "end"  # one 1,503-character line
    msg = Message()
    msg["Subject"] = "long"
    msg.set_payload(text + "\n")
    data = to_wire(msg)
    assert max(map(len, data.split(b"\r\n"))) <= MAX_LINE
    parsed = email.message_from_bytes(data)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_payload(decode=True) == (text + "\r\n").encode()
    # The caller's object is untouched.
    assert msg.get_payload() == text + "\n"
    assert msg["Content-Transfer-Encoding"] is None


def test_parsed_message_with_long_8bit_line_is_reencoded() -> None:
    line = "ü" * 600  # 1,200 octets
    raw = "Subject: x\nContent-Type: text/plain; charset=utf-8\n"
    raw += f"Content-Transfer-Encoding: 8bit\n\n{line}\n"
    msg = email.message_from_bytes(raw.encode())
    data = to_wire(msg)
    assert data.isascii()
    assert max(map(len, data.split(b"\r\n"))) <= MAX_LINE
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content().splitlines() == [line]
    assert header_values(data, "Content-Transfer-Encoding") == ["quoted-printable"]


def test_email_message_forced_8bit_long_line_is_reencoded() -> None:
    msg = EmailMessage()
    msg["Subject"] = "x"
    msg.set_content("k" * 2000 + "\n", cte="8bit")
    data = to_wire(msg)
    assert max(map(len, data.split(b"\r\n"))) <= MAX_LINE
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content().splitlines() == ["k" * 2000]


def test_multipart_long_part_is_reencoded_and_others_untouched() -> None:
    msg = MIMEMultipart()
    msg.attach(MIMEText("short body\n"))
    msg.attach(MIMEText("y" * 1200 + "\nz\n"))
    data = to_wire(msg)
    assert max(map(len, data.split(b"\r\n"))) <= MAX_LINE
    parsed = email.message_from_bytes(data)
    first, second = parsed.get_payload()
    assert first["Content-Transfer-Encoding"] == "7bit"
    assert first.get_payload().splitlines() == ["short body"]
    assert second["Content-Transfer-Encoding"] == "quoted-printable"
    assert second.get_payload(decode=True).splitlines() == [b"y" * 1200, b"z"]


def test_signed_message_with_long_line_is_refused_not_reencoded() -> None:
    msg = MIMEMultipart("signed", protocol="application/pgp-signature")
    msg.attach(MIMEText("y" * 1200 + "\n"))
    with pytest.raises(InvalidMessage, match="1200 octets long"):
        to_wire(msg)


def test_message_with_unfoldable_long_header_is_refused() -> None:
    msg = Message()
    msg["X-Token"] = "t" * 1200  # compat32 cannot fold a single word
    msg.set_payload("x")
    with pytest.raises(InvalidMessage, match="octets long"):
        to_wire(msg)


# --- Message-Id --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Message-Id: <abc.def@example.org>", "abc.def@example.org"),
        (b"MESSAGE-ID: <x@y>", "x@y"),
        (b"message-id:<x@y>", "x@y"),
        (b"Message-ID :  <x@y>  ", "x@y"),
        (b"Message-Id:\n  <folded.id@example.org>", "folded.id@example.org"),
        (b"Message-Id:\r\n\t<tab@example.org>", "tab@example.org"),
        (b"Message-Id: <a+b=c$d'e@[127.0.0.1]>", "a+b=c$d'e@[127.0.0.1]"),
    ],
)
def test_well_formed_message_id_is_kept(header: bytes, expected: str) -> None:
    raw = b"Subject: x\n" + header + b"\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nbody\n"
    prepared = prepare(FROM, TO, raw)
    assert prepared.message_id == expected
    assert prepared.data == to_wire(raw)  # nothing added, nothing rewritten


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"abc@example.org",
        b"<abc@example.org",
        b"abc@example.org>",
        b"<abc>",
        b"<@example.org>",
        b"<abc@>",
        b"<a b@example.org>",
        b"<a..b@example.org>",
        b"<.a@example.org>",
        b"<a@b@example.org>",
        b"<a@example.org> <b@example.org>",
        b"<a@example.org> (comment)",
        b'<"quoted"@example.org>',
        b"<\xc3\xa9t\xc3\xa9@example.org>",
        b"<a@[bad]literal]>",
    ],
)
def test_malformed_message_id_is_refused(value: bytes) -> None:
    raw = b"Subject: x\nMessage-Id: " + value + b"\n\nbody\n"
    with pytest.raises(InvalidMessage, match="malformed Message-Id") as info:
        prepare(FROM, TO, raw)
    shown = value.strip().decode("utf-8")
    assert repr(shown) in str(info.value)


def test_two_message_ids_are_refused() -> None:
    raw = b"Message-Id: <a@example.org>\nmessage-id: <b@example.org>\n\nbody\n"
    with pytest.raises(InvalidMessage, match="2 Message-Id"):
        prepare(FROM, TO, raw)


def test_missing_message_id_is_added_in_rfc5322_form() -> None:
    prepared = prepare(FROM, TO, b"Subject: x\nTo: rcpt@example.org\n\nbody\n")
    values = header_values(prepared.data, "Message-Id")
    assert values == [f"<{prepared.message_id}>"]
    assert RFC5322_MSGID.match(values[0])
    assert "<" not in prepared.message_id and ">" not in prepared.message_id
    # Added at the end of the header block; the original fields keep their order.
    assert prepared.data.startswith(b"Subject: x\r\nTo: rcpt@example.org\r\nMessage-Id: <")
    assert prepared.data.endswith(b"\r\n\r\nbody\r\n")


def test_message_id_only_in_the_body_does_not_count() -> None:
    raw = b"Subject: x\n\nMessage-Id: <in.body@example.org>\nDate: nope\n"
    prepared = prepare(FROM, TO, raw)
    assert prepared.message_id != "in.body@example.org"
    assert header_values(prepared.data, "Message-Id") == [f"<{prepared.message_id}>"]
    assert len(header_values(prepared.data, "Date")) == 1
    assert prepared.data.endswith(b"\r\n\r\nMessage-Id: <in.body@example.org>\r\nDate: nope\r\n")


@pytest.mark.parametrize("name", [b"X-Message-Id", b"Resent-Message-Id", b"Message-Ids"])
def test_other_fields_ending_or_starting_like_message_id_do_not_count(name: bytes) -> None:
    raw = name + b": <other@example.org>\n\nbody\n"
    prepared = prepare(FROM, TO, raw)
    assert prepared.message_id != "other@example.org"
    assert header_values(prepared.data, "Message-Id") == [f"<{prepared.message_id}>"]


def test_message_id_of_a_message_object() -> None:
    msg = EmailMessage()
    msg["Message-Id"] = "<given@example.org>"
    msg.set_content("x\n")
    assert prepare(FROM, TO, msg).message_id == "given@example.org"


def test_msgid_domain_is_used() -> None:
    prepared = prepare(FROM, TO, b"Subject: x\n\nbody\n", msgid_domain="mail.example.org")
    assert prepared.message_id.endswith("@mail.example.org")


@pytest.mark.parametrize("domain", ["", "a b", "a..b", "exämple.org", "<x>", "a@b"])
def test_bad_msgid_domain_is_refused(domain: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        make_msgid(domain)


def test_make_msgid_default_domain_is_a_dot_atom() -> None:
    msgid = make_msgid()
    assert RFC5322_MSGID.match(msgid), msgid


@pytest.mark.parametrize(
    ("hostname", "domain"),
    [
        ("mail.example.org", "mail.example.org"),
        ("vm", "vm"),
        ("bad host_näme..x.", "bad-host-n-me.x"),
        ("", "localhost"),
        ("...", "localhost"),
    ],
)
def test_make_msgid_domain_from_the_host_name(
    monkeypatch: pytest.MonkeyPatch, hostname: str, domain: str
) -> None:
    monkeypatch.setattr(message_module, "_hostname", None)
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    msgid = make_msgid()
    assert msgid.endswith(f"@{domain}>")
    assert RFC5322_MSGID.match(msgid), msgid


def _msgids_in_threads(threads: int, each: int) -> list[str]:
    results: list[list[str]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = [make_msgid() for _ in range(each)]

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [m for r in results for m in r]


def test_msgids_are_unique_across_threads() -> None:
    ids = _msgids_in_threads(threads=8, each=1250)
    assert len(ids) == 10_000
    assert len(set(ids)) == 10_000
    assert all(RFC5322_MSGID.match(m) for m in ids)


_CHILD = """
import sys, time
from mailspool.message import make_msgid
start = float(sys.argv[1])
while time.time() < start:
    pass
sys.stdout.write("\\n".join(make_msgid() for _ in range(5000)))
"""


def test_msgids_are_unique_across_processes() -> None:
    start = time.time() + 1.0  # both children generate in the same instants
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, repr(start)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        for _ in range(2)
    ]
    ids: list[str] = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        ids.extend(out.decode().split("\n"))
    ids.extend(make_msgid() for _ in range(1000))
    assert len(ids) == 11_000
    assert len(set(ids)) == 11_000
    assert all(RFC5322_MSGID.match(m) for m in ids)


# --- Date --------------------------------------------------------------------


def test_missing_date_is_added() -> None:
    prepared = prepare(FROM, TO, b"Message-Id: <a@example.org>\n\nbody\n")
    (value,) = header_values(prepared.data, "Date")
    when = email.utils.parsedate_to_datetime(value)
    assert abs(when.timestamp() - time.time()) < 60
    assert prepared.data.startswith(b"Message-Id: <a@example.org>\r\nDate: ")


@pytest.mark.parametrize("name", [b"Date", b"DATE", b"date"])
def test_present_date_is_kept(name: bytes) -> None:
    raw = name + b": Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <a@b>\n\nbody\n"
    prepared = prepare(FROM, TO, raw)
    assert prepared.data == to_wire(raw)


def test_folded_date_is_detected() -> None:
    raw = b"Date:\n Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <a@b>\n\nbody\n"
    assert prepare(FROM, TO, raw).data == to_wire(raw)


# --- the header block --------------------------------------------------------


def test_message_without_headers_gets_a_header_block() -> None:
    prepared = prepare(FROM, TO, "Hello there: friend\nsecond line\n")
    # "Hello there:" is not a header field name (no spaces allowed).
    parsed = email.message_from_bytes(prepared.data)
    assert parsed["Message-Id"] == f"<{prepared.message_id}>"
    assert parsed["Date"] is not None
    assert parsed.get_payload() == "Hello there: friend\r\nsecond line\r\n"


def test_message_starting_with_an_mbox_from_line_is_refused() -> None:
    raw = b"From jane@example.org Mon Jan  1 00:00:00 2024\nSubject: x\n\nbody\n"
    with pytest.raises(InvalidMessage, match="mbox 'From ' line"):
        prepare(FROM, TO, raw)
    # A "From:" header field is of course fine.
    assert prepare(FROM, TO, b"From: jane@example.org\n\nbody\n").data.startswith(b"From: ")


def test_message_starting_with_blank_line() -> None:
    prepared = prepare(FROM, TO, b"\nbody\n")
    assert re.fullmatch(rb"Message-Id: <[^>]+>\r\nDate: [^\r\n]+\r\n\r\nbody\r\n", prepared.data)


def test_headers_only_message() -> None:
    prepared = prepare(FROM, TO, b"Subject: only headers\n")
    assert re.fullmatch(
        rb"Subject: only headers\r\nMessage-Id: <[^>]+>\r\nDate: [^\r\n]+\r\n", prepared.data
    )


def test_prepared_envelope_and_eight_bit() -> None:
    prepared = prepare("Jane <jane@example.org>", "bob@example.org", "Subject: x\n\nü\n")
    assert isinstance(prepared, Prepared)
    assert prepared.envelope == Envelope("jane@example.org", ("bob@example.org",))
    assert prepared.eight_bit
    assert not prepare(FROM, TO, b"Subject: x\n\nascii\n").eight_bit


def test_prepare_refuses_bad_address_before_looking_at_the_message() -> None:
    with pytest.raises(InvalidAddress):
        prepare(FROM, ["bad"], 12345)  # type: ignore[arg-type]


# --- addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mailbox"),
    [
        ("jane@example.org", "jane@example.org"),
        ("  jane@example.org\t", "jane@example.org"),
        ("<jane@example.org>", "jane@example.org"),
        ("Jane <jane@example.org>", "jane@example.org"),
        ("Jane<jane@example.org>", "jane@example.org"),
        ("Jane Q. Public <jane@example.org>", "jane@example.org"),
        ('"Doe, Jane" <jane@example.org>', "jane@example.org"),
        ('"Doe, \\"JJ\\" Jane" <jane@example.org>', "jane@example.org"),
        ('"<evil@example.com>" <jane@example.org>', "jane@example.org"),
        ("Jane (Acme, Inc.) <jane@example.org>", "jane@example.org"),
        ("=?utf-8?q?J=C3=B6rg?= <joerg@example.org>", "joerg@example.org"),
        ("Jörg Müller <jörg@müller.example>", "jörg@müller.example"),
        ("< jane@example.org >", "jane@example.org"),
        ('"a b"@example.org', '"a b"@example.org'),
        ('"a\u00a0b"@example.org', '"a\u00a0b"@example.org'),
        ('"Doe, Jane"@example.org', '"Doe, Jane"@example.org'),
        ('"a@b"@example.org', '"a@b"@example.org'),
        ('"a\\"b"@example.org', '"a\\"b"@example.org'),
        ('Jane <"a>b"@example.org>', '"a>b"@example.org'),
        ('<"a<b"@example.org>', '"a<b"@example.org'),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
        ("!#$%&'*+/=?^_`{|}~-@example.org", "!#$%&'*+/=?^_`{|}~-@example.org"),
        ("postmaster@localhost", "postmaster@localhost"),
        ("Jane@Example.ORG", "Jane@Example.ORG"),
        ("a@[192.0.2.1]", "a@[192.0.2.1]"),
        ("a@[IPv6:2001:db8::1]", "a@[IPv6:2001:db8::1]"),
        ("用户@例子.广告", "用户@例子.广告"),
        ("x@1-2.example", "x@1-2.example"),
    ],
)
def test_valid_addresses(value: str, mailbox: str) -> None:
    assert parse_mailbox(value) == mailbox


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("<>", "empty mailbox"),
        ("Jane <>", "empty mailbox"),
        ("foo", "no '@'"),
        ("a@", "empty domain"),
        ("@b", "empty local part"),
        ("a@b@c", "it has two '@'"),
        ("a b@example.org", "local part"),
        ("a..b@example.org", "local part"),
        (".a@example.org", "local part"),
        ("a.@example.org", "local part"),
        ('"unclosed@example.org', "local part"),
        ("a,b@example.org", "local part"),
        ("a@example.org, b@example.org", "it has two '@'"),
        ("Doe, Jane <jane@example.org>", "unexpected ','"),
        ("jane@evil.example <jane@example.org>", "unexpected '@'"),
        ("<a@example.org> <b@example.org>", "two '@'"),
        ('"unclosed <jane@example.org>', "unexpected '\"'"),
        ("jane@example.org>", "unexpected '@'"),
        ("a@-example.org", "invalid label '-example'"),
        ("a@example-.org", "invalid label 'example-'"),
        ("a@exa..mple.org", "invalid label ''"),
        ("a@.example.org", "invalid label ''"),
        ("a@example.org.", "invalid label ''"),
        ("a@exa_mple.org", "invalid label"),
        ("a@exa mple.org", "invalid label"),
        ("a@" + "l" * 64 + ".org", "longer than 63"),
        ("a@" + "ü" * 60 + ".org", "longer than 63"),
        ("a@[192.0.2]", "address literal"),
        ("a@[IPv6:not:an:address]", "address literal"),
        ("a@[IPv6:fe80::1%eth0]", "address literal"),
        ("a@[192.0.2.1", "address literal"),
        ("a\x01b@example.org", "control character"),
        ("a@example.org\x7f", "control character"),
        ("Jane\u2028 <jane@example.org>", "control character"),
        ("Jane \x85<jane@example.org>", "control character"),
        ("a\ud800@example.org", "lone surrogate"),
        ("a\u00a0b@example.org", "white space outside quotes"),
        ("jane@exa\u3000mple.org", "white space outside quotes"),
        ('"a"@exa\u2003mple.org', "white space outside quotes"),
    ],
)
def test_invalid_addresses(value: str, reason: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        parse_mailbox(value)
    assert isinstance(info.value, ValueError)
    assert info.value.address == value
    assert repr(value) in str(info.value)
    assert reason in info.value.reason


def test_local_part_length_is_counted_in_octets() -> None:
    assert parse_mailbox("l" * 64 + "@example.org") == "l" * 64 + "@example.org"
    assert parse_mailbox("é" * 32 + "@example.org") == "é" * 32 + "@example.org"
    for local in ("l" * 65, "é" * 32 + "l"):
        with pytest.raises(InvalidAddress, match="local part longer than 64 octets"):
            parse_mailbox(local + "@example.org")


def _domain(octets: int) -> str:
    """A domain of valid 63-character labels, exactly ``octets`` long."""
    labels = []
    while octets > 64:
        labels.append("d" * 63)
        octets -= 64
    labels.append("d" * octets)
    return ".".join(labels)


def test_domain_length() -> None:
    assert len(_domain(256)) == 256
    with pytest.raises(InvalidAddress, match="domain longer than 255 octets"):
        parse_mailbox("a@" + _domain(256))
    # 255 octets is a valid domain, but the whole path may be 254 at most.
    with pytest.raises(InvalidAddress, match="longer than 254 octets"):
        parse_mailbox("a@" + _domain(255))
    assert parse_mailbox("a@" + _domain(252)) == "a@" + _domain(252)


@pytest.mark.parametrize("char", ["\r", "\n", "\0"])
@pytest.mark.parametrize(
    "template",
    [
        "{c}jane@example.org",
        "jane{c}@example.org",
        "jane@example.org{c}",
        "jane@exa{c}mple.org",
        '"ja{c}ne"@example.org',
        "Jane{c} <jane@example.org>",
        '"Doe,{c} Jane" <jane@example.org>',
        "Jane <jane@example.org>{c}",
        "Jane <jane@example.org>{c}Bcc: victim@example.com",
        "jane@example.org{c}RCPT TO:<victim@example.com>",
    ],
)
def test_injection_characters_are_refused_anywhere(char: str, template: str) -> None:
    value = template.format(c=char)
    with pytest.raises(InvalidAddress, match="header injection") as info:
        parse_mailbox(value)
    assert info.value.address == value
    assert repr(char) in str(info.value)


@pytest.mark.parametrize("value", [None, 42, b"jane@example.org", ["jane@example.org"]])
def test_non_str_address_is_refused(value: Any) -> None:
    with pytest.raises(InvalidAddress, match="expected str") as info:
        parse_mailbox(value)
    assert info.value.address is value


def test_envelope_reduces_display_names_and_keeps_order() -> None:
    env = make_envelope(
        "Sender <sender@example.org>",
        ['"Doe, Jane" <jane@example.org>', "bob@example.org", "Carol <carol@example.org>"],
    )
    assert env == Envelope(
        "sender@example.org", ("jane@example.org", "bob@example.org", "carol@example.org")
    )
    assert not env.smtputf8


def test_str_toaddrs_is_one_address_never_split() -> None:
    env = make_envelope(FROM, '"Doe, Jane" <jane@example.org>')
    assert env.recipients == ("jane@example.org",)
    with pytest.raises(InvalidAddress) as info:
        make_envelope(FROM, "a@example.org, b@example.org")
    assert info.value.address == "a@example.org, b@example.org"
    with pytest.raises(InvalidAddress):
        make_envelope(FROM, "a@example.org,b@example.org")


def test_duplicate_recipients_are_collapsed() -> None:
    env = make_envelope(
        FROM,
        [
            "a@example.org",
            "b@example.org",
            "A <a@example.org>",
            "a@EXAMPLE.org",
            "b@example.org",
            "A@example.org",  # local parts are case-sensitive: another mailbox
        ],
    )
    assert env.recipients == ("a@example.org", "b@example.org", "A@example.org")


@pytest.mark.parametrize("toaddrs", [[], (), set(), iter([])])
def test_no_recipients_is_refused(toaddrs: Any) -> None:
    with pytest.raises(InvalidAddress, match="no recipients"):
        make_envelope(FROM, toaddrs)


def test_generator_of_recipients_is_accepted() -> None:
    env = make_envelope(FROM, (f"r{i}@example.org" for i in range(3)))
    assert env.recipients == ("r0@example.org", "r1@example.org", "r2@example.org")


@pytest.mark.parametrize("toaddrs", [None, 42, b"a@example.org", bytearray(b"x")])
def test_recipients_of_the_wrong_type_are_refused(toaddrs: Any) -> None:
    with pytest.raises(InvalidAddress, match="recipients must be") as info:
        make_envelope(FROM, toaddrs)
    assert info.value.address is toaddrs


def test_non_str_recipient_in_a_list_is_refused() -> None:
    with pytest.raises(InvalidAddress, match="expected str, got bytes"):
        make_envelope(FROM, ["a@example.org", b"b@example.org"])  # type: ignore[list-item]


def test_bad_sender_is_refused() -> None:
    with pytest.raises(InvalidAddress, match="'bad sender'"):
        make_envelope("bad sender", TO)


@pytest.mark.parametrize(
    ("sender", "recipients", "smtputf8"),
    [
        ("a@example.org", ["b@example.org"], False),
        ("jörg@example.org", ["b@example.org"], True),
        ("a@example.org", ["b@example.org", "c@bücher.example"], True),
        ("Jörg <a@example.org>", ["Zoë <b@example.org>"], False),  # names do not count
    ],
)
def test_smtputf8_is_needed_for_non_ascii_mailboxes(
    sender: str, recipients: list[str], smtputf8: bool
) -> None:
    assert make_envelope(sender, recipients).smtputf8 is smtputf8


# --- hypothesis --------------------------------------------------------------

_line_text = st.text(
    alphabet=st.characters(exclude_characters="\r\n\x00", exclude_categories=("Cs",)),
    max_size=40,
)


@given(
    lines=st.lists(st.tuples(_line_text, st.sampled_from(["\r", "\n", "\r\n"])), max_size=30),
    last=_line_text,
    as_bytes=st.booleans(),
)
def test_any_line_endings_give_crlf_and_the_same_lines(
    lines: list[tuple[str, str]], last: str, as_bytes: bool
) -> None:
    body = "".join(text + sep for text, sep in lines) + last
    message = "Subject: x\n\n" + body
    data = to_wire(message.encode() if as_bytes else message)
    assert no_bare_cr_or_lf(data)
    assert data.endswith(b"\r\n")
    # A CR directly followed by an LF is one CRLF; every other CR or LF is a
    # line break of its own.
    expected = re.split("\r\n|\r|\n", message)
    if expected[-1] == "":
        expected.pop()
    assert data.decode().split("\r\n")[:-1] == expected


@given(
    before=st.text(max_size=20),
    char=st.sampled_from(["\r", "\n", "\0"]),
    after=st.text(max_size=20),
)
def test_any_string_with_cr_lf_or_nul_is_refused(before: str, char: str, after: str) -> None:
    value = before + char + after
    with pytest.raises(InvalidAddress) as info:
        parse_mailbox(value)
    assert info.value.address == value


_ASCII_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
_letters = st.characters(categories=("Ll", "Lu", "Lo"), min_codepoint=0xC0, max_codepoint=0xFFFF)
_atext = st.one_of(st.sampled_from(_ASCII_ATEXT), _letters)
_atom = st.text(alphabet=_atext, min_size=1, max_size=10)
_dot_atom = st.lists(_atom, min_size=1, max_size=3).map(".".join)
_qtext = st.one_of(
    st.sampled_from([" ", ",", "@", "<", ">", "(", ")", ";", ":", "[", "]", "."]),
    st.sampled_from(_ASCII_ATEXT),
    _letters,
    st.sampled_from(['\\"', "\\\\"]),
)
_quoted = st.lists(_qtext, max_size=15).map(lambda parts: '"' + "".join(parts) + '"')
_local = st.one_of(_dot_atom, _quoted).filter(lambda s: len(s.encode()) <= 64)
_label_char = st.one_of(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789"), _letters)
_label = st.tuples(
    _label_char, st.text(alphabet=st.one_of(_label_char, st.just("-")), max_size=8), _label_char
).map(lambda t: t[0] + t[1] + t[2])
_domain_st = st.lists(st.one_of(_label, _label_char), min_size=1, max_size=4).map(".".join)
_mailbox = st.builds(lambda local, domain: f"{local}@{domain}", _local, _domain_st)
_display = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"), exclude_characters='"\\'),
    max_size=20,
)


@settings(max_examples=300)
@given(mailbox=_mailbox, display=_display)
def test_valid_mailboxes_are_accepted_unchanged(mailbox: str, display: str) -> None:
    assert parse_mailbox(mailbox) == mailbox
    assert parse_mailbox(f"<{mailbox}>") == mailbox
    assert parse_mailbox(f'"{display}" <{mailbox}>') == mailbox
    env = make_envelope(mailbox, [mailbox, f'"{display}" <{mailbox}>'])
    assert env.recipients == (mailbox,)
    assert env.smtputf8 is (not mailbox.isascii())


@pytest.mark.parametrize(
    "value",
    [
        "<id@example.org>\r\nRCPT TO:<victim@evil.example>",
        "Hello\r\n\r\nInjected text where the body should start",
        "Hello\nInjected line",
        "Hello\rInjected line",
        "a@example.org\r\nnot a header field",
        "ends with a break\r\n",
        "nul\x00byte",
    ],
)
def test_message_object_header_with_a_line_break_is_refused(value: str) -> None:
    from email.message import Message as Compat32Message

    msg = Compat32Message()
    msg["Subject"] = value
    msg.set_payload("body\n")
    with pytest.raises(InvalidMessage, match="header injection"):
        to_wire(msg)


@pytest.mark.parametrize("value", ["folded\r\n continued", "folded\n\tcontinued", "plain"])
def test_message_object_header_folding_is_kept(value: str) -> None:
    from email.message import Message as Compat32Message

    msg = Compat32Message()
    msg["Subject"] = value
    msg.set_payload("body\n")
    wire = to_wire(msg)
    first = wire.split(b"\r\n\r\n", 1)[0]
    assert first.startswith(b"Subject: ")
    assert (
        first.replace(b"\r\n", b"")
        == b"Subject: " + value.replace("\r\n", "").replace("\n", "").encode()
    )


def test_one_cleaned_host_name_for_message_ids_queue_names_and_stats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mailspool.maildir.directory import host_label, new_name
    from mailspool.postgres.rows import new_id

    label = host_label()
    assert label == message_module.host_name().split(".")[0] and label
    assert new_name().endswith(f".{label}") and new_id().endswith(f".{label}")
    monkeypatch.setattr(message_module, "_hostname", None)
    monkeypatch.setattr(socket, "gethostname", lambda: "a/b:c.example")
    assert message_module.host_name() == "a-b-c.example"  # no path or Maildir separator
