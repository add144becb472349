"""Sending the next message's commands with a message's final dot (RFC 2920 3.1).

``SMTPConnection.send(..., then=next)`` writes ``next``'s MAIL, RCPT and
DATA in the same write as the final dot; the next ``send()`` for ``next``
only reads their replies.  The relays here note, when each message's data
is complete, what input was already waiting behind its final dot.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from _relays import RefuseSender, RefuseSome, enqueue, message_id
from mailspool import QueueProcessor, SMTPMailer
from mailspool.errors import ConnectionFailed, PermanentError, RecipientsRefused
from mailspool.maildir.spool import Spool
from mailspool.message import Envelope, make_envelope
from mailspool.processor.loop import Summary

FROM = "sender@example.org"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def msg(n: int) -> bytes:
    return f"From: a@example.org\r\nSubject: n={n}\r\n\r\nHello {n}.\r\n".encode()


def env(*rcpts: str, sender: str = FROM) -> Envelope:
    return make_envelope(sender, list(rcpts) or ["a@example.org"])


class Behind:
    """Notes, for each message, the input waiting behind its final dot;
    ``replies`` answers the data of the n-th message (from 0) instead of 250."""

    def __init__(self, replies: dict[int, str] | None = None) -> None:
        self.behind: list[bytes] = []
        self.replies = replies or {}

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await asyncio.sleep(0.01)  # whatever was written with the dot has arrived
        self.behind.append(bytes(server._reader._buffer))
        n = len(self.behind) - 1
        return self.replies.get(n, "250 2.0.0 queued")


def subjects(relay: Any) -> list[str]:
    return [m.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in relay.messages]


def test_the_next_commands_go_with_the_final_dot(smtp_relay: Any) -> None:
    handler = Behind()
    relay = smtp_relay(handler)
    envs = [env("a@example.org", "b@example.org"), env("c@example.org"), env("d@example.org")]
    datas = [msg(n) for n in range(3)]
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        assert conn.sends_ahead
        assert conn.send(envs[0], datas[0], then=(envs[1], datas[1])).accepted == envs[0].recipients
        assert conn.pending and not conn.alive  # it waits for the next message only
        conn.send(envs[1], datas[1], then=(envs[2], datas[2]))
        conn.send(envs[2], datas[2])
        assert not conn.pending and conn.alive
    assert handler.behind == [
        f"MAIL FROM:<{FROM}> SIZE={len(datas[1])}\r\nRCPT TO:<c@example.org>\r\nDATA\r\n".encode(),
        f"MAIL FROM:<{FROM}> SIZE={len(datas[2])}\r\nRCPT TO:<d@example.org>\r\nDATA\r\n".encode(),
        b"",
    ]
    assert subjects(relay) == ["n=0", "n=1", "n=2"]
    assert [m.rcpt_tos for m in relay.messages] == [list(e.recipients) for e in envs]
    assert relay.commands == ["EHLO"] + ["MAIL", "RCPT", "RCPT", "DATA"] + [
        "MAIL",
        "RCPT",
        "DATA",
    ] * 2 + ["QUIT"]
    assert relay.connections == 1


def test_a_message_of_several_blocks_has_the_next_commands_after_its_dot(
    smtp_relay: Any,
) -> None:
    # Over 256 KiB the data goes out in blocks and the commands in a write of
    # their own; the relay sees the same stream as for a small message.
    handler = Behind()
    relay = smtp_relay(handler)
    big = msg(0) + (b"." + b"x" * 97 + b"\r\n") * 3000  # 300 KB, every line stuffed
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        conn.send(env(), big, then=(env("c@example.org"), msg(1)))
        conn.send(env("c@example.org"), msg(1))
    assert handler.behind[0] == (
        f"MAIL FROM:<{FROM}> SIZE={len(msg(1))}\r\nRCPT TO:<c@example.org>\r\nDATA\r\n".encode()
    )
    assert relay.messages[0].content == big and subjects(relay) == ["n=0", "n=1"]


def test_a_refused_message_leaves_the_next_one_going(smtp_relay: Any) -> None:
    handler = Behind({0: "554 5.6.0 content rejected"})
    relay = smtp_relay(handler)
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        first, second = env(), env("b@example.org")
        with pytest.raises(PermanentError) as info:
            conn.send(first, msg(0), then=(second, msg(1)))
        assert info.value.code == 554
        assert conn.pending  # the refusal ended that transaction, not the session
        data = msg(1)
        conn.send(second, data)  # not the same object as given as ``then``
    # The commands sent ahead were abandoned by closing that session; the
    # message went again, whole, over a new one.
    assert subjects(relay) == ["n=1"]
    assert relay.connections == 2


def test_the_next_message_refused_at_mail_or_rcpt(smtp_relay: Any) -> None:
    class Refuse(RefuseSender, RefuseSome):
        def __init__(self) -> None:
            RefuseSender.__init__(self, {"spammer@example.org"})
            RefuseSome.__init__(self, {"nobody@example.org"})

    relay = smtp_relay(Refuse())
    spam, nobody, fine = env(sender="spammer@example.org"), env("nobody@example.org"), env()
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        conn.send(env(), msg(0), then=(spam, d1 := msg(1)))
        with pytest.raises(PermanentError) as info:
            conn.send(spam, d1)
        assert info.value.code == 550
        conn.send(fine, d2 := msg(2), then=(nobody, d3 := msg(3)))
        with pytest.raises(RecipientsRefused):
            conn.send(nobody, d3)
        conn.send(fine, msg(4))  # the session stayed in step
    assert subjects(relay) == ["n=0", "n=2", "n=4"]
    assert d2 and relay.connections == 1


def test_the_connection_lost_at_the_final_reply_sends_nothing_of_the_next(
    smtp_relay: Any,
) -> None:
    class CutAtDot:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            server.transport.abort()
            return "250 never read"

    relay = smtp_relay(CutAtDot())
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        first, second = env(), env("b@example.org")
        with pytest.raises(ConnectionFailed):
            conn.send(first, msg(0), then=(second, msg(1)))
        assert not conn.pending
    assert "n=1" not in subjects(relay)
    assert relay.commands.count("MAIL") == 1  # the relay never read the next one's


def test_closing_with_commands_sent_ahead_delivers_nothing_more(smtp_relay: Any) -> None:
    relay = smtp_relay()
    conn = SMTPMailer(**relay.mailer_kwargs()).connect()
    conn.send(env(), msg(0), then=(env("b@example.org"), msg(1)))
    conn.close()  # no QUIT: after the 354 it would be message data
    assert subjects(relay) == ["n=0"]
    assert "QUIT" not in relay.commands
    assert not conn.alive


def test_no_commands_ahead_without_pipelining(smtp_relay: Any) -> None:
    handler = Behind()
    relay = smtp_relay(handler, pipelining=False)
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        assert not conn.sends_ahead
        second = env("b@example.org")
        conn.send(env(), msg(0), then=(second, d1 := msg(1)))
        assert not conn.pending
        conn.send(second, d1)
    assert handler.behind == [b"", b""]
    assert subjects(relay) == ["n=0", "n=1"]


def test_the_processor_sends_nothing_ahead_and_delivers_each_message_once(
    spool: Spool, smtp_relay: Any
) -> None:
    # The processor no longer sends the next message's commands with a final
    # dot: a relay that holds its reply until it has read them (Postfix)
    # would hide an acceptance from a processor that loses the connection.
    handler = Behind({3: "451 4.3.0 try again", 7: "554 5.6.0 rejected"})
    relay = smtp_relay(handler)
    ids = enqueue(spool, 12)
    with QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), watch=False) as p:
        assert p.process_once() == Summary(sent=10, deferred=1, failed=1)
    received = [message_id(m.content) for m in relay.messages]
    assert len(received) == len(set(received)) == 10 and set(received) <= set(ids)
    assert relay.connections == 1
    assert len(handler.behind) == 12 and set(handler.behind) == {b""}
    assert spool.counts()["in_flight"] == 0


def test_the_processor_after_a_refused_data_command(spool: Spool, smtp_relay: Any) -> None:
    # DATA answered 451 (before any data): each message is deferred on its
    # own, and nothing is left claimed.
    relay = smtp_relay(replies={"DATA": "451 4.3.0 busy"})
    enqueue(spool, 3)
    with QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), watch=False) as p:
        assert p.process_once() == Summary(deferred=3)
    assert relay.messages == []
    assert spool.counts()["in_flight"] == 0
