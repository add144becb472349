"""SMTPConnection.send(retry_stale=...): a reused connection the relay closed is reopened once.

The relay may close a connection while it sits idle (aiosmtpd's
``timeout``, the conftest relay's ``idle_timeout``), or answer the next
``MAIL`` with a 421 and close.  Nothing of the message was sent then, so
the connection reopens and sends once more.  Never after ``MAIL`` was
accepted, never after ``DATA`` began, never on a fresh session, never twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _relays import SlowData, accept_mail, enqueue, wait_for
from conftest import RELAY_PASSWORD, Relay, RelayFactory
from mailspool.errors import ConnectionFailed, RelayUnavailable
from mailspool.maildir.spool import Spool
from mailspool.message import make_envelope, to_wire
from mailspool.processor.loop import QueueProcessor
from mailspool.smtp.mailer import SMTPConnection, SMTPMailer

FROM = "sender@example.org"
DATA = to_wire(b"Subject: reuse\r\n\r\nHello.\r\n")


def envelope(rcpt: str) -> Any:
    return make_envelope(FROM, [rcpt])


@pytest.fixture
def connect() -> Iterator[Callable[..., SMTPConnection]]:
    """Open an SMTPConnection to a relay (short timeouts); closed afterwards."""
    opened: list[SMTPConnection] = []

    def make(relay: Relay, **overrides: Any) -> SMTPConnection:
        conn = SMTPMailer(**relay.mailer_kwargs(**overrides)).connect()
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def wait_until_closed(conn: SMTPConnection, limit: float = 5.0) -> None:
    """Wait (polling, at most ``limit`` s) until the relay has closed ``conn``."""
    assert wait_for(lambda: not conn.alive, limit), "the relay did not close the idle connection"


class CloseAtMail:
    """Answers ``MAIL`` number ``nth`` of each session (or every one after the
    first overall, with ``every_later``) with a 421, or a bare drop, and closes."""

    def __init__(self, how: str = "421", *, nth: int = 2, every_later: bool = False) -> None:
        self.how = how
        self.nth = nth
        self.every_later = every_later
        self.per_session: dict[int, int] = {}
        self.total = 0

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.total += 1
        n = self.per_session[id(session)] = self.per_session.get(id(session), 0) + 1
        if n == self.nth or (self.every_later and self.total > 1):
            asyncio.get_running_loop().call_soon(server.transport.close)
            if self.how == "drop":
                await asyncio.sleep(5)  # cancelled when the connection is gone
            return "421 4.4.2 idle for too long"
        return accept_mail(envelope, address, options)


# --- the relay closed the idle connection -------------------------------------------


def test_idle_closed_connection_is_reopened_and_the_message_sent(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay(idle_timeout=0.3)
    conn = connect(relay)
    assert conn.send(envelope("a@example.org"), DATA).accepted == ("a@example.org",)
    wait_until_closed(conn)
    result = conn.send(envelope("b@example.org"), DATA)
    assert result.accepted == ("b@example.org",)
    assert conn.reconnects == 1 and conn.alive and conn.transactions == 2
    assert relay.connections == 2
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org"], ["b@example.org"]]
    # Seen before MAIL: the dead session was not even tried.
    assert relay.commands.count("MAIL") == 2


def test_without_retry_stale_the_closed_connection_fails(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay(idle_timeout=0.3)
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    wait_until_closed(conn)
    with pytest.raises(ConnectionFailed) as info:
        conn.send(envelope("b@example.org"), DATA, retry_stale=False)
    assert info.value.transient and not info.value.about_relay
    assert not conn.alive and conn.reconnects == 0
    assert relay.connections == 1 and len(relay.messages) == 1


def test_reconnecting_authenticates_again_without_showing_the_password(
    smtp_relay: RelayFactory, connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    relay = smtp_relay(tls="starttls", auth=True, idle_timeout=0.3)
    conn = connect(relay)
    with caplog.at_level(logging.DEBUG):
        conn.send(envelope("a@example.org"), DATA)
        wait_until_closed(conn)
        conn.send(envelope("b@example.org"), DATA)
    assert [login for _, login in relay.auth_attempts] == ["mailer", "mailer"]
    assert relay.commands.count("STARTTLS") == 2 and len(relay.messages) == 2
    assert "closed a reused connection" in caplog.text
    assert RELAY_PASSWORD not in caplog.text and RELAY_PASSWORD not in repr(vars(conn))


@pytest.mark.parametrize("how", ["421", "drop"])
def test_reused_connection_closed_at_mail_is_retried_once(
    smtp_relay: RelayFactory, connect: Any, how: str
) -> None:
    relay = smtp_relay(CloseAtMail(how))
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    assert conn.send(envelope("b@example.org"), DATA).accepted == ("b@example.org",)
    assert conn.reconnects == 1 and relay.connections == 2
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org"], ["b@example.org"]]


def test_a_reconnected_session_failing_again_is_not_retried_twice(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay(CloseAtMail("421", every_later=True))
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    with pytest.raises(RelayUnavailable) as info:
        conn.send(envelope("b@example.org"), DATA)
    assert info.value.code == 421 and info.value.about_relay
    assert conn.reconnects == 1 and relay.connections == 2
    assert not conn.alive and len(relay.messages) == 1


def test_a_fresh_connection_closed_at_mail_is_not_retried(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay(CloseAtMail("421", nth=1))
    conn = connect(relay)
    with pytest.raises(RelayUnavailable) as info:
        conn.send(envelope("a@example.org"), DATA)
    assert info.value.code == 421
    assert conn.reconnects == 0 and relay.connections == 1 and not conn.alive


def test_when_reconnecting_fails_the_error_is_about_the_relay(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay(idle_timeout=0.3)
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    wait_until_closed(conn)
    relay.stop()  # nobody listens any more
    with pytest.raises(RelayUnavailable, match="cannot connect") as info:
        conn.send(envelope("b@example.org"), DATA)
    assert info.value.about_relay  # the processor pauses; the message is not failed
    assert not conn.alive and len(relay.messages) == 1


# --- never once MAIL was accepted ---------------------------------------------------


class DropAtRcpt:
    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("drop"):
            server.transport.close()
            await asyncio.sleep(5)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


class DropAtFinalDot:
    def __init__(self) -> None:
        self.armed = False

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.armed:
            self.armed = False
            server.transport.close()
            await asyncio.sleep(5)
        return "250 2.0.0 OK"


def test_no_retry_when_the_drop_comes_after_mail_was_accepted(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay(DropAtRcpt())
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    with pytest.raises(ConnectionFailed):
        conn.send(envelope("drop@example.org"), DATA)
    assert conn.reconnects == 0 and relay.connections == 1 and not conn.alive


def test_no_retry_when_the_drop_comes_during_the_data(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    relay = smtp_relay()
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    relay.drops_in_data = 1
    big = to_wire(b"Subject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * 80_000)
    with pytest.raises(ConnectionFailed) as info:
        conn.send(envelope("b@example.org"), big)
    assert "may have been delivered" not in str(info.value)
    assert conn.reconnects == 0 and relay.connections == 1
    assert len(relay.messages) == 1


def test_no_retry_when_the_drop_comes_after_the_final_dot(
    smtp_relay: RelayFactory, connect: Any
) -> None:
    handler = DropAtFinalDot()
    relay = smtp_relay(handler)
    conn = connect(relay)
    conn.send(envelope("a@example.org"), DATA)
    handler.armed = True
    with pytest.raises(ConnectionFailed, match="may have been delivered"):
        conn.send(envelope("b@example.org"), DATA)
    assert conn.reconnects == 0 and relay.connections == 1
    assert relay.commands.count("DATA") == 2  # sent once, not again


# --- the processor benefits ---------------------------------------------------------


def test_the_processor_sends_through_a_connection_closed_at_mail(
    smtp_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = smtp_relay(CloseAtMail("421"))
    spool = Spool(tmp_path / "spool")
    enqueue(spool, 3)
    mailer = SMTPMailer(**relay.mailer_kwargs())
    with QueueProcessor(spool, mailer, connections=1, watch=False) as proc:
        summary = proc.drain()
    # Without the retry, the 421 would have paused the relay and left mail behind.
    assert summary.sent == 3 and summary.deferred == 0 and not summary.relay_paused
    assert len(relay.messages) == 3
    # Each session takes one message, then the relay answers its next MAIL with 421.
    assert relay.connections == 3


@pytest.mark.parametrize("pipelining", [True, False])
def test_a_connection_counts_the_time_it_waited_for_replies(
    smtp_relay: RelayFactory, pipelining: bool
) -> None:
    # The processor adds connections by this count: the relay's 80 ms before
    # its answer to the data is waiting; the work on this side is not.
    relay = smtp_relay(SlowData(0.08), pipelining=pipelining)
    mailer = SMTPMailer(**relay.mailer_kwargs(pipelining=pipelining))
    with mailer.connect() as conn:
        assert conn.waited == 0.0
        t0 = time.monotonic()
        conn.send(make_envelope("a@example.org", ["b@example.org"]), b"Subject: x\r\n\r\nx\r\n")
        wall = time.monotonic() - t0
    assert 0.08 <= conn.waited <= wall
