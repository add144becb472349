"""Regression tests for three delivery defects, each against real parts.

1. A refusal at or after DATA answered only for the recipients accepted at
   RCPT, yet it failed every pending recipient, also one greylisted at RCPT
   (torture finding 1).  The error now carries each recipient's outcome.
2. When the spool ran full just as a send's outcome was written, the message
   was released and its accepted recipients got it again (torture finding
   3).  The claim is now kept and the same outcome written once the spool
   has room.
3. A message scheduled (``not_before``) further ahead than ``give_up_after``
   expired at its first temporary failure: the give-up time counted from the
   commit.  It now counts from the scheduled time, which the file keeps.

The full spool is a real tmpfs filled to the last page (root only; skipped
elsewhere).  One test forces ENOSPC on the spool's writes with a mock
instead, so that the rule is checked where no file system can be mounted.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction
import zope.event

from _fs import fill, tmpfs
from _relays import FillDiskThenAccept, enqueue, message_id, only_id, wait_for
from conftest import Relay, RelayFactory
from mailspool import DirectMailDelivery, QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.errors import ConnectionFailed, PermanentError
from mailspool.events import MailDeferred, MailEvent, MailFailed, MailQueued, MailSent
from mailspool.maildir.fileformat import encode_head
from mailspool.maildir.spool import RecipientStatus, Record, Spool, decode_file, encode_file
from mailspool.message import make_envelope
from mailspool.processor import unwritten
from mailspool.processor.loop import RetryPolicy, Summary
from mailspool.smtp.result import Reply

QUICK = RetryPolicy(
    first_delay=60, max_delay=60, give_up_after=3600, relay_first_delay=10, relay_max_delay=10,
    jitter=0,
)  # fmt: skip
SENDER = "app@example.org"
MESSAGE = b"Subject: regression\r\nFrom: app@example.org\r\n\r\nbody\r\n"


def processor(spool: Spool, relay: Relay) -> QueueProcessor:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    return QueueProcessor(spool, mailer, connections=1, retry=QUICK, watch=False)


def commit(spool: Spool, to: list[str], *, not_before: float | None = None) -> str:
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool.path, transaction_manager=tm)
    tm.begin()
    mid = delivery.send(SENDER, to, MESSAGE, not_before=not_before)
    tm.commit()
    return mid


def statuses(spool: Spool) -> dict[str, tuple[str, int | None]]:
    (entry,) = list(spool.entries())
    return {r.address: (r.status, r.code) for r in entry.recipients}


def received(relay: Relay) -> collections.Counter[str]:
    return collections.Counter(r for m in relay.messages for r in m.rcpt_tos)


@pytest.fixture(autouse=True)
def nothing_left_waiting() -> Iterator[None]:
    """Outcomes waiting to be written belong to the process: none may outlive a test."""
    yield
    left = unwritten.WAITING.take()
    for key, u in left:  # give the messages back, so that no other test sees them
        unwritten.WAITING.drop(key, u)
        with contextlib.suppress(OSError):
            u.claim.release()
    assert left == []


@pytest.fixture
def fired() -> Iterator[list[MailEvent]]:
    seen: list[MailEvent] = []

    def subscriber(event: object) -> None:
        if isinstance(event, MailEvent):
            seen.append(event)

    zope.event.subscribers.append(subscriber)
    yield seen
    zope.event.subscribers.remove(subscriber)


# --- 1. a refusal after DATA answers for the transaction's recipients only ----------------


class Answers:
    """Fixed RCPT replies for some addresses (250 for the others); a fixed
    reply to the data.  ``once``: those RCPT replies are given the first time only."""

    def __init__(
        self, rcpt: dict[str, str], data: str = "250 2.0.0 OK", *, once: bool = False
    ) -> None:
        self.rcpt = dict(rcpt)
        self.data = data
        self.once = once

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt.pop(address, None) if self.once else self.rcpt.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return self.data


# The end-to-end case (a recipient greylisted at RCPT, then a 554 for the data)
# is in tests/torture/test_findings.py
# (test_data_refusal_fails_only_the_recipients_it_answered_for).


def test_a_refused_data_command_carries_every_recipients_own_reply(
    smtp_relay: RelayFactory,
) -> None:
    relay = smtp_relay(
        Answers({"grey@example.org": "450 4.2.0 greylisted", "gone@example.org": "550 5.1.1 no"}),
        replies={"DATA": "554 5.7.1 not from you"},
    )
    rcpts = ["grey@example.org", "ok@example.org", "gone@example.org", "ok2@example.org"]
    with SMTPMailer(**relay.mailer_kwargs()).connect() as conn:
        with pytest.raises(PermanentError) as info:
            conn.send(make_envelope(SENDER, rcpts), MESSAGE)
        assert conn.alive  # RSET after the refused DATA: still usable
    result = info.value.result  # type: ignore[attr-defined]
    refusal = Reply(554, "5.7.1 not from you")
    assert result.accepted == ()
    assert result.reply == refusal
    assert list(result.refused.items()) == [  # every recipient, in envelope order
        ("grey@example.org", Reply(450, "4.2.0 greylisted")),
        ("ok@example.org", refusal),
        ("gone@example.org", Reply(550, "5.1.1 no")),
        ("ok2@example.org", refusal),
    ]
    assert relay.messages == []


def test_a_4xx_after_the_dot_defers_the_transaction_and_keeps_the_rcpt_refusals(
    tmp_path: Path, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(
        Answers(
            {"grey@example.org": "450 4.2.0 greylisted", "gone@example.org": "550 5.1.1 no"},
            data="451 4.3.0 queue full, later",
        )
    )
    spool = Spool(tmp_path / "spool")
    commit(spool, ["ok@example.org", "grey@example.org", "gone@example.org"])
    with processor(spool, relay) as p:
        assert p.process_once() == Summary(deferred=1)
    assert statuses(spool) == {
        "ok@example.org": ("pending", 451),
        "grey@example.org": ("pending", 450),  # its own reply, not the 451
        "gone@example.org": ("failed", 550),  # refused for good at RCPT: not retried
    }


def test_a_connection_lost_during_the_data_leaves_the_rcpt_refusals_their_replies(
    tmp_path: Path, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(Answers({"gone@example.org": "550 5.1.1 no"}), drop_in_data=1)
    mailer = SMTPMailer(**relay.mailer_kwargs())
    rcpts = ["ok@example.org", "gone@example.org"]
    with pytest.raises(ConnectionFailed) as info:
        mailer.send(SENDER, rcpts, MESSAGE)
    result = info.value.result  # type: ignore[attr-defined]
    # No reply answered for ok@: the lost connection does; gone@ keeps its 550.
    assert dict(result.refused) == {"gone@example.org": Reply(550, "5.1.1 no")}
    assert result.reply is None

    relay.drops_in_data = 1
    spool = Spool(tmp_path / "spool")
    commit(spool, rcpts)
    with processor(spool, relay) as p:
        assert p.process_once() == Summary(deferred=1)
    assert statuses(spool) == {
        "ok@example.org": ("pending", None),
        "gone@example.org": ("failed", 550),
    }


def test_direct_delivery_reports_each_recipients_own_reason_after_a_data_refusal(
    smtp_relay: RelayFactory, fired: list[MailEvent]
) -> None:
    relay = smtp_relay(
        Answers({"grey@example.org": "450 4.2.0 greylisted"}, data="554 5.6.0 content refused")
    )
    tm = transaction.TransactionManager()
    delivery = DirectMailDelivery(SMTPMailer(**relay.mailer_kwargs()), transaction_manager=tm)
    tm.begin()
    mid = delivery.send(SENDER, ["ok@example.org", "grey@example.org"], MESSAGE)
    tm.commit()
    (event,) = [e for e in fired if e.message_id == mid]
    assert isinstance(event, MailFailed)
    assert event.reasons == {
        "ok@example.org": (554, "5.6.0 content refused"),
        "grey@example.org": (450, "4.2.0 greylisted"),
    }


# --- 2. an outcome the full spool cannot take is kept, never sent again -----------------


def test_an_outcome_the_spool_cannot_take_is_written_later_and_nothing_new_goes_meanwhile(
    tmp_path: Path,
    smtp_relay: RelayFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fired: list[MailEvent],
) -> None:
    caplog.set_level(logging.INFO, logger="mailspool")
    relay = smtp_relay(Answers({"later@example.org": "450 4.2.0 greylisted"}, once=True))
    spool = Spool(tmp_path / "spool")
    t0 = time.time()
    first = commit(spool, ["now@example.org", "later@example.org"])
    second = commit(spool, ["other@example.org"], not_before=t0 + 10)
    full = True
    write = Spool._write

    def write_unless_full(self: Spool, path: str, *args: Any) -> int:
        # A mock: only a mounted file system can be filled on demand (root).
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, path, *args)

    monkeypatch.setattr(Spool, "_write", write_unless_full)
    with processor(spool, relay) as p:
        assert p.process_once(t0) == Summary(unwritten=1)  # sent, but its outcome waits
        id = next(e.id for e in spool.entries() if e.message_id == first)
        assert spool.state(id) == "in_flight"
        assert id not in list(spool.due(t0 + 1000))  # still held: no one else takes it
        assert p.process_once(t0 + 20) == Summary(unwritten=1)  # nothing new goes
        assert [message_id(m.content) for m in relay.messages] == [first]
        told = [e for e in fired if isinstance(e, (MailSent, MailDeferred))]
        assert told == []  # told once the outcome is written
        full = False
        assert p.process_once(t0 + 20) == Summary(sent=1, deferred=1)
        assert [message_id(m.content) for m in relay.messages] == [first, second]
        assert {r.address: r.status for r in spool.get(id).recipients} == {
            "now@example.org": "sent",
            "later@example.org": "pending",
        }
        assert p.process_once(t0 + 100) == Summary(sent=1)  # later@, at its retry time
    assert received(relay) == {"now@example.org": 1, "later@example.org": 1, "other@example.org": 1}
    told = [type(e) for e in fired if e.message_id == first and not isinstance(e, MailQueued)]
    assert told == [MailSent, MailDeferred, MailSent]  # each outcome told once
    about_first = [r for r in caplog.records if r.getMessage().startswith(f"mail {id} ")]
    errors = [r.getMessage() for r in about_first if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # one error however many passes it waits
    assert "cannot record this outcome" in errors[0] and "ENOSPC" in errors[0]
    assert "now@example.org will get it again" in errors[0]
    assert any("written to the spool now" in r.getMessage() for r in about_first)


def test_a_stop_with_an_outcome_unwritten_keeps_the_claim_and_names_who_may_get_it_again(
    tmp_path: Path, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailspool")
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        spool = Spool(disk / "spool")
        relay = smtp_relay(FillDiskThenAccept(disk))
        commit(spool, ["now@example.org", "later@example.org"])
        p = processor(spool, relay)
        p.process_once()
        id = only_id(spool)
        p.stop()  # tries once more: the disk is still full
        stopping = [r for r in caplog.records if "stopping with the outcome" in r.getMessage()]
        assert len(stopping) == 1 and stopping[0].levelno == logging.ERROR
        assert id in stopping[0].getMessage() and "ENOSPC" in stopping[0].getMessage()
        assert "now@example.org will get it a second time" in stopping[0].getMessage()
        # Still held by this process: neither listed as due nor swept back to ready.
        assert spool.state(id) == "in_flight"
        assert id not in list(spool.due(2e9))
        assert spool.sweep() == 0 and spool.state(id) == "in_flight"
        (disk / "filler").unlink()
        with processor(spool, relay) as p2:
            assert p2.process_once(2e9) == Summary(deferred=1, sent=1)
        assert received(relay) == {"now@example.org": 1, "later@example.org": 1}


class FillDiskAtRcpt:
    """Fills ``disk`` and greylists every recipient: nothing is accepted."""

    def __init__(self, disk: Path) -> None:
        self.disk = disk

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        fill(self.disk)
        return "450 4.2.0 greylisted"


def test_a_stop_gives_back_an_unwritten_outcome_when_no_recipient_accepted_it(
    tmp_path: Path, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mailspool")
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        spool = Spool(disk / "spool")
        relay = smtp_relay(FillDiskAtRcpt(disk))
        commit(spool, ["a@example.org"])
        with processor(spool, relay) as p:
            assert p.process_once() == Summary(unwritten=1)
            id = only_id(spool)
            assert spool.state(id) == "in_flight"
        # Nothing was accepted: releasing it sends nothing twice.
        entry = spool.get(id)
        assert entry.state == "ready" and entry.attempts == 0
        assert any(
            r.levelno == logging.WARNING and "back in the queue as it was" in r.getMessage()
            for r in caplog.records
        )
        assert not any("second time" in r.getMessage() for r in caplog.records)
        (disk / "filler").unlink()


# --- 3. send later: give_up_after counts from the scheduled time -------------------------


def test_not_before_is_kept_in_the_file_through_every_rewrite(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    later = time.time() + 10 * 86400
    enqueue(spool, 1, to=["a@example.org", "b@example.org"], not_before=later)
    id = only_id(spool)
    path = Path(spool.path, "deferred", id)
    assert b"\r\nX-Mailspool-Not-Before: " in path.read_bytes()
    claim = spool.claim(id)
    assert claim is not None
    with claim:
        assert claim.not_before == pytest.approx(later)
        assert claim.due_since == claim.not_before > claim.queued_at
        claim.settle(sent=["a@example.org"], deferred={"b@example.org": (451, "later")})
    record, _ = decode_file(path.read_bytes())
    assert record.not_before == pytest.approx(later)
    assert record.due_since == record.not_before


def test_a_not_before_already_past_is_not_written(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    enqueue(spool, 1, not_before=time.time() - 60)
    id = only_id(spool)
    raw = Path(spool.path, "new", id).read_bytes()
    assert b"X-Mailspool-Not-Before" not in raw
    record, _ = decode_file(raw)
    assert record.not_before is None and record.due_since == record.queued_at


def test_the_enqueue_fast_path_writes_not_before_as_encode_file_does() -> None:
    record = Record(
        SENDER, (RecipientStatus("a@example.org"),), 1.5, 0, "m.1@example.org", not_before=9.25
    )
    head = encode_head(SENDER, ["a@example.org"], "m.1@example.org", 1.5, b"x", 9.25)
    assert head == encode_file(record, b"x")[0]
    assert decode_file(head + b"x")[0] == record


def test_a_message_sent_later_expires_give_up_after_after_its_time_not_before(
    tmp_path: Path, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(replies={"RCPT": "450 4.2.0 try later"})
    spool = Spool(tmp_path / "spool")
    later = time.time() + 2 * QUICK.give_up_after
    enqueue(spool, 1, not_before=later)
    id = only_id(spool)
    with processor(spool, relay) as p:
        assert p.process_once(later) == Summary(deferred=1)  # not expired at once
        assert spool.get(id).next_attempt == pytest.approx(later + QUICK.first_delay)
        assert p.process_once(later + QUICK.give_up_after - 1) == Summary(deferred=1)
        # The last retry is moved to the give-up time, counted from `later`.
        assert spool.get(id).next_attempt == pytest.approx(later + QUICK.give_up_after)
        # (A second past it: a file's mtime is rounded, and may lie just after.)
        assert p.process_once(later + QUICK.give_up_after + 1) == Summary(failed=1)
    [r] = spool.get(id).recipients
    assert r.status == "failed" and (r.text or "").startswith("expired")


def test_unwritten_outcomes_make_the_command_report_failure() -> None:
    from mailspool.cli.common import EXIT_FAILED, EXIT_OK, summary_code, summary_line
    from mailspool.processor.loop import Summary

    assert summary_code(Summary(sent=3)) == EXIT_OK
    waiting = Summary(sent=3) + Summary(unwritten=2)
    assert waiting.unwritten == 2 and waiting.sent == 3
    assert summary_code(waiting) == EXIT_FAILED
    assert "2 outcome(s) could not be written" in summary_line(waiting)


CLAIM_AND_HOLD = """
import sys, time
from mailspool.maildir.spool import Spool
spool = Spool(sys.argv[1])
claim = spool.claim(sys.argv[2])
assert claim is not None
print("claimed", flush=True)
time.sleep(60)
"""


def test_a_running_processor_takes_over_a_dead_processors_claim_within_seconds(
    tmp_path: Path, relay: Relay
) -> None:
    import subprocess
    import sys

    spool = Spool(tmp_path / "spool")
    mid = commit(spool, ["jane@example.org"])
    (id,) = list(spool.due())
    child = subprocess.Popen(
        [sys.executable, "-c", CLAIM_AND_HOLD, spool.path, id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "claimed"
        mailer = SMTPMailer(**relay.mailer_kwargs())
        # The look every ``interval`` is far away: only the check for abandoned
        # claims can bring the message in time.
        p = QueueProcessor(spool, mailer, connections=1, interval=300, watch=True)
        p.start()
        try:
            assert spool.state(id) == "in_flight"
            child.kill()
            child.wait(10)
            wait_for(lambda: bool(relay.messages), 20)
        finally:
            p.stop(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert [message_id(m.content) for m in relay.messages] == [mid]
    assert spool.state(id) is None
