"""The sans-IO SMTP engine, table by table: no server, no socket.

Each case is a conversation: the replies a relay gives (as bytes, the way
they arrive), what the engine asks to write in between, and how the
transaction ends, per recipient.  The same conversations against real relays
are in test_mailer*.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mailspool.errors import (
    MessageTooLarge,
    PermanentError,
    RecipientsRefused,
    RelayUnavailable,
    TransientError,
)
from mailspool.message import Envelope
from mailspool.smtp.protocol import (
    Failed,
    Finished,
    Phase,
    ProtocolViolation,
    Read,
    ReplyReader,
    Transaction,
    Write,
    WriteMessage,
)
from mailspool.smtp.result import Reply

ENV = Envelope("app@example.org", ("a@example.org", "b@example.org"))

# --- replies: bytes in, replies out ---------------------------------------------------------


@pytest.mark.parametrize(
    ("chunks", "replies"),
    [
        ([b"250 ok\r\n"], [Reply(250, "ok")]),
        ([b"250-first\r\n250-second\r\n250 last\r\n"], [Reply(250, "first\nsecond\nlast")]),
        ([b"25", b"0 o", b"k\r", b"\n"], [Reply(250, "ok")]),  # split anywhere
        ([b"250 a\r\n354 b\r\n"], [Reply(250, "a"), Reply(354, "b")]),  # two in one read
        ([b"250-one\r\n", b"250 two\r\n"], [Reply(250, "one\ntwo")]),  # line by line
        ([b"", b"250 ok\r\n"], [Reply(250, "ok")]),  # an empty read completes nothing
        (  # a line seen before gives the same reply, another line its own
            [b"250 ok\r\n", b"250 ok\r\n", b"250 ok \r\n", b"550 ok\r\n"],
            [Reply(250, "ok"), Reply(250, "ok"), Reply(250, "ok "), Reply(550, "ok")],
        ),
        ([b"250\r\n"], [Reply(250, "")]),  # a bare code
        ([b"421 4.4.2 bye\n"], [Reply(421, "4.4.2 bye")]),  # a bare LF
        ([b"550 \xe4\r\n"], [Reply(550, "\ufffd")]),  # undecodable text is replaced
    ],
)
def test_reply_reader_joins_and_splits_replies(chunks: list[bytes], replies: list[Reply]) -> None:
    reader = ReplyReader()
    got: list[Reply] = []
    for chunk in chunks:
        got.extend(reader.feed(chunk))
    assert got == replies
    assert not reader.pending


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"SSH-2.0-OpenSSH_8.9\r\n", "not an SMTP reply"),
        (b"HTTP/1.1 400 Bad Request\r\n", "not an SMTP reply"),
        (b"600 what\r\n", "not an SMTP reply"),
        (b"250x ok\r\n", "not an SMTP reply"),
        (b"250-one\r\n550 two\r\n", "changed its code"),
        (b"2" * 70000, "without end"),
    ],
)
def test_reply_reader_refuses_what_is_not_smtp(data: bytes, why: str) -> None:
    with pytest.raises(ProtocolViolation, match=why):
        ReplyReader().feed(data)


def test_a_partial_reply_is_pending_until_its_last_line() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250-one\r\n250 tw") == []
    assert reader.pending
    assert reader.feed(b"o\r\n") == [Reply(250, "one\ntwo")]


# --- transactions: one table per way a conversation can go ----------------------------------


@dataclass
class Talk:
    """Drive a transaction with replies; record every step it asks for."""

    tx: Transaction

    def run(self, *replies: bytes) -> list[object]:
        reader = ReplyReader()
        steps: list[object] = []
        for raw in replies:
            for reply in reader.feed(raw):
                steps.append(self.tx.receive(reply))
        return steps


def talk(pipelining: bool, envelope: Envelope = ENV, options: tuple[str, ...] = ()) -> Talk:
    return Talk(Transaction(envelope, options, pipelining=pipelining))


def test_plain_transaction_asks_one_command_at_a_time() -> None:
    t = talk(False)
    assert t.tx.start() == b"MAIL FROM:<app@example.org>\r\n"
    steps = t.run(
        b"250 ok\r\n", b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n", b"250 queued as X\r\n"
    )
    assert steps[:4] == [
        Write(b"RCPT TO:<a@example.org>\r\n"),
        Write(b"RCPT TO:<b@example.org>\r\n"),
        Write(b"DATA\r\n"),
        WriteMessage(),
    ]
    [done] = steps[4:]
    assert isinstance(done, Finished)
    assert done.result.accepted == ("a@example.org", "b@example.org")
    assert done.result.reply == Reply(250, "queued as X")
    assert t.tx.phase is Phase.OVER


def test_pipelined_transaction_sends_every_command_at_once() -> None:
    t = talk(True, options=("SIZE=10", "SMTPUTF8"))
    assert t.tx.start() == (
        b"MAIL FROM:<app@example.org> SIZE=10 SMTPUTF8\r\n"
        b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    steps = t.run(b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n", b"250 ok\r\n")
    assert steps[:4] == [Read(), Read(), Read(), WriteMessage()]
    done = steps[4]
    assert isinstance(done, Finished)
    assert done.result.accepted == ("a@example.org",)
    assert done.result.refused == {"b@example.org": Reply(550, "5.1.1 no such user")}


def test_552_at_rcpt_counts_as_452() -> None:
    t = talk(False)
    t.run(b"250 ok\r\n", b"250 ok\r\n")
    t.run(b"552 too many recipients\r\n")
    assert t.tx.refused == {"b@example.org": Reply(452, "too many recipients")}


@dataclass(frozen=True)
class Refusal:
    """A conversation that ends in a refusal, and what must come of it."""

    name: str
    pipelining: bool
    replies: tuple[bytes, ...]
    error: type[Exception]
    then: str
    writes: tuple[bytes, ...] = ()  # what the engine asked to write on the way
    per_recipient: tuple[tuple[str, int], ...] = ()  # .result: recipient -> code


REFUSALS = [
    Refusal("mail 451, plain", False, (b"451 later\r\n",), TransientError, "rset"),
    Refusal("mail 550, plain", False, (b"550 no\r\n",), PermanentError, "rset"),
    Refusal("mail 421", False, (b"421 bye\r\n",), RelayUnavailable, "close"),
    Refusal(
        "mail 450, pipelined: the replies due are read, DATA's 554 ends it",
        True,
        (b"450 slow down\r\n554 no mail\r\n554 no mail\r\n554 no valid recipients\r\n",),
        TransientError,
        "rset",
    ),
    Refusal(
        "mail 451, pipelined, and the relay took DATA anyway: the lone dot",
        True,
        (b"451 later\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"250 ok (empty)\r\n"),
        TransientError,
        "rset",
        writes=(b".\r\n",),
    ),
    Refusal(
        "mail 451, pipelined, a 421 while draining closes",
        True,
        (b"451 later\r\n421 bye\r\n",),
        TransientError,
        "close",
    ),
    Refusal(
        "every rcpt refused, plain",
        False,
        (b"250 ok\r\n", b"550 no\r\n", b"450 greylisted\r\n"),
        RecipientsRefused,
        "rset",
        writes=(b"RCPT TO:<a@example.org>\r\n", b"RCPT TO:<b@example.org>\r\n"),
        per_recipient=(("a@example.org", 550), ("b@example.org", 450)),
    ),
    Refusal(
        "every rcpt refused, pipelined, DATA refused too",
        True,
        (b"250 ok\r\n550 no\r\n550 no\r\n554 no valid recipients\r\n",),
        RecipientsRefused,
        "rset",
        per_recipient=(("a@example.org", 550), ("b@example.org", 550)),
    ),
    Refusal(
        "rcpt 421 ends the session",
        False,
        (b"250 ok\r\n", b"421 4.7.0 too fast\r\n"),
        RelayUnavailable,
        "close",
        writes=(b"RCPT TO:<a@example.org>\r\n",),
    ),
    Refusal(
        "data 451: only the accepted recipient is answered",
        False,
        (b"250 ok\r\n", b"250 ok\r\n", b"450 greylisted\r\n", b"451 not now\r\n"),
        TransientError,
        "rset",
        writes=(b"RCPT TO:<a@example.org>\r\n", b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"),
        per_recipient=(("a@example.org", 451), ("b@example.org", 450)),
    ),
    Refusal(
        "554 after the final dot: the session goes on",
        True,
        (b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"554 5.7.1 spam\r\n"),
        PermanentError,
        "continue",
        per_recipient=(("a@example.org", 554), ("b@example.org", 554)),
    ),
    Refusal(
        "552 after the final dot: too large",
        True,
        (b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"552 5.3.4 too big\r\n"),
        MessageTooLarge,
        "continue",
    ),
    Refusal(
        "421 after the final dot",
        True,
        (b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", b"421 shutting down\r\n"),
        RelayUnavailable,
        "close",
    ),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.name for c in REFUSALS])
def test_every_refusal_is_classified_and_says_what_the_session_needs(case: Refusal) -> None:
    t = talk(case.pipelining)
    steps = t.run(*case.replies)
    *between, last = steps
    assert isinstance(last, Failed), steps
    assert isinstance(last.error, case.error)
    assert last.then == case.then
    assert tuple(s.data for s in between if isinstance(s, Write)) == case.writes
    assert all(isinstance(s, (Read, Write, WriteMessage)) for s in between)
    if case.per_recipient:
        result = last.error.result  # type: ignore[attr-defined]
        assert tuple((r, reply.code) for r, reply in result.refused.items()) == (case.per_recipient)
    assert t.tx.phase is Phase.OVER
    with pytest.raises(RuntimeError, match="no reply is expected"):
        t.tx.receive(Reply(250, "late"))


def test_an_address_with_a_line_break_never_becomes_a_command() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        Transaction(Envelope("a@b.org", ("x@y.org\r\nRCPT TO:<z@w.org>",)), (), pipelining=False)


def test_the_phase_tells_the_transport_which_timeout_applies() -> None:
    t = talk(True)
    assert t.tx.phase is Phase.MAIL
    t.run(b"250 ok\r\n")
    assert t.tx.phase is Phase.RCPT
    t.run(b"250 ok\r\n250 ok\r\n")
    assert t.tx.phase is Phase.DATA
    t.run(b"354 go\r\n")
    assert t.tx.phase is Phase.DOT  # the long wait of RFC 5321 4.5.3.2.6
    assert str(t.tx.phase) == "the reply after the final dot"


def test_a_session_lost_while_draining_keeps_the_refusal() -> None:
    t = talk(True)
    [step] = t.run(b"550 5.7.1 sender rejected\r\n")
    assert step == Read() and t.tx.draining
    failed = t.tx.session_lost()
    assert isinstance(failed.error, PermanentError) and failed.error.code == 550
    assert failed.then == "close" and not t.tx.draining
