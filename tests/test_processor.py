"""The queue processor against real relays: outcomes per recipient, retries, pauses.

Time is injected (``process_once(now=...)``) wherever retries, expiry or
relay pauses are involved, so nothing here waits for a backoff.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zope.event

from _pg import pg_database, pg_url, queue  # noqa: F401
from _relays import (
    RCPT,
    DataReply,
    DropAfter250,
    Greylist,
    MidDataDropper,
    RcptOnce,
    RefuseSome,
    SlowData,
    Switchable,
    TooManyConnections,
    enqueue,
    message_id,
    only_id,
    wait_for,
)
from conftest import RELAY_PASSWORD, Relay, RelayFactory
from mailspool.events import MailDeferred, MailEvent, MailFailed, MailSent
from mailspool.interfaces import IMailQueueProcessor
from mailspool.maildir.spool import Claim, Spool
from mailspool.memory import MemoryQueue
from mailspool.processor.crew import LOST_RUN, RECENT
from mailspool.processor.loop import QueueProcessor, RetryPolicy, Summary
from mailspool.processor.policy import THROTTLE_PERIOD
from mailspool.smtp.mailer import SMTPMailer

QUICK = RetryPolicy(
    first_delay=60, factor=2, max_delay=240, give_up_after=3600, relay_first_delay=10,
    relay_max_delay=40, jitter=0,
)  # fmt: skip


@pytest.fixture
def maildir(tmp_path: Path) -> Spool:
    """For the tests about the Maildir backend's own files, claims and formats."""
    return Spool(tmp_path / "spool")


@pytest.fixture(params=["maildir", "memory", "postgres"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each behaviour test runs against every backend of the queue seam."""
    if request.param == "memory":
        return MemoryQueue("test")
    if request.param == "postgres":
        return request.getfixturevalue("queue")
    return Spool(tmp_path / "spool")


class Fired(list[MailEvent]):
    """Mail events seen during a test (``zope.event`` is global: filter by message)."""

    def about(self, ids: Iterable[str]) -> list[MailEvent]:
        """The events about these Message-Ids, in order."""
        wanted = set(ids)
        return [e for e in self if e.message_id in wanted]


@pytest.fixture
def fired() -> Iterator[Fired]:
    """The mail events dispatched during the test."""
    seen = Fired()

    def subscriber(event: Any) -> None:
        if isinstance(event, MailEvent):
            seen.append(event)

    zope.event.subscribers.append(subscriber)
    yield seen
    zope.event.subscribers.remove(subscriber)


def errors_about(caplog: pytest.LogCaptureFixture, relay_port: int) -> list[str]:
    """ERROR lines about the relay on ``relay_port`` (other tests' threads may log too)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and f":{relay_port}" in r.getMessage()
    ]


def processor(spool: Spool, relay: Relay, **kw: Any) -> QueueProcessor:
    kw.setdefault("retry", QUICK)
    kw.setdefault("watch", False)
    return QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), **kw)


def outcome_lines(caplog: pytest.LogCaptureFixture, id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "mailspool.processor" and r.getMessage().startswith(f"mail {id} ")
    ]


# --- construction ----------------------------------------------------------------------


def test_constructor_checks_its_arguments(maildir: Spool) -> None:
    spool = maildir  # files, claims or formats of the Maildir spool
    with pytest.raises(ValueError, match="connections"):
        QueueProcessor(spool, object(), connections=0)
    with pytest.raises(ValueError, match="rate_limit"):
        QueueProcessor(spool, object(), rate_limit=0)
    p = QueueProcessor(spool.path, object())
    assert IMailQueueProcessor.providedBy(p)
    assert p.queuePath == spool.path


# --- outcomes per recipient ---------------------------------------------------------------


def test_healthy_relay_sends_everything_over_reused_connections(
    spool: Spool, relay: Relay, fired: Fired, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    ids = enqueue(spool, 20)
    with processor(spool, relay, connections=2) as p:
        summary = p.drain()
    assert summary == Summary(sent=20)
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)
    assert relay.connections <= 2  # reused, not one per message
    assert spool.counts() == dict.fromkeys(spool.counts(), 0)
    assert sorted(e.message_id for e in fired.about(ids) if isinstance(e, MailSent)) == sorted(ids)
    lines = [r for r in caplog.records if " sent to " in r.getMessage()]
    assert len(lines) == 20 and all(
        RCPT in r.getMessage() and "250" in r.getMessage() for r in lines
    )


def test_greylisting_defers_then_sends_after_the_retry(
    spool: Spool, smtp_relay: RelayFactory, fired: Fired
) -> None:
    relay = smtp_relay(Greylist())
    to = ["a@example.org", "b@example.org", "c@example.org"]
    [mid] = enqueue(spool, to=to)
    id = only_id(spool)
    p = processor(spool, relay)
    t0 = time.time()
    assert p.process_once(t0) == Summary(deferred=1)
    entry = spool.get(id)
    assert entry.state == "deferred" and entry.attempts == 1
    assert entry.next_attempt == pytest.approx(t0 + 60)
    assert [r.code for r in entry.recipients] == [450, 450, 450]
    assert relay.messages == []
    assert p.process_once(t0 + 59) == Summary()  # not due yet: nothing tried
    assert relay.commands.count("MAIL") == 1
    assert p.process_once(t0 + 60) == Summary(sent=1)
    assert [m.rcpt_tos for m in relay.messages] == [to]
    assert [type(e) for e in fired.about([mid])] == [MailDeferred, MailSent]
    deferred = fired.about([mid])[0]
    assert isinstance(deferred, MailDeferred)
    assert deferred.message_id == mid and deferred.retry_at == pytest.approx(t0 + 60)
    assert "450 4.2.0 greylisted" in deferred.errorMessage
    p.stop()


def test_one_of_three_refused_fails_alone(
    spool: Spool, smtp_relay: RelayFactory, fired: Fired
) -> None:
    relay = smtp_relay(RefuseSome(["nobody@example.org"]))
    ids = enqueue(spool, to=["a@example.org", "nobody@example.org", "b@example.org"])
    id = only_id(spool)
    p = processor(spool, relay)
    t0 = time.time()
    assert p.process_once(t0) == Summary(failed=1)
    assert p.process_once(t0 + 86400) == Summary()  # a failed message is not retried
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org", "b@example.org"]]
    entry = spool.get(id)
    assert entry.state == "failed"
    status = {r.address: (r.status, r.code, r.text) for r in entry.recipients}
    assert status["a@example.org"][0] == status["b@example.org"][0] == "sent"
    assert status["nobody@example.org"] == ("failed", 550, "5.1.1 no such user here")
    sent, failed = fired.about(ids)
    assert isinstance(sent, MailSent) and sent.toaddrs == ("a@example.org", "b@example.org")
    assert isinstance(failed, MailFailed) and failed.toaddrs == ("nobody@example.org",)
    assert failed.reasons == {"nobody@example.org": (550, "5.1.1 no such user here")}
    p.stop()


def test_permanent_data_refusal_fails_every_recipient(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(DataReply("554 5.6.0 content rejected"))
    enqueue(spool, to=["a@example.org", "b@example.org"])
    id = only_id(spool)
    with processor(spool, relay) as p:
        assert p.process_once() == Summary(failed=1)
    assert {(r.status, r.code) for r in spool.get(id).recipients} == {("failed", 554)}


def test_always_451_until_expiry(spool: Spool, smtp_relay: RelayFactory, fired: Fired) -> None:
    relay = smtp_relay(DataReply("451 4.3.0 try again later"))
    policy = RetryPolicy(first_delay=10, factor=2, max_delay=40, give_up_after=100, jitter=0)
    ids = enqueue(spool)
    id = only_id(spool)
    p = processor(spool, relay, retry=policy)
    now: float | None = time.time()
    seen: list[Summary] = []
    while now is not None and len(seen) < 20:
        seen.append(p.process_once(now))
        now = spool.next_due()
    p.stop()
    # Attempts at +0, +10, +30, +70, then at the give-up time (moved forward).
    assert seen == [Summary(deferred=1)] * 4 + [Summary(failed=1)]
    assert relay.commands.count("DATA") == 5 and relay.messages == []
    entry = spool.get(id)
    assert entry.state == "failed" and entry.attempts == 5
    [r] = entry.recipients
    assert r.status == "failed" and r.code == 451
    assert r.text is not None and r.text.startswith("expired") and "4.3.0 try again" in r.text
    assert [type(e) for e in fired.about(ids)] == [MailDeferred] * 4 + [MailFailed]


def test_drop_mid_data_defers_and_loses_nothing(spool: Spool) -> None:
    server = MidDataDropper(drops=1)
    try:
        enqueue(spool, size=3_000_000)  # larger than the socket buffers
        id = only_id(spool)
        mailer = SMTPMailer("127.0.0.1", server.port, tls="none", timeout=5, data_timeout=5)
        with QueueProcessor(spool, mailer, retry=QUICK, watch=False) as p:
            t0 = time.time()
            assert p.process_once(t0) == Summary(deferred=1)
            entry = spool.get(id)
            assert entry.attempts == 1 and entry.last_error
            assert server.received == 0
            assert p.process_once(t0 + 60) == Summary(sent=1)
        assert server.received == 1
    finally:
        server.stop()


def test_drop_after_250_counts_as_sent(spool: Spool, smtp_relay: RelayFactory) -> None:
    handler = DropAfter250()
    relay = smtp_relay(handler)
    enqueue(spool, 1)
    with processor(spool, relay, connections=1) as p:
        assert p.process_once() == Summary(sent=1)
        assert handler.closed.wait(5)
        time.sleep(0.1)  # for the close to reach the client
        enqueue(spool, 1)
        assert p.process_once() == Summary(sent=1)  # a dead connection is not reused
    assert len(relay.messages) == 2
    assert relay.connections == 2
    assert spool.counts()["deferred"] == 0


# --- relay-level trouble ------------------------------------------------------------------


def test_relay_down_then_back_pauses_and_probes_once_per_step(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    handler = Switchable()
    relay = smtp_relay(handler)
    ids = enqueue(spool, 20)
    p = processor(spool, relay, connections=4)
    t0 = time.time()
    probes = []
    for dt in (0, 5, 10, 29, 30, 69):  # pauses of 10, 20, 40 s
        s = p.process_once(t0 + dt)
        assert s.relay_paused and s.total == 0
        probes.append(relay.connections)
    assert probes == [1, 1, 2, 2, 3, 3]  # one connection per backoff step
    counts = spool.counts()
    assert counts["ready"] == 20 and counts["failed"] == counts["deferred"] == 0
    assert {e.attempts for e in spool.entries()} == {0}  # not counted against any message
    [error] = errors_about(caplog, relay.port)  # one error for the whole outage
    assert "paused for 10s" in error and "421" in error
    probe_warnings = [
        r.getMessage() for r in caplog.records if "still unavailable" in r.getMessage()
    ]
    assert len(probe_warnings) == 2 and "next probe in 40s" in probe_warnings[-1]

    handler.down = False
    assert p.process_once(t0 + 70) == Summary(sent=20)
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)
    assert any("is back" in r.getMessage() for r in caplog.records)
    p.stop()


def test_relay_that_refuses_connections_fails_nothing(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    enqueue(spool, 3)
    mailer = SMTPMailer("127.0.0.1", port, tls="none", connect_timeout=2)
    with QueueProcessor(spool, mailer, retry=QUICK, watch=False) as p:
        summary = p.drain()
    assert summary == Summary(relay_paused=True)
    assert spool.counts()["ready"] == 3
    [error] = errors_about(caplog, port)
    assert "cannot connect" in error


def test_421_on_rcpt_defers_that_message_and_the_pass_goes_on(
    spool: Spool, smtp_relay: RelayFactory, fired: Fired, caplog: pytest.LogCaptureFixture
) -> None:
    # A 421 after MAIL FROM is the message's trouble while the relay still
    # takes connections: that message is deferred (a quick first retry), the
    # connection replaced, and the others go through in the same pass.
    caplog.set_level(logging.INFO, "mailspool")
    relay = smtp_relay(RcptOnce("421 4.7.0 too many connections"))
    ids = enqueue(spool, 3)
    p = processor(spool, relay, connections=1)
    t0 = time.time()
    assert p.process_once(t0) == Summary(sent=2, deferred=1)
    [deferred] = [e for e in spool.entries() if e.state == "deferred"]
    assert deferred.attempts == 1
    assert deferred.next_attempt == pytest.approx(t0 + QUICK.quick_retry)
    assert relay.connections == 2  # the 421 closed the first; a new one took the others
    assert errors_about(caplog, relay.port) == []  # nothing paused
    assert p.process_once(t0 + QUICK.quick_retry) == Summary(sent=1)
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)
    assert [type(e) for e in fired.about(ids)].count(MailSent) == 3
    p.stop()


def test_421_too_many_connections_lowers_the_parallelism_without_a_pause(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    # Each message is held a while, so the processor (which starts with one
    # connection) adds connections, one per RECENT slow messages, up to four.
    handler = TooManyConnections(limit=2, hold=0.05)
    relay = smtp_relay(handler)
    n = 4 * RECENT
    ids = enqueue(spool, n)
    p = processor(spool, relay, connections=4)
    t0 = time.time()
    # Two connections are busy when the third is refused: the connection
    # count goes down to two and the pass goes on (the refused message is
    # tried again in it, not counted as an attempt).
    assert p.process_once(t0) == Summary(sent=n)
    assert handler.refused >= 1 and handler.most == 2
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)
    assert errors_about(caplog, relay.port) == []  # no pause
    warned = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert warned and "while 2 were open" in warned[0] and "at most 2" in warned[0]
    assert p.relay.parallelism(t0 + 10) == 2
    assert p.relay.parallelism(t0 + THROTTLE_PERIOD) > 2  # for a while only
    p.stop()


def test_wrong_password_pauses_and_never_logs_it(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    relay = smtp_relay(RefuseSome(["nobody@example.org"]), tls="starttls", auth=True)
    enqueue(spool, 2, to=["a@example.org", "nobody@example.org"])
    good = SMTPMailer(**relay.mailer_kwargs())
    with QueueProcessor(spool, good, connections=1, retry=QUICK, watch=False) as p:
        assert p.drain() == Summary(failed=2)
    enqueue(spool, 2)
    bad = SMTPMailer(**relay.mailer_kwargs(password="wrong-" + RELAY_PASSWORD))
    with QueueProcessor(spool, bad, connections=1, retry=QUICK, watch=False) as p:
        t0 = time.time()
        assert p.process_once(t0).relay_paused
        assert p.process_once(t0 + 1).relay_paused
    assert relay.connections == 2  # the good one, then a single probe
    assert spool.counts()["ready"] == 2
    assert RELAY_PASSWORD not in caplog.text
    assert any(r.levelno == logging.ERROR and "535" in r.getMessage() for r in caplog.records)


# --- never stuck ------------------------------------------------------------------------


def test_corrupt_file_and_fifo_do_not_stop_the_drain(maildir: Spool, relay: Relay) -> None:
    spool = maildir  # files, claims or formats of the Maildir spool
    ids = enqueue(spool, 3)
    new = Path(spool.path, "new")
    (new / "1700000000.corrupt.test").write_bytes(b"X-Mailspool: 1 10 10 00000000\r\ngarbage")
    os.mkfifo(new / "1700000000.fifo.test")
    result: list[Summary] = []
    p = processor(spool, relay)
    t = threading.Thread(target=lambda: result.append(p.drain()), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the drain got stuck"
    p.stop()
    assert result == [Summary(sent=3, quarantined=2)]
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)
    assert spool.counts()["quarantined"] == 2


def test_a_message_claimed_elsewhere_is_left_alone(spool: Spool, relay: Relay) -> None:
    ids = enqueue(spool, 2)
    [held] = [e.id for e in spool.entries()][:1]
    claim = spool.claim(held)  # as another processor would hold it
    assert claim is not None
    with claim, processor(spool, relay) as p:
        assert p.process_once() == Summary(sent=1)  # not quarantined, not sent
        assert spool.state(held) == "in_flight"
    assert len(relay.messages) == 1 and message_id(relay.messages[0].content) in ids
    assert spool.state(held) == "ready"  # given back by its holder, untouched


class Buggy:
    """A mailer whose first ``bugs`` sends raise a bug (not a delivery error)."""

    def __init__(self, relay: Relay, bugs: int = 1) -> None:
        self.mailer = SMTPMailer(**relay.mailer_kwargs())
        self.bugs = bugs

    def connect(self) -> Any:
        conn = self.mailer.connect()
        original = conn.send

        def send(envelope: Any, data: bytes, **kw: Any) -> Any:
            if self.bugs > 0:
                self.bugs -= 1
                raise RuntimeError("a bug in the mailer")
            return original(envelope, data, **kw)

        conn.send = send  # type: ignore[method-assign]
        return conn


def test_an_exception_is_caught_at_the_message_and_the_rest_flows(
    spool: Spool, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(spool, 3)
    with QueueProcessor(spool, Buggy(relay), connections=1, retry=QUICK, watch=False) as p:
        assert p.process_once() == Summary(sent=2, deferred=1)
    [entry] = spool.entries("deferred")
    assert entry.attempts == 1 and "a bug in the mailer" in (entry.last_error or "")
    [line] = outcome_lines(caplog, entry.id)
    assert line.exc_info is not None and "RuntimeError" in caplog.text
    assert f"unexpected error while sending to {RCPT}; deferred until" in line.getMessage()
    assert relay.connections == 2  # the connection in an unknown state was not reused


def test_an_exception_expires_like_a_temporary_failure(
    spool: Spool, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    enqueue(spool, 1)
    id = only_id(spool)
    with QueueProcessor(spool, Buggy(relay), connections=1, retry=QUICK, watch=False) as p:
        assert p.process_once(time.time() + QUICK.give_up_after) == Summary(failed=1)
    [r] = spool.get(id).recipients
    assert r.status == "failed" and r.text is not None
    assert r.text.startswith("expired") and "a bug in the mailer" in r.text


def test_a_message_that_cannot_even_be_deferred_is_left_until_its_retry(
    maildir: Spool, relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = maildir  # files, claims or formats of the Maildir spool
    enqueue(spool, 1)
    id = only_id(spool)

    def broken(self: Any, retry_at: float, reason: str, **kw: Any) -> None:
        # A mock: no real part fails exactly this write on demand.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Claim, "defer", broken)
    with QueueProcessor(spool, Buggy(relay, bugs=1), connections=1, retry=QUICK, watch=False) as p:
        t0 = time.time()
        assert p.process_once(t0) == Summary()  # nothing settled: released untouched
        assert spool.state(id) == "ready"
        assert p.process_once(t0 + 59) == Summary()  # not taken again before its retry time
        assert relay.messages == []
        assert p.process_once(t0 + 60) == Summary(sent=1)


# --- one line per outcome, send later, rate limit ----------------------------------------


def test_one_log_line_per_message_outcome(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    relay = smtp_relay(RefuseSome(["nobody@example.org"]))
    enqueue(spool, to=["a@example.org", "nobody@example.org"])
    id = only_id(spool)
    with processor(spool, relay) as p:
        p.process_once()
    [line] = outcome_lines(caplog, id)
    text = line.getMessage()
    assert line.levelno == logging.ERROR
    assert "sent to a@example.org" in text and "250" in text
    assert "failed for nobody@example.org: 550 5.1.1 no such user here" in text


def test_send_later_waits_for_its_time(spool: Spool, relay: Relay) -> None:
    t0 = time.time()
    enqueue(spool, 1, not_before=t0 + 3600)
    with processor(spool, relay) as p:
        assert p.process_once(t0) == Summary()
        assert spool.next_due() == pytest.approx(t0 + 3600)
        assert p.process_once(t0 + 3600) == Summary(sent=1)
    assert len(relay.messages) == 1


def test_send_later_than_the_give_up_time_is_not_expired_at_its_first_failure(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(Greylist())
    t0 = time.time()
    later = t0 + 2 * QUICK.give_up_after  # a reminder for the day after tomorrow
    enqueue(spool, 1, not_before=later)
    id = only_id(spool)
    with processor(spool, relay) as p:
        assert p.process_once(later) == Summary(deferred=1)  # greylisted: try again
        assert p.process_once(later + 60) == Summary(sent=1)
    assert spool.state(id) is None


def test_rate_limit_holds_the_next_message_until_its_slot(spool: Spool, relay: Relay) -> None:
    enqueue(spool, 2)
    p = processor(spool, relay, rate_limit=0.1, connections=2)  # one message every 10 s
    p.start()
    try:
        assert wait_for(lambda: len(relay.messages) == 1)
        # The second is claimed and waits for its slot instead of going at once...
        assert wait_for(lambda: spool.counts()["in_flight"] == 1)
        assert len(relay.messages) == 1
    finally:
        p.stop()  # ...and a stop cuts the wait short
    assert len(relay.messages) == 1
    counts = spool.counts()
    assert counts["ready"] == 1 and counts["in_flight"] == 0  # given back untouched
    assert {e.attempts for e in spool.entries()} == {0}


def drain_one_legacy(spool: Spool, relay: Relay, legacy: bytes) -> Any:
    """Put one zope.sendmail file in ``new/``, drain it, return what the relay got."""
    Path(spool.path, "new", "1700000000.12345.oldhost").write_bytes(legacy)
    with processor(spool, relay) as p:
        assert p.drain() == Summary(sent=1)
    [received] = relay.messages
    return received


def test_a_queue_written_by_zope_sendmail_is_drained(maildir: Spool, relay: Relay) -> None:
    spool = maildir  # files, claims or formats of the Maildir spool
    legacy = (
        b"X-Zope-From: app@example.org\r\n"
        b"X-Zope-To: a@example.org, b@example.org\r\n"
        b"Message-Id: <legacy.1@example.org>\r\n"
        b"Subject: from the old queue\r\n\r\nhello\r\n"
    )
    received = drain_one_legacy(spool, relay, legacy)
    assert received.mail_from == "app@example.org"
    assert received.rcpt_tos == ["a@example.org", "b@example.org"]
    assert message_id(received.content) == "legacy.1@example.org"
    assert b"X-Zope-" not in received.content


def test_a_legacy_message_with_bare_lf_and_no_final_newline_goes_out_whole(
    maildir: Spool, relay: Relay
) -> None:
    spool = maildir  # files, claims or formats of the Maildir spool
    # Only mailspool's own format keeps the message in wire form; an old
    # queue's file is normalised when sent: CRLF, ending with one, so the
    # final dot stands on a line of its own.
    legacy = (
        b"X-Zope-From: app@example.org\n"
        b"X-Zope-To: a@example.org\n"
        b"Message-Id: <legacy.2@example.org>\n"
        b"Subject: old\n\nfirst\n.dot line\nlast line without newline"
    )
    received = drain_one_legacy(spool, relay, legacy)
    assert received.content.endswith(b"\r\nlast line without newline\r\n")
    assert b"\r\n.dot line\r\n" in received.content
    assert b"\n" not in received.content.replace(b"\r\n", b"")


def test_a_slow_relay_gets_more_connections_up_to_the_limit(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(SlowData(0.05))
    ids = enqueue(spool, 12 * RECENT)
    with processor(spool, relay, connections=10) as p:
        assert p.drain() == Summary(sent=12 * RECENT)
        grown = len(p._crew.threads)
    # Started with 1; the relay's 50 ms per message made it add one
    # connection every RECENT messages, never more than allowed.
    assert 6 < grown <= 10
    assert 6 < relay.connections <= 10
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)


def test_connections_below_the_initial_number_are_never_exceeded(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(SlowData(0.05))
    enqueue(spool, 3 * RECENT)
    with processor(spool, relay, connections=2) as p:
        assert p.drain() == Summary(sent=3 * RECENT)
        assert len(p._crew.threads) == 2
    assert relay.connections <= 2


def test_claims_lost_to_another_processor_make_the_pass_list_again(
    maildir: Spool, relay: Relay
) -> None:
    spool = maildir  # files, claims or formats of the Maildir spool
    # Another processor on the same spool takes 280 of 300 messages just
    # after this one has listed them.  Rather than try each of those names
    # in turn, the pass lists the spool again after LOST_RUN lost claims.
    enqueue(spool, 300)
    rival = Spool(spool.path)
    p = processor(spool, relay, connections=1)
    real_claim = p.spool.claim
    tried: list[str] = []
    lost: list[str] = []

    def claim(id: str) -> Claim | None:
        if not tried:
            for other in sorted(os.listdir(os.path.join(spool.path, "new")))[:280]:
                with rival.claim(other) as c:
                    assert c is not None
                    c.settle(sent=c.envelope.recipients)
        tried.append(id)
        c = real_claim(id)
        if c is None:
            lost.append(id)
        return c

    p.spool.claim = claim  # type: ignore[method-assign]
    with p:
        assert p.drain() == Summary(sent=20)
    assert len(relay.messages) == 20
    assert sum(spool.counts().values()) == 0
    # Some claims lost before the pass noticed (LOST_RUN in a row; a claim
    # made in between starts the count again) and the ids queued ahead of
    # the sender meanwhile: not one per name the rival took (280).
    assert LOST_RUN <= len(lost) <= 40
    assert len(tried) == 20 + len(lost)
