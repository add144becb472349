"""The queue processor draining a PostgreSQL queue into a real SMTP relay.

The processor reaches the queue through the seam only; these tests check
the whole path on this backend: enqueue (two-phase and in the
application's transaction), claim, send over aiosmtpd, settle per
recipient, and the pickup by NOTIFY of a running processor.
"""

# ruff: noqa: E402, F811  (psycopg is checked first; the fixtures from _pg are parameters)

from __future__ import annotations

import time
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (mailspool[postgres])")

from _pg import pg_database, pg_url, queue, sql  # noqa: F401
from _relays import RCPT, Greylist, RefuseSome, enqueue, message_id, wait_for
from conftest import Relay, RelayFactory
from mailspool import QueueProcessor, RetryPolicy, SMTPMailer, Summary
from mailspool.postgres import PostgresQueue
from mailspool.postgres.connect import parse_target

QUICK = RetryPolicy(first_delay=60, max_delay=600, give_up_after=3600, jitter=0)


def processor(queue: PostgresQueue, relay: Relay, **kw: Any) -> QueueProcessor:
    kw.setdefault("retry", QUICK)
    return QueueProcessor(queue, SMTPMailer(**relay.mailer_kwargs()), **kw)


def test_drain_sends_everything_and_empties_the_queue(queue: PostgresQueue, relay: Relay) -> None:
    ids = enqueue(queue, 20)
    with processor(queue, relay, connections=2, watch=False) as p:
        summary = p.drain()
    assert summary == Summary(sent=20)
    assert sorted(message_id(m.content) for m in relay.messages) == sorted(ids)
    assert queue.counts() == dict.fromkeys(queue.counts(), 0)


def test_per_recipient_outcomes_are_written_to_the_rows(
    queue: PostgresQueue, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(RefuseSome(["nobody@example.org"]))
    enqueue(queue, to=["a@example.org", "nobody@example.org"])
    p = processor(queue, relay, watch=False)
    assert p.process_once() == Summary(failed=1)
    (entry,) = queue.entries()
    assert entry.state == "failed"
    assert {r.address: r.status for r in entry.recipients} == {
        "a@example.org": "sent",
        "nobody@example.org": "failed",
    }
    assert [m.rcpt_tos for m in relay.messages] == [["a@example.org"]]
    p.stop()


def test_greylisting_defers_then_sends_after_the_retry(
    queue: PostgresQueue, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(Greylist())
    enqueue(queue, to=[RCPT])
    p = processor(queue, relay, watch=False)
    t0 = time.time()
    assert p.process_once(t0) == Summary(deferred=1)
    t1 = time.time()
    (entry,) = queue.entries()
    assert entry.state == "deferred" and entry.attempts == 1
    # (the table keeps microseconds: a float may differ in its last digits)
    assert entry.next_attempt is not None
    assert t0 + 60 - 1e-5 <= entry.next_attempt <= t1 + 60 + 1e-5
    assert p.process_once(entry.next_attempt - 1) == Summary()  # not due yet
    assert p.process_once(entry.next_attempt + 1) == Summary(sent=1)
    assert queue.state(entry.id) is None
    p.stop()


def test_a_running_processor_picks_up_a_commit_of_the_application(
    queue: PostgresQueue, relay: Relay, pg_url: str
) -> None:
    # A long polling interval: only the NOTIFY of the commit can bring the
    # message in time.
    p = processor(queue, relay, interval=3600)
    p.start()
    try:
        assert wait_for(lambda: p._waiter is not None)
        waker = p._waiter.waker
        assert waker is not None and waker.kind == "LISTEN/NOTIFY"
        assert waker.ready(10)
        with psycopg.connect(parse_target(pg_url).conninfo) as app:
            mid = queue.enqueue(app, "shop@example.org", [RCPT], b"Subject: hi\r\n\r\nhello\r\n")
            app.commit()
        assert wait_for(lambda: len(relay.messages) == 1)
        assert message_id(relay.messages[0].content) == mid
        assert wait_for(lambda: sum(queue.counts().values()) == 0)
    finally:
        p.stop()


def test_a_processor_whose_connections_are_cut_keeps_going(
    queue: PostgresQueue, relay: Relay, pg_url: str
) -> None:
    # What a restarted server does to its clients: every session ends.
    p = processor(queue, relay, interval=0.2)
    p.start()
    try:
        enqueue(queue, 1)
        assert wait_for(lambda: len(relay.messages) == 1)
        cut = sql(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'mailspool' "
            "AND pid <> pg_backend_pid()",
        )
        assert cut  # the processor's own sessions, at least the queue's and the listener's
        app = PostgresQueue(pg_url)  # an application's, made after the cut
        enqueue(app, 2)
        app.close()
        assert wait_for(lambda: len(relay.messages) == 3)
        assert wait_for(lambda: sum(queue.counts().values()) == 0)
        assert p._thread is not None and p._thread.is_alive()
    finally:
        p.stop()
