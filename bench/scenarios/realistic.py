"""Drains against relays that behave as real ones do: a rate limit, one-off faults.

Each trial, in a fresh process: the system's own delivery fills a fresh
spool (untimed), then the system's *running* processor is started (as in
production: mailspool ``QueueProcessor.start()``, zope.sendmail's
``QueueProcessorThread`` polling every 3 s, repoze.sendmail's
``send_messages()`` every 3 s) and the clock runs until the relay has
accepted every message once, or a time limit.  A one-pass drain would not
do: against such relays every system needs retries, and how soon it makes
them is what is measured.  The relay counts what it accepted, the distinct
Message-Ids among them (the rest are duplicates), what it refused for rate
and the faults it injected; a message neither received nor left in the
queue is lost.

* **drain-ratelimited**: the relay takes R messages a second (a token
  bucket holding a tenth of a second's worth) and refuses the excess at
  MAIL with ``454 4.7.0 Throttling failure`` (Amazon SES's words), keeping
  the session.  Reported: the sustained rate as a percentage of R, and the
  refused attempts as a percentage of the messages.
* **drain-flaky**: one transaction in ten meets a one-off fault, in turn:
  451 at MAIL, 421 at RCPT and the connection closed, 451 after the data,
  the connection cut after the data before any reply; and one connection
  in ten gets 421 at EHLO.  Each system also drains the same queue to a
  clean relay; reported: the flaky drain's time over the clean one, lost
  messages and duplicates.
* **drain-postfix** (only when asked): the same rate-limit drain against a
  real Postfix (Debian's package) on a loopback port, a private instance
  (``postfix -c DIR``) with its anvil rate limit on
  (``smtpd_client_message_rate_limit``), relaying what it accepts to a
  counting aiosmtpd relay.  See :mod:`postfix_relay`.
"""

from __future__ import annotations

import time
from typing import Any

from harness import TrialError, rotate, run_child
from relays import AiosmtpdRelay, Probe, running
from scenarios import Env
from systems import MAILSPOOL, REPOZE, ZOPE, Runner, make_messages, pending

__all__ = ["run_flaky", "run_postfix", "run_ratelimited", "running_trial"]

RATE = 40.0  # messages a second the rate-limited relay takes
FAULT_EVERY = 10  # one transaction (and connection) in this many meets a fault
SYSTEMS = [(MAILSPOOL, MAILSPOOL, {}), (ZOPE, ZOPE, {}), (REPOZE, REPOZE, {})]


def running_trial(
    system: str,
    path: str,
    port: int,
    probe: Probe,
    n: int,
    tag: str,
    limit: float,
    settle: float = 0.2,
) -> dict[str, Any]:
    """Queue ``n`` messages, start the system's processor, wait until the relay has them all."""
    runner = Runner(system, path, port, wake=False)
    runner.enqueue(runner.inputs(make_messages(n, tag)), per_tx=100)
    queued = pending(system, path)
    if queued != n:
        raise TrialError(f"{queued} messages queued, {n} expected")
    start = time.monotonic()
    runner.start()
    try:
        deadline = start + limit
        while probe.distinct.value < n and time.monotonic() < deadline:
            time.sleep(0.02)
        finished = probe.distinct.value >= n
        elapsed = (probe.last.value - start) if finished else limit
    finally:
        runner.stop()
    time.sleep(settle)  # a message in flight at the stop is counted or stays queued
    delivered = int(probe.distinct.value)
    left = pending(system, path)
    return {
        "elapsed": elapsed,
        "finished": finished,
        "delivered": delivered,
        "duplicates": int(probe.accepted.value) - delivered,
        "faults": int(probe.faults.value) if probe.faults is not None else 0,
        "left": left,
        "lost": max(0, n - delivered - left),
    }


def _trial(
    env: Env, relay: Any, system: str, n: int, limit: float, extra: dict[str, Any]
) -> dict[str, Any]:
    relay.reset()
    path = env.spool(system.split()[0])
    try:
        return dict(
            run_child(
                running_trial,
                limit + 120,
                system=system,
                path=path,
                port=relay.port,
                probe=relay.probe,
                n=n,
                tag=env.tag(),
                limit=limit,
                **extra,
            )
        )
    finally:
        env.cleanup(path)


def _series(env: Env, scenario: str, metric: str, unit: str, better: str) -> dict[str, Any]:
    return {
        label: env.results.get(scenario, metric, label, unit, better, primary=label == MAILSPOOL)
        for label, _, _ in SYSTEMS
    }


def rate_limited(
    env: Env,
    scenario: str,
    relay: Any,
    rate: float,
    n: int,
    limit: float,
    settle: dict[str, float] | None = None,
) -> None:
    """Drain ``n`` messages through ``relay`` (which takes ``rate`` a second) with each system."""
    settle = settle or {}
    runs = env.opts.r(2, 1)
    sustained = _series(env, scenario, "sustained rate", "% of the relay's rate", "higher")
    refused = _series(env, scenario, "refused attempts", "% of messages", "lower")
    undelivered = _series(env, scenario, f"undelivered after {limit:.0f} s", "messages", "lower")
    lost = _series(env, scenario, "lost messages", "messages", "lower")
    dups = _series(env, scenario, "duplicates", "messages", "lower")
    with running(relay):
        for run in range(runs):
            for label, system, extra in rotate(SYSTEMS, run):
                try:
                    out = _trial(env, relay, system, n, limit, {**extra, **settle})
                    out["refused"] = relay.refused()
                except TrialError as exc:
                    sustained[label].errors.append(str(exc))
                    print(f"  {scenario} / {label}: ERROR {str(exc).splitlines()[0]}")
                    continue
                pct = 100 * out["delivered"] / out["elapsed"] / rate
                sustained[label].values.append(pct)
                refused[label].values.append(100 * out["refused"] / n)
                undelivered[label].values.append(n - out["delivered"])
                lost[label].values.append(out["lost"])
                dups[label].values.append(out["duplicates"])
                print(
                    f"  {scenario} / {label} run {run + 1}: {out['delivered']}/{n} in "
                    f"{out['elapsed']:.1f} s = {pct:.0f}% of {rate:g}/s; "
                    f"{out['refused']} refused attempts, {out['lost']} lost, "
                    f"{out['duplicates']} duplicate(s)"
                )


def run_ratelimited(env: Env) -> None:
    n = env.opts.n(1000, 200)
    limit = max(45.0, 3 * n / RATE)
    relay = AiosmtpdRelay(rate=RATE)
    env.results.scenario_info["drain, rate-limited relay"] = {
        "messages": n,
        "rate": RATE,
        "time_limit_s": limit,
        "relay": relay.description,
        "how": "queue filled first, then the system's running processor started; "
        "the clock stops when the relay has every message (or at the limit)",
        "mailspool": "QueueProcessor().start() (default settings)",
        "peers": "their running processors, polling every 3 s",
    }
    rate_limited(env, "drain, rate-limited relay", relay, RATE, n, limit)


def run_flaky(env: Env) -> None:
    n = env.opts.n(1000, 200)
    runs = env.opts.r(2, 1)
    limit = 120.0 if not env.opts.quick else 60.0
    scenario = "drain, flaky relay"
    clean_relay = AiosmtpdRelay()
    flaky_relay = AiosmtpdRelay(fault_every=FAULT_EVERY)
    env.results.scenario_info[scenario] = {
        "messages": n,
        "time_limit_s": limit,
        "relay": flaky_relay.description,
        "clean relay": clean_relay.description,
        "how": "each system drains the same number of messages to a clean relay, then "
        "to the flaky one, with its running processor; the clock stops when the relay "
        "has every message once (or at the limit)",
    }
    ratio = _series(env, scenario, "time, flaky / clean", "x", "lower")
    lost = _series(env, scenario, "lost messages", "messages", "lower")
    dups = _series(env, scenario, "duplicates", "messages", "lower")
    undelivered = _series(env, scenario, f"undelivered after {limit:.0f} s", "messages", "lower")
    with running(clean_relay), running(flaky_relay):
        for run in range(runs):
            for label, system, extra in rotate(SYSTEMS, run):
                try:
                    clean = _trial(env, clean_relay, system, n, limit, extra)
                    if not clean["finished"]:
                        raise TrialError(f"the clean drain did not finish in {limit:.0f} s")
                    flaky = _trial(env, flaky_relay, system, n, limit, extra)
                except TrialError as exc:
                    ratio[label].errors.append(str(exc))
                    print(f"  {scenario} / {label}: ERROR {str(exc).splitlines()[0]}")
                    continue
                r = flaky["elapsed"] / clean["elapsed"]
                ratio[label].values.append(r)
                lost[label].values.append(flaky["lost"])
                dups[label].values.append(flaky["duplicates"])
                undelivered[label].values.append(n - flaky["delivered"])
                print(
                    f"  {scenario} / {label} run {run + 1}: clean {clean['elapsed']:.1f} s, "
                    f"flaky {flaky['elapsed']:.1f} s{'' if flaky['finished'] else ' (limit)'} "
                    f"= {r:.1f}x; {flaky['faults']} faults, {flaky['lost']} lost, "
                    f"{flaky['duplicates']} duplicate(s), {n - flaky['delivered']} undelivered"
                )


def run_postfix(env: Env) -> None:
    from postfix_relay import PostfixRelay

    binary = PostfixRelay.find(install=env.opts.install_postfix)
    scenario = "drain, Postfix with its rate limit"
    if binary is None:
        env.results.notes.append(
            f"{scenario}: Postfix not found; install Debian's postfix package or run "
            "with --install-postfix (as root)"
        )
        return
    n = env.opts.n(600, 90)
    per, unit = (30, 10) if env.opts.quick else (50, 10)  # messages per unit seconds
    rate = per / unit
    limit = max(60.0, 3 * n / rate)
    relay = PostfixRelay(binary, message_rate=per, time_unit=unit)
    env.results.scenario_info[scenario] = {
        "messages": n,
        "rate": rate,
        "time_limit_s": limit,
        "relay": relay.description,
        "how": "as drain-ratelimited, the relay being a private Postfix instance that "
        "relays what it accepts to a counting aiosmtpd relay",
    }
    # What Postfix accepted reaches the counting relay a little later.
    rate_limited(env, scenario, relay, rate, n, limit, {"settle": 5.0})
