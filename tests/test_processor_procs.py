"""Several processor processes on one spool, processors killed mid-drain, a big queue.

These prove the claims: no message held twice, nothing lost on SIGKILL,
duplicates bounded by what was in flight, memory that does not grow with
the queue.
"""

from __future__ import annotations

import collections
import signal
import tracemalloc
from pathlib import Path

import pytest

from _relays import CountingSink, enqueue, fill_fast, message_id, start_child, wait_for
from conftest import Relay
from mailspool.maildir.spool import Spool
from mailspool.processor.loop import QueueProcessor, Summary


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


@pytest.mark.slow
def test_four_processes_deliver_each_message_exactly_once(spool: Spool, relay: Relay) -> None:
    ids = enqueue(spool, 1000)
    children = [start_child(spool, relay.port, connections=2, mode="drain") for _ in range(4)]
    sent = 0
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        counts = [int(n) for n in out.split()]
        assert counts[1:] == [0, 0, 0], out  # nothing deferred, failed or quarantined
        sent += counts[0]
    received = collections.Counter(message_id(m.content) for m in relay.messages)
    assert sorted(received) == sorted(ids)
    assert set(received.values()) == {1}  # exactly once each
    assert sent == 1000  # and each counted by exactly one process
    assert sum(spool.counts().values()) == 0


@pytest.mark.slow
def test_sigkill_during_drain_loses_nothing_and_bounds_duplicates(
    spool: Spool, relay: Relay
) -> None:
    connections, kills = 4, 4
    ids = enqueue(spool, 400)
    for _ in range(kills):
        child = start_child(spool, relay.port, connections=connections, mode="drain")
        start = len(relay.messages)
        try:
            # Kill it in the middle of its work, not before it started.
            assert wait_for(lambda s=start: len(relay.messages) >= s + 40, timeout=30)
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate()
    assert len({message_id(m.content) for m in relay.messages}) < len(ids)  # cut short
    final = start_child(spool, relay.port, connections=connections, mode="drain")
    _, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    received = collections.Counter(message_id(m.content) for m in relay.messages)
    assert sorted(received) == sorted(ids)  # nothing lost
    duplicates = sum(received.values()) - len(received)
    assert duplicates <= kills * connections
    assert sum(spool.counts().values()) == 0


def _peak(spool: Spool, count: int) -> int:
    fill_fast(spool, count)
    sink = CountingSink()
    tracemalloc.start()
    try:
        with QueueProcessor(spool, sink, connections=4, watch=False) as p:
            assert p.process_once() == Summary(sent=count)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_memory_stays_flat_with_the_queue_size(tmp_path: Path) -> None:
    small = _peak(Spool(tmp_path / "small"), 500)
    big = _peak(Spool(tmp_path / "big"), 10_000)
    # Holding 10,000 ids alone would take about a megabyte more.
    assert big < small + 300_000, (small, big)
