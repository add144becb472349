"""Scale: a queue of 100,000 messages (mailspool only).

* fill: ``QueuedMailDelivery``, 100 messages per transaction, in one process
  (reported as a figure of its own: enqueue throughput with a big queue);
* ``mailspool status`` on the full queue: wall time of the whole command,
  interpreter start-up included, as an operator would run it (3 times);
* drain: a fresh process runs ``QueueProcessor(...).drain()`` to the fast
  relay; throughput, and the process's peak RSS (``ru_maxrss``) next to its
  RSS before the drain started.

The same drain of 2,000 messages runs first, under the same conditions, for
the "not below the throughput at 2,000" comparison.  The peers are not run at
this size: they have no status command, and each would need minutes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from typing import Any

from harness import TrialError, run_child
from relays import running
from scenarios import Env, check_relay
from systems import MAILSPOOL, Runner, make_messages, pending

__all__ = ["drain_only_trial", "fill_trial", "run", "status_command"]

NAME = "scale"


def fill_trial(path: str, n: int, tag: str, per_tx: int = 100) -> dict[str, Any]:
    runner = Runner(MAILSPOOL, path, 0)
    runner.delivery()
    t0 = time.perf_counter()
    for start in range(0, n, per_tx):
        batch = make_messages(min(per_tx, n - start), tag, start=start)
        runner.enqueue(batch, per_tx)
    elapsed = time.perf_counter() - t0
    queued = pending(MAILSPOOL, path)
    if queued != n:
        raise TrialError(f"{queued} messages queued, {n} expected")
    return {"elapsed": elapsed}


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def drain_only_trial(path: str, port: int, connections: int | None = None) -> dict[str, Any]:
    from mailspool import SMTPMailer
    from mailspool.processor import QueueProcessor

    kw = {} if connections is None else {"connections": connections}
    processor = QueueProcessor(path, SMTPMailer("127.0.0.1", port, tls="none"), **kw)
    before = _rss_kb()
    t0 = time.perf_counter()
    summary = processor.drain()
    elapsed = time.perf_counter() - t0
    left = pending(MAILSPOOL, path)
    if left:
        raise TrialError(f"{left} messages left in the queue after the drain ({summary!r})")
    return {"elapsed": elapsed, "rss_before_kb": before, "summary": repr(summary)}


def status_command(path: str) -> list[str]:
    """The operator's command for the queue's state."""
    exe = shutil.which("mailspool")
    base = [exe] if exe else [sys.executable, "-m", "mailspool"]
    return [*base, "--queue", path, "status"]


def _time_status(path: str) -> tuple[float, str]:
    cmd = status_command(path)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise TrialError(f"`{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return elapsed, proc.stdout


def run(env: Env) -> None:
    opts = env.opts
    big = opts.scale_messages or (5000 if opts.quick else 100_000)
    small = 2000 if not opts.quick else 500
    scenario = f"scale ({big:,} queued)"
    res = env.results
    res.scenario_info[scenario] = {
        "messages": big,
        "baseline": small,
        "status_command": " ".join(status_command("SPOOL")),
        "mailspool": "QueueProcessor().drain() (default connections) in a fresh process",
    }
    fill = res.get(scenario, "fill (100/transaction)", MAILSPOOL, "messages/s", "higher")
    status = res.get(scenario, "`mailspool status` wall time", MAILSPOOL, "s", "lower")
    d_small = res.get(scenario, f"drain throughput at {small:,}", MAILSPOOL, "messages/s", "higher")
    d_big = res.get(scenario, f"drain throughput at {big:,}", MAILSPOOL, "messages/s", "higher")
    rss = res.get(scenario, "processor peak RSS", f"{MAILSPOOL} (drain of {big:,})", "MB", "lower")
    rss_small = res.get(
        scenario, "processor peak RSS", f"{MAILSPOOL} (drain of {small:,})", "MB", "lower"
    )
    relay = env.fast_relay()
    with running(relay):
        for n, series, rss_series in ((small, d_small, rss_small), (big, d_big, rss)):
            path = env.spool("scale")
            try:
                out = run_child(fill_trial, 3600, path=path, n=n, tag=env.tag())
                if n == big:
                    fill.values.append(n / out["elapsed"])
                    print(f"  {scenario} / fill: {n / out['elapsed']:,.0f} messages/s")
                    for i in range(3):
                        try:
                            seconds, text = _time_status(path)
                        except (TrialError, subprocess.SubprocessError, OSError) as exc:
                            status.errors.append(str(exc))
                            print(f"  {scenario} / status: ERROR {exc}")
                            break
                        status.values.append(seconds)
                        if i == 0:
                            res.scenario_info[scenario]["status_output"] = text[:2000]
                        print(f"  {scenario} / status: {seconds:.3f} s")
                relay.reset()
                out = run_child(drain_only_trial, 3600, path=path, port=relay.port)
                check_relay(relay, n, timeout=30)
            except TrialError as exc:
                series.errors.append(str(exc))
                rss_series.errors.append(str(exc))
                print(f"  {scenario} / drain of {n:,}: ERROR {str(exc).splitlines()[0]}")
                continue
            finally:
                env.cleanup(path)
            rate = n / out["elapsed"]
            series.values.append(rate)
            rss_series.values.append(out["maxrss_kb"] / 1024)
            res.scenario_info[scenario][f"rss_before_drain_of_{n}_MB"] = out["rss_before_kb"] / 1024
            peak, before = out["maxrss_kb"] / 1024, out["rss_before_kb"] / 1024
            print(
                f"  {scenario} / drain of {n:,}: {rate:,.0f} messages/s, "
                f"peak RSS {peak:.1f} MB (before the drain {before:.1f} MB)"
            )
