"""The processor's pure parts, on their own: retry schedule, relay state, rate
limit, per-recipient verdicts and the report, the connection pool, the waiter.

Times are made up (an injected clock), so nothing here waits for a backoff.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import MappingProxyType

import pytest

from conftest import Relay
from mailspool.errors import PermanentError, RecipientsRefused, TransientError, error_for_reply
from mailspool.events import MailDeferred, MailFailed, MailSent
from mailspool.maildir.inotify import Inotify, spool_watches
from mailspool.message import make_envelope
from mailspool.processor.crew import ThreadClock
from mailspool.processor.loop import Summary
from mailspool.processor.outcome import Verdict, classify, human, one_line, report, when
from mailspool.processor.pacing import Pacer
from mailspool.processor.policy import (
    THROTTLE_PERIOD,
    RelayState,
    RetryPolicy,
    backoff,
)
from mailspool.processor.pool import ConnectionPool, MailerConnection, relay_name
from mailspool.processor.wakeup import Waiter
from mailspool.smtp.mailer import Reply, SendResult, SMTPMailer
from mailspool.testing import InMemoryMailer

QUICK = RetryPolicy(
    first_delay=60, factor=2, max_delay=240, give_up_after=3600, relay_first_delay=10,
    relay_max_delay=40,
)  # fmt: skip


class Clock:
    """A clock that moves only when told."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --- the retry schedule -------------------------------------------------------------------


def test_retry_policy_defaults_follow_postfix() -> None:
    policy = RetryPolicy()
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 6)] == [300, 600, 1200, 2400, 3600, 3600]
    assert policy.delay(10_000) == 3600  # no overflow
    assert policy.give_up_after == 5 * 86400
    assert [QUICK.relay_delay(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 40]
    assert backoff(1.0, 10.0, 5.0, 0) == 1.0  # below 1 counts as the first step


def test_retry_policy_takes_seconds_for_tests() -> None:
    policy = RetryPolicy(first_delay=0.01, max_delay=0.04, give_up_after=0.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.01, 0.02, 0.04, 0.04]


def test_retry_at_never_passes_the_give_up_time() -> None:
    queued = 1000.0
    assert QUICK.retry_at(queued, 1, queued) == queued + 60
    assert QUICK.retry_at(queued + 3500, 7, queued) == queued + 3600  # moved forward
    assert QUICK.retry_at(queued + 3600, 8, queued) is None  # expired now


@pytest.mark.parametrize(
    "kw",
    [
        {"first_delay": 0},
        {"factor": 0.5},
        {"max_delay": 1.0},
        {"give_up_after": 0},
        {"relay_first_delay": -1},
        {"relay_max_delay": 1.0},
    ],
)
def test_retry_policy_refuses_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kw)


# --- the relay: pause, probe, throttle ------------------------------------------------------


def test_relay_state_pauses_probes_and_throttles() -> None:
    relay = RelayState(QUICK, connections=4)
    assert relay.parallelism(0) == 4 and relay.failures == 0
    pause = relay.trouble(100, crowded=True)
    assert pause is not None and (pause.delay, pause.failures, pause.lowered) == (10, 1, True)
    assert relay.trouble(105, crowded=True) is None  # same step: no new pause
    assert relay.paused(109) and not relay.paused(110) and relay.paused_until == 110
    assert relay.answered(105) == 0  # under way before the pause: proves nothing
    assert relay.parallelism(110) == 1  # probing: one message at a time
    again = relay.trouble(110)
    assert again is not None and (again.delay, again.failures, again.lowered) == (20, 2, False)
    assert relay.answered(130) == 2  # the next probe got through
    assert relay.failures == 0
    assert relay.parallelism(130) == 2  # halved after the 421...
    assert relay.parallelism(100 + THROTTLE_PERIOD) == 4  # ...for a while


def test_relay_state_never_goes_below_one_connection() -> None:
    relay = RelayState(QUICK, connections=2)
    t = 0.0
    for _ in range(3):
        assert relay.trouble(t, crowded=True) is not None
        t = relay.paused_until
        relay.answered(t)
    assert relay.parallelism(t) == 1
    assert relay.parallelism(t + THROTTLE_PERIOD) == 2


def test_rate_limit_spaces_slots_evenly_without_bursts() -> None:
    clock = Clock(50.0)
    limit = Pacer(4.0, clock=clock)  # one slot every 0.25 s
    assert [limit.reserve() for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    clock.t = 60.0  # idle for a while: no saved-up burst
    assert [limit.reserve() for _ in range(2)] == [0.0, 0.25]
    per_minute = Pacer(30 / 60, clock=clock)
    assert [per_minute.reserve() for _ in range(3)] == [0.0, 2.0, 4.0]
    with pytest.raises(ValueError):
        Pacer(0)


# --- verdicts per recipient, and how they are told -------------------------------------------


A, B, C = "a@example.org", "b@example.org", "c@example.org"


def test_classify_sorts_recipients_by_their_replies() -> None:
    result = SendResult(
        (A,),
        MappingProxyType({B: Reply(550, "5.1.1 no such user"), C: Reply(452, "4.2.2 full")}),
        Reply(250, "2.0.0 OK"),
    )
    v = classify((A, B, C), result, None)
    assert v.sent == (A,)
    assert dict(v.failed) == {B: (550, "5.1.1 no such user")}
    assert dict(v.deferred) == {C: (452, "4.2.2 full")}


def test_a_data_failure_applies_to_the_recipients_accepted_at_rcpt() -> None:
    result = SendResult((A, B), MappingProxyType({C: Reply(550, "no")}), None)
    temporary = classify((A, B, C), result, error_for_reply(451, "4.3.0 later", phase="data"))
    assert temporary.sent == () and set(temporary.deferred) == {A, B}
    assert temporary.deferred[A][0] == 451 and dict(temporary.failed) == {C: (550, "no")}
    permanent = classify((A, B), None, error_for_reply(554, "5.6.0 rejected", phase="data"))
    assert set(permanent.failed) == {A, B} and not permanent.deferred
    # Greylisted at RCPT, so not in the transaction the 554 refused: still pending.
    greylisted = SendResult((A,), MappingProxyType({B: Reply(450, "4.2.0 greylisted")}), None)
    mixed = classify((A, B), greylisted, error_for_reply(554, "5.6.0 rejected", phase="data"))
    assert dict(mixed.failed) == {A: (554, "5.6.0 rejected")}
    assert dict(mixed.deferred) == {B: (450, "4.2.0 greylisted")}


def test_classify_without_any_reply() -> None:
    assert set(classify((A,), None, TransientError("connection lost")).deferred) == {A}
    assert set(classify((A,), None, PermanentError("too large")).failed) == {A}
    refused = RecipientsRefused(
        "refused", result=SendResult((), {A: Reply(450, "greylisted")}, None), transient=True
    )
    assert dict(classify((A,), refused.result, refused).deferred) == {A: (450, "greylisted")}
    v = classify((A, B), SendResult((A,), {}, Reply(250, "OK")), None)
    assert v.deferred[B][0] is None  # the relay said nothing about b: try again


def test_expiry_fails_the_deferred_recipients_with_the_last_reply() -> None:
    v = Verdict((A,), MappingProxyType({}), MappingProxyType({B: (451, "4.3.0 later")}))
    e = v.expired(5 * 86400)
    assert e.sent == (A,) and not e.deferred
    assert e.failed[B] == (451, "expired: not delivered within 5d; last: 4.3.0 later")


def test_report_gives_one_line_and_the_events() -> None:
    v = Verdict(
        (A,),
        MappingProxyType({B: (550, "5.1.1 no such\r\nuser here")}),
        MappingProxyType({C: (450, "4.2.0 greylisted")}),
    )
    told = report(
        "ID1", "m1@example.org", "app@example.org", v,
        reply=Reply(250, "2.0.0 queued"), retry_at=0.0, attempt=3,
    )  # fmt: skip
    assert told.level == logging.ERROR
    assert told.line == (
        "mail ID1 <m1@example.org> from app@example.org: sent to a@example.org (250 2.0.0 "
        "queued); failed for b@example.org: 550 5.1.1 no such / user here; deferred until "
        "1970-01-01 00:00:00Z (attempt 3) for c@example.org: 450 4.2.0 greylisted"
    )
    sent, failed, deferred = told.events
    assert isinstance(sent, MailSent) and sent.toaddrs == (A,)
    assert isinstance(failed, MailFailed) and failed.reasons == {B: v.failed[B]}
    assert isinstance(deferred, MailDeferred) and deferred.retry_at == 0.0
    only_sent = report("ID2", None, "app@example.org", Verdict((A,)))
    assert only_sent.level == logging.INFO and "<>" in only_sent.line
    # Logged as the report itself: the line is made only by a logger that
    # keeps the level, once, and it is the same line.
    assert str(only_sent) == only_sent.line
    reply = _CountedReply(250, "2.0.0 queued")
    lazy = report("ID3", None, "app@example.org", Verdict((A,)), reply=reply)
    quiet = logging.getLogger("mailspool.test.quiet")
    quiet.setLevel(logging.WARNING)
    quiet.info("%s", lazy)
    assert reply.shown == 0
    assert lazy.line.endswith("sent to a@example.org (250 2.0.0 queued)") and str(lazy) == lazy.line
    assert reply.shown == 1


class _CountedReply(Reply):
    """A reply that counts how often it was written out."""

    shown = 0

    def __str__(self) -> str:
        object.__setattr__(self, "shown", self.shown + 1)
        return super().__str__()


def test_summaries_add_up() -> None:
    total = Summary(sent=1, deferred=2) + Summary(failed=3, quarantined=1, relay_paused=True)
    assert total == Summary(1, 2, 3, 1, True)
    assert total.total == 7


def test_small_formatters() -> None:
    assert [human(s) for s in (30, 90, 600, 3600, 432000)] == ["30s", "90s", "10m", "1h", "5d"]
    assert len(one_line("x" * 1000)) == 300
    assert when(86400) == "1970-01-02 00:00:00Z"
    assert when(float("inf")) == "inf"


# --- the connection pool, with real connections ----------------------------------------------


def test_pool_reuses_the_last_connection_and_closes_stale_ones(relay: Relay) -> None:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    clock = Clock(0.0)
    pool = ConnectionPool(idle_timeout=30.0, clock=clock)
    assert pool.take() is None
    first, second = mailer.connect(), mailer.connect()
    pool.add(first)
    pool.add(second)
    pool.give_back(first, keep=4)
    clock.t = 10.0
    pool.give_back(second, keep=4)
    assert pool.open == 2
    assert pool.take() is second  # the one used last
    pool.give_back(second, keep=4)
    clock.t = 35.0  # first has been idle for 35 s, second for 25 s
    assert pool.close_idle() == pytest.approx(5.0)
    assert pool.open == 1 and not first.alive
    clock.t = 45.0
    assert pool.take() is None  # stale: closed, not handed out
    assert pool.open == 0 and not second.alive


def test_pool_quits_a_connection_idle_too_long_even_while_others_are_busy(
    relay: Relay,
) -> None:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    clock = Clock(0.0)
    pool = ConnectionPool(idle_timeout=30.0, clock=clock)
    old, busy = mailer.connect(), mailer.connect()
    pool.add(old)
    pool.add(busy)
    pool.give_back(old, keep=4)  # idle from 0 on: no longer needed
    for t in (10.0, 20.0, 31.0):  # the other one carries a message now and then
        clock.t = t
        pool.give_back(busy, keep=4)
        assert pool.take() is busy
    # The take at 31 s closed the one idle for 31 s, with QUIT, before a
    # relay's own idle timeout (300 s for Postfix) would have.
    assert not old.alive and pool.open == 1
    assert relay.commands.count("QUIT") == 1


def test_pool_keeps_no_more_than_allowed_and_drops_dead_ones(relay: Relay) -> None:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    pool = ConnectionPool()
    conns = [mailer.connect() for _ in range(3)]
    for conn in conns:
        pool.add(conn)
    for conn in conns:
        pool.give_back(conn, keep=2)  # the parallelism was lowered to 2
    assert pool.open == 2 and not conns[0].alive and conns[1].alive and conns[2].alive
    conns[2].close()  # e.g. the relay closed it while it was idle
    assert pool.count_alive() == 1 and pool.open == 1
    held = pool.take()
    assert held is conns[1]
    pool.discard(held)
    assert pool.open == 0 and not conns[1].alive
    pool.close_all()
    assert pool.take() is None


def test_a_mailer_without_connect_is_adapted() -> None:
    mailer = InMemoryMailer()
    conn = MailerConnection(mailer)
    envelope = make_envelope("app@example.org", [A])
    result = conn.send(envelope, b"Subject: x\r\n\r\nhi\r\n")
    assert result.accepted == (A,)
    assert len(mailer.outbox) == 1
    assert relay_name(mailer) == "InMemoryMailer"
    assert relay_name(SMTPMailer("127.0.0.1", 2525, tls="none")) == "127.0.0.1:2525"


# --- the waiter ----------------------------------------------------------------------------


def test_waiter_wakes_on_wake_and_times_out_otherwise() -> None:
    waiter = Waiter(None)
    try:
        assert waiter.waker is None
        assert waiter.wait(0.01) is False
        waiter.wake()
        waiter.wake()  # twice: still one look
        assert waiter.wait(5.0) is True
        waiter.consume()
        assert waiter.wait(0.01) is False
        threading.Timer(0.05, waiter.wake).start()
        assert waiter.wait(10.0) is True  # cut short by a wake from another thread
    finally:
        waiter.close()


def test_waiter_sees_new_mail_through_inotify(tmp_path: Path) -> None:
    for area in ("new", "deferred"):
        (tmp_path / area).mkdir()
    waiter = Waiter(Inotify.open(spool_watches(str(tmp_path))))
    try:
        if waiter.waker is None:
            pytest.skip("inotify is not available here")
        assert waiter.wait(0.01) is False
        (tmp_path / "tmpfile").write_bytes(b"x")
        assert waiter.wait(0.01) is False  # not a watched directory
        os.rename(tmp_path / "tmpfile", tmp_path / "new" / "msg")
        assert waiter.wait(5.0) is True
        waiter.consume()
        assert waiter.wait(0.01) is False
        os.utime(tmp_path / "new" / "msg", (0, 0))  # not watched in new/
        assert waiter.wait(0.01) is False
    finally:
        waiter.close()


def test_inotify_refuses_a_missing_directory(tmp_path: Path) -> None:
    assert Inotify.open({str(tmp_path / "missing"): 0x100}) is None


def test_a_421_lowers_the_parallelism_to_the_connections_the_relay_took() -> None:
    state = RelayState(RetryPolicy(), 1)
    state.grow(3)
    assert state.trouble(10.0, crowded=True, others=2) is not None
    after_pause = 10.0 + RetryPolicy().relay_delay(1)
    state.answered(after_pause)
    assert state.parallelism(after_pause) == 2  # the two the relay had accepted
    assert state.parallelism(10.0 + THROTTLE_PERIOD) == 3
    # Never below one, and always below what it was.
    assert state.trouble(10.0 + THROTTLE_PERIOD, crowded=True, others=5) is not None
    later = 10.0 + THROTTLE_PERIOD + RetryPolicy().relay_delay(1)
    state.answered(later)
    assert state.parallelism(later) == 2


def test_relay_state_grows_but_a_421_throttle_still_halves_it() -> None:
    state = RelayState(RetryPolicy(), 4)
    assert state.parallelism(0.0) == 4
    state.grow(6)
    assert state.parallelism(0.0) == 6
    state.grow(5)  # never shrinks by growing
    assert state.parallelism(0.0) == 6
    assert state.trouble(10.0, crowded=True) is not None
    after_pause = 10.0 + RetryPolicy().relay_delay(1)
    assert state.answered(after_pause) == 1
    assert state.parallelism(after_pause) == 3  # halved for a while...
    state.grow(8)  # ...and growing meanwhile does not lift the throttle
    assert state.parallelism(after_pause + 1) == 3
    assert state.parallelism(10.0 + THROTTLE_PERIOD) == 8  # then the new maximum


def test_thread_clock_counts_this_threads_cpu_and_not_its_sleep() -> None:
    with ThreadClock() as clock:
        cpu0, delay0 = clock.read()
        t0 = time.monotonic()
        time.sleep(0.05)  # not CPU time
        # 50 ms of this thread's CPU time, however busy the machine is (a
        # wall-clock deadline gave less on a loaded machine).
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass
        wall = time.monotonic() - t0
        cpu1, delay1 = clock.read()
    assert 0.04 <= cpu1 - cpu0 <= wall - 0.04
    assert 0 <= delay1 - delay0 <= wall
