"""The in-memory queue: the seam's second backend, as an application's tests use it.

The processor's behaviour against it is in test_processor.py (every test
there runs on both backends); here is what is particular to it: the
documented recipe, the operator's moves, and the seam's contract.
"""

from __future__ import annotations

import select
import threading
from pathlib import Path

import pytest
import transaction

from mailspool import QueuedMailDelivery, QueueProcessor
from mailspool.backends import open_queue
from mailspool.errors import SpoolError
from mailspool.maildir.spool import Spool
from mailspool.memory import MemoryQueue
from mailspool.queue import QueueBackend, QueueClaim
from mailspool.testing import InMemoryMailer

MESSAGE = b"Subject: hello\r\n\r\nbody\r\n"


def test_the_documented_recipe_queues_at_commit_and_delivers() -> None:
    queue = MemoryQueue()
    mailer = InMemoryMailer()
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue, transaction_manager=tm)
    processor = QueueProcessor(queue, mailer, watch=False)
    with tm:
        msgid = delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
        assert queue.counts()["ready"] == 0  # nothing before the commit
    assert queue.counts()["ready"] == 1
    with tm:
        delivery.send("app@example.org", ["joe@example.org"], MESSAGE)
        tm.abort()
    summary = processor.process_once()
    assert summary.sent == 1
    [sent] = mailer.outbox
    assert sent.message_id == msgid and sent.recipients == ("jane@example.org",)
    assert list(queue.entries()) == []
    processor.stop()


def test_per_recipient_outcomes_and_the_operators_moves() -> None:
    queue = MemoryQueue()
    mailer = InMemoryMailer()
    mailer.refuse("bad@example.org", code=550, text="no such user")
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(queue, transaction_manager=tm)
    with tm:
        delivery.send("app@example.org", ["ok@example.org", "bad@example.org"], MESSAGE)
    [entry] = queue.entries()
    with QueueProcessor(queue, mailer, watch=False) as processor:
        assert processor.process_once().failed == 1
    failed = queue.get(entry.id)
    assert failed.state == "failed"
    assert {(r.address, r.status) for r in failed.recipients} == {
        ("ok@example.org", "sent"),
        ("bad@example.org", "failed"),
    }
    with pytest.raises(SpoolError, match="cannot hold a message that is failed"):
        queue.hold(entry.id)
    queue.retry(entry.id)  # the failed recipient is pending again, the sent one stays sent
    again = queue.get(entry.id)
    assert again.state == "ready"
    assert [r.status for r in again.recipients] == ["sent", "pending"]
    queue.hold(entry.id)
    assert queue.state(entry.id) == "held" and list(queue.due()) == []
    queue.release(entry.id)
    assert list(queue.due()) == [entry.id]
    queue.delete(entry.id)
    assert queue.state(entry.id) is None
    with pytest.raises(KeyError):
        queue.get(entry.id)


def test_a_claim_is_held_by_one_holder_and_released_when_left() -> None:
    queue = MemoryQueue()
    tm = transaction.TransactionManager()
    with tm:
        QueuedMailDelivery(queue, transaction_manager=tm).send(
            "app@example.org", ["jane@example.org"], MESSAGE
        )
    [id] = list(queue.due())
    claim = queue.claim(id)
    assert claim is not None and claim.held
    assert queue.claim(id) is None  # no second holder
    assert queue.claimed_elsewhere() and queue.state(id) == "in_flight"
    with claim:
        pass  # left without an outcome: back to ready, untouched
    assert queue.state(id) == "ready" and queue.get(id).attempts == 0
    claim2 = queue.claim(id)
    assert claim2 is not None
    claim2.defer(100.0, "451 later")
    assert queue.get(id).attempts == 1 and queue.next_due() == 100.0
    assert list(queue.due(now=99.0)) == [] and list(queue.due(now=100.0)) == [id]
    assert queue.counts(now=100.0)["ready"] == 1


def test_a_sleeping_processor_is_woken_by_a_commit() -> None:
    queue = MemoryQueue()
    waker = queue.waker()
    try:
        woken = threading.Event()

        def watch() -> None:
            if select.select([waker], [], [], 10)[0]:
                woken.set()

        t = threading.Thread(target=watch)
        t.start()
        tm = transaction.TransactionManager()
        with tm:
            QueuedMailDelivery(queue, transaction_manager=tm).send(
                "app@example.org", ["jane@example.org"], MESSAGE
            )
        t.join(10)
        assert woken.is_set()
    finally:
        waker.close()


def test_both_backends_satisfy_the_seam(tmp_path: Path) -> None:
    spool = open_queue(tmp_path / "spool")
    memory = open_queue(MemoryQueue())
    assert isinstance(spool, Spool) and isinstance(memory, MemoryQueue)
    for backend in (spool, memory):
        assert isinstance(backend, QueueBackend)
    tm = transaction.TransactionManager()
    for backend in (spool, memory):
        with tm:
            QueuedMailDelivery(backend, transaction_manager=tm).send(
                "app@example.org", ["jane@example.org"], MESSAGE
            )
        [id] = list(backend.due())
        claim = backend.claim(id)
        assert isinstance(claim, QueueClaim)
        assert claim.envelope.recipients == ("jane@example.org",)
        assert claim.settle(sent=["jane@example.org"]) == "removed"
        assert backend.state(id) is None
