"""Pickup latency of a processor in a process of its own, and its CPU while idle.

The application (the trial's process) commits one message per
transaction through Django (:mod:`pgsystems`); the processor runs in
another process, as ``mailspool run`` or django-mailer's ``runmailer_pg``
would:

* ``mailspool (PostgreSQL)``: ``QueueProcessor(PostgresQueue(url)).run()``,
  woken by the NOTIFY sent in the application's transaction (its LISTEN
  connection), polling every 3 s as the safety net;
* ``mailspool (Maildir)``: ``QueueProcessor(spool).run()``, woken by inotify;
* ``django-mailer``: ``postgres_send_loop()`` (``manage.py runmailer_pg``),
  woken by the NOTIFY of its insert trigger.

A sample is the time from the last statement inside the ``atomic()`` block
(its exit commits) to the moment the relay (aiosmtpd, its own process)
answered the final dot, read from a shared CLOCK_MONOTONIC stamp; the
application waits a random 0-1 s before each.  Then, the queue empty, the
processor process's CPU time over some seconds is its idle cost.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from typing import Any

from harness import TrialError, rotate, run_child
from pgsystems import DJANGO_MAILER, MAILDIR, PG, configure, django_messages, proc_cpu_seconds
from relays import AiosmtpdRelay, Probe, running
from scenarios import Env, check_relay

__all__ = ["pickup_trial", "run"]

#: Seconds the processor gets to start and listen before the first commit.
SETTLE = 3.0


def _processor_main(system: str, db: dict[str, Any], queue_url: str, spool: str, port: int) -> None:
    if system == DJANGO_MAILER:
        configure(db, backend=None, relay_port=port)
        from mailer.postgres import postgres_send_loop

        postgres_send_loop()  # until terminated
        return
    from mailspool import SMTPMailer
    from mailspool.processor.loop import QueueProcessor

    where: Any = spool
    if system == PG:
        from mailspool.postgres import PostgresQueue

        where = PostgresQueue(queue_url)
    QueueProcessor(where, SMTPMailer("127.0.0.1", port, tls="none"), interval=3.0).run()


def _commit_one(message: Any, probe: Probe, n: int) -> float:
    """Commit one message with the application's INSERT; seconds until the relay had it."""
    from django.db import connection, transaction

    from pgsystems import APP_TABLE

    probe.drain_signals()
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"INSERT INTO {APP_TABLE} (customer, total) VALUES (%s, %s)", (f"c{n}", n))
        message.send()
        t0 = time.monotonic()
    if not probe.arrived.acquire(True, 30.0):
        raise TrialError("a committed message did not reach the relay within 30 s")
    return float(probe.last.value) - t0


def pickup_trial(
    system: str,
    db: dict[str, Any],
    url: str,
    queue_url: str,
    spool: str,
    port: int,
    probe: Probe,
    samples: int,
    idle_seconds: float,
    tag: str,
) -> dict[str, Any]:
    from pgsystems import truncate

    truncate(url)
    configure(db, backend=system, spool=spool, queue_url=queue_url)
    messages = django_messages(samples + 1, tag)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_processor_main, args=(system, db, queue_url, spool, port), daemon=True
    )
    proc.start()
    try:
        time.sleep(SETTLE)
        _commit_one(messages[0], probe, 0)  # untimed: the first one opens the connections
        rng = random.Random(tag)
        latencies = []
        for i, message in enumerate(messages[1:], 1):
            time.sleep(rng.uniform(0.0, 1.0))
            latencies.append(_commit_one(message, probe, i))
        time.sleep(1.0)
        c0, w0 = proc_cpu_seconds(proc.pid or 0), time.monotonic()
        time.sleep(idle_seconds)
        c1, w1 = proc_cpu_seconds(proc.pid or 0), time.monotonic()
    finally:
        proc.terminate()
        proc.join(15)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return {"latencies": latencies, "idle_cpu_percent": 100.0 * (c1 - c0) / (w1 - w0)}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(env: Env) -> None:
    pg = env.postgres()
    if pg is None:
        return
    opts = env.opts
    samples = 10 if opts.quick else 40
    idle = 3.0 if opts.quick else 10.0
    runs = opts.r(1, 1)
    scenario = "PostgreSQL pickup"
    env.results.scenario_info[scenario] = {
        "samples_per_run": samples,
        "runs": runs,
        "idle_seconds": idle,
        "relay": "aiosmtpd, answers at once",
        "processor": "a process of its own (QueueProcessor.run(), interval 3 s; "
        "django-mailer: postgres_send_loop(), as manage.py runmailer_pg)",
    }
    variants = [PG, MAILDIR] + ([DJANGO_MAILER] if env.django_mailer else [])
    res = env.results
    lat = {
        s: res.get(scenario, "latency commit -> relay", s, "ms", "lower", primary=s == PG)
        for s in variants
    }
    p90 = {
        s: res.get(scenario, "latency commit -> relay, p90", s, "ms", "lower", primary=s == PG)
        for s in variants
    }
    cpu = {
        s: res.get(
            scenario, f"idle CPU over {idle:.0f} s", s, "% of one core", "lower", primary=s == PG
        )
        for s in variants
    }
    relay = AiosmtpdRelay()
    with running(relay):
        for r in range(runs):
            for system in rotate(variants, r):
                if lat[system].errors:
                    continue
                relay.reset()
                spool = env.spool("pickup")
                try:
                    out = run_child(
                        pickup_trial,
                        samples * 35 + idle + 60,
                        system=system,
                        db=pg.params,
                        url=pg.url,
                        queue_url=pg.queue_url(),
                        spool=spool,
                        port=relay.port,
                        probe=relay.probe,
                        samples=samples,
                        idle_seconds=idle,
                        tag=env.tag(),
                    )
                    check_relay(relay, samples + 1)
                except TrialError as exc:
                    for s in (lat, p90, cpu):
                        s[system].errors.append(str(exc))
                    print(f"  {scenario} / {system}: ERROR {str(exc).splitlines()[0]}")
                    continue
                finally:
                    env.cleanup(spool)
                ms = [x * 1000 for x in out["latencies"]]
                lat[system].values.extend(ms)
                p90[system].values.append(_percentile(ms, 0.9))
                cpu[system].values.append(out["idle_cpu_percent"])
                print(
                    f"  {scenario} / {system} run {r + 1}: median "
                    f"{_percentile(ms, 0.5):.1f} ms, p90 {_percentile(ms, 0.9):.1f} ms, "
                    f"idle CPU {out['idle_cpu_percent']:.3f} %"
                )
