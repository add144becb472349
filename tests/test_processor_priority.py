"""The processor takes urgent mail first and starves no class, on every backend."""

from __future__ import annotations

from typing import Any

import test_processor
from _pg import pg_database, pg_url, queue  # noqa: F401
from _relays import enqueue, message_id
from conftest import Relay
from mailspool.priority import Priority
from test_processor import processor

spool = test_processor.spool  # the fixture that runs a test on every backend


def sent_order(relay: Relay) -> list[str]:
    return [message_id(m.content) for m in relay.messages]


def test_urgent_mail_goes_before_what_was_queued_earlier(spool: Any, relay: Relay) -> None:
    bulk = enqueue(spool, 30, priority=Priority.BULK)
    normal = enqueue(spool, 10)
    urgent = enqueue(spool, 3, priority=Priority.URGENT)
    with processor(spool, relay, connections=1) as p:
        assert p.process_once().sent == 43
    order = sent_order(relay)
    assert set(order[:3]) == set(urgent)
    # Then normal mail before bulk, but bulk gets its share (pick 15 of each 16).
    first_bulk = min(order.index(b) for b in bulk)
    last_normal = max(order.index(n) for n in normal)
    assert first_bulk <= 15 and last_normal < 20


def test_a_stream_of_urgent_mail_does_not_starve_bulk(spool: Any, relay: Relay) -> None:
    bulk = enqueue(spool, 4, priority=Priority.BULK)
    urgent = enqueue(spool, 80, priority=Priority.URGENT)
    with processor(spool, relay, connections=1) as p:
        assert p.process_once().sent == 84
    order = sent_order(relay)
    where = sorted(order.index(b) for b in bulk)
    assert where[0] <= 15 and where[-1] <= 63  # one in every 16 while urgent mail waits
    assert set(order) == set(bulk) | set(urgent)


def test_the_class_shows_in_the_listing(spool: Any) -> None:
    enqueue(spool, 1, priority=Priority.URGENT)
    enqueue(spool, 1, priority=Priority.BULK)
    enqueue(spool, 1)
    assert sorted(e.priority for e in spool.entries()) == ["bulk", "normal", "urgent"]
    assert [e.priority for e in spool.oldest_entries(1)] == ["urgent"]
