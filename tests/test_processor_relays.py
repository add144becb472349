"""The processor against relays that refuse, throttle, fail and go away.

Each relay is a real aiosmtpd server scripted for one case
(``_scripted_relays``).  The assertions are about deliveries, duplicates
and attempts counted, never about how long anything took.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from _relays import enqueue, message_id
from _scripted_relays import (
    BreaksEveryTransaction,
    EveryFifth,
    FaultsOne,
    GoesAway,
    RefusesSomeSessions,
    TokenBucket,
)
from conftest import Relay, RelayFactory
from mailspool import QueueProcessor, RetryPolicy, SMTPMailer, Spool, Summary
from mailspool.events import MailDeferred, MailEvent, MailSent
from mailspool.processor.pacing import FIRST_HOLD_MAX, Pacer
from mailspool.processor.policy import COHORT, QUICK_TRIES
from mailspool.processor.relayfile import read as read_relay_state

QUICK = RetryPolicy(
    first_delay=60, factor=2, max_delay=240, give_up_after=3600, relay_first_delay=10,
    relay_max_delay=40, quick_retry=20, jitter=0,
)  # fmt: skip


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def processor(spool: Spool, relay: Relay, **kw: Any) -> QueueProcessor:
    kw.setdefault("retry", QUICK)
    kw.setdefault("watch", False)
    return QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), **kw)


def delivered(relay: Relay) -> Counter[str]:
    """How many times the relay took each Message-Id."""
    return Counter(message_id(m.content) for m in relay.messages)


@pytest.mark.parametrize("close", [True, False], ids=["421-and-close", "454-and-stay"])
def test_a_rate_limit_is_paced_not_obeyed_by_stopping(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture, close: bool
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    bucket = TokenBucket(rate=40, burst=4, close=close)
    relay = smtp_relay(bucket)
    ids = enqueue(spool, 80)
    with processor(spool, relay, connections=4) as p:
        # One pass delivers everything: a refusal for rate puts the message
        # back (not an attempt, not deferred) and the pass goes on, paced.
        assert p.process_once(time.time()) == Summary(sent=80)
        assert p.pacer.learned and p.pacer.rate is not None
    assert bucket.refused >= 1  # the relay did say "too fast"
    assert delivered(relay) == Counter(ids)  # each once
    assert spool.counts()["deferred"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # never paused
    assert any("says too fast" in r.getMessage() for r in caplog.records)
    state = read_relay_state(spool.path)  # what `mailspool status` shows
    assert state is not None and state["rate"] == pytest.approx(p.pacer.rate, rel=0.06)


@pytest.mark.parametrize("close", [True, False], ids=["421-and-close", "454-and-stay"])
def test_a_short_burst_learns_the_rate_with_few_refusals(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture, close: bool
) -> None:
    caplog.set_level(logging.DEBUG, "mailspool")
    bucket = TokenBucket(rate=40, burst=4, close=close)
    relay = smtp_relay(bucket)
    ids = enqueue(spool, 40)
    with processor(spool, relay, connections=4) as p:
        assert p.process_once(time.time()) == Summary(sent=40)
    assert delivered(relay) == Counter(ids)
    # Every refusal reached the pacer: none was followed by the same
    # message sent again at once on a new session, unseen.
    busy = [r for r in caplog.records if "relay busy" in r.getMessage()]
    assert len(busy) == bucket.refused
    # Learning costs a few refusals, not a third of the burst.
    assert bucket.refused <= 10


@pytest.mark.parametrize("kind", ["rcpt421", "data451", "drop_mid", "drop_reply"])
def test_one_off_faults_defer_only_their_message(
    spool: Spool, smtp_relay: RelayFactory, kind: str
) -> None:
    handler = EveryFifth(kind)
    relay = smtp_relay(handler)
    handler.relay = relay
    ids = enqueue(spool, 40)
    t = time.time()
    with processor(spool, relay, connections=2) as p:
        first = p.process_once(t)
        # A fifth of the transactions failed; each failure deferred its own
        # message and the pass went on with the others.
        assert not first.relay_paused
        assert first.sent + first.deferred == 40 and 5 <= first.deferred <= 10
        attempts = {e.attempts for e in spool.entries()}
        assert attempts == {1}
        assert spool.next_due() == pytest.approx(t + QUICK.quick_retry, abs=1)  # quick
        for _ in range(6):  # the retries meet faults too, now and then
            due = spool.next_due()
            if due is None:
                break
            assert not p.process_once(due).relay_paused
    assert sum(spool.counts().values()) == 0
    got = delivered(relay)
    assert set(got) == set(ids)
    duplicates = sum(got.values()) - len(ids)
    if kind == "drop_reply":  # taken, reply lost: the one window for a duplicate
        assert duplicates <= handler.faults
    else:
        assert duplicates == 0


#: Quick retries in the pass (a few milliseconds), the rest as QUICK.
IN_PASS = RetryPolicy(
    first_delay=60, factor=2, max_delay=240, give_up_after=3600, relay_first_delay=10,
    relay_max_delay=40, quick_retry=0.01, jitter=0,
)  # fmt: skip


@pytest.fixture
def fired() -> Any:
    """The mail events dispatched during the test."""
    import zope.event

    seen: list[MailEvent] = []
    zope.event.subscribers.append(seen.append)
    yield seen
    zope.event.subscribers.remove(seen.append)


@pytest.mark.parametrize("kind", ["mail451", "rcpt421", "data451", "drop_mid", "drop_reply"])
def test_one_off_faults_are_tried_again_in_the_same_pass(
    spool: Spool, smtp_relay: RelayFactory, fired: list[MailEvent], kind: str
) -> None:
    handler = EveryFifth(kind)
    relay = smtp_relay(handler)
    handler.relay = relay
    ids = enqueue(spool, 40)
    with processor(spool, relay, connections=2, retry=IN_PASS) as p:
        # Each faulted message was deferred (its attempt counted), then tried
        # again in the same pass; each counts once, by its last outcome.  A
        # retry is a transaction too, and meets every fifth fault: a message
        # may run out of quick tries, rarely, and wait for a later pass.
        first = p.process_once(time.time())
        assert first.sent + first.deferred == 40 and first.deferred <= 2
        assert p.relay.paused_until == 0  # a fault of one message pauses nothing
        while (due := spool.next_due()) is not None:
            assert not p.process_once(due).relay_paused
    assert sum(spool.counts().values()) == 0
    mine = [e for e in fired if e.message_id in ids]
    deferrals = [e for e in mine if isinstance(e, MailDeferred)]
    assert len(deferrals) == handler.faults >= 8  # one per fault, retries' faults too
    assert sum(isinstance(e, MailSent) for e in mine) == 40
    got = delivered(relay)
    assert set(got) == set(ids)
    duplicates = sum(got.values()) - len(ids)
    if kind == "drop_reply":  # taken, reply lost: the one window for a duplicate
        assert duplicates <= handler.faults
    else:
        assert duplicates == 0


@pytest.mark.parametrize(
    ("kinds", "tries"),
    [(("data451",) * QUICK_TRIES, QUICK_TRIES), (("drop_reply", "drop_reply"), 2)],
)
def test_a_message_that_keeps_failing_gets_the_usual_schedule(
    spool: Spool, smtp_relay: RelayFactory, kinds: tuple[str, ...], tries: int
) -> None:
    # Its fault is its own, not a one-off: after the quick tries it waits
    # first_delay (the quick tries count as one step).  A reply lost after
    # the final dot (it may have been delivered) is resent at once only once.
    handler = FaultsOne(b"Subject: test 3\r\n", kinds)
    relay = smtp_relay(handler)
    ids = enqueue(spool, 6)
    t0 = time.time()
    with processor(spool, relay, retry=IN_PASS) as p:
        assert p.process_once(t0) == Summary(sent=5, deferred=1)
    [entry] = spool.entries()
    assert entry.message_id == ids[3] and entry.attempts == tries == handler.tries
    assert entry.next_attempt == pytest.approx(t0 + IN_PASS.first_delay)


def test_a_lost_reply_after_another_fault_still_gets_its_quick_retry(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    handler = FaultsOne(b"Subject: test 3\r\n", ("data451", "drop_reply"))
    relay = smtp_relay(handler)
    ids = enqueue(spool, 6)
    with processor(spool, relay, retry=IN_PASS) as p:
        assert p.process_once(time.time()) == Summary(sent=6)
    assert handler.tries == 3
    # The lost reply's message had been taken: the one duplicate its window allows.
    assert delivered(relay) == Counter(ids) + Counter([ids[3]])


def test_one_refused_session_is_tried_again_at_once_not_a_pause(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    refusing = RefusesSomeSessions(nth=3)

    class Both(EveryFifth):  # each fault closes the session: many are opened
        handle_EHLO = refusing.handle_EHLO

    relay = smtp_relay(Both("rcpt421"))
    ids = enqueue(spool, 30)
    with processor(spool, relay, connections=1, retry=IN_PASS) as p:
        assert p.process_once(time.time()) == Summary(sent=30)
    assert refusing.refused >= 2  # the relay did refuse sessions
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # never paused
    assert delivered(relay) == Counter(ids)


def test_a_relay_that_breaks_every_transaction_is_paused_after_a_cohort(
    spool: Spool, smtp_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    handler = BreaksEveryTransaction()
    relay = smtp_relay(handler)
    ids = enqueue(spool, 30)
    t0 = time.time()
    with processor(spool, relay, connections=1) as p:
        first = p.process_once(t0)
        # A few messages, not the whole queue, are put in the "may have been
        # delivered" state; the one that completed the cohort goes back untouched.
        assert first == Summary(deferred=COHORT - 1, relay_paused=True)
        assert handler.broke == COHORT
        assert sorted(e.attempts for e in spool.entries()) == [0] * (31 - COHORT) + [1] * (
            COHORT - 1
        )
        [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert f"broke {COHORT} transactions in a row" in error
        handler.broken = False  # the relay recovers
        assert p.process_once(t0 + QUICK.relay_first_delay).sent == 31 - COHORT
        assert p.process_once(t0 + QUICK.quick_retry) == Summary(sent=COHORT - 1)
    assert delivered(relay) == Counter(ids)


def test_messages_caught_by_an_outage_are_not_counted_and_go_when_it_is_back(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    handler = GoesAway(before=10)
    relay = smtp_relay(handler)
    ids = enqueue(spool, 25)
    t0 = time.time()
    with processor(spool, relay, connections=1) as p:
        first = p.process_once(t0)
        assert first == Summary(sent=10, relay_paused=True)
        # The message under way when the relay went away is the relay's
        # trouble: back in the queue, no attempt counted, nothing deferred.
        assert {e.attempts for e in spool.entries()} == {0}
        assert spool.counts()["ready"] == 15
        handler.back.set()
        assert p.process_once(t0 + QUICK.relay_first_delay) == Summary(sent=15)
    assert delivered(relay) == Counter(ids)


def test_a_queue_deferred_together_is_not_retried_in_lockstep(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    from _relays import DataReply

    relay = smtp_relay(DataReply("451 4.3.0 try again later"))
    enqueue(spool, 20)
    policy = RetryPolicy(first_delay=300, quick_retry=300, jitter=0.1)
    t0 = time.time()
    with processor(spool, relay, retry=policy) as p:
        assert p.process_once(t0) == Summary(deferred=20)
    times = [e.next_attempt for e in spool.entries()]
    assert all(t0 + 300 <= t <= t0 + 330 for t in times)
    assert len({round(t, 3) for t in times}) > 10  # spread, not one second for all


def test_nothing_of_the_next_message_is_sent_with_a_final_dot(
    spool: Spool, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay()
    enqueue(spool, 5, to=["a@example.org", "b@example.org"])
    with processor(spool, relay, connections=1) as p:
        assert p.process_once(time.time()) == Summary(sent=5)
    # Within a message MAIL and RCPT are pipelined; DATA is the last of its
    # group, and no MAIL ever arrives behind a message's final dot.
    assert relay.commands.count("MAIL") == 5 and relay.connections == 1
    assert relay.pipelined.count("MAIL") == 5 and "DATA" not in relay.pipelined


# --- the pacer alone, against simulated limits (a made-up clock: no waiting) -------


class _Sim:
    """A pacer driven against a simulated relay limit; each transaction takes 2 ms."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pacer = Pacer(None, clock=lambda: self.now)
        self.accepted = self.refused = self.gave_up = 0

    def run(self, n: int, admits: Any) -> float:
        """Send until ``n`` are accepted; ``admits(now)`` is the relay. Returns msgs/s."""
        while self.accepted < n:
            self.now += self.pacer.reserve()
            started = self.now
            self.now += 0.002
            if admits(started):
                self.accepted += 1
                self.pacer.accepted()
                continue
            self.refused += 1
            cut = self.pacer.refused(started)
            if cut is not None and cut.give_up:
                self.gave_up += 1
                self.now += QUICK.relay_first_delay
        return self.accepted / self.now


def token_bucket(rate: float, burst: int) -> Any:
    state = {"tokens": float(burst), "at": 0.0}

    def admits(now: float) -> bool:
        state["tokens"] = min(burst, state["tokens"] + (now - state["at"]) * rate)
        state["at"] = now
        if state["tokens"] >= 1:
            state["tokens"] -= 1
            return True
        return False

    return admits


def fixed_window(limit: int, unit: float) -> Any:
    """Postfix's anvil: at most ``limit`` per ``unit`` seconds, counted per window."""
    state = {"start": 0.0, "count": 0}

    def admits(now: float) -> bool:
        if now - state["start"] >= unit:
            state["start"], state["count"] = now, 0
        state["count"] += 1
        return state["count"] <= limit

    return admits


@pytest.mark.parametrize(
    ("limit", "rate"),
    [
        (token_bucket(40, 4), 40.0),
        (token_bucket(5, 1), 5.0),
        (fixed_window(50, 60), 50 / 60),
        (fixed_window(10, 2), 5.0),
    ],
    ids=["bucket-40/s", "bucket-5/s", "anvil-50/min", "anvil-10/2s"],
)
def test_the_pacer_converges_on_what_the_relay_accepts(limit: Any, rate: float) -> None:
    sim = _Sim()
    got = sim.run(1500 if rate > 1 else 600, limit)
    assert got >= 0.7 * rate  # from an unpaced start, bursts included
    assert sim.refused < 0.1 * sim.accepted
    assert sim.gave_up == 0


def test_the_pacer_cuts_once_for_the_transactions_in_flight() -> None:
    now = [100.0]
    pacer = Pacer(None, clock=lambda: now[0])
    for _ in range(10):
        pacer.reserve()
        pacer.accepted()
        now[0] += 0.01
    started = now[0] - 0.005  # three transactions in flight when the first is refused
    first = pacer.refused(started)
    assert first is not None and first.rate == pytest.approx(0.8 * 10 / 0.1, rel=0.2)
    assert pacer.refused(started) is None and pacer.refused(started) is None
    assert pacer.rate == first.rate


def test_the_pacer_never_passes_the_configured_limit_and_gives_up_in_the_end() -> None:
    now = [0.0]
    pacer = Pacer(2.0, clock=lambda: now[0])
    assert pacer.reserve() == 0 and pacer.reserve() == pytest.approx(0.5)
    for _ in range(100):
        pacer.accepted()
    assert pacer.rate == 2.0  # never above the limit
    cuts = []
    while True:  # refused forever: holds grow, then the caller is told to pause
        now[0] += 1
        cut = pacer.refused(now[0])
        assert cut is not None
        cuts.append(cut)
        if cut.give_up:
            break
    # The first hold is as long as the relay took messages before it first
    # refused (1 s here: the clock moved once), then each one doubles.
    first = max(1 / cuts[0].rate, FIRST_HOLD_MAX)
    assert [c.hold for c in cuts[1:4]] == pytest.approx([first, 2 * first, 4 * first])
    assert len(cuts) < 15


def test_the_first_hold_is_as_long_as_the_relay_took_messages() -> None:
    now = [0.0]
    pacer = Pacer(None, clock=lambda: now[0])
    for _ in range(10):  # ten taken in 20 ms, then refused: an anvil-like window
        assert pacer.reserve() == 0
        now[0] += 0.002
        pacer.accepted()
    cut = pacer.refused(now[0])
    assert cut is not None and cut.hold == 0 and cut.rate == pytest.approx(400)
    now[0] += 1 / cut.rate
    held = pacer.refused(now[0])
    # Not 1/400 s, which the relay would refuse again: the 20 ms it took the
    # burst in.  Every hold it saves is one refusal fewer.
    assert held is not None and held.hold == pytest.approx(0.02)


def test_status_shows_what_the_processor_learned_about_its_relay(
    spool: Spool, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailspool.cli.main import main
    from mailspool.processor.relayfile import write

    now = time.time()
    state = {"relay": "127.0.0.1:25", "pid": 42, "rate": 50 / 60, "rate_limit": None,
             "connections": 2, "paused_until": None, "written_at": now - 5}  # fmt: skip
    assert write(spool.path, state)
    assert main(["status", "--queue", spool.path]) == 0
    out = capsys.readouterr().out
    assert "relay 127.0.0.1:25: pacing at 50/min (learned from its replies), 2 connection(s)" in out
    assert main(["status", "--json", "--queue", spool.path]) == 0
    assert json.loads(capsys.readouterr().out)["relay"] == state
