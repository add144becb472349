"""The PostgreSQL queue behaves as the Maildir spool does.

Most tests here run twice, on a Maildir spool and on a PostgreSQL queue
(the ``q`` fixture), so that the two backends are held to one behaviour;
the rest are about what only the database has (row locks, connections,
schemas).  The server is a real one (see ``_pg.py``).
"""

# ruff: noqa: E402, F811  (psycopg is checked first; the fixtures from _pg are parameters)

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (mailspool[postgres])")

from _pg import pg_database, pg_url, queue, sql  # noqa: F401
from _relays import wait_for
from mailspool.errors import ClaimLost, SpoolError
from mailspool.maildir.spool import Spool
from mailspool.message import prepare
from mailspool.postgres import PostgresQueue

A, B, C = "a@example.org", "b@example.org", "c@example.org"
STATES = ("ready", "in_flight", "deferred", "held", "failed", "quarantined")


@pytest.fixture(params=["maildir", "postgres"])
def q(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "maildir":
        yield Spool(tmp_path / "spool")
    else:
        yield request.getfixturevalue("queue")


def put(
    q: Any, n: int = 1, to: tuple[str, ...] = (A,), not_before: float | None = None
) -> list[str]:
    batch = [
        (prepare("s@example.org", list(to), f"Subject: {i}\r\n\r\nbody {i}\r\n"), not_before)
        for i in range(n)
    ]
    staged = q.stage_many(batch)
    q.publish(staged)
    return [s.id for s in staged]


def counts(q: Any, now: float | None = None) -> dict[str, int]:
    return {k: v for k, v in q.counts(now).items() if v}


def test_staged_is_invisible_until_published_and_discard_leaves_nothing(q: Any) -> None:
    p = prepare("s@example.org", [A], b"Subject: x\r\n\r\nhi\r\n")
    staged = q.stage(p)
    assert list(q.due()) == [] and counts(q) == {}
    q.discard([staged])
    q.discard([staged])  # never raises
    kept = q.stage(p)
    q.publish([kept])
    assert list(q.due()) == [kept.id]
    assert q.state(kept.id) == "ready" and q.get(kept.id).message_id == p.message_id


def test_claim_gives_the_envelope_and_the_message_and_excludes_others(q: Any) -> None:
    (id,) = put(q, to=(A, B))
    claim = q.claim(id)
    assert claim is not None and claim.held
    assert claim.envelope.recipients == (A, B) and claim.envelope.sender == "s@example.org"
    assert claim.data.startswith(b"Subject: 0\r\n") and claim.attempts == 0
    assert claim.queued_at == pytest.approx(time.time(), abs=60)
    assert claim.due_since == claim.queued_at and not claim.legacy
    assert q.claim(id) is None
    assert q.state(id) == "in_flight" and counts(q) == {"in_flight": 1}
    assert [e.state for e in q.entries()] == ["in_flight"]
    with pytest.raises(SpoolError, match="cannot hold a message that is in_flight"):
        q.hold(id)
    with pytest.raises(SpoolError, match="being sent"):
        q.delete(id)
    assert claim.settle(sent=[A, B]) == "removed"
    assert not claim.held and q.state(id) is None and counts(q) == {}
    with pytest.raises(SpoolError, match="already"):
        claim.release()


def test_per_recipient_outcomes_and_sent_never_pending_again(q: Any) -> None:
    (id,) = put(q, to=(A, B, C))
    claim = q.claim(id)
    later = time.time() + 600
    outcome = claim.settle(
        sent=[A], failed={B: (550, "no such user")}, deferred={C: (451, "later")}, retry_at=later
    )
    assert outcome == "deferred"
    entry = q.get(id)
    assert entry.state == "deferred" and entry.attempts == 1 and entry.last_error == "451 later"
    assert entry.next_attempt == pytest.approx(later, abs=0.01)
    assert [(r.address, r.status, r.code) for r in entry.recipients] == [
        (A, "sent", None),
        (B, "failed", 550),
        (C, "pending", 451),
    ]
    assert list(q.due()) == [] and list(q.due(later + 1)) == [id]
    assert q.next_due() == pytest.approx(later, abs=0.01)
    assert counts(q) == {"deferred": 1} and counts(q, later + 1) == {"ready": 1}
    claim = q.claim(id)
    assert claim.envelope.recipients == (C,)
    assert claim.settle(sent=[C]) == "failed"
    assert q.state(id) == "failed" and q.next_due() is None


def test_settle_refuses_contradictions_and_keeps_the_claim(q: Any) -> None:
    (id,) = put(q, to=(A, B))
    claim = q.claim(id)
    with pytest.raises(ValueError, match="not pending"):
        claim.settle(sent=[C])
    with pytest.raises(ValueError, match="more than one outcome"):
        claim.settle(sent=[A], failed={A: (550, "x")})
    assert claim.held
    claim.release()
    assert q.state(id) == "ready"


def test_defer_whole_message_with_or_without_counting(q: Any) -> None:
    (id,) = put(q)
    claim = q.claim(id)
    claim.defer(time.time() - 1, "relay down", count_attempt=False)
    assert q.get(id).attempts == 0 and q.get(id).last_error == "relay down"
    claim = q.claim(id)
    assert claim.source in ("deferred", "new")
    claim.defer(time.time() + 60, "451 busy")
    assert q.get(id).attempts == 1 and q.state(id) == "deferred"


def test_release_makes_it_ready_and_the_context_manager_releases(q: Any) -> None:
    (id,) = put(q)
    claim = q.claim(id)
    claim.defer(time.time() - 1, "x", count_attempt=False)
    with q.claim(id) as claim:
        assert q.state(id) == "in_flight"
    assert not claim.held and q.state(id) == "ready" and q.get(id).attempts == 0


def test_quarantine_keeps_the_reason_and_retry_brings_it_back(q: Any) -> None:
    (id,) = put(q)
    q.claim(id).quarantine("bad headers")
    entry = q.get(id)
    assert entry.state == "quarantined" and entry.last_error == "bad headers"
    assert list(q.due()) == []
    q.retry(id)
    assert q.state(id) == "ready"


def test_admin_moves_follow_the_lifecycle(q: Any) -> None:
    a, b = put(q, 2, to=(A, B))
    q.hold(a)
    assert q.state(a) == "held" and list(q.due()) == [b]
    with pytest.raises(SpoolError, match="cannot retry a message that is held"):
        q.retry(a)
    with pytest.raises(SpoolError, match=r"not held \(it is ready\): nothing to release"):
        q.release(b)
    q.release(a)
    assert q.state(a) == "ready"
    q.claim(b).settle(sent=[A], failed={B: (550, "no")})
    q.retry(b)
    entry = q.get(b)
    assert entry.state == "ready"
    assert [(r.status, r.code) for r in entry.recipients] == [("sent", None), ("pending", 550)]
    assert q.claim(b).envelope.recipients == (B,)
    q.delete(a)
    assert q.state(a) is None
    for op in (q.retry, q.hold, q.release, q.delete, q.get):
        with pytest.raises(KeyError):
            op(a)
    with pytest.raises(ValueError):
        q.state("../x")


def test_not_before_schedules_and_counts_from_then(q: Any) -> None:
    when = time.time() + 3600
    (id,) = put(q, not_before=when)
    assert q.state(id) == "deferred" and list(q.due()) == []
    assert list(q.due(when + 1)) == [id]
    claim = q.claim(id)
    assert claim.not_before == pytest.approx(when, abs=0.01)
    assert claim.due_since == pytest.approx(when, abs=0.01)
    claim.release()


def test_counts_entries_oldest_and_message(q: Any) -> None:
    ids = put(q, 5)
    q.hold(ids[0])
    q.claim(ids[1]).defer(time.time() + 60, "later")
    q.claim(ids[2]).quarantine("why")
    held = q.claim(ids[3])
    assert counts(q) == {"ready": 1, "in_flight": 1, "deferred": 1, "held": 1, "quarantined": 1}
    assert {e.id: e.state for e in q.entries()} == {
        ids[0]: "held",
        ids[1]: "deferred",
        ids[2]: "quarantined",
        ids[3]: "in_flight",
        ids[4]: "ready",
    }
    assert [e.id for e in q.entries("in_flight")] == [ids[3]]
    assert [e.id for e in q.entries("ready")] == [ids[4]]
    with pytest.raises(ValueError, match="unknown state"):
        list(q.entries("sent"))
    assert q.message(ids[4]) == b"Subject: 4\r\n\r\nbody 4\r\n"[:0] + q.message(ids[4])
    assert q.message(ids[4]).endswith(b"body 4\r\n")
    oldest = q.oldest()
    assert oldest is not None and oldest <= min(e.queued_at for e in q.entries())
    held.release()


def test_threads_each_claim_a_message_exactly_once(q: Any) -> None:
    ids = put(q, 40)
    taken: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for id in list(q.due()):
            claim = q.claim(id)
            if claim is not None:
                with lock:
                    taken.append(id)
                claim.settle(sent=[A])

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(ids) and counts(q) == {}


# --- what only the database has -------------------------------------------------------


def test_a_missing_or_outdated_schema_is_refused(pg_url: str) -> None:
    with pytest.raises(SpoolError, match="db init"):
        PostgresQueue(pg_url)
    PostgresQueue(pg_url, create=True).close()
    schema = pg_url.rsplit("=", 1)[1]
    sql(pg_url, f'INSERT INTO "{schema}".schema_version VALUES (99)')
    with pytest.raises(SpoolError, match="newer than this mailspool knows"):
        PostgresQueue(pg_url)


def test_the_queue_name_never_shows_a_password(pg_database: str) -> None:
    url = pg_database.replace("postgres@", "postgres:hunter2@") + "?schema=pw"
    q = PostgresQueue(url, create=True)
    assert "hunter2" not in q.location and "hunter2" not in repr(q)
    assert q.location.endswith("?schema=pw")
    assert not hasattr(q, "path")  # no directory: nothing is written beside the queue
    q.close()


def test_bad_names_are_refused_in_one_line(pg_database: str) -> None:
    with pytest.raises(ValueError, match="not a plain name"):
        PostgresQueue(pg_database + "?schema=a;drop")
    with pytest.raises(SpoolError, match="cannot connect"):
        PostgresQueue("postgresql://postgres@127.0.0.1:1/nowhere")


def test_sweep_removes_staged_rows_of_a_crash_and_old_sent_rows(
    queue: PostgresQueue, pg_url: str
) -> None:
    p = prepare("s@example.org", [A], b"Subject: x\r\n\r\nhi\r\n")
    queue.stage(p)  # its delivery never published it: a crash between vote and finish
    assert queue.sweep() == 0
    assert queue.sweep(time.time() + 36 * 3600 + 1) == 1
    kept = PostgresQueue(pg_url, keep_sent=3600)
    (id,) = put(kept)
    assert kept.claim(id).settle(sent=[A]) == "removed"
    assert kept.state(id) is None and counts(kept) == {}
    schema = pg_url.rsplit("=", 1)[1]
    assert sql(pg_url, f'SELECT state, attempts FROM "{schema}".message') == [("sent", 1)]
    assert kept.sweep() == 0 and kept.sweep(time.time() + 3601) == 1
    kept.close()


def test_a_claim_whose_connection_dies_is_taken_again_and_settled(
    queue: PostgresQueue, pg_url: str
) -> None:
    (id,) = put(queue)
    claim = queue.claim(id)
    pid = claim._conn.info.backend_pid
    sql(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
    assert claim.settle(sent=[A]) == "removed"
    assert queue.state(id) is None


def test_a_lost_claim_taken_by_another_is_not_written_twice(
    queue: PostgresQueue, pg_url: str
) -> None:
    (id,) = put(queue)
    claim = queue.claim(id)
    sql(pg_url, "SELECT pg_terminate_backend(%s)", (claim._conn.info.backend_pid,))
    other = queue.claim(id)
    assert other is not None
    with pytest.raises(ClaimLost, match="another processor holds the message now"):
        claim.settle(sent=[A])
    assert not claim.held
    assert other.settle(sent=[A]) == "removed"


def test_a_lost_claim_settled_by_another_says_so(queue: PostgresQueue, pg_url: str) -> None:
    (id,) = put(queue)
    claim = queue.claim(id)
    sql(pg_url, "SELECT pg_terminate_backend(%s)", (claim._conn.info.backend_pid,))
    other = queue.claim(id)
    assert other is not None and other.settle(sent=[A]) == "removed"
    with pytest.raises(ClaimLost, match="settled or changed by another processor"):
        claim.defer(time.time() + 60, "4xx")
    assert not claim.held and queue.state(id) is None


def test_the_queue_reconnects_after_losing_its_connection(
    queue: PostgresQueue, pg_url: str
) -> None:
    (id,) = put(queue)
    with queue._main() as conn:
        pid = conn.info.backend_pid
    sql(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
    gone = "SELECT 1 FROM pg_stat_activity WHERE pid = %s"
    assert wait_for(lambda: not sql(pg_url, gone, (pid,)))
    # The ended session is noticed before a statement is lost on it.
    assert queue.counts()["ready"] == 1 and list(queue.due()) == [id]
    with queue._main() as conn:
        assert conn.info.backend_pid != pid


def test_a_statement_on_a_connection_lost_unnoticed_fails_once(
    queue: PostgresQueue, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (id,) = put(queue)
    with queue._main() as conn:
        pid = conn.info.backend_pid
    # A host that vanished says nothing: the check finds nothing to read.
    monkeypatch.setattr("mailspool.postgres.admin.usable", lambda conn: True)
    sql(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
    assert wait_for(
        lambda: not sql(pg_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,))
    )
    with pytest.raises(SpoolError, match="queue postgresql://"):
        queue.counts()
    assert queue.counts()["ready"] == 1 and list(queue.due()) == [id]


def test_claim_connections_are_reused_then_closed_when_idle(queue: PostgresQueue) -> None:
    ids = put(queue, 3)
    for id in ids:
        queue.claim(id).settle(sent=[A])
    assert len(queue._pool._idle) == 1  # one connection served the three claims in turn
    queue._pool.prune(3600)
    assert len(queue._pool._idle) == 1
    queue._pool.prune(0)
    assert queue._pool._idle == []


def test_keep_sent_days_in_the_url_and_the_hourly_sweep_of_due(pg_url: str) -> None:
    with pytest.raises(ValueError, match="keep_sent_days: must be a number of days"):
        PostgresQueue(pg_url + "&keep_sent_days=soon")
    q = PostgresQueue(pg_url + "&keep_sent_days=0", create=True)
    assert q.keep_sent == 0 and q.location.endswith("&keep_sent_days=0")
    (id,) = put(q)
    q.claim(id).settle(sent=[A])
    table = f'"{q.schema}".message'
    assert sql(pg_url, f"SELECT state FROM {table}") == [("sent",)]
    assert list(q.due()) == []  # not yet an hour since the queue was opened
    assert sql(pg_url, f"SELECT state FROM {table}") == [("sent",)]
    q._next_sweep = 0.0  # an hour later
    assert list(q.due()) == []
    assert sql(pg_url, f"SELECT state FROM {table}") == []
    q.close()
