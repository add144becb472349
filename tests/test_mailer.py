"""SMTPMailer against real aiosmtpd relays: outcomes, failures, reuse, the wire."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from _relays import PerRecipient, RefuseSender, accept_mail
from mailspool import SMTPMailer
from mailspool.errors import (
    AuthenticationError,
    ConnectionFailed,
    InvalidAddress,
    MessageTooLarge,
    PermanentError,
    RecipientsRefused,
    RelayUnavailable,
    SMTPTimeout,
    SMTPUTF8Required,
    TransientError,
)
from mailspool.interfaces import IMailer, ISMTPMailer
from mailspool.message import make_envelope, to_wire
from mailspool.smtp.mailer import Reply, SendResult

MSG = b"From: a@example.org\r\nSubject: test\r\n\r\nHello.\r\n"
FROM = "sender@example.org"


def _accept_rcpt(envelope: Any, address: str, options: list[str]) -> str:
    envelope.rcpt_tos.append(address)
    envelope.rcpt_options.extend(options)
    return "250 2.1.5 OK"


class AtData:
    """Answers the end of DATA with ``reply`` (once, or always)."""

    def __init__(self, reply: str, *, times: int = 1_000_000) -> None:
        self.reply = reply
        self.times = times

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.times > 0:
            self.times -= 1
            return self.reply
        return "250 2.0.0 OK"


# --- the interface and input ---------------------------------------------------


def test_provides_the_interfaces() -> None:
    mailer = SMTPMailer("relay.example.org", tls="none")
    assert verifyObject(ISMTPMailer, mailer)
    assert verifyObject(IMailer, mailer)
    assert mailer.hostname == "relay.example.org" and mailer.port == 25
    assert SMTPMailer("relay.example.org", tls="implicit").port == 465


def test_invalid_input_raises_before_connecting(relay: Any, mailer_for: Any) -> None:
    mailer = mailer_for(relay)
    with pytest.raises(InvalidAddress, match="evil"):
        mailer.send(FROM, ["evil@example.org\r\nRCPT TO:<x@y.org>"], MSG)
    with pytest.raises(InvalidAddress):
        mailer.send(FROM, [], MSG)
    assert relay.connections == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tls": "sometimes"},
        {"username": "u"},
        {"password": "p"},
        {"timeout": 0},
        {"data_timeout": -1},
    ],
)
def test_bad_configuration_is_refused_at_once(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SMTPMailer("relay.example.org", **kwargs)


# --- outcomes ----------------------------------------------------------------


def test_send_reports_every_recipient(relay: Any, mailer_for: Any) -> None:
    result = mailer_for(relay).send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert result == SendResult(("a@example.org", "b@example.org"), {}, Reply(250, "2.0.0 OK"))
    [received] = relay.messages
    assert received.mail_from == FROM
    assert received.rcpt_tos == ["a@example.org", "b@example.org"]
    assert received.original_content == MSG


def test_mixed_recipient_replies_are_reported_exactly(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(
        PerRecipient(
            {
                "gone@example.org": "550 5.1.1 no such user",
                "later@example.org": "451 4.2.0 try again later",
                "crowd@example.org": "552 5.5.3 too many recipients",
            }
        )
    )
    result = mailer_for(relay).send(
        FROM,
        ["ok@example.org", "gone@example.org", "later@example.org", "crowd@example.org"],
        MSG,
    )
    assert result.accepted == ("ok@example.org",)
    assert dict(result.refused) == {
        "gone@example.org": Reply(550, "5.1.1 no such user"),
        "later@example.org": Reply(451, "4.2.0 try again later"),
        # RFC 5321 4.5.3.1.10: 552 at RCPT is taken as 452.
        "crowd@example.org": Reply(452, "5.5.3 too many recipients"),
    }
    assert result.refused["gone@example.org"].enhanced == "5.1.1"
    assert not result.refused["gone@example.org"].transient
    assert result.refused["later@example.org"].transient
    assert result.refused["crowd@example.org"].transient
    assert result.reply is not None and result.reply.code == 250
    assert [m.rcpt_tos for m in relay.messages] == [["ok@example.org"]]


@pytest.mark.parametrize(
    ("replies", "transient"),
    [
        (["550 5.1.1 no such user", "553 5.1.3 bad address"], False),
        (["550 5.1.1 no such user", "450 4.2.1 mailbox busy"], True),
        (["552 5.5.3 too many recipients", "550 5.1.1 no such user"], True),
    ],
)
@pytest.mark.parametrize("pipelining", [True, False])
def test_all_refused_raises_with_the_result(
    smtp_relay: Any, mailer_for: Any, replies: list[str], transient: bool, pipelining: bool
) -> None:
    rcpts = ["x@example.org", "y@example.org"]
    relay = smtp_relay(PerRecipient(dict(zip(rcpts, replies, strict=True))), pipelining=pipelining)
    mailer = mailer_for(relay)
    with pytest.raises(RecipientsRefused) as info:
        mailer.send(FROM, rcpts, MSG)
    error = info.value
    assert error.transient is transient
    assert error.result.accepted == ()
    assert set(error.result.refused) == set(rcpts)
    assert error.result.reply is None
    assert "x@example.org" in str(error) and "y@example.org" in str(error)
    # No message data; the transaction was reset and the connection is still
    # good.  Pipelined, DATA went out with the RCPTs, and the relay refused it.
    if pipelining:
        assert relay.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET"]
        assert relay.pipelined == ["MAIL", "RCPT", "RCPT"]
    else:
        assert relay.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"]
        assert relay.pipelined == []
    mailer.send(FROM, ["fine@example.org"], MSG)
    assert relay.connections == 1


@pytest.mark.parametrize("pipelining", [True, False])
def test_sender_refused_is_permanent_and_the_connection_survives(
    smtp_relay: Any, mailer_for: Any, pipelining: bool
) -> None:
    relay = smtp_relay(RefuseSender({"spammer@example.org"}), pipelining=pipelining)
    mailer = mailer_for(relay)
    with pytest.raises(PermanentError) as info:
        mailer.send("spammer@example.org", ["a@example.org"], MSG)
    assert info.value.code == 550 and info.value.enhanced == "5.7.1"
    assert not info.value.about_relay
    if pipelining:  # RCPT and DATA were on their way; the relay refused both
        assert relay.commands == ["EHLO", "MAIL", "RCPT", "DATA", "RSET"]
    else:
        assert relay.commands == ["EHLO", "MAIL", "RSET"]
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 1 and len(relay.messages) == 1


@pytest.mark.parametrize(
    ("reply", "kind", "transient"),
    [
        ("554 5.6.0 content rejected", PermanentError, False),
        ("451 4.3.0 local problem", TransientError, True),
        ("552 5.3.4 message too big", MessageTooLarge, False),
    ],
)
def test_reply_after_data(
    smtp_relay: Any, mailer_for: Any, reply: str, kind: type[Exception], transient: bool
) -> None:
    relay = smtp_relay(AtData(reply, times=1))
    mailer = mailer_for(relay)
    with pytest.raises(kind) as info:
        mailer.send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert info.value.transient is transient  # type: ignore[attr-defined]
    assert info.value.code == int(reply[:3])  # type: ignore[attr-defined]
    assert relay.messages == []
    # The relay ended the transaction itself: the connection goes on.
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 1 and len(relay.messages) == 1


# --- the relay's own trouble ---------------------------------------------------


@pytest.mark.parametrize("greeting", ["554 5.3.2 no service here", "421 4.3.2 too busy"])
def test_bad_greeting_means_relay_unavailable(
    smtp_relay: Any, mailer_for: Any, greeting: str
) -> None:
    relay = smtp_relay(greeting=greeting)
    with pytest.raises(RelayUnavailable) as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay and info.value.transient
    assert info.value.code == int(greeting[:3])
    assert "greeting" in str(info.value)
    assert "MAIL" not in relay.commands


def test_nobody_listening_means_relay_unavailable(mailer_for: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused

        class Nowhere:
            def mailer_kwargs(self, **kw: Any) -> dict[str, Any]:
                return {"host": "127.0.0.1", "port": port, "tls": "none", **kw}

        with pytest.raises(RelayUnavailable, match="cannot connect") as info:
            mailer_for(Nowhere()).send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay and info.value.code is None


@pytest.mark.parametrize("pipelining", [True, False])
def test_421_at_rcpt_closes_and_next_send_reconnects(
    smtp_relay: Any, mailer_for: Any, pipelining: bool
) -> None:
    relay = smtp_relay(
        PerRecipient({"b@example.org": "421 4.3.2 shutting down"}), pipelining=pipelining
    )
    mailer = mailer_for(relay)
    with pytest.raises(RelayUnavailable) as info:
        mailer.send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert info.value.code == 421 and info.value.about_relay
    # Pipelined, DATA was already on its way (the relay may have answered it
    # before it saw the connection close), but the message data never
    # follows a 421: the connection was closed instead.
    if not pipelining:
        assert "DATA" not in relay.commands
    assert relay.messages == []
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 2


def test_refused_ehlo_when_starttls_is_required(smtp_relay: Any, mailer_for: Any) -> None:
    class NoEhlo:
        async def handle_EHLO(
            self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
        ) -> list[str]:
            return ["554 5.7.1 not you"]

    relay = smtp_relay(NoEhlo(), tls="starttls")
    with pytest.raises(RelayUnavailable) as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    assert info.value.code == 554 and "EHLO" in str(info.value)


def test_malformed_reply_drops_the_connection(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(PerRecipient({"a@example.org": "what is this"}))
    mailer = mailer_for(relay)
    with pytest.raises(ConnectionFailed, match="malformed"):
        mailer.send(FROM, ["a@example.org"], MSG)
    mailer.send(FROM, ["b@example.org"], MSG)
    assert relay.connections == 2


# --- lost connections and timeouts -------------------------------------------------


class DropAt:
    """Closes the connection at RCPT of ``address`` or at the end of DATA, without a reply."""

    def __init__(self, *, rcpt: str | None = None, data: bool = False) -> None:
        self.rcpt = rcpt
        self.data = data

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address == self.rcpt:
            server.transport.close()
            await asyncio.sleep(5)  # cancelled when the connection is gone
        return _accept_rcpt(envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data:
            self.data = False
            server.transport.close()
            await asyncio.sleep(5)
        return "250 2.0.0 OK"


def test_drop_waiting_for_the_final_reply_is_transient_maybe_delivered(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay(DropAt(data=True))
    mailer = mailer_for(relay)
    with pytest.raises(ConnectionFailed) as info:
        mailer.send(FROM, ["a@example.org"], MSG)
    assert isinstance(info.value, ConnectionError) and info.value.transient
    assert "may have been delivered" in str(info.value)
    mailer.send(FROM, ["a@example.org"], MSG)  # a new connection, never the dead one
    assert relay.connections == 2 and len(relay.messages) == 1


def test_drop_during_the_transaction_is_transient(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(DropAt(rcpt="b@example.org"))
    mailer = mailer_for(relay)
    with pytest.raises(ConnectionFailed) as info:
        mailer.send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert info.value.transient and not info.value.about_relay
    assert "may have been delivered" not in str(info.value)
    assert relay.messages == []


@pytest.mark.parametrize("tls", [None, "starttls"])
def test_drop_while_sending_the_data_is_transient(
    smtp_relay: Any, mailer_for: Any, tls: str | None
) -> None:
    relay = smtp_relay(tls=tls, drop_in_data=1)
    mailer = mailer_for(relay)
    big = b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 80_000  # 8 MB
    with pytest.raises(ConnectionFailed) as info:
        mailer.send(FROM, ["a@example.org"], big)
    assert info.value.transient and not info.value.about_relay
    assert relay.messages == []
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 2 and len(relay.messages) == 1


def test_drop_after_the_250_is_a_success(smtp_relay: Any, mailer_for: Any) -> None:
    class CloseAfterAccepting:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            asyncio.get_running_loop().call_soon(server.transport.close)
            return "250 2.0.0 queued"

    relay = smtp_relay(CloseAfterAccepting())
    mailer = mailer_for(relay)
    first = mailer.send(FROM, ["a@example.org"], MSG)
    assert first.accepted == ("a@example.org",)
    second = mailer.send(FROM, ["b@example.org"], MSG)
    assert second.accepted == ("b@example.org",)
    assert relay.connections == 2 and len(relay.messages) == 2


class Stall:
    """Sleeps ``seconds`` before answering RCPT or the end of DATA."""

    def __init__(self, seconds: float, *, at: str) -> None:
        self.seconds = seconds
        self.at = at

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.at == "rcpt":
            await asyncio.sleep(self.seconds)
        return _accept_rcpt(envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.at == "data":
            await asyncio.sleep(self.seconds)
        return "250 2.0.0 OK"


def test_stalled_command_times_out(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(Stall(3, at="rcpt"))
    mailer = mailer_for(relay, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(SMTPTimeout) as info:
        mailer.send(FROM, ["a@example.org"], MSG)
    assert time.monotonic() - start < 2
    assert isinstance(info.value, TimeoutError) and info.value.transient
    assert "RCPT" in str(info.value)


def test_stalled_final_reply_times_out_maybe_delivered(smtp_relay: Any, mailer_for: Any) -> None:
    stall = Stall(3, at="data")
    relay = smtp_relay(stall)
    mailer = mailer_for(relay, data_timeout=0.3)
    with pytest.raises(SMTPTimeout, match="may have been delivered"):
        mailer.send(FROM, ["a@example.org"], MSG)
    stall.seconds = 0  # no longer stalls
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 2  # the timed-out connection was not reused


def test_the_final_reply_has_its_own_longer_timeout(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(Stall(0.6, at="data"))
    mailer = mailer_for(relay, timeout=0.2, data_timeout=5)
    assert mailer.send(FROM, ["a@example.org"], MSG).accepted == ("a@example.org",)


def test_every_message_on_a_reused_connection_gets_both_timeouts(
    smtp_relay: Any, mailer_for: Any
) -> None:
    # The socket's timeout is set only when it changes: the next message on
    # the same connection still waits the long one for its final reply, and
    # its commands the short one.
    stall = Stall(0.6, at="data")
    relay = smtp_relay(stall)
    mailer = mailer_for(relay, timeout=0.2, data_timeout=5)
    envelope = make_envelope(FROM, ["a@example.org"])
    with mailer.connect() as conn:
        for _ in range(2):
            assert conn.send(envelope, to_wire(MSG)).accepted == ("a@example.org",)
        stall.at = "rcpt"
        with pytest.raises(SMTPTimeout, match="RCPT"):
            conn.send(envelope, to_wire(MSG))
    assert relay.connections == 1 and len(relay.messages) == 2


# --- one connection, many messages -----------------------------------------------


def test_many_messages_go_over_one_connection(relay: Any, mailer_for: Any) -> None:
    mailer = mailer_for(relay)
    for i in range(20):
        mailer.send(FROM, [f"r{i}@example.org"], MSG)
    assert len(relay.messages) == 20
    assert relay.connections == 1
    assert relay.commands.count("EHLO") == 1


def test_connection_fast_path(relay: Any, mailer_for: Any) -> None:
    mailer = mailer_for(relay)
    envelope = make_envelope(FROM, ["a@example.org"])
    with mailer.connect() as conn:
        for _ in range(3):
            assert conn.send(envelope, to_wire(MSG)).accepted == ("a@example.org",)
        assert conn.alive and conn.transactions == 3
    assert not conn.alive
    assert relay.commands[-1] == "QUIT"
    assert relay.connections == 1 and len(relay.messages) == 3
    with pytest.raises(ConnectionFailed, match="closed"):
        conn.send(envelope, MSG)


def test_idle_closed_connection_is_reopened(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(idle_timeout=0.3)
    mailer = mailer_for(relay)
    mailer.send(FROM, ["a@example.org"], MSG)
    time.sleep(0.8)  # the relay closes the idle connection
    mailer.send(FROM, ["b@example.org"], MSG)
    assert relay.connections == 2 and len(relay.messages) == 2


class CloseAtSecondMail:
    """Like a relay whose idle timer fires just as the next message starts."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.mails: dict[int, int] = {}

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        n = self.mails[id(session)] = self.mails.get(id(session), 0) + 1
        if n >= 2 or self.how == "always":
            asyncio.get_running_loop().call_soon(server.transport.close)
            if self.how == "drop":
                await asyncio.sleep(5)
            return "421 4.4.2 idle for too long"
        return accept_mail(envelope, address, options)


@pytest.mark.parametrize("how", ["421", "drop"])
def test_reused_connection_closed_at_mail_is_retried_once(
    smtp_relay: Any, mailer_for: Any, how: str
) -> None:
    relay = smtp_relay(CloseAtSecondMail(how))
    mailer = mailer_for(relay)
    mailer.send(FROM, ["a@example.org"], MSG)
    mailer.send(FROM, ["b@example.org"], MSG)
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org"], ["b@example.org"]]
    assert relay.connections == 2


def test_fresh_connection_closed_at_mail_is_not_retried(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(CloseAtSecondMail("always"))
    with pytest.raises(RelayUnavailable) as info:
        mailer_for(relay).send(FROM, ["a@example.org"], MSG)
    assert info.value.code == 421
    assert relay.connections == 1


def test_each_thread_has_its_own_connection(relay: Any) -> None:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(4):
                mailer.send(FROM, [f"t{n}-{i}@example.org"], MSG)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            mailer.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(relay.messages) == 12
    assert relay.connections == 3


def test_reuse_can_be_turned_off(relay: Any, mailer_for: Any) -> None:
    mailer = mailer_for(relay, reuse_connections=False)
    mailer.send(FROM, ["a@example.org"], MSG)
    mailer.send(FROM, ["b@example.org"], MSG)
    assert relay.connections == 2
    assert relay.commands.count("QUIT") == 2


def test_vote_opens_the_connection_send_uses_abort_drops(relay: Any, mailer_for: Any) -> None:
    mailer = mailer_for(relay)
    mailer.vote(FROM, ["a@example.org"], MSG)
    assert relay.connections == 1 and "MAIL" not in relay.commands
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 1
    mailer.vote(FROM, ["a@example.org"], MSG)  # checks the kept connection with NOOP
    assert relay.commands[-1] == "NOOP"
    mailer.abort()
    assert relay.commands[-1] == "QUIT"
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 2 and len(relay.messages) == 2


def test_vote_checks_the_message_against_the_relay(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(size=200)
    mailer = mailer_for(relay)
    with pytest.raises(MessageTooLarge):
        mailer.vote(FROM, ["a@example.org"], MSG + b"x" * 300 + b"\r\n")
    with pytest.raises(RelayUnavailable):
        mailer_for(smtp_relay(greeting="554 no")).vote(FROM, ["a@example.org"], MSG)


# --- what goes on the wire ------------------------------------------------------------


def _email_message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = FROM
    msg["Subject"] = "as an object"
    msg.set_content("one\ntwo\n.three\n")
    return msg


@pytest.mark.parametrize(
    "message",
    [
        b"Subject: bytes\n\nline one\nline two\n",
        "Subject: str\n\nline one\r\nline two\rline three",
        _email_message(),
    ],
    ids=["bytes-lf", "str-mixed", "email-message"],
)
def test_bare_lf_never_reaches_the_wire(relay: Any, mailer_for: Any, message: Any) -> None:
    mailer_for(relay).send(FROM, ["a@example.org"], message)
    wire = relay.messages[0].original_content
    assert wire.count(b"\n") == wire.count(b"\r\n") > 2
    assert wire.count(b"\r") == wire.count(b"\r\n")
    assert b"line" in wire or b"three" in wire


def test_fast_path_normalises_line_endings_too(relay: Any, mailer_for: Any) -> None:
    with mailer_for(relay).connect() as conn:
        conn.send(make_envelope(FROM, ["a@example.org"]), b"Subject: x\n\nbare\nlf")
    assert relay.messages[0].original_content == b"Subject: x\r\n\r\nbare\r\nlf\r\n"


def test_lines_starting_with_a_dot_arrive_intact(relay: Any, mailer_for: Any) -> None:
    body = b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\nmid.dle\r\n. space\r\n"
    mailer_for(relay).send(FROM, ["a@example.org"], body)
    assert relay.messages[0].original_content == body
    assert relay.messages[0].content == body


_LINE = st.one_of(
    st.text(
        alphabet=st.characters(
            blacklist_categories=("Cs",),
            # Only CR and LF may end a line: leave out what str.splitlines also splits on.
            blacklist_characters="\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029",
        ),
        max_size=30,
    ),
    st.sampled_from(["", ".", "..", ".x", " "]),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    lines=st.lists(_LINE, min_size=1, max_size=10),
    endings=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=10, max_size=10),
    as_bytes=st.booleans(),
    final_newline=st.booleans(),
)
def test_any_line_endings_arrive_as_the_same_text_with_crlf(
    relay: Any,
    mailer_for: Any,
    lines: list[str],
    endings: list[str],
    as_bytes: bool,
    final_newline: bool,
) -> None:
    text = "Subject: endings\n" + "".join(
        line + ending for line, ending in zip(lines, endings[: len(lines)], strict=True)
    )
    if not final_newline:
        text = text[: -len(endings[len(lines) - 1])]
    assume(text.strip())
    mailer = mailer_for(relay)
    relay.messages.clear()
    mailer.send(FROM, ["a@example.org"], text.encode("utf-8") if as_bytes else text)
    expected = "".join(line + "\r\n" for line in text.splitlines()).encode("utf-8")
    [received] = relay.messages
    assert received.original_content == expected
    mailer.close()


# --- extensions: SMTPUTF8, 8BITMIME, SIZE -----------------------------------------


def test_non_ascii_addresses_work_with_an_smtputf8_relay(relay: Any, mailer_for: Any) -> None:
    result = mailer_for(relay).send(
        "jörg@exämple.org", ["zoë@example.org", "plain@example.org"], MSG
    )
    assert result.accepted == ("zoë@example.org", "plain@example.org")
    [received] = relay.messages
    assert received.mail_from == "jörg@exämple.org"
    assert received.rcpt_tos == ["zoë@example.org", "plain@example.org"]
    assert received.smtp_utf8 and "SMTPUTF8" in received.mail_options


def test_non_ascii_addresses_fail_clearly_without_smtputf8(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay(smtputf8=False)
    mailer = mailer_for(relay)
    with pytest.raises(SMTPUTF8Required) as info:
        mailer.send(FROM, ["zoë@example.org"], MSG)
    assert isinstance(info.value, PermanentError) and not info.value.transient
    assert "SMTPUTF8" in str(info.value) and "zoë@example.org" in str(info.value)
    assert "MAIL" not in relay.commands
    mailer.send(FROM, ["zoe@example.org"], MSG)  # the connection is still fine
    assert relay.connections == 1


def test_eight_bit_body_is_sent_with_8bitmime(relay: Any, mailer_for: Any) -> None:
    body = "Subject: café\n\nCrème brûlée\n".encode()
    mailer_for(relay).send(FROM, ["a@example.org"], body)
    [received] = relay.messages
    assert "BODY=8BITMIME" in received.mail_options
    assert received.original_content == body.replace(b"\n", b"\r\n")
    # The non-ASCII header asked for SMTPUTF8 too, since the relay offers it.
    assert "SMTPUTF8" in received.mail_options
    plain = "Subject: plain\n\nCrème\n".encode()
    mailer_for(relay).send(FROM, ["a@example.org"], plain)
    assert relay.messages[1].mail_options == ["BODY=8BITMIME", f"SIZE={len(plain) + 3}"]


def test_eight_bit_body_without_8bitmime_is_refused(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(smtputf8=False, ehlo_strip=["8BITMIME"])
    with pytest.raises(PermanentError, match="8BITMIME"):
        mailer_for(relay).send(FROM, ["a@example.org"], "Subject: x\n\nCrème\n")
    assert "MAIL" not in relay.commands


def test_size_limit_is_respected_before_sending(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(size=1000)
    mailer = mailer_for(relay)
    big = MSG + (b"x" * 70 + b"\r\n") * 20
    with pytest.raises(MessageTooLarge) as info:
        mailer.send(FROM, ["a@example.org"], big)
    assert not info.value.transient and "1000" in str(info.value)
    assert "MAIL" not in relay.commands
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.messages[0].mail_options == [f"SIZE={len(MSG)}"]
    assert relay.connections == 1


def test_large_message_goes_through_in_blocks(relay: Any, mailer_for: Any) -> None:
    line = b"0123456789" * 9 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 12_000  # ~1.1 MB, several blocks
    mailer_for(relay).send(FROM, ["a@example.org"], body)
    assert relay.messages[0].original_content == body


# --- the module layout, the defaults ---------------------------------------------------


def test_the_root_exports_each_public_name_from_its_room() -> None:
    import mailspool
    import mailspool.smtp.result
    import mailspool.smtp.sendmail
    from mailspool.smtp.mailer import SMTPMailer as Mailer

    assert Mailer is SMTPMailer is mailspool.SMTPMailer
    assert mailspool.SendmailMailer is mailspool.smtp.sendmail.SendmailMailer
    assert (Reply, SendResult) == (mailspool.Reply, mailspool.SendResult)
    assert (Reply, SendResult) == (mailspool.smtp.result.Reply, mailspool.smtp.result.SendResult)
    for name in mailspool.__all__:
        assert getattr(mailspool, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        mailspool.Nope  # noqa: B018


def test_importing_the_package_loads_none_of_its_modules() -> None:
    # A fresh interpreter: `import mailspool` must not pull in the spool, the
    # processor or the mailers, nor install exit or fork hooks with them.
    code = (
        "import sys, mailspool; print(sorted(m for m in sys.modules if m.startswith('mailspool')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['mailspool']"


def test_timeouts_default_to_rfc_5321_like_values() -> None:
    mailer = SMTPMailer("relay.example.org")
    # Commands 5 min; the reply after the final dot 10 min (RFC 5321 4.5.3.2).
    assert (mailer.timeout, mailer.data_timeout) == (300.0, 600.0)
    assert mailer.connect_timeout == 60.0


def test_a_relay_that_never_greets_times_out_as_unavailable(mailer_for: Any) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody answers
        port = listener.getsockname()[1]

        class Silent:
            def mailer_kwargs(self, **kw: Any) -> dict[str, Any]:
                return {"host": "127.0.0.1", "port": port, "tls": "none", **kw}

        with pytest.raises(RelayUnavailable, match="no greeting") as info:
            mailer_for(Silent(), connect_timeout=0.3).send(FROM, ["a@example.org"], MSG)
    assert info.value.about_relay and info.value.transient


def test_530_at_every_rcpt_is_about_the_relay_not_the_recipients(
    smtp_relay: Any, mailer_for: Any
) -> None:
    refuse = "530 5.7.0 authentication required"
    relay = smtp_relay(PerRecipient({"a@example.org": refuse, "b@example.org": refuse}))
    with pytest.raises(AuthenticationError) as info:
        mailer_for(relay).send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert info.value.about_relay and info.value.code == 530
    assert not isinstance(info.value, RecipientsRefused)


def test_eight_bit_body_uses_smtputf8_when_8bitmime_is_missing(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay(ehlo_strip=["8BITMIME"])  # offers SMTPUTF8 only
    mailer_for(relay).send(FROM, ["a@example.org"], "Subject: plain\n\nCrème\n")
    [received] = relay.messages
    assert "SMTPUTF8" in received.mail_options and "BODY=8BITMIME" not in received.mail_options


def test_importing_every_module_installs_no_hook_until_first_use(tmp_path: Any) -> None:
    # Exit (and with them fork) hooks come with the first spool or delivery,
    # never with an import: an application that only imports pays nothing.
    code = f"""
import atexit, pkgutil, importlib, threading, logging, transaction, mailspool
# The frameworks of the integrations are dependencies too (django.db installs a hook).
for framework in ("django.db", "django.core.management.base", "flask.cli"):
    importlib.import_module(framework)
before = atexit._ncallbacks()  # after the standard library's and dependencies' own
for m in pkgutil.walk_packages(mailspool.__path__, "mailspool."):
    if m.name.rsplit(".", 1)[-1] != "__main__":
        importlib.import_module(m.name)
imported = atexit._ncallbacks()
from mailspool import QueuedMailDelivery
QueuedMailDelivery({str(tmp_path / "spool")!r})
print(before, imported, atexit._ncallbacks(), threading.active_count())
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    before, imported, used, threads = map(int, out)
    assert imported == before
    assert used >= before + 2  # at least the spool's reapers and the delivery's warning
    assert threads == 1
