"""The processor's smaller promises against real relays: what it logs and counts.

Each test here pins one behaviour an operator relies on when reading the
log or the summary: how many probes failed before the relay came back,
how a message that reached some of its recipients is counted, the relay's
own reply (its queue id) for the recipients it accepted, and a drain that
says goodbye (QUIT) to the relay.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import zope.event

from _relays import RCPT, PerRecipient, Switchable, enqueue
from conftest import Relay, RelayFactory
from mailspool import QueueProcessor, RetryPolicy, SMTPMailer
from mailspool.cli.common import summary_line
from mailspool.events import MailSent
from mailspool.maildir.spool import Spool

QUICK = RetryPolicy(first_delay=60, relay_first_delay=10, relay_max_delay=40)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def processor(spool: Spool, relay: Relay, **kw: Any) -> QueueProcessor:
    kw.setdefault("retry", QUICK)
    kw.setdefault("watch", False)
    return QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), **kw)


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# --- the relay comes back ----------------------------------------------------------------


@pytest.mark.parametrize("failed_probes", [0, 2])
def test_back_after_counts_only_the_probes_that_failed(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture, failed_probes: int
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    handler = Switchable()
    relay = smtp_relay(handler)
    enqueue(spool, 2)
    p = processor(spool, relay, connections=1)
    t0 = time.time()
    assert p.process_once(t0).relay_paused  # the outage begins: no probe yet
    for dt in (10, 30)[:failed_probes]:  # pauses of 10 s, then 20 s
        assert p.process_once(t0 + dt).relay_paused
    handler.down = False
    assert p.process_once(t0 + 100).sent == 2
    p.stop()
    [back] = lines(caplog, "is back")
    assert f"after {failed_probes} failed probe(s)" in back


# --- a drain says goodbye ------------------------------------------------------------------


class QuitSeen:
    """Counts the QUITs the relay receives."""

    def __init__(self) -> None:
        self.quits = 0

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 Bye"


def test_an_in_process_drain_quits_its_connections(spool: Spool, smtp_relay: RelayFactory) -> None:
    handler = QuitSeen()
    relay = smtp_relay(handler)
    enqueue(spool, 6)
    p = processor(spool, relay, connections=2)
    assert p.drain().sent == 6  # no stop(), no context manager
    assert relay.connections >= 1 and handler.quits == relay.connections
    assert p.pool.count_alive() == 0
    enqueue(spool, 2)
    assert p.drain().sent == 2  # a drain after a drain opens what it needs again
    assert handler.quits == relay.connections
    p.stop()


# --- a message some recipients got ----------------------------------------------------------


class QueuedAs(PerRecipient):
    """Answers RCPT from a table, and the data with a queue id, as Postfix does."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok: queued as 4XyZ7Q"


def test_a_message_delivered_to_two_of_three_counts_as_partly_delivered(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    refusals = {"nobody@example.org": "550 5.1.1 no such user", "later@example.org": "450 4.2.0 x"}
    relay = smtp_relay(QueuedAs(refusals))
    enqueue(spool, to=["a@example.org", "nobody@example.org", "b@example.org"])
    enqueue(spool, to=["c@example.org", "later@example.org"])
    enqueue(spool, to=[RCPT])
    with processor(spool, relay) as p:
        summary = p.drain()
    assert (summary.sent, summary.failed, summary.deferred, summary.partly) == (1, 1, 1, 2)
    assert "2 of the deferred and failed went to some of their recipients" in summary_line(summary)


def test_the_relays_queue_id_is_logged_and_kept_for_the_recipients_it_accepted(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Any] = []
    zope.event.subscribers.append(seen.append)
    caplog.set_level(logging.INFO, "mailspool")
    relay = smtp_relay(QueuedAs({"later@example.org": "450 4.2.0 greylisted"}))
    enqueue(spool, to=["a@example.org", "later@example.org"])
    try:
        with processor(spool, relay) as p:
            assert p.drain().deferred == 1
    finally:
        zope.event.subscribers.remove(seen.append)
    [entry] = spool.entries("deferred")
    kept = {r.address: (r.status, r.code, r.text) for r in entry.recipients}
    assert kept["a@example.org"] == ("sent", 250, "2.0.0 Ok: queued as 4XyZ7Q")
    assert kept["later@example.org"][:2] == ("pending", 450)
    [line] = lines(caplog, f"mail {entry.id} ")
    assert "sent to a@example.org (250 2.0.0 Ok: queued as 4XyZ7Q)" in line
    [sent] = [e for e in seen if isinstance(e, MailSent) and e.message_id == entry.message_id]
    assert str(sent.reply) == "250 2.0.0 Ok: queued as 4XyZ7Q"


# --- the queue commands see a paused relay ---------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    from mailspool.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_status_list_and_show_say_ready_messages_wait_on_a_paused_relay(
    spool: Spool, smtp_relay: RelayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = Switchable()
    relay = smtp_relay(handler)
    enqueue(spool, 1)
    queue = ("--queue", spool.path)
    p = processor(spool, relay)
    assert p.process_once().relay_paused

    status = json.loads(cli(capsys, "status", "--json", *queue))
    assert status["ready"] == 1
    paused = status["relay"]
    assert paused["relay"] == f"127.0.0.1:{relay.port}" and "421" in paused["reason"]
    assert paused["paused_until"] > time.time()
    [ready] = [x for x in cli(capsys, "status", *queue).splitlines() if "ready" in x]
    assert f"waiting: relay 127.0.0.1:{relay.port} is paused until" in ready
    listing = cli(capsys, "list", *queue)
    [row] = [x for x in listing.splitlines() if x.startswith(next(spool.entries()).id)]
    assert row.split()[1] == "relay-wait"
    assert "relay-wait: ready, but relay 127.0.0.1:" in listing
    [entry] = json.loads(cli(capsys, "list", "--json", *queue))
    assert entry["state"] == "ready" and entry["waiting_on_relay"]["relay"] == paused["relay"]
    assert "waiting: relay" in cli(capsys, "show", entry["id"], *queue)

    handler.down = False  # back: the note goes, and the message with it
    assert p.process_once(time.time() + 11).sent == 1
    p.stop()
    enqueue(spool, 1)
    after = json.loads(cli(capsys, "status", "--json", *queue))["relay"]
    assert after is None or after["paused_until"] is None
    assert "relay-wait" not in cli(capsys, "list", *queue)
