"""Pickup latency of a running processor, and the CPU it uses when idle.

Each trial, in a fresh process, starts the system's processor in the
background (mailspool: ``QueueProcessor.start()`` with the delivery's
``on_commit=processor.wake``; zope.sendmail: ``QueueProcessorThread`` polling
every 3 s; repoze.sendmail: a thread calling ``send_messages()`` every 3 s),
then commits one message at a time.  A sample is the time from the call to
``commit()`` to the moment the relay (aiosmtpd, in its own process) answered
the final dot, read from a shared CLOCK_MONOTONIC stamp.  Before each commit
the trial waits a random 0-3 s so that commits do not fall in step with a
poller.  Then, with the queue empty, the process's CPU time over 10 s of idle
is the idle cost.
"""

from __future__ import annotations

import random
import time
from typing import Any

from harness import TrialError, rotate, run_child
from relays import AiosmtpdRelay, Probe, running
from scenarios import Env, check_relay, note_bare_lf
from systems import MAILSPOOL, POLL_INTERVAL, REPOZE, ZOPE, Runner, make_messages

__all__ = ["pickup_trial", "run"]

NAME = "pickup"
NO_WAKE = "mailspool (no on_commit wake)"


def pickup_trial(
    system: str,
    path: str,
    port: int,
    probe: Probe,
    samples: int,
    idle_seconds: float,
    tag: str,
    wake: bool = True,
) -> dict[str, Any]:
    import transaction

    runner = Runner(system, path, port, wake=wake)
    runner.start()
    try:
        inputs = runner.inputs(make_messages(samples, tag))
        delivery = runner.delivery()
        rng = random.Random(tag)
        latencies = []
        for fromaddr, toaddrs, message in inputs:
            time.sleep(rng.uniform(0.0, POLL_INTERVAL))
            probe.drain_signals()
            transaction.begin()
            delivery.send(fromaddr, toaddrs, message)
            t0 = time.monotonic()
            transaction.commit()
            if not probe.arrived.acquire(True, 30.0):
                raise TrialError("a committed message did not reach the relay within 30 s")
            latencies.append(probe.last.value - t0)
        time.sleep(0.5)
        c0, w0 = time.process_time(), time.monotonic()
        time.sleep(idle_seconds)
        c1, w1 = time.process_time(), time.monotonic()
    finally:
        runner.stop()
    return {"latencies": latencies, "idle_cpu_percent": 100.0 * (c1 - c0) / (w1 - w0)}


def run(env: Env) -> None:
    opts = env.opts
    samples = 5 if opts.quick else 20
    idle = 3.0 if opts.quick else 10.0
    runs = opts.r(1, 1)
    scenario = "pickup"
    env.results.scenario_info[scenario] = {
        "samples_per_run": samples,
        "runs": runs,
        "idle_seconds": idle,
        "relay": "aiosmtpd, answers at once",
        "mailspool": "QueueProcessor(interval=3.0).start() (default connections), "
        "QueuedMailDelivery(on_commit=processor.wake)",
        NO_WAKE: "the same without on_commit: the processor notices the new file "
        "by itself (inotify on Linux, else every interval), as a separate "
        "`mailspool run` process would",
        "zope.sendmail": "QueueProcessorThread(interval=3.0).start() (its default)",
        "repoze.sendmail": "QueueProcessor.send_messages() every 3.0 s in a thread "
        "(repoze ships only a one-shot `qp` for cron: with cron every minute, "
        "expect ~30 s)",
    }
    variants = [
        (MAILSPOOL, MAILSPOOL, {}),
        (NO_WAKE, MAILSPOOL, {"wake": False}),
        (ZOPE, ZOPE, {}),
        (REPOZE, REPOZE, {}),
    ]
    systems = [label for label, _, _ in variants]
    lat = {
        s: env.results.get(
            scenario,
            "latency commit -> relay",
            s,
            "ms",
            "lower",
            primary=(s == MAILSPOOL),
        )
        for s in systems
    }
    cpu = {
        s: env.results.get(
            scenario,
            f"idle CPU over {idle:.0f} s",
            s,
            "% of one core",
            "lower",
            primary=(s == MAILSPOOL),
        )
        for s in systems
    }
    relay = AiosmtpdRelay()
    with running(relay):
        for r in range(runs):
            for system, kind, extra in rotate(variants, r):
                if lat[system].errors:
                    continue
                relay.reset()
                path = env.spool(kind)
                try:
                    out = run_child(
                        pickup_trial,
                        samples * 40 + idle + 60,
                        system=kind,
                        path=path,
                        port=relay.port,
                        probe=relay.probe,
                        samples=samples,
                        idle_seconds=idle,
                        tag=env.tag(),
                        **extra,
                    )
                    check_relay(relay, samples)
                    note_bare_lf(env, relay, scenario, system, samples)
                except TrialError as exc:
                    lat[system].errors.append(str(exc))
                    cpu[system].errors.append(str(exc))
                    print(f"  {scenario} / {system}: ERROR {str(exc).splitlines()[0]}")
                    continue
                finally:
                    env.cleanup(path)
                ms = [x * 1000 for x in out["latencies"]]
                lat[system].values.extend(ms)
                cpu[system].values.append(out["idle_cpu_percent"])
                ms.sort()
                print(
                    f"  {scenario} / {system} run {r + 1}: median "
                    f"{ms[len(ms) // 2]:.1f} ms, idle CPU {out['idle_cpu_percent']:.3f} %"
                )
