"""Drain a queue of N messages to a relay: fast, slow and STARTTLS relays.

Each trial, in a fresh process: the system's own delivery fills a fresh spool
(untimed, 100 messages per transaction), then the clock runs from the start
of the system's processor pass until it returns with the queue empty.  The
relay must have counted exactly N messages with N distinct Message-Ids (where
it can tell), and the spool must hold nothing; otherwise the trial is an
error.  The raw limit sends the same messages with smtplib over 4 reused
connections in 4 threads, with no spool at all.
"""

from __future__ import annotations

import multiprocessing
import os
import smtplib
import threading
import time
from typing import Any

from harness import TrialError, rotate, run_child
from relays import AiosmtpdRelay, running
from scenarios import Env, check_relay, note_bare_lf
from systems import MAILSPOOL, REPOZE, ZOPE, Runner, make_messages, pending

__all__ = ["drain_trial", "raw_trial", "run_fast", "run_slow", "run_tls"]

RAW = "raw smtplib (4 threads, no spool)"
METRICS = "mailspool (metrics on)"
TRASH = "(until trash/ is emptied)"
SLOW_DELAY = 0.020


def drain_trial(
    system: str,
    path: str,
    port: int,
    n: int,
    tag: str,
    tls_ca: str | None = None,
    connections: int | None = None,
    processes: int = 1,
    metrics: bool = False,
) -> dict[str, Any]:
    if metrics:
        # Counted as `mailspool run --metrics` counts: a subscriber to the
        # mail events, plus the queue gauges read as a scrape reads them.
        from prometheus_client import CollectorRegistry, generate_latest

        from mailspool.metrics import Metrics

        registry = CollectorRegistry()
        Metrics(registry)
        scraping = threading.Event()

        def scrape() -> None:  # once a second, as a busy Prometheus would
            while not scraping.wait(1.0):
                generate_latest(registry)

        threading.Thread(target=scrape, daemon=True).start()
    runner = Runner(system, path, port, tls_ca=tls_ca, connections=connections)
    runner.enqueue(runner.inputs(make_messages(n, tag)), per_tx=100)
    queued = pending(system, path)
    if queued != n:
        raise TrialError(f"{queued} messages queued, {n} expected")
    if processes > 1:
        elapsed, details = _drain_together(runner, processes)
    else:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        details = runner.drain()
        elapsed = time.perf_counter() - t0
        # CPU time of the whole process (every thread) per message: unlike
        # the wall clock, hardly moved by other processes on the machine.
        details["cpu_us"] = (time.process_time() - cpu0) / n * 1e6
    t0 = time.perf_counter() - elapsed
    left = pending(system, path)
    if left:
        raise TrialError(f"{left} messages left in the queue after the drain ({details})")
    out = {"elapsed": elapsed, **details}
    trash = os.path.join(path, "trash")
    if system == MAILSPOOL and os.path.isdir(trash):
        # mailspool renames finished files into trash/ and unlinks them in a
        # background thread; the peers unlink inline.  Also time the drain up
        # to the moment that work is done too.
        deadline = time.monotonic() + 120
        while not _empty(trash) and time.monotonic() < deadline:
            time.sleep(0.005)
        out["elapsed_trash"] = time.perf_counter() - t0
    return out


def _drain_in_child(
    system: str,
    path: str,
    port: int,
    tls_ca: str | None,
    connections: int | None,
    go: Any,
    ends: Any,
) -> None:
    runner = Runner(system, path, port, tls_ca=tls_ca, connections=connections)
    go.wait()
    details = runner.drain()
    ends.put((time.monotonic(), details))


def _drain_together(runner: Runner, processes: int) -> tuple[float, dict[str, Any]]:
    """Drain one spool from ``processes`` processes at once, as an operator
    running several ``mailspool run`` services on one spool would; the time
    runs from the common start until the last one is done."""
    ctx = multiprocessing.get_context("spawn")
    go, ends = ctx.Event(), ctx.Queue()
    others = [
        ctx.Process(
            target=_drain_in_child,
            args=(
                runner.system,
                runner.path,
                runner.port,
                runner.tls_ca,
                runner.connections,
                go,
                ends,
            ),
        )
        for _ in range(processes - 1)
    ]
    for proc in others:
        proc.start()
    time.sleep(1.0)  # let them import and reach go.wait()
    start = time.monotonic()
    go.set()
    mine = runner.drain()
    last = time.monotonic()
    details = [mine]
    for _ in others:
        end, theirs = ends.get(timeout=600)
        last = max(last, end)
        details.append(theirs)
    for proc in others:
        proc.join(10)
    return last - start, {"processes": details}


def _empty(directory: str) -> bool:
    with os.scandir(directory) as it:
        return next(it, None) is None


def raw_trial(port: int, n: int, tag: str, threads: int = 4) -> dict[str, Any]:
    messages = make_messages(n, tag)
    chunks = [messages[i::threads] for i in range(threads)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def work(chunk: list[tuple[str, list[str], bytes]]) -> None:
        try:
            barrier.wait()
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=60)
            for fromaddr, toaddrs, data in chunk:
                smtp.sendmail(fromaddr, toaddrs, data)
            smtp.quit()
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    barrier.wait()
    t0 = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise TrialError(f"raw smtplib failed: {errors[0]!r}")
    return {"elapsed": elapsed}


def _drain_scenario(
    env: Env,
    scenario: str,
    relay: Any,
    variants: list[tuple[str, str, dict[str, Any]]],
    n: int,
    runs: int,
    timeout: float,
) -> None:
    """Run every variant ``runs`` times in alternating order against ``relay``.

    ``variants`` are (row label, system, extra trial kwargs); system "raw"
    is the smtplib limit.
    """
    res = env.results
    for label, system, _ in variants:
        if system == MAILSPOOL:  # keep the rows together
            res.get(
                scenario, "throughput", label, "messages/s", "higher", primary=label == MAILSPOOL
            )
            res.get(scenario, "throughput", f"{label} {TRASH}", "messages/s", "higher")
    series = {
        label: res.get(
            scenario,
            "throughput",
            label,
            "messages/s",
            "higher",
            primary=(label == MAILSPOOL),
        )
        for label, _, _ in variants
    }
    relay_cpu: dict[str, list[float]] = {}
    with running(relay):
        for run in range(runs):
            for label, system, extra in rotate(variants, run):
                s = series[label]
                if s.errors:
                    continue  # one error already disqualifies the row
                relay.reset()
                path = env.spool(label.split()[0])
                cpu0 = relay.cpu_seconds()
                try:
                    if system == "raw":
                        out = run_child(raw_trial, timeout, port=relay.port, n=n, tag=env.tag())
                    else:
                        out = run_child(
                            drain_trial,
                            timeout,
                            system=system,
                            path=path,
                            port=relay.port,
                            n=n,
                            tag=env.tag(),
                            **extra,
                        )
                    check_relay(relay, n)
                    note_bare_lf(env, relay, scenario, label, n)
                except TrialError as exc:
                    s.errors.append(str(exc))
                    print(f"  {scenario} / {label}: ERROR {str(exc).splitlines()[0]}")
                    continue
                finally:
                    env.cleanup(path)
                rate = n / out["elapsed"]
                s.values.append(rate)
                if "cpu_us" in out and system == MAILSPOOL:
                    res.get(
                        scenario,
                        "CPU per message",
                        label,
                        "µs",
                        "lower",
                        primary=label == MAILSPOOL,
                    ).values.append(out["cpu_us"])
                if "elapsed_trash" in out:
                    t = res.get(scenario, "throughput", f"{label} {TRASH}", "messages/s", "higher")
                    t.values.append(n / out["elapsed_trash"])
                busy = 100 * (relay.cpu_seconds() - cpu0) / out["elapsed"]
                relay_cpu.setdefault(label, []).append(round(busy, 1))
                print(
                    f"  {scenario} / {label} run {run + 1}: {rate:,.0f} messages/s "
                    f"(relay CPU {busy:.0f}% of a core)"
                )
        env.results.scenario_info[scenario]["relay_cpu_percent_during_drain"] = relay_cpu


def run_fast(env: Env) -> None:
    opts = env.opts
    n = opts.n(2000, 300)
    runs = opts.r(5, 2)
    relay = env.fast_relay()
    env.results.scenario_info["drain, fast relay"] = {
        "messages": n,
        "runs": runs,
        "relay": relay.description,
        "mailspool": "QueueProcessor() (default: starts with 1 connection, grows up "
        "to 16 while the relay is slow), and two such processors in two processes "
        "on the same spool; SMTPMailer(tls='none')",
        "peers": "one pass of their processor, new connection per message",
    }
    if not env.sink_path:
        env.results.notes.append(
            "drain, fast relay: smtp-sink not found (install Debian's postfix package, "
            "or run with --install-sink); an aiosmtpd sink was used instead, which is "
            "itself CPU-bound, so every figure in this scenario is capped by the sink."
        )
    variants = [
        (MAILSPOOL, MAILSPOOL, {}),
        (METRICS, MAILSPOOL, {"metrics": True}),
        ("mailspool (2 processes)", MAILSPOOL, {"processes": 2}),
        (ZOPE, ZOPE, {}),
        (REPOZE, REPOZE, {}),
        (RAW, "raw", {}),
    ]
    _drain_scenario(env, "drain, fast relay", relay, variants, n, runs, timeout=600)


def run_slow(env: Env) -> None:
    opts = env.opts
    n = opts.n(2000, 200)
    runs = opts.r(3, 1)
    relay = AiosmtpdRelay(delay=SLOW_DELAY)
    env.results.scenario_info["drain, slow relay"] = {
        "messages": n,
        "runs": runs,
        "relay": relay.description,
        "mailspool": "QueueProcessor() (default: starts with 1 connection, grows "
        "to 16 while the relay is slow) and at most connections=4",
    }
    variants = [
        (MAILSPOOL, MAILSPOOL, {}),
        ("mailspool (connections=4)", MAILSPOOL, {"connections": 4}),
        (ZOPE, ZOPE, {}),
        (REPOZE, REPOZE, {}),
    ]
    _drain_scenario(env, "drain, slow relay", relay, variants, n, runs, timeout=900)


def run_tls(env: Env) -> None:
    opts = env.opts
    n = opts.n(2000, 200)
    runs = opts.r(3, 2)
    tls = env.tls_files()
    relay = AiosmtpdRelay(tls=tls)
    env.results.scenario_info["drain, STARTTLS relay"] = {
        "messages": n,
        "runs": runs,
        "relay": relay.description,
        "mailspool": "SMTPMailer(tls='starttls', ca_file=<trustme CA>): certificate "
        "and host name verified; QueueProcessor() (default connections)",
        "peers": "SMTPMailer(force_tls=True): STARTTLS with smtplib's default, "
        "unverified context (neither can verify a certificate); one TLS handshake "
        "per message",
    }
    variants = [
        (MAILSPOOL, MAILSPOOL, {"tls_ca": tls["ca"]}),
        (ZOPE, ZOPE, {"tls_ca": tls["ca"]}),
        (REPOZE, REPOZE, {"tls_ca": tls["ca"]}),
    ]
    _drain_scenario(env, "drain, STARTTLS relay", relay, variants, n, runs, timeout=900)
