"""The processor against a real Postfix on loopback (Debian's package).

Each test configures and starts its own Postfix (``_postfix``) and stops
it; they are skipped, saying why, where Postfix is not installed or the
tests do not run as root.  ``.ci/run`` installs the package, so CI runs
them.  The numbers they measure are printed (``pytest -s``) and quoted in
docs/operations.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _postfix import Postfix, why_not
from _relays import enqueue, wait_for
from mailspool import QueueProcessor, RetryPolicy, SMTPMailer, Spool, Summary

pytestmark = pytest.mark.skipif(why_not() is not None, reason=str(why_not()))

QUICK = RetryPolicy(
    first_delay=60, give_up_after=3600, relay_first_delay=0.5, relay_max_delay=2,
    quick_retry=30, jitter=0,
)  # fmt: skip

PostfixFactory = Callable[..., Postfix]


@pytest.fixture
def postfix() -> Iterator[PostfixFactory]:
    started: list[Postfix] = []

    def make(**settings: str) -> Postfix:
        pf = Postfix(settings)
        started.append(pf)
        pf.start()
        return pf

    yield make
    for pf in started:
        pf.remove()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def processor(spool: Spool, pf: Postfix, **kw: Any) -> QueueProcessor:
    mailer = SMTPMailer(
        "127.0.0.1", pf.port, tls="none", timeout=10, data_timeout=10, local_hostname="client.test"
    )
    return QueueProcessor(spool, mailer, retry=QUICK, watch=False, **kw)


def settle(pf: Postfix, count: int) -> None:
    assert wait_for(lambda: pf.settled() and sum(pf.delivered().values()) >= count, 20)


def test_postfix_anvil_message_rate_limit_is_learned(
    spool: Spool, postfix: PostfixFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    # 10 messages per second per client, counted in fixed windows.
    pf = postfix(smtpd_client_message_rate_limit="10", anvil_rate_time_unit="1s")
    ids = enqueue(spool, 40)
    started = time.monotonic()
    with processor(spool, pf, connections=2) as p:
        # One pass: every "450 4.7.1 Error: too much mail" puts its message
        # back, uncounted, and the pass goes on at the rate learned.
        assert p.process_once() == Summary(sent=40)
        rate = p.pacer.rate
    elapsed = time.monotonic() - started
    settle(pf, 40)
    assert pf.delivered() == dict.fromkeys(ids, 1)
    refused = pf.log_count("Message delivery request rate limit exceeded")
    assert refused >= 1  # the limit was met, and paced
    assert refused < 40
    print(
        f"\nanvil 10/1s: 40 delivered in {elapsed:.1f}s ({40 / elapsed:.2f}/s for a limit "
        f"of 10/s), {refused} MAIL refused for rate, learned rate {rate:.2f}/s"
    )


def test_postfix_connection_count_limit_lowers_connections_without_a_pause(
    spool: Spool, postfix: PostfixFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "mailspool")
    pf = postfix(smtpd_client_connection_count_limit="2")
    ids = enqueue(spool, 200)
    with processor(spool, pf, connections=4) as p:
        summary = p.process_once()
        limit = p.relay.parallelism(time.time())
    assert summary == Summary(sent=200)  # never paused
    settle(pf, 200)
    assert pf.delivered() == dict.fromkeys(ids, 1)
    refused = pf.log_count("Connection concurrency limit exceeded")
    crowded = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(crowded) == refused  # each refusal seen, none made up
    if refused:  # the processor grew past the limit: back down to it, no pause
        assert limit <= 2 and "deliveries go on" in crowded[0]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    print(
        f"\nconnection limit 2: 200 delivered, {refused} connection(s) refused, limit now {limit}"
    )


def test_postfix_restart_mid_drain_duplicates_at_most_one_per_connection(
    spool: Spool, postfix: PostfixFactory
) -> None:
    pf = postfix()
    n, connections = 400, 2
    ids = enqueue(spool, n)
    p = processor(spool, pf, connections=connections)
    p.start()
    try:
        assert wait_for(lambda: spool.counts()["ready"] <= n - 100, 30)
        pf.stop()  # SIGTERM to its master: sessions cut wherever they are
        time.sleep(0.5)
        pf.start()
        assert wait_for(lambda: sum(spool.counts().values()) == 0, 40)
    finally:
        p.stop()
    settle(pf, n)
    got = pf.delivered()
    assert set(got) == set(ids)  # nothing lost
    duplicates = sum(got.values()) - n
    assert duplicates <= connections
    print(f"\npostfix stop/start mid-drain: {n} delivered, {duplicates} duplicate(s)")
