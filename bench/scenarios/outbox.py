"""The PostgreSQL queue beside the Maildir spool and django-mailer: enqueue and drain.

One Django application on a scratch PostgreSQL database, three mail queues
(:mod:`pgsystems`).  Both scenarios run only when named (they need a
PostgreSQL server, and django-mailer for its rows: ``--install-django-mailer``).

* ``pg-enqueue``: what queuing one message adds to the application's
  transaction.  A trial times N transactions, each the application's own
  ``INSERT`` and, in the same ``atomic()`` block, ``EmailMessage.send()``;
  the baseline is the same ``INSERT`` alone.  The figure is the time per
  transaction, and the difference to the baseline of the same run.
* ``pg-drain-fast`` / ``pg-drain-slow``: a queue of N messages (filled
  untimed through the same backend, 100 per transaction) drained by 1 and
  by 4 processor processes started together; the clock runs from their
  common start until the last one returns.  The relay must count exactly N
  messages, N distinct Message-Ids (aiosmtpd), and the queue must be empty.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from harness import TrialError, rotate, run_child
from pgsystems import (
    BASELINE,
    DJANGO_MAILER,
    MAILDIR,
    PG,
    app_transaction,
    configure,
    django_messages,
    enqueue_batch,
    make_drainer,
    pending,
    truncate,
)
from relays import AiosmtpdRelay, running
from scenarios import Env, check_relay
from scenarios.drain import SLOW_DELAY

__all__ = ["drain_trial", "enqueue_trial", "run_drain_fast", "run_drain_slow", "run_enqueue"]

#: Untimed transactions first: connections made, code paths warm.
WARMUP = 20


def enqueue_trial(
    system: str | None,
    db: dict[str, Any],
    url: str,
    queue_url: str,
    spool: str,
    n: int,
    tag: str,
) -> dict[str, Any]:
    truncate(url)
    configure(db, backend=system, spool=spool, queue_url=queue_url)
    messages = django_messages(n + WARMUP, tag)
    for i in range(WARMUP):
        app_transaction(messages[i] if system else None, i)
    timed = messages[WARMUP:]
    c0, t0 = time.process_time(), time.perf_counter()
    for i, message in enumerate(timed):
        app_transaction(message if system else None, i)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    if system is not None:
        queued = pending(system, url, spool)
        if queued != n + WARMUP:
            raise TrialError(f"{queued} messages queued, {n + WARMUP} were committed")
    return {"elapsed": elapsed, "cpu": cpu}


def run_enqueue(env: Env) -> None:
    pg = env.postgres()
    if pg is None:
        return
    opts = env.opts
    n = opts.n(1000, 200)
    runs = opts.r(5, 2)
    scenario = "enqueue in the application's transaction"
    env.results.scenario_info[scenario] = {
        "transactions": n,
        "runs": runs,
        "application": "Django, transaction.atomic(): INSERT INTO the application's "
        "table + EmailMessage.send() (1 message per transaction)",
        PG: "mailspool's EmailBackend, MAILSPOOL_QUEUE_PATH = postgresql://... "
        "(a row in the same transaction)",
        MAILDIR: "mailspool's EmailBackend, a spool directory (written, fsync, by "
        "an on_commit callback)",
        DJANGO_MAILER: "mailer.backend.DbBackend (a row in the same transaction)",
        "server": "PostgreSQL on 127.0.0.1, synchronous_commit on",
    }
    variants: list[tuple[str, str | None]] = [(BASELINE, None), (PG, PG), (MAILDIR, MAILDIR)]
    if env.django_mailer:
        variants.append((DJANGO_MAILER, DJANGO_MAILER))
    per_tx = {
        label: env.results.get(
            scenario, "time per transaction", label, "ms", "lower", primary=label == PG
        )
        for label, _ in variants
    }
    added = {
        label: env.results.get(
            scenario, "added by the mail", label, "ms", "lower", primary=label == PG
        )
        for label, system in variants
        if system is not None
    }
    # The application process's CPU time per transaction (not the server's):
    # hardly moved by a busy machine, unlike the wall clock.
    cpu = {
        label: env.results.get(
            scenario, "application's CPU per transaction", label, "µs", "lower", primary=label == PG
        )
        for label, _ in variants
    }
    for r in range(runs):
        this_run: dict[str, float] = {}
        for label, system in rotate(variants, r):
            s = per_tx[label]
            if s.errors:
                continue
            spool = env.spool("outbox")
            try:
                out = run_child(
                    enqueue_trial,
                    600,
                    system=system,
                    db=pg.params,
                    url=pg.url,
                    queue_url=pg.queue_url(),
                    spool=spool,
                    n=n,
                    tag=env.tag(),
                )
            except TrialError as exc:
                s.errors.append(str(exc))
                print(f"  {scenario} / {label}: ERROR {str(exc).splitlines()[0]}")
                continue
            finally:
                env.cleanup(spool)
            ms = out["elapsed"] / n * 1000
            this_run[label] = ms
            s.values.append(ms)
            cpu[label].values.append(out["cpu"] / n * 1e6)
            print(
                f"  {scenario} / {label} run {r + 1}: {ms:.3f} ms per transaction, "
                f"{out['cpu'] / n * 1e6:.0f} µs CPU"
            )
        base = this_run.get(BASELINE)
        for label, series in added.items():
            if base is not None and label in this_run:
                series.values.append(this_run[label] - base)


# --- drain ---------------------------------------------------------------------------


def _drainer_main(kwargs: dict[str, Any], ready: Any, go: Any, ends: Any) -> None:
    try:
        drain = make_drainer(**kwargs)
        ready.put(os.getpid())
        go.wait()
        cpu = time.process_time()
        drain()
        ends.put(("ok", (time.monotonic(), time.process_time() - cpu)))
    except BaseException as exc:  # the trial reports it
        ends.put(("error", f"{type(exc).__name__}: {exc}"))


def drain_trial(
    system: str,
    db: dict[str, Any],
    url: str,
    queue_url: str,
    spool: str,
    port: int,
    n: int,
    tag: str,
    processes: int,
    connections: int,
    tmp: str,
) -> dict[str, Any]:
    truncate(url)
    configure(db, backend=system, spool=spool, queue_url=queue_url, tmp=tmp)
    enqueue_batch(django_messages(n, tag), per_tx=100)
    queued = pending(system, url, spool)
    if queued != n:
        raise TrialError(f"{queued} messages queued, {n} expected")
    ctx = multiprocessing.get_context("spawn")
    ready, go, ends = ctx.Queue(), ctx.Event(), ctx.Queue()
    kwargs = {
        "system": system,
        "db": db,
        "queue_url": queue_url,
        "spool": spool,
        "relay_port": port,
        "connections": connections,
        # django-mailer's file lock lets one send_all() run at a time; with
        # several processes its documented way is the lock off, NOWAIT rows.
        "file_lock": processes == 1,
        "tmp": tmp,
    }
    procs = [
        ctx.Process(target=_drainer_main, args=(kwargs, ready, go, ends)) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start = time.monotonic()
        go.set()
        last, cpu = start, 0.0
        for _ in procs:
            status, value = ends.get(timeout=900)
            if status != "ok":
                raise TrialError(f"a processor failed: {value}")
            last = max(last, value[0])
            cpu += value[1]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    left = pending(system, url, spool)
    if left:
        raise TrialError(f"{left} messages left in the queue after the drain")
    return {"elapsed": last - start, "cpu_us": cpu / n * 1e6}


def _drain(
    env: Env,
    scenario: str,
    relay: Any,
    variants: list[tuple[str, str, int, int]],
    n: int,
    runs: int,
) -> None:
    pg = env.postgres()
    assert pg is not None
    series = {
        label: env.results.get(
            scenario, "throughput", label, "messages/s", "higher", primary=i == 0
        )
        for i, (label, *_) in enumerate(variants)
    }
    # The processors' own CPU time (every process, every thread) per
    # message: unlike the wall clock, hardly moved by a busy machine.  The
    # database server's share is not in it.
    cpu = {
        label: env.results.get(
            scenario, "processors' CPU per message", label, "µs", "lower", primary=i == 0
        )
        for i, (label, *_) in enumerate(variants)
    }
    with running(relay):
        for r in range(runs):
            for label, system, processes, connections in rotate(variants, r):
                s = series[label]
                if s.errors:
                    continue
                relay.reset()
                spool = env.spool("drain")
                try:
                    out = run_child(
                        drain_trial,
                        1200,
                        system=system,
                        db=pg.params,
                        url=pg.url,
                        queue_url=pg.queue_url(),
                        spool=spool,
                        port=relay.port,
                        n=n,
                        tag=env.tag(),
                        processes=processes,
                        connections=connections,
                        tmp=env.tmp,
                    )
                    check_relay(relay, n)
                except TrialError as exc:
                    s.errors.append(str(exc))
                    print(f"  {scenario} / {label}: ERROR {str(exc).splitlines()[0]}")
                    continue
                finally:
                    env.cleanup(spool)
                rate = n / out["elapsed"]
                s.values.append(rate)
                cpu[label].values.append(out["cpu_us"])
                print(
                    f"  {scenario} / {label} run {r + 1}: {rate:,.0f} messages/s, "
                    f"processors' CPU {out['cpu_us']:.0f} µs per message"
                )


def _label(system: str, processes: int, connections: int | None = None) -> str:
    what = f"{processes} processor" + ("s" if processes > 1 else "")
    if connections is not None:
        what += f", connections={connections}"
    return f"{system}, {what}"


def run_drain_fast(env: Env) -> None:
    if env.postgres() is None:
        return
    n = env.opts.n(2000, 300)
    runs = env.opts.r(3, 1)
    relay = env.fast_relay()
    scenario = "PostgreSQL drain, fast relay"
    variants = [
        (_label(s, p), s, p, 16)
        for s in (PG, MAILDIR, DJANGO_MAILER)
        if s != DJANGO_MAILER or env.django_mailer
        for p in (1, 4)
    ]
    env.results.scenario_info[scenario] = _drain_info(n, runs, relay)
    _drain(env, scenario, relay, variants, n, runs)


def run_drain_slow(env: Env) -> None:
    if env.postgres() is None:
        return
    n = env.opts.n(1000, 200)
    runs = env.opts.r(3, 1)
    relay = AiosmtpdRelay(delay=SLOW_DELAY)
    scenario = "PostgreSQL drain, 20 ms relay"
    variants = [(_label(PG, p, 1), PG, p, 1) for p in (1, 4)]
    variants += [(_label(PG, p), PG, p, 16) for p in (1, 4)]
    variants += [(_label(MAILDIR, p, 1), MAILDIR, p, 1) for p in (1, 4)]
    if env.django_mailer:
        variants += [(_label(DJANGO_MAILER, p), DJANGO_MAILER, p, 1) for p in (1, 4)]
    env.results.scenario_info[scenario] = _drain_info(n, runs, relay)
    _drain(env, scenario, relay, variants, n, runs)


def _drain_info(n: int, runs: int, relay: Any) -> dict[str, Any]:
    return {
        "messages": n,
        "runs": runs,
        "relay": relay.description,
        "processors": "separate processes started together on the same queue",
        "mailspool": "QueueProcessor(queue).drain(); connections=N is the most SMTP "
        "connections of one processor (default 16: it starts with 1 and grows while "
        "the relay is slow)",
        DJANGO_MAILER: "mailer.engine.send_all() (as manage.py send_mail); one "
        "processor: its file lock on; four: the lock off (MAILER_USE_FILE_LOCK = "
        "False), rows taken with SELECT ... FOR UPDATE NOWAIT; Django's SMTP backend, "
        "a connection per message",
        "filled": "untimed, through the same Django backend, 100 per transaction",
    }
