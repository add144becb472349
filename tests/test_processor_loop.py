"""The processor's loop: pickup after commit, sleeping when idle, stopping cleanly.

Time bounds here are generous (seconds where milliseconds are expected):
they prove that the pickup is not waiting for a poll, without timing it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import transaction

from _relays import (
    RCPT,
    SENDER,
    SlowData,
    Switchable,
    body,
    enqueue,
    message_id,
    start_child,
    wait_for,
)
from conftest import Relay, RelayFactory
from mailspool.delivery import QueuedMailDelivery
from mailspool.maildir.inotify import Inotify
from mailspool.maildir.spool import Spool
from mailspool.processor.loop import QueueProcessor
from mailspool.processor.passes import QUEUED_MIN
from mailspool.smtp.mailer import SMTPMailer


def _has_inotify() -> bool:
    watcher = Inotify.open({"/": 0x100})
    if watcher is None:
        return False
    watcher.close()
    return True


inotify = pytest.mark.skipif(not _has_inotify(), reason="inotify is not available here")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def running(spool: Spool, relay: Relay, **kw: object) -> QueueProcessor:
    p = QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), **kw)  # type: ignore[arg-type]
    p.start()
    time.sleep(0.2)  # the first pass is over: the loop is waiting
    return p


def commit(delivery: QueuedMailDelivery, n: int = 0, **kw: object) -> str:
    with transaction.manager:
        return delivery.send(SENDER, [RCPT], body(n), **kw)  # type: ignore[arg-type]


def test_wake_after_commit_picks_up_at_once(spool: Spool, relay: Relay) -> None:
    p = running(spool, relay, watch=False, interval=30.0)
    try:
        delivery = QueuedMailDelivery(spool.path, on_commit=p.wake)
        mid = commit(delivery)
        assert wait_for(lambda: len(relay.messages) == 1, timeout=2.0)
        assert message_id(relay.messages[0].content) == mid
    finally:
        p.stop()


@inotify
def test_inotify_sees_a_commit_from_another_process(spool: Spool, relay: Relay) -> None:
    p = running(spool, relay, watch=True, interval=30.0)
    try:
        code = textwrap.dedent(
            f"""
            import transaction
            from mailspool.delivery import QueuedMailDelivery
            delivery = QueuedMailDelivery({spool.path!r})
            with transaction.manager:
                print(delivery.send({SENDER!r}, [{RCPT!r}], b"Subject: x\\r\\n\\r\\nhi\\r\\n"))
            """
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert wait_for(lambda: len(relay.messages) == 1, timeout=2.0)
        assert message_id(relay.messages[0].content) == out.stdout.strip()
    finally:
        p.stop()


def test_polls_every_interval_without_inotify(spool: Spool, relay: Relay) -> None:
    p = running(spool, relay, watch=False, interval=0.2)
    try:
        commit(QueuedMailDelivery(spool.path))  # no wake: only the poll can find it
        assert wait_for(lambda: len(relay.messages) == 1, timeout=3.0)
    finally:
        p.stop()


def test_send_later_is_sent_when_due_and_not_before(spool: Spool, relay: Relay) -> None:
    p = running(spool, relay, watch=True, interval=30.0)
    try:
        not_before = time.time() + 0.8
        commit(QueuedMailDelivery(spool.path, on_commit=p.wake), not_before=not_before)
        time.sleep(0.3)
        assert relay.messages == []  # kept in deferred/ until its time
        assert wait_for(lambda: len(relay.messages) == 1, timeout=3.0)
        assert time.time() >= not_before
    finally:
        p.stop()


def test_idle_processor_sleeps(spool: Spool, relay: Relay) -> None:
    passes: list[float] = []

    def clock() -> float:  # the loop reads its clock once per pass
        passes.append(time.time())
        return passes[-1]

    mailer = SMTPMailer(**relay.mailer_kwargs())
    p = QueueProcessor(spool, mailer, watch=True, interval=30.0, clock=clock)
    p.start()
    try:
        assert wait_for(lambda: len(passes) == 1)
        time.sleep(1.0)
        assert len(passes) == 1  # no look at the spool at all: asleep in the kernel
        commit(QueuedMailDelivery(spool.path, on_commit=p.wake))
        assert wait_for(lambda: len(relay.messages) == 1, timeout=5.0)
        assert len(passes) >= 2  # woken by the commit, not by a poll
    finally:
        p.stop()


def test_stop_finishes_what_is_in_flight(spool: Spool, smtp_relay: RelayFactory) -> None:
    handler = SlowData(0.5)
    relay = smtp_relay(handler)
    enqueue(spool, 3)
    p = QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), connections=1, watch=False)
    p.start()
    assert handler.started.wait(5)
    p.stop()
    assert len(relay.messages) == 1  # the one under way was settled...
    counts = spool.counts()
    assert counts["ready"] == 2 and counts["in_flight"] == 0  # ...nothing new started
    with pytest.raises(RuntimeError):
        p.start()
        p.start()
    p.stop()


class HeldData:
    """Holds every message's final reply until ``release`` is set; counts those held."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.held = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.held += 1
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        return "250 2.0.0 OK"


def test_ids_queued_ahead_are_not_started_after_a_stop(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    handler = HeldData()
    relay = smtp_relay(handler)
    enqueue(spool, 30)
    p = QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), connections=2, watch=False)
    stopper = threading.Thread(target=p.stop)
    try:
        p.start()
        # The processor starts with one sender thread (it adds more only as
        # messages finish slowly, and the relay holds this one).
        assert wait_for(lambda: handler.held == 1)
        # A few ids wait ahead of the sender thread; only the one under way
        # is claimed (nothing of the next message goes with its final dot).
        assert spool.counts()["in_flight"] == 1
        assert p._crew.jobs.qsize() <= QUEUED_MIN  # bounded, whatever the size of the queue
        stopper.start()
        assert wait_for(p._stopping)
    finally:
        handler.release.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert len(relay.messages) == 1  # the one under way was settled...
    counts = spool.counts()
    assert counts["ready"] == 29 and counts["in_flight"] == 0  # ...nothing new was started


class HeldAfterOutage(Switchable, HeldData):
    """Down (421 at EHLO) until switched on, then holds the final replies."""

    def __init__(self) -> None:
        Switchable.__init__(self)
        HeldData.__init__(self)


def test_a_probe_is_one_message_although_ids_are_queued_ahead(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    handler = HeldAfterOutage()
    relay = smtp_relay(handler)
    enqueue(spool, 30)
    p = QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), connections=4, watch=False)
    t0 = time.time()
    assert p.process_once(t0).relay_paused  # down: paused, then one message probes
    handler.down = False
    probe = threading.Thread(target=p.process_once, args=(t0 + p.retry.relay_first_delay,))
    try:
        probe.start()
        # The dispatcher has queued ids ahead of the threads; only one started.
        assert wait_for(lambda: handler.held == 1 and p._crew.jobs.qsize() >= 1)
        time.sleep(0.3)  # time for a wrong implementation to start more
        assert spool.counts()["in_flight"] == 1 and handler.held == 1
        assert len(relay.messages) == 0
    finally:
        handler.release.set()
    probe.join(30)
    assert not probe.is_alive()
    assert len(relay.messages) == 30 and sum(spool.counts().values()) == 0
    p.stop()


@pytest.mark.slow
def test_sigterm_during_run_finishes_the_message_in_flight(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    handler = SlowData(1.0)
    relay = smtp_relay(handler)
    ids = enqueue(spool, 3)
    child = start_child(spool, relay.port, connections=1, mode="run")
    try:
        assert handler.started.wait(10), child.stderr.read() if child.stderr else ""
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=15)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert "returned" in out
    assert "stopped on SIGTERM" in err
    [received] = relay.messages
    assert message_id(received.content) in ids
    counts = spool.counts()
    assert counts["ready"] == 2 and counts["in_flight"] == 0


class _SignalNotHandled(Exception):
    pass


def test_sigint_stops_run_and_restores_the_previous_handler(spool: Spool, relay: Relay) -> None:
    passes: list[float] = []

    def clock() -> float:  # called at each pass: run() has installed its handlers by then
        passes.append(time.time())
        return passes[-1]

    def previous(signum: int, frame: object) -> None:
        raise _SignalNotHandled(signum)  # what the test gets if run() did not catch it

    p = QueueProcessor(
        spool, SMTPMailer(**relay.mailer_kwargs()), watch=False, interval=30.0, clock=clock
    )

    def interrupt() -> None:
        if wait_for(lambda: len(passes) >= 1):
            time.sleep(0.1)  # asleep between passes now
            os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGINT, previous)
    try:
        killer = threading.Thread(target=interrupt, daemon=True)
        killer.start()
        p.run()  # returns on SIGINT instead of raising
        killer.join()
        assert signal.getsignal(signal.SIGINT) is previous  # put back as it was
    finally:
        signal.signal(signal.SIGINT, old)
        p.stop()
