"""A PostgreSQL queue whose database goes away: at start, mid-run, mid-send.

These tests stop and start a private server (:mod:`_pgcluster`), never
the shared one.  What must hold: the processor waits instead of dying,
says so in one line when the outage begins and one when it ends (no
traceback), fails or defers no message for it, and delivers what was
committed once the database is back; an outcome learned while the
database was down is written when it is back.  What is a mistake of
configuration (a refused login, no schema) still stops the command at
once, with one line and exit code 3.
"""

# ruff: noqa: E402, F811  (psycopg is checked first; the fixtures are parameters)

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (mailspool[postgres])")

from _pgcluster import Cluster, _pg_cluster_session, pg_cluster  # noqa: F401
from _relays import RCPT, SENDER, body, message_id, wait_for
from conftest import Relay, RelayFactory
from mailspool import QueueProcessor, RetryPolicy, SMTPMailer
from mailspool.errors import QueueUnavailable, SpoolError
from mailspool.message import prepare
from mailspool.postgres import PostgresQueue

QUICK = RetryPolicy(first_delay=60, max_delay=600, give_up_after=3600, jitter=0)
_schemas = iter(range(1, 10_000))


@pytest.fixture
def url(pg_cluster: Cluster) -> Iterator[str]:
    """A queue URL on the private server, its schema initialised."""
    u = f"{pg_cluster.url}?schema=o{next(_schemas)}_{os.getpid()}"
    PostgresQueue(u, create=True).close()
    yield u
    if not pg_cluster.running:
        pg_cluster.start()


class Records(logging.Handler):
    """The processor's log records, kept."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines())


@pytest.fixture
def records() -> Iterator[Records]:
    h = Records()
    logger = logging.getLogger("mailspool")
    old = logger.level
    logger.addHandler(h)
    logger.setLevel(logging.DEBUG)
    yield h
    logger.removeHandler(h)
    logger.setLevel(old)


def put(queue: PostgresQueue, n: int = 0) -> str:
    p = prepare(SENDER, [RCPT], body(n))
    queue.publish([queue.stage(p)])
    return p.message_id


def processor(queue: PostgresQueue, relay: Relay, **kw: Any) -> QueueProcessor:
    kw.setdefault("retry", QUICK)
    kw.setdefault("interval", 0.5)
    return QueueProcessor(queue, SMTPMailer(**relay.mailer_kwargs()), **kw)


def delivered(relay: Relay) -> list[str]:
    return [message_id(m.content) for m in relay.messages]


def test_an_unreachable_database_is_unavailable_a_refusal_is_not(pg_cluster: Cluster) -> None:
    with pytest.raises(SpoolError) as refused:
        PostgresQueue(pg_cluster.url.replace("postgres@", "nobody@"))
    assert not isinstance(refused.value, QueueUnavailable)
    assert "nobody" in str(refused.value)
    with pytest.raises(SpoolError, match="no queue there") as missing:
        PostgresQueue(f"{pg_cluster.url}?schema=never_made")
    assert not isinstance(missing.value, QueueUnavailable)
    pg_cluster.stop()
    with pytest.raises(QueueUnavailable, match="cannot connect"):
        PostgresQueue(pg_cluster.url)
    lazy = PostgresQueue(pg_cluster.url, connect=False)  # nothing asked yet
    with pytest.raises(QueueUnavailable):
        lazy.counts()


def test_a_processor_started_while_the_database_is_down_waits_for_it(
    pg_cluster: Cluster, url: str, relay: Relay, records: Records
) -> None:
    pg_cluster.stop()
    queue = PostgresQueue(url, connect=False)
    p = processor(queue, relay)
    p.start()
    try:
        assert wait_for(lambda: records.count("waiting for the queue") == 1)
        assert p._thread is not None and p._thread.is_alive()
        pg_cluster.start()
        assert wait_for(lambda: records.count("is back after") == 1, timeout=60)
        mid = put(queue)
        assert wait_for(lambda: delivered(relay) == [mid], timeout=30)
    finally:
        p.stop()
        queue.close()
    assert records.count("waiting for the queue") == 1
    assert not [r for r in records.records if r.exc_info], "no traceback"
    assert not [line for line in records.lines(logging.ERROR)]


def test_a_processor_waits_through_a_restart_and_fails_nothing(
    pg_cluster: Cluster, url: str, relay: Relay, records: Records
) -> None:
    queue = PostgresQueue(url)
    first = put(queue, 1)
    p = processor(queue, relay)
    p.start()
    try:
        assert wait_for(lambda: delivered(relay) == [first])
        pg_cluster.stop()
        p.wake()  # look now: the database is gone
        assert wait_for(lambda: records.count("waiting for the queue") == 1)
        time.sleep(1.5)  # a look or two more while it is down: no more lines
        pg_cluster.start()
        assert wait_for(lambda: records.count("is back after") == 1, timeout=60)
        second = put(queue, 2)
        assert wait_for(lambda: delivered(relay) == [first, second], timeout=30)
    finally:
        p.stop()
    assert records.count("waiting for the queue") == 1
    assert not [r for r in records.records if r.exc_info], "no traceback"
    assert queue.counts() == dict.fromkeys(queue.counts(), 0)  # nothing deferred, failed
    queue.close()


class HoldData:
    """Takes a message's data, then answers only once ``release`` is set."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.started.set()
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return "250 2.0.0 OK"


def test_an_outcome_learned_while_the_database_is_down_is_written_when_it_is_back(
    pg_cluster: Cluster, url: str, smtp_relay: RelayFactory, records: Records
) -> None:
    hold = HoldData()
    relay = smtp_relay(hold)
    queue = PostgresQueue(url)
    mid = put(queue)
    p = processor(queue, relay, watch=False)
    p.start()
    try:
        assert hold.started.wait(10)
        pg_cluster.stop()  # the claim's session ends with it
        hold.release.set()  # the relay's 250 comes while the database is down
        assert wait_for(lambda: records.count("cannot record this outcome now") == 1)
        pg_cluster.start()
        assert wait_for(lambda: records.count("written to the spool now") == 1, timeout=60)
    finally:
        p.stop()
    assert delivered(relay) == [mid]  # once
    assert queue.counts() == dict.fromkeys(queue.counts(), 0)
    assert not [r for r in records.records if r.exc_info], "no traceback"
    queue.close()


def test_a_lost_claim_is_logged_as_lost_not_as_unsynced(
    pg_cluster: Cluster, url: str, smtp_relay: RelayFactory, records: Records
) -> None:
    hold = HoldData()
    relay = smtp_relay(hold)
    queue = PostgresQueue(url)
    put(queue)
    p = processor(queue, relay, watch=False)
    p.start()
    try:
        assert hold.started.wait(10)
        pg_cluster.restart()  # the claim's session ends; the row is free again
        other = PostgresQueue(url)
        (id,) = other.due()
        taken = other.claim(id)  # another processor takes it meanwhile
        assert taken is not None
        hold.release.set()
        assert wait_for(lambda: records.count("this outcome is not recorded") == 1, timeout=30)
        taken.release()
        other.close()
    finally:
        p.stop()
        queue.close()
    (line,) = [x for x in records.lines() if "not recorded" in x]
    assert "another processor holds the message now" in line
    assert f"{RCPT} may get it a second time" in line
    assert "synced" not in " ".join(records.lines())


def _run(url: str, relay: Relay, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "mailspool", "run", "--queue", url, "--host", relay.host,
            "--port", str(relay.port), "--tls", "none", "--interval", "0.5", *extra]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_mailspool_run_waits_for_the_database_at_start(
    pg_cluster: Cluster, url: str, relay: Relay, tmp_path: Any
) -> None:
    pg_cluster.stop()
    proc = _run(url, relay, "-v")
    try:
        time.sleep(3)  # it tries, says so, and waits
        assert proc.poll() is None
        pg_cluster.start()
        queue = PostgresQueue(url)
        mid = put(queue)
        assert wait_for(lambda: delivered(relay) == [mid], timeout=60)
        queue.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("waiting for the queue") == 1, err
    assert err.count("is back after") == 1, err
    assert "password" not in err.lower()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda u: u.replace("postgres@", "nobody@"), 'role "nobody" does not exist'),
        (lambda u: u.rpartition("?")[0] + "?schema=never_made", "no queue there"),
    ],
    ids=["login refused", "no schema"],
)
def test_mailspool_run_fails_at_once_on_a_mistake(
    url: str, relay: Relay, change: Any, expected: str
) -> None:
    proc = _run(change(url), relay)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_status_does_not_wait_for_a_database_that_is_down(pg_cluster: Cluster, url: str) -> None:
    pg_cluster.stop()
    proc = subprocess.run(
        [sys.executable, "-m", "mailspool", "status", "--queue", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr
    assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
