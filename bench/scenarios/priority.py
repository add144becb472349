"""Priority under backlog: urgent mail committed behind 100,000 bulk messages.

The spool is filled with bulk mail (:mod:`fastfill`), ``mailspool run``
starts draining it to the fast relay in a process of its own, and once the
drain is under way the bench commits urgent messages one at a time, each
with ``QueuedMailDelivery.send(..., priority="urgent")`` in a transaction of
its own.  The latency of one is from the return of its commit to the moment
its file is gone from the spool: the relay answered 250 and the processor
removed it (polled every millisecond).  The next is committed a quarter of a
second later.  The bulk drain must still be running when the last urgent
message has gone, or the trial is an error (it would show nothing).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from fastfill import fast_fill
from harness import TrialError, run_child
from relays import running
from scenarios import Env
from systems import MAILSPOOL, make_messages

__all__ = ["run"]

NAME = "priority"
#: Urgent messages per trial (the median of these is the figure).
URGENT = 20


def _processor(path: str, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("mailspool")
    base = [exe] if exe else [sys.executable, "-m", "mailspool"]
    cmd = [*base, "run", "--queue", path, "--host", "127.0.0.1", "--port", str(port)]
    # Its log (a line per message) goes nowhere: an unread pipe would stop it.
    return subprocess.Popen([*cmd, "--tls", "none"], stderr=subprocess.DEVNULL)


def _urgent_left(path: str) -> bool:
    for area in ("urgent", "cur", "deferred"):
        if any(n.endswith(",P=urgent") for n in os.listdir(os.path.join(path, area))):
            return True
    return False


def latency_trial(path: str, port: int, bulk: int, tag: str, urgent: int) -> dict[str, Any]:
    import transaction

    from mailspool import QueuedMailDelivery

    fill = fast_fill(path, bulk, tag, "bulk")
    proc = _processor(path, port)
    try:
        bulk_dir = os.path.join(path, "bulk")
        deadline = time.monotonic() + 60
        while len(os.listdir(bulk_dir)) > bulk - 2000:  # the drain is under way
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TrialError("the processor did not start draining")
            time.sleep(0.05)
        delivery = QueuedMailDelivery(path)  # no on_commit: the processor is elsewhere
        latencies = []
        for sender, rcpts, data in make_messages(urgent, tag + "u"):
            with transaction.manager:
                delivery.send(sender, rcpts, data, priority="urgent")
            t0 = time.perf_counter()
            while _urgent_left(path):
                if time.perf_counter() - t0 > 120:
                    raise TrialError("an urgent message waited more than 2 minutes")
                time.sleep(0.001)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.25)
        left = len(os.listdir(bulk_dir))
        if left == 0:
            raise TrialError("the bulk drain ended before the last urgent message went")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"latencies": latencies, "bulk_left": left, "fill_seconds": fill}


def run(env: Env) -> None:
    opts = env.opts
    bulk = 10_000 if opts.quick else 100_000
    urgent = 5 if opts.quick else URGENT
    scenario = f"priority ({bulk:,} bulk queued)"
    res = env.results
    res.scenario_info[scenario] = {
        "bulk": bulk,
        "urgent": urgent,
        "mailspool": "`mailspool run` draining the bulk mail; urgent commits from the bench",
    }
    lat = res.get(scenario, "urgent: commit -> sent, median", MAILSPOOL, "ms", "lower")
    worst = res.get(scenario, "urgent: commit -> sent, slowest", MAILSPOOL, "ms", "lower")
    relay = env.fast_relay()
    with running(relay):
        for _ in range(opts.r(1, 1)):
            path = env.spool("priority")
            relay.reset()
            try:
                out = run_child(
                    latency_trial,
                    3600,
                    path=path,
                    port=relay.port,
                    bulk=bulk,
                    tag=env.tag(),
                    urgent=urgent,
                )
            except TrialError as exc:
                lat.errors.append(str(exc))
                print(f"  {scenario}: ERROR {str(exc).splitlines()[0]}")
                continue
            finally:
                env.cleanup(path)
            ms = sorted(x * 1000 for x in out["latencies"])
            lat.values.append(ms[len(ms) // 2])
            worst.values.append(ms[-1])
            res.scenario_info[scenario]["bulk_left_at_the_end"] = out["bulk_left"]
            print(
                f"  {scenario}: urgent median {ms[len(ms) // 2]:.0f} ms, slowest {ms[-1]:.0f} ms "
                f"({out['bulk_left']:,} bulk still queued at the end)"
            )
