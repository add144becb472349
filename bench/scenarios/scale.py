"""Scale: a queue of 100,000 messages (mailspool only).

* fill: ``QueuedMailDelivery``, 100 messages per transaction, in one process
  (reported as a figure of its own: enqueue throughput with a big queue);
  with ``--scale-fill fast``, the files are written as a commit writes them
  but without fsync (:mod:`fastfill`): how a million is filled in minutes;
* ``mailspool status`` and ``mailspool list --limit 50`` on the full queue:
  wall time of the whole command, interpreter start-up included, as an
  operator would run it (3 times each);
* commits into the full queue: 200 ``QueuedMailDelivery`` commits of one
  message each, their median latency next to the same into an empty queue
  (filling the spool must not slow the next commits); they are drained
  with the rest;
* drain: a fresh process runs ``QueueProcessor(...).drain()`` to the fast
  relay; throughput, and the process's peak RSS (``ru_maxrss``) next to its
  RSS before the drain started.

The same drain of 2,000 messages runs five times under the same conditions,
two before the big drain and three after, for the "not below the throughput
at 2,000" comparison with their median.  During the big drain the relay's
count is sampled to show the rate over each fifth of the queue.  The peers
are not run at this size: they have no status command, and each would need
minutes.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from fastfill import fast_fill
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
    from mailspool.processor.loop import QueueProcessor

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


def fast_fill_trial(path: str, n: int, tag: str) -> dict[str, Any]:
    elapsed = fast_fill(path, n, tag)
    queued = pending(MAILSPOOL, path)
    if queued != n:
        raise TrialError(f"{queued} messages queued, {n} expected")
    return {"elapsed": elapsed}


def commit_trial(path: str, n: int, tag: str) -> dict[str, Any]:
    """``n`` commits of one message each (QueuedMailDelivery): their latencies, sorted."""
    import transaction

    from mailspool import QueuedMailDelivery

    delivery = QueuedMailDelivery(path)
    latencies = []
    for sender, rcpts, data in make_messages(n, tag):
        t0 = time.perf_counter()
        with transaction.manager:
            delivery.send(sender, rcpts, data)
        latencies.append(time.perf_counter() - t0)
    return {"latencies": sorted(latencies)}


def status_command(path: str, *verb: str) -> list[str]:
    """The operator's command for the queue's state (or ``verb``)."""
    exe = shutil.which("mailspool")
    base = [exe] if exe else [sys.executable, "-m", "mailspool"]
    return [*base, "--queue", path, *(verb or ("status",))]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _time_status(path: str, *verb: str) -> tuple[float, str]:
    cmd = status_command(path, *verb)
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    elapsed = time.perf_counter() - t0
    # The CPU time beside the wall time: on a loaded machine the wall time
    # is mostly waiting for a core.
    print(f"    ({' '.join(verb) or 'status'}: {_children_cpu() - c0:.2f} s of CPU)")
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
    fast = opts.scale_fill == "fast"
    fill_name = "fill (files written, no fsync)" if fast else "fill (100/transaction)"
    fill = res.get(scenario, fill_name, MAILSPOOL, "messages/s", "higher")
    status = res.get(scenario, "`mailspool status` wall time", MAILSPOOL, "s", "lower")
    listing = res.get(scenario, "`mailspool list --limit 50` wall time", MAILSPOOL, "s", "lower")
    c_empty = res.get(scenario, "commit latency p50, empty queue", MAILSPOOL, "ms", "lower")
    c_full = res.get(scenario, f"commit latency p50, {big:,} queued", MAILSPOOL, "ms", "lower")
    d_small = res.get(scenario, f"drain throughput at {small:,}", MAILSPOOL, "messages/s", "higher")
    d_big = res.get(scenario, f"drain throughput at {big:,}", MAILSPOOL, "messages/s", "higher")
    rss = res.get(scenario, "processor peak RSS", f"{MAILSPOOL} (drain of {big:,})", "MB", "lower")
    rss_small = res.get(
        scenario, "processor peak RSS", f"{MAILSPOOL} (drain of {small:,})", "MB", "lower"
    )
    relay = env.fast_relay()
    # One drain of 2,000 takes a fifth of a second, so a single one is mostly
    # noise: the machine's speed drifts by 20 % within minutes.  Several
    # small drains run around the big one, and the target compares the big
    # drain with their median.
    smalls = 2 if opts.quick else 5
    order = [small] * (smalls // 2) + [big] + [small] * (smalls - smalls // 2)
    with running(relay):
        for n in order:
            series, rss_series = (d_big, rss) if n == big else (d_small, rss_small)
            path = env.spool("scale")
            try:
                extra = 0
                if n == big:
                    _commit_runs(env, scenario, c_empty, env.spool("commits"), "empty")
                trial = fast_fill_trial if fast else fill_trial
                out = run_child(trial, 7200, path=path, n=n, tag=env.tag())
                if n == big:
                    fill.values.append(n / out["elapsed"])
                    print(f"  {scenario} / fill: {n / out['elapsed']:,.0f} messages/s")
                    _status_runs(env, scenario, status, path)
                    _status_runs(env, scenario, listing, path, "list", "--limit", "50")
                    extra = _commit_runs(env, scenario, c_full, path, f"{big}")
                # A backlog builds up over hours, not in the seconds before
                # the drain: let the file system write out the fill first,
                # for either size alike.
                os.sync()
                relay.reset()
                with _Watch(relay) as watch:
                    out = run_child(drain_only_trial, 3600, path=path, port=relay.port)
                    check_relay(relay, n + extra, timeout=30)  # until the relay counted all
            except TrialError as exc:
                series.errors.append(str(exc))
                rss_series.errors.append(str(exc))
                print(f"  {scenario} / drain of {n:,}: ERROR {str(exc).splitlines()[0]}")
                continue
            finally:
                env.cleanup(path)
            rate = (n + extra) / out["elapsed"]
            series.values.append(rate)
            rss_series.values.append(out["maxrss_kb"] / 1024)
            info = res.scenario_info[scenario]
            info[f"rss_before_drain_of_{n}_MB"] = out["rss_before_kb"] / 1024
            peak, before = out["maxrss_kb"] / 1024, out["rss_before_kb"] / 1024
            print(
                f"  {scenario} / drain of {n:,}: {rate:,.0f} messages/s, "
                f"peak RSS {peak:.1f} MB (before the drain {before:.1f} MB)"
            )
            if n == big:
                parts = watch.fifths(n)
                if parts:
                    info["drain_rate_by_fifth"] = parts
                    shown = ", ".join(f"{r:,.0f}" for r in parts)
                    print(f"  {scenario} / drain of {n:,} by fifths: {shown} messages/s")


def _status_runs(env: Env, scenario: str, status: Any, path: str, *verb: str) -> None:
    res = env.results
    name = " ".join(verb) or "status"
    for i in range(3):
        try:
            seconds, text = _time_status(path, *verb)
        except (TrialError, subprocess.SubprocessError, OSError) as exc:
            status.errors.append(str(exc))
            print(f"  {scenario} / {name}: ERROR {exc}")
            return
        status.values.append(seconds)
        if i == 0:
            res.scenario_info[scenario][f"{name}_output"] = text[:2000]
        print(f"  {scenario} / {name}: {seconds:.3f} s")


def _commit_runs(env: Env, scenario: str, series: Any, path: str, label: str) -> int:
    """Commits into the spool at ``path``: their median latency; how many were committed."""
    n = 200
    try:
        out = run_child(commit_trial, 600, path=path, n=n, tag=env.tag())
    except TrialError as exc:
        series.errors.append(str(exc))
        print(f"  {scenario} / commits {label}: ERROR {exc}")
        return 0
    lat = out["latencies"]
    p50, p99 = lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.99)] * 1000
    series.values.append(p50)
    env.results.scenario_info[scenario][f"commit_p99_ms_{label}"] = p99
    print(f"  {scenario} / commits {label}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    return n


class _Watch:
    """Samples the relay's count every 50 ms while a drain runs.

    Shows whether the rate falls as the drain goes on: the throughput over
    each fifth of the queue, from the time the relay counted the first
    message of that fifth to the time it counted the last.
    """

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.perf_counter(), self.relay.count()))
            if self._stop.wait(0.05):
                return

    def _time_at(self, count: float) -> float | None:
        """When the relay's count reached ``count`` (interpolated)."""
        for (t0, c0), (t1, c1) in zip(self.samples, self.samples[1:], strict=False):
            if c0 <= count <= c1 and c1 > c0:
                return t0 + (t1 - t0) * (count - c0) / (c1 - c0)
        return None

    def fifths(self, n: int) -> list[float]:
        rates: list[float] = []
        for k in range(5):
            a, b = self._time_at(n * k / 5), self._time_at(n * (k + 1) / 5)
            if a is None or b is None or b <= a:
                return []
            rates.append(n / 5 / (b - a))
        return rates
