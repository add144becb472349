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

from _pg import pg_database, pg_url, queue  # noqa: F401
from _relays import wait_for
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
