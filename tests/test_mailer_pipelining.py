"""PIPELINING (RFC 2920) against real aiosmtpd relays that offer it.

The test relays offer PIPELINING unless told not to, and record in
``relay.pipelined`` each command that arrived with more input already
waiting behind it: a command sent without waiting for its reply.
"""

from __future__ import annotations

from typing import Any

import pytest

from _relays import PerRecipient
from mailspool.errors import PermanentError, RecipientsRefused, TransientError
from mailspool.message import Envelope

MSG = b"From: a@example.org\r\nSubject: pipelined\r\n\r\nHello.\r\n"
FROM = "sender@example.org"


class Refuse(PerRecipient):
    """Refuses the listed recipients at RCPT; ``keep`` still adds them to the
    envelope, as a broken relay that then answers DATA with 354 would."""

    def __init__(self, replies: dict[str, str], *, keep: bool = False) -> None:
        super().__init__(replies)
        self.keep = keep

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = await super().handle_RCPT(server, session, envelope, address, options)
        if self.keep and address in self.replies:
            envelope.rcpt_tos.append(address)
        return reply


def test_mail_rcpt_and_data_go_out_together(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay()
    mailer = mailer_for(relay)
    rcpts = ["a@example.org", "b@example.org", "c@example.org"]
    for n in range(3):
        result = mailer.send(FROM, rcpts, MSG + f"n={n}\r\n".encode())
        assert result.accepted == tuple(rcpts)
    # Each transaction: MAIL and every RCPT were written before any reply
    # was read; DATA closed the group, and the data waited for its 354.
    assert relay.pipelined == ["MAIL", "RCPT", "RCPT", "RCPT"] * 3
    assert relay.commands == ["EHLO"] + ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"] * 3
    assert [m.content.endswith(f"n={n}\r\n".encode()) for n, m in enumerate(relay.messages)] == [
        True
    ] * 3
    assert all(m.rcpt_tos == rcpts for m in relay.messages)
    assert relay.connections == 1


@pytest.mark.parametrize(
    ("relay_offers", "mailer_uses"), [(False, True), (True, False)], ids=["not-offered", "off"]
)
def test_lockstep_when_not_offered_or_turned_off(
    smtp_relay: Any, mailer_for: Any, relay_offers: bool, mailer_uses: bool
) -> None:
    relay = smtp_relay(pipelining=relay_offers)
    mailer = mailer_for(relay, pipelining=mailer_uses)
    mailer.send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert relay.pipelined == []
    assert relay.commands == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
    assert len(relay.messages) == 1


def test_some_recipients_refused(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(Refuse({"no@example.org": "550 5.1.1 no such user"}))
    mailer = mailer_for(relay)
    result = mailer.send(FROM, ["a@example.org", "no@example.org", "b@example.org"], MSG)
    assert result.accepted == ("a@example.org", "b@example.org")
    assert {k: v.code for k, v in result.refused.items()} == {"no@example.org": 550}
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org", "b@example.org"]]
    assert relay.pipelined == ["MAIL", "RCPT", "RCPT", "RCPT"]


def test_data_refused_resets_and_the_connection_goes_on(smtp_relay: Any, mailer_for: Any) -> None:
    relay = smtp_relay(replies={"DATA": "451 4.3.0 try again later"})
    mailer = mailer_for(relay)
    with pytest.raises(TransientError) as info:
        mailer.send(FROM, ["a@example.org", "b@example.org"], MSG)
    assert info.value.code == 451
    # The error answers for the recipients accepted at RCPT.
    assert info.value.result is not None
    assert set(info.value.result.refused) == {"a@example.org", "b@example.org"}
    assert relay.commands[-1] == "RSET" and relay.messages == []


def test_relay_that_takes_data_with_no_recipient_gets_an_empty_message(
    smtp_relay: Any, mailer_for: Any
) -> None:
    # A broken relay refuses every RCPT and still answers DATA with 354.
    # RFC 2920 3.1: the client then sends the lone final dot, never the data.
    refusals = {r: "550 5.1.1 no such user" for r in ("x@example.org", "y@example.org")}
    relay = smtp_relay(Refuse(refusals, keep=True))
    mailer = mailer_for(relay)
    with pytest.raises(RecipientsRefused) as info:
        mailer.send(FROM, ["x@example.org", "y@example.org"], MSG)
    assert not info.value.transient
    assert [m.content for m in relay.messages] == [b""]
    # The session stayed in step: the next message goes over the same connection.
    mailer.send(FROM, ["ok@example.org"], MSG)
    assert relay.messages[-1].content.startswith(b"From: a@example.org")
    assert relay.connections == 1


def test_refused_sender_with_the_relay_closing_keeps_the_refusal(
    smtp_relay: Any, mailer_for: Any
) -> None:
    # A relay that refuses MAIL and hangs up before answering the rest of the
    # group: the caller still learns why (the 550), not "connection lost".
    class RefuseAndClose:
        async def handle_MAIL(
            self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
        ) -> str:
            if address != "spammer@example.org":
                envelope.mail_from = address
                return "250 2.1.0 OK"
            await server.push("550 5.7.1 sender rejected")
            server.transport.close()
            return "250 never read"

    relay = smtp_relay(RefuseAndClose())
    mailer = mailer_for(relay)
    with pytest.raises(PermanentError) as info:
        mailer.send("spammer@example.org", ["a@example.org"], MSG)
    assert info.value.code == 550 and info.value.enhanced == "5.7.1"
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.connections == 2 and len(relay.messages) == 1


def test_a_line_break_in_a_hand_made_envelope_is_never_written(
    smtp_relay: Any, mailer_for: Any
) -> None:
    relay = smtp_relay()
    mailer = mailer_for(relay)
    with mailer.connect() as conn:
        bad = Envelope(FROM, ("a@example.org>\r\nRCPT TO:<victim@example.org",))
        with pytest.raises(ValueError, match="CR or LF"):
            conn.send(bad, MSG)
        # Nothing was written, and the connection is closed rather than trusted.
        assert not conn.alive
    mailer.send(FROM, ["a@example.org"], MSG)
    assert relay.commands == ["EHLO", "EHLO", "MAIL", "RCPT", "DATA"]
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org"]]
