"""Nothing of the next message goes with a message's final dot.

Commands are pipelined within a message (RFC 2920), never across: a relay
that holds its reply to a final dot until it has read what follows
(Postfix does) would hide an acceptance, and a session lost then would
send the message twice.  The relays here note, when each message's data
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


def test_commands_are_pipelined_within_a_message_and_nothing_follows_its_dot(
    smtp_relay: Any,
) -> None:
    handler = Behind()
    relay = smtp_relay(handler)
    envs = [env("a@example.org", "b@example.org"), env("c@example.org"), env("d@example.org")]
    datas = [msg(n) for n in range(3)]
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        assert conn.pipelining
        for e, d in zip(envs, datas, strict=True):
            assert conn.send(e, d).accepted == e.recipients
            assert conn.alive
    # The relay's reply to a final dot is never held back by what follows it.
    assert handler.behind == [b"", b"", b""]
    assert subjects(relay) == ["n=0", "n=1", "n=2"]
    assert [m.rcpt_tos for m in relay.messages] == [list(e.recipients) for e in envs]
    assert relay.commands == ["EHLO"] + ["MAIL", "RCPT", "RCPT", "DATA"] + [
        "MAIL",
        "RCPT",
        "DATA",
    ] * 2 + ["QUIT"]
    assert relay.connections == 1


def test_a_message_of_several_blocks_goes_whole_with_nothing_behind(smtp_relay: Any) -> None:
    # Over 256 KiB the data goes out in blocks; the relay sees one stream.
    handler = Behind()
    relay = smtp_relay(handler)
    big = msg(0) + (b"." + b"x" * 97 + b"\r\n") * 3000  # 300 KB, every line stuffed
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        conn.send(env(), big)
        conn.send(env("c@example.org"), msg(1))
    assert handler.behind == [b"", b""]
    assert relay.messages[0].content == big and subjects(relay) == ["n=0", "n=1"]


def test_a_refused_message_leaves_the_session_going(smtp_relay: Any) -> None:
    handler = Behind({0: "554 5.6.0 content rejected"})
    relay = smtp_relay(handler)
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        with pytest.raises(PermanentError) as info:
            conn.send(env(), msg(0))
        assert info.value.code == 554
        assert conn.alive  # the refusal ended that transaction, not the session
        conn.send(env("b@example.org"), msg(1))
    assert subjects(relay) == ["n=1"]
    assert relay.connections == 1


def test_messages_refused_at_mail_or_rcpt_keep_the_session_in_step(smtp_relay: Any) -> None:
    class Refuse(RefuseSender, RefuseSome):
        def __init__(self) -> None:
            RefuseSender.__init__(self, {"spammer@example.org"})
            RefuseSome.__init__(self, {"nobody@example.org"})

    relay = smtp_relay(Refuse())
    spam, nobody, fine = env(sender="spammer@example.org"), env("nobody@example.org"), env()
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        conn.send(fine, msg(0))
        with pytest.raises(PermanentError) as info:
            conn.send(spam, msg(1))
        assert info.value.code == 550
        conn.send(fine, msg(2))
        with pytest.raises(RecipientsRefused):
            conn.send(nobody, msg(3))
        conn.send(fine, msg(4))  # the session stayed in step
    assert subjects(relay) == ["n=0", "n=2", "n=4"]
    assert relay.connections == 1


def test_the_connection_lost_at_the_final_reply_may_have_delivered(smtp_relay: Any) -> None:
    class CutAtDot:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            server.transport.abort()
            return "250 never read"

    relay = smtp_relay(CutAtDot())
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        with pytest.raises(ConnectionFailed, match="may have been delivered"):
            conn.send(env(), msg(0))
        assert not conn.alive
    assert relay.commands.count("MAIL") == 1


def test_closing_says_quit(smtp_relay: Any) -> None:
    relay = smtp_relay()
    conn = SMTPMailer(**relay.mailer_kwargs()).connect()
    conn.send(env(), msg(0))
    conn.close()
    assert subjects(relay) == ["n=0"]
    assert relay.commands[-1] == "QUIT"
    assert not conn.alive


def test_without_pipelining_each_command_waits_for_its_reply(smtp_relay: Any) -> None:
    handler = Behind()
    relay = smtp_relay(handler, pipelining=False)
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        assert not conn.pipelining
        conn.send(env("a@example.org", "b@example.org"), msg(0))
        conn.send(env("b@example.org"), msg(1))
    assert handler.behind == [b"", b""]
    assert subjects(relay) == ["n=0", "n=1"]


def test_the_processor_sends_nothing_ahead_and_delivers_each_message_once(
    spool: Spool, smtp_relay: Any
) -> None:
    # The processor no longer sends the next message's commands with a final
    # dot: a relay that holds its reply until it has read them (Postfix)
    # would hide an acceptance from a processor that loses the connection.
    # (The message refused with a 451 is tried again in the same pass: a
    # quick retry, a thirteenth transaction.)
    handler = Behind({3: "451 4.3.0 try again", 7: "554 5.6.0 rejected"})
    relay = smtp_relay(handler)
    ids = enqueue(spool, 12)
    with QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), watch=False) as p:
        assert p.process_once() == Summary(sent=11, failed=1)
    received = [message_id(m.content) for m in relay.messages]
    assert len(received) == len(set(received)) == 11 and set(received) <= set(ids)
    assert relay.connections == 1
    assert len(handler.behind) == 13 and set(handler.behind) == {b""}
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
