"""Tests for mailspool.errors: reply classification, retry-or-fail, pickling."""

from __future__ import annotations

import errno
import pickle
import smtplib
import socket
import ssl
from typing import Any

import pytest

from mailspool.errors import (
    AuthenticationError,
    ConnectionFailed,
    DeliveryError,
    InvalidAddress,
    InvalidMessage,
    MailspoolError,
    MessageStateError,
    MessageTooLarge,
    NoSuchMessage,
    PermanentError,
    RecipientsRefused,
    RelayUnavailable,
    SMTPTimeout,
    SMTPUTF8Required,
    SpoolCorrupt,
    SpoolError,
    SpoolIOError,
    TLSFailure,
    TransientError,
    enhanced_code,
    error_for_reply,
    is_transient,
)

# --- enhanced status codes ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5.1.1 <jane@example.org>: Recipient address rejected", "5.1.1"),
        ("  4.2.2 Mailbox full", "4.2.2"),
        ("2.0.0 Ok: queued as 4BC2F1", "2.0.0"),
        ("5.7.26 Unauthenticated email is not accepted", "5.7.26"),
        ("4.4.100 odd but allowed", "4.4.100"),
        ("5.1.1", "5.1.1"),
        ("Requested action aborted", None),
        ("", None),
        ("3.1.1 not a class", None),
        ("5.1 too short", None),
        ("5.1.1234 detail too long", None),
        ("55.1.1 subject", None),
        ("see 5.1.1 later in the text", None),
    ],
)
def test_enhanced_code(text: str, expected: str | None) -> None:
    assert enhanced_code(text) == expected


# --- error_for_reply ---------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "text", "phase", "cls", "about_relay", "transient"),
    [
        # About the relay: pause it, do not fail the message.
        (421, "4.3.2 Service shutting down", "rcpt", RelayUnavailable, True, True),
        (421, "Too many connections", "", RelayUnavailable, True, True),
        (554, "5.3.2 No SMTP service here", "greeting", RelayUnavailable, True, True),
        (550, "Go away", "ehlo", RelayUnavailable, True, True),
        (501, "Bad HELO", "helo", RelayUnavailable, True, True),
        # TLS.
        (454, "4.7.0 TLS not available", "starttls", TLSFailure, True, True),
        (501, "Syntax error", "starttls", TLSFailure, True, True),
        (538, "5.7.11 Encryption required", "auth", TLSFailure, True, True),
        (538, "5.7.11 Encryption required", "", TLSFailure, True, True),
        # Authentication.
        (535, "5.7.8 Authentication credentials invalid", "auth", AuthenticationError, True, True),
        (535, "Bad credentials", "", AuthenticationError, True, True),
        (454, "4.7.0 Temporary authentication failure", "auth", AuthenticationError, True, True),
        (454, "4.7.0 Temporary authentication failure", "", AuthenticationError, True, True),
        (530, "5.7.0 Authentication required", "mail", AuthenticationError, True, True),
        (530, "5.7.0 Authentication required", "rcpt", AuthenticationError, True, True),
        (504, "5.5.4 Unrecognized authentication type", "auth", AuthenticationError, True, True),
        (550, "5.7.8 bad credentials", "mail", AuthenticationError, True, True),
        # 454 at RCPT refuses that recipient only.
        (454, "4.7.1 <a@example.com>: Relay access denied", "rcpt", TransientError, False, True),
        # About this message or recipient.
        (450, "4.2.0 Mailbox busy", "rcpt", TransientError, False, True),
        (451, "4.3.0 Local error", "data", TransientError, False, True),
        (452, "4.5.3 Too many recipients", "rcpt", TransientError, False, True),
        (550, "5.1.1 User unknown", "rcpt", PermanentError, False, False),
        (553, "5.1.3 Bad address syntax", "mail", PermanentError, False, False),
        (554, "5.7.1 Spam", "data", PermanentError, False, False),
        (550, "5.7.80 some other policy", "rcpt", PermanentError, False, False),
        # Too big.
        (552, "Message size exceeds fixed limit", "data", MessageTooLarge, False, False),
        (552, "5.3.4 Message too big", "data", MessageTooLarge, False, False),
        (552, "5.3.4 Message size exceeds limit", "mail", MessageTooLarge, False, False),
        (554, "5.3.4 Message too big for system", "data", MessageTooLarge, False, False),
        (
            550,
            "5.2.3 Message length exceeds administrative limit",
            "data",
            MessageTooLarge,
            False,
            False,
        ),
        # 552 with another enhanced code is not about size.
        (552, "5.2.2 Mailbox full", "data", PermanentError, False, False),
        # A reply where none was expected: only a 5xx is permanent.
        (250, "2.0.0 Ok", "data", TransientError, False, True),
        (354, "End data with <CR><LF>.<CR><LF>", "rcpt", TransientError, False, True),
        (-1, "garbage", "", TransientError, False, True),
    ],
)
def test_error_for_reply(
    code: int, text: str, phase: str, cls: type[DeliveryError], about_relay: bool, transient: bool
) -> None:
    exc = error_for_reply(code, text, phase=phase, recipient="a@example.com")
    assert type(exc) is cls
    assert exc.about_relay is about_relay
    assert exc.transient is transient
    assert is_transient(exc) is transient
    assert exc.code == code
    assert exc.text == text
    assert exc.enhanced == enhanced_code(text)
    assert exc.recipient == "a@example.com"


def test_552_at_rcpt_counts_as_452() -> None:
    exc = error_for_reply(552, "5.5.3 Too many recipients", phase="rcpt", recipient="b@x.org")
    assert type(exc) is TransientError
    assert exc.code == 452
    assert exc.enhanced == "5.5.3"
    assert exc.text == "5.5.3 Too many recipients"
    assert is_transient(exc)


def test_error_text_names_recipient_code_and_reply() -> None:
    exc = error_for_reply(550, "5.1.1 User unknown", phase="rcpt", recipient="jane@example.org")
    assert str(exc) == "jane@example.org: 550 5.1.1 User unknown"
    exc = error_for_reply(421, "Closing")
    assert str(exc) == "421 Closing"
    assert str(ConnectionFailed("connection refused")) == "connection refused"


def test_explicit_enhanced_code_wins_over_the_text() -> None:
    exc = PermanentError("5.1.1 text", code=550, enhanced="5.1.2")
    assert exc.enhanced == "5.1.2"
    assert PermanentError("no code here", code=550).enhanced is None


# --- the families ------------------------------------------------------------


def test_hierarchy() -> None:
    assert issubclass(InvalidAddress, ValueError) and issubclass(InvalidAddress, MailspoolError)
    assert issubclass(InvalidMessage, ValueError) and issubclass(InvalidMessage, MailspoolError)
    assert issubclass(ConnectionFailed, ConnectionError)
    assert issubclass(ConnectionFailed, TransientError)
    assert issubclass(SMTPTimeout, TimeoutError) and issubclass(SMTPTimeout, TransientError)
    for cls in (RelayUnavailable, AuthenticationError, TLSFailure):
        assert issubclass(cls, TransientError) and cls.about_relay
    for cls in (SMTPUTF8Required, MessageTooLarge):
        assert issubclass(cls, PermanentError) and not cls.about_relay
    assert issubclass(SpoolCorrupt, SpoolError) and issubclass(SpoolIOError, SpoolError)
    assert issubclass(SpoolIOError, OSError) and not issubclass(SpoolError, OSError)
    assert issubclass(NoSuchMessage, SpoolError) and issubclass(NoSuchMessage, KeyError)
    assert issubclass(MessageStateError, SpoolError)
    for cls in (SpoolCorrupt, NoSuchMessage, MessageStateError):  # logic, not I/O
        assert not issubclass(cls, OSError), cls
    assert not issubclass(PermanentError, TransientError)


def test_invalid_address_carries_the_value() -> None:
    exc = InvalidAddress("a\r\nb", "contains '\\r'")
    assert exc.address == "a\r\nb"
    assert exc.reason == "contains '\\r'"
    assert str(exc) == "invalid address 'a\\r\\nb': contains '\\r'"


@pytest.mark.parametrize("transient", [True, False])
def test_recipients_refused(transient: bool) -> None:
    result = object()
    exc = RecipientsRefused("all refused", result=result, transient=transient, code=550)
    assert exc.result is result
    assert exc.transient is transient
    assert is_transient(exc) is transient
    assert exc.code == 550


# --- is_transient ------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (TimeoutError("timed out"), True),
        (socket.gaierror(socket.EAI_NONAME, "unknown host"), True),
        (ssl.SSLCertVerificationError("certificate verify failed"), True),
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (SpoolIOError(errno.ENOSPC, "spool full"), True),
        (SpoolError("no queue there"), False),
        (NoSuchMessage("1234.5678"), False),
        (MessageStateError("cannot retry a message that is in_flight"), False),
        (SpoolCorrupt("/spool/new/x", "checksum mismatch"), False),
        (ConnectionFailed("lost"), True),
        (SMTPTimeout("no reply after the final dot"), True),
        (SMTPUTF8Required("relay lacks SMTPUTF8", code=None), False),
        (MessageTooLarge("over SIZE"), False),
        (InvalidAddress("x", "bad"), False),
        (InvalidMessage("bad"), False),
        (ValueError("bug"), False),
        (KeyError("bug"), False),
        (RuntimeError("bug"), False),
        # smtplib's own errors, judged like ours.
        (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"), True),
        (smtplib.SMTPDataError(451, b"4.3.0 try later"), True),
        (smtplib.SMTPDataError(554, b"5.7.1 spam"), False),
        (smtplib.SMTPDataError(552, b"5.3.4 too big"), False),
        (smtplib.SMTPSenderRefused(550, b"5.1.8 bad sender", "a@example.org"), False),
        (smtplib.SMTPSenderRefused(421, b"closing", "a@example.org"), True),
        (smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"), True),
        (smtplib.SMTPConnectError(554, b"no service"), True),
        (smtplib.SMTPHeloError(550, b"go away"), True),
        (smtplib.SMTPResponseException(-1, b"garbled"), True),
        (smtplib.SMTPRecipientsRefused({"a@x.org": (550, b"5.1.1 unknown")}), False),
        (
            smtplib.SMTPRecipientsRefused(
                {"a@x.org": (550, b"5.1.1 unknown"), "b@x.org": (450, b"4.2.0 busy")}
            ),
            True,
        ),
        (smtplib.SMTPRecipientsRefused({"a@x.org": (552, b"5.5.3 too many")}), True),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_is_transient(exc: BaseException, expected: bool) -> None:
    assert is_transient(exc) is expected


# --- pickling (errors cross process boundaries) --------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        InvalidAddress("a b@example.org", "local part"),
        InvalidMessage("line 3 is 1200 octets long"),
        DeliveryError("5.1.1 unknown", code=550, recipient="a@example.org"),
        PermanentError("5.1.1 unknown", code=550, enhanced="5.1.1", recipient="a@x.org"),
        error_for_reply(552, "5.5.3 too many", phase="rcpt", recipient="b@x.org"),
        ConnectionFailed("connection lost"),
        SMTPTimeout("no answer", code=None),
        RelayUnavailable("4.3.2 shutting down", code=421),
        AuthenticationError("5.7.8 bad credentials", code=535),
        TLSFailure("certificate verify failed"),
        SMTPUTF8Required("relay does not offer SMTPUTF8"),
        MessageTooLarge("5.3.4 too big", code=552),
        RecipientsRefused("all refused", result={"a@x.org": (550, "no")}, transient=False),
        SpoolIOError(errno.ENOSPC, "No space left on device", "/spool/tmp/x"),
        NoSuchMessage("1234.5678"),
        MessageStateError("cannot hold a message that is failed"),
        SpoolCorrupt("/spool/new/x", "truncated"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(exc: MailspoolError) -> None:
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert str(copy) == str(exc)
    assert copy.args == exc.args
    assert vars(copy) == vars(exc)
    for attr in ("errno", "strerror", "filename"):
        if isinstance(exc, OSError):
            assert getattr(copy, attr) == getattr(exc, attr)
    assert is_transient(copy) == is_transient(exc)


def test_pickled_delivery_error_keeps_its_reply() -> None:
    exc: Any = pickle.loads(pickle.dumps(error_for_reply(550, "5.1.1 no", recipient="a@x.org")))
    assert (exc.code, exc.enhanced, exc.text, exc.recipient) == (
        550,
        "5.1.1",
        "5.1.1 no",
        "a@x.org",
    )


def test_no_such_message_names_the_id_and_is_still_a_key_error() -> None:
    exc = NoSuchMessage("1234.5678")
    assert exc.id == "1234.5678" and exc.args == ("1234.5678",)
    assert str(exc) == "no such message: 1234.5678"
    with pytest.raises(KeyError):  # what callers caught before it had a name
        raise exc
