"""Claims die with their holder: a processor killed with SIGKILL frees its messages.

The claim is a row lock in a transaction of the holder's own session; when
the process dies, the kernel closes its socket, PostgreSQL ends the session
and rolls the transaction back, and the lock is gone.
"""

# ruff: noqa: F811  (psycopg is checked first; the fixtures from _pg are parameters)

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("psycopg", reason="psycopg is not installed (mailspool[postgres])")

from _pg import pg_database, pg_url, queue, sql  # noqa: F401
from _relays import wait_for
from mailspool.errors import SpoolError
from mailspool.message import prepare
from mailspool.postgres import PostgresQueue
from mailspool.postgres.claim import PostgresClaim

A = "a@example.org"

CHILD = textwrap.dedent(
    """
    import sys, time
    from mailspool.postgres import PostgresQueue
    q = PostgresQueue(sys.argv[1])
    claim = q.claim(sys.argv[2])
    print("claimed" if claim is not None else "none", flush=True)
    time.sleep(120)
    """
)


def _put(q: PostgresQueue) -> str:
    staged = q.stage(prepare("s@example.org", [A], b"Subject: x\r\n\r\nhi\r\n"))
    q.publish([staged])
    return staged.id


def test_a_sigkilled_holder_loses_its_claim_within_seconds(
    queue: PostgresQueue, pg_url: str
) -> None:
    id = _put(queue)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, pg_url, id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "claimed"
        assert queue.claim(id) is None  # held by the child
        assert queue.state(id) == "in_flight" and list(queue.due()) == []
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    got: list[PostgresClaim | None] = [None]

    def claimed() -> bool:
        got[0] = queue.claim(id)
        return got[0] is not None

    # the server notices the closed socket at once
    assert wait_for(claimed, 30), "the dead child's claim was never freed"
    claim = got[0]
    assert claim is not None
    assert claim.attempts == 0  # nothing was written for the dead claim
    assert claim.settle(sent=[A]) == "removed"


def test_a_claim_in_a_forked_child_holds_nothing_there(queue: PostgresQueue) -> None:
    id = _put(queue)
    claim = queue.claim(id)
    assert claim is not None
    pid = os.fork()
    if pid == 0:  # the child: the claim is the parent's, and stays so
        code = 0 if not claim.held else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert claim.held and queue.state(id) == "in_flight"
    assert claim.settle(sent=[A]) == "removed"


def _record_flushes(url: str, q: PostgresQueue) -> None:
    """A trigger that notes, for each outcome written, whether its commit waits for the flush."""
    sql(
        url,
        f"""
        CREATE TABLE {q.table}_flushes (op text, sync text);
        CREATE FUNCTION {q.table}_note() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO {q.table}_flushes
            VALUES (TG_OP || ' ' || coalesce(NEW.state, 'gone'),
                    current_setting('synchronous_commit'));
          RETURN NULL;
        END $$;
        CREATE TRIGGER note AFTER UPDATE OR DELETE ON {q.table}
          FOR EACH ROW EXECUTE FUNCTION {q.table}_note();
        """,
    )


@pytest.mark.parametrize("keep_sent", [None, 3600.0])
def test_only_a_message_sent_to_all_is_settled_without_waiting_for_the_flush(
    pg_url: str, keep_sent: float | None
) -> None:
    # As the spool unlinks a sent message's file without an fsync: a crash of
    # the server just after can only bring back that message (sent again);
    # every other outcome, and every other transaction, waits for the flush.
    q = PostgresQueue(pg_url, create=True, keep_sent=keep_sent)
    try:
        two = q.stage(prepare("s@example.org", [A, "b@example.org"], b"Subject: x\r\n\r\nhi\r\n"))
        q.publish([two])
        first = _put(q)
        _record_flushes(pg_url, q)
        with q.claim(first) as claim:
            assert claim.settle(sent=[A]) == "removed"
        with q.claim(two.id) as claim:  # the same pooled connection: nothing carried over
            assert claim.settle(sent=[A], deferred={"b@example.org": (451, "later")}) == "deferred"
        with q.claim(two.id) as claim:
            claim.defer(0, "try again")
        with q.claim(two.id) as claim:
            assert claim.settle(failed={"b@example.org": (550, "no")}) == "failed"
        notes = sql(pg_url, f"SELECT op, sync FROM {q.table}_flushes")
    finally:
        q.close()
    sent = ("UPDATE sent" if keep_sent else "DELETE gone", "off")
    assert notes == [
        sent,
        ("UPDATE deferred", "on"),
        ("UPDATE deferred", "on"),
        ("UPDATE failed", "on"),
    ]


def test_an_outcome_the_server_refuses_keeps_the_claim(queue: PostgresQueue, pg_url: str) -> None:
    # The outcome and its commit go in one round trip; a statement that
    # fails there is rolled back to its savepoint, and the row stays locked.
    id = _put(queue)
    sql(
        pg_url,
        f"""
        CREATE TABLE {queue.table}_refusing (yes boolean);
        INSERT INTO {queue.table}_refusing VALUES (true);
        CREATE FUNCTION {queue.table}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF EXISTS (SELECT FROM {queue.table}_refusing) THEN
            RAISE EXCEPTION 'refused by a trigger';
          END IF;
          RETURN OLD;
        END $$;
        CREATE TRIGGER refuse BEFORE DELETE ON {queue.table}
          FOR EACH ROW EXECUTE FUNCTION {queue.table}_refuse();
        """,
    )
    claim = queue.claim(id)
    assert claim is not None
    with pytest.raises(SpoolError, match="refused by a trigger"):
        claim.settle(sent=[A])
    assert claim.held and queue.state(id) == "in_flight" and queue.claim(id) is None
    sql(pg_url, f"DELETE FROM {queue.table}_refusing")
    assert claim.settle(sent=[A]) == "removed"
    assert sum(queue.counts().values()) == 0


def test_after_lost_claims_a_listing_starts_elsewhere(queue: PostgresQueue, pg_url: str) -> None:
    # Processors that share the queue would follow one another through the
    # same order, each finding most rows taken; one that lost claims starts
    # its next listing at a random message (the order otherwise kept), and
    # one alone keeps the oldest-first order.
    ids = [_put(queue) for _ in range(30)]
    assert list(queue.due()) == ids and list(queue.due()) == ids
    other = PostgresQueue(pg_url)
    try:
        starts = []
        for _ in range(6):
            held = other.claim(ids[0])
            assert held is not None and queue.claim(ids[0]) is None  # lost to the other
            listing = list(queue.due())
            k = listing.index(ids[1])
            assert listing[k:] + listing[:k] == ids[1:]  # the same order, rotated
            starts.append(k)
            held.release()
        assert any(starts)  # all six at the start: 1 chance in 29**6
        assert list(queue.due()) == ids  # no claim lost since: oldest first again
    finally:
        other.close()
