"""Commits under concurrency: many threads (or processes) each committing one message.

A web application commits from many threads at once, and each commit that
sends mail waits in the request path until its message is durable.  Each
trial, in a fresh process, starts T threads (or P processes) that each
commit M transactions of one 2 KB message with the system's queued
delivery, and records every commit's latency.  Reported: commits per second,
and the median and 99th percentile of a commit's latency.

zope.sendmail and repoze.sendmail never fsync, so their rows are shown for
reference only: they do not make a message durable before the commit
returns.  So is the row *mailspool (fsync off: the ceiling)*: the same code
with ``os.fsync`` made a no-op in the trial's process, which no setting of
mailspool offers.  It shows what is left when the disk costs nothing: the
interpreter, its lock, and the other system calls.  Each trial also
reports the CPU time (user + system, all threads and processes) per commit.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import statistics
import threading
import time
from typing import Any

from harness import TrialError, rotate, run_child
from scenarios import Env
from systems import MAILSPOOL, REPOZE, ZOPE, Runner, make_messages, pending

__all__ = ["commit_trial", "run", "targets"]

NAME = "commits"
#: mailspool with fsync made a no-op: a reference, not a mode it offers.
CEILING = f"{MAILSPOOL} (fsync off: the ceiling)"
BODY_LINE = b"y" * 76 + b"\r\n"


def _two_kb(messages: list[tuple[str, list[str], bytes]]) -> list[tuple[str, list[str], bytes]]:
    return [(f, t, d.rstrip(b"\r\n") + b"\r\n" + BODY_LINE * 26) for f, t, d in messages]


def _commit_loop(system: str, path: str, inputs: list[Any]) -> list[float]:
    """Commit ``inputs`` one per transaction; each commit's latency, seconds."""
    import transaction

    runner = Runner(system, path, 0)
    send = runner.delivery().send
    manager = transaction.manager  # thread-local: one transaction per thread
    latencies = []
    for fromaddr, toaddrs, message in inputs:
        t0 = time.perf_counter()
        with manager:
            send(fromaddr, toaddrs, message)
        latencies.append(time.perf_counter() - t0)
    return latencies


def _process_main(system: str, path: str, inputs: list[Any], out: Any) -> None:
    out.send(_commit_loop(system, path, inputs))
    out.close()


def _no_fsync(fd: int) -> None:
    """The ceiling row's ``os.fsync``: nothing reaches the disk."""


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def commit_trial(
    system: str, path: str, workers: int, each: int, processes: bool, tag: str, fsync: bool = True
) -> dict[str, Any]:
    if not fsync:
        os.fsync = _no_fsync  # this trial's own process (and its forks) only
    runner = Runner(system, path, 0)
    runner.delivery()  # creates the spool, untimed
    shares = [runner.inputs(_two_kb(make_messages(each, f"{tag}w{w}"))) for w in range(workers)]
    latencies: list[float] = []
    cpu0 = _cpu()
    t0 = time.perf_counter()
    if processes:
        ctx = multiprocessing.get_context("fork")
        pipes, procs = [], []
        for share in shares:
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_process_main, args=(system, path, share, send))
            p.start()
            send.close()
            pipes.append(recv)
            procs.append(p)
        for recv in pipes:
            latencies.extend(recv.recv())
        for p in procs:
            p.join()
    else:
        lock = threading.Lock()

        def work(share: list[Any]) -> None:
            mine = _commit_loop(system, path, share)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=work, args=(s,)) for s in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    queued = pending(system, path)
    if queued != workers * each or len(latencies) != workers * each:
        raise TrialError(f"{queued} messages in the spool, {workers * each} were committed")
    latencies.sort()
    return {
        "rate": len(latencies) / elapsed,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "cpu": cpu / len(latencies),
    }


def run(env: Env) -> None:
    opts = env.opts
    total = opts.n(1600, 320)
    runs = opts.r(3, 1)
    scenario = NAME
    env.results.scenario_info[scenario] = {
        "messages": total,
        "runs": runs,
        "message": "2 KB, one per transaction",
        "durability": "mailspool fsyncs file and directory before the commit returns; "
        "zope.sendmail and repoze.sendmail never fsync (reference only), nor does "
        f"{CEILING!r} (mailspool with os.fsync a no-op: what is left without the disk)",
    }
    variants = [
        (MAILSPOOL, MAILSPOOL),
        (CEILING, MAILSPOOL),
        (f"{ZOPE} (no fsync)", ZOPE),
        (f"{REPOZE} (no fsync)", REPOZE),
    ]
    shapes = [(1, False), (4, False), (16, False), (4, True)]
    for workers, processes in shapes:
        what = f"{workers} {'processes' if processes else 'thread' + ('s' if workers > 1 else '')}"
        series = {
            label: tuple(
                env.results.get(scenario, f"{what}: {m}", label, unit, better,
                                primary=(label == MAILSPOOL and m == "commits/s"))
                for m, unit, better in (
                    ("commits/s", "commits/s", "higher"),
                    ("p50 latency", "ms", "lower"),
                    ("p99 latency", "ms", "lower"),
                    ("CPU per commit", "µs", "lower"),
                )
            )
            for label, _ in variants
        }  # fmt: skip
        for r in range(runs):
            for label, system in rotate(variants, r):
                _trial(env, scenario, what, label, system, series[label], workers, processes, total)


def _trial(
    env: Env,
    scenario: str,
    what: str,
    label: str,
    system: str,
    series: tuple[Any, ...],
    workers: int,
    processes: bool,
    total: int,
) -> None:
    rate, p50, p99, cpu = series
    if rate.errors:
        return
    path = env.spool(system)
    try:
        out = run_child(
            commit_trial,
            600,
            system=system,
            path=path,
            workers=workers,
            each=total // workers,
            processes=processes,
            tag=env.tag(),
            fsync=label != CEILING,
        )
    except TrialError as exc:
        rate.errors.append(str(exc))
        print(f"  {scenario} / {what} / {label}: ERROR {str(exc).splitlines()[0]}")
        return
    finally:
        env.cleanup(path)
    rate.values.append(out["rate"])
    p50.values.append(out["p50"] * 1e3)
    p99.values.append(out["p99"] * 1e3)
    cpu.values.append(out["cpu"] * 1e6)
    print(
        f"  {scenario} / {what} / {label}: {out['rate']:,.0f} commits/s, "
        f"p50 {out['p50'] * 1e3:.2f} ms, p99 {out['p99'] * 1e3:.2f} ms, "
        f"CPU {out['cpu'] * 1e6:.0f} µs per commit"
    )


def targets(results: Any, out: list[dict[str, Any]]) -> None:
    """Issue 20's latency target, and the room left under the no-fsync ceiling."""

    def median(metric: str, system: str) -> float | None:
        s = results.find(NAME, metric, system)
        return s.median if s is not None else None

    single = median("1 thread: p99 latency", MAILSPOOL)
    for what in ("16 threads", "4 processes"):
        p99 = median(f"{what}: p99 latency", MAILSPOOL)
        row: dict[str, Any] = {"target": f"commits, {what}: p99 <= 3x the p99 of 1 thread"}
        if p99 is not None and single is not None:
            row.update(value=f"{p99 / single:.2f}x", met=p99 <= 3 * single)
        else:
            row.update(value=None, met=None)
        out.append(row)
        rate = median(f"{what}: commits/s", MAILSPOOL)
        ceiling = median(f"{what}: commits/s", CEILING)
        out.append(
            {
                "target": f"commits, {what}: the fsync-off ceiling over mailspool "
                "(the most any fsync scheme could gain; a comparison)",
                "value": f"{ceiling / rate:.2f}x" if rate and ceiling else None,
                "met": None,
                "info": True,
            }
        )
