"""mailspool's benchmarks, side by side with zope.sendmail and repoze.sendmail.

One command::

    python -m pip install -e '.[bench]' && python bench/run.py

runs every scenario several times, alternating the systems, prints a table of
medians with min-max and the ratio mailspool/peer, checks the targets
(docs/benchmarks.md lists them), and writes the same as JSON and as a PNG
plot into bench/results/.
Options: ``--quick`` (a smoke run), ``--scenario NAME`` (repeatable),
``--messages N``, ``--runs N``.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import harness  # noqa: E402
from harness import Options, Results, machine_info, write_json  # noqa: E402
from pgsystems import DEFAULT_SERVER, DJANGO_MAILER, MAILDIR, PG, find_django_mailer  # noqa: E402
from relays import SmtpSink  # noqa: E402
from scenarios import (  # noqa: E402
    Env,
    commits,
    drain,
    enqueue,
    outbox,
    pg_pickup,
    pickup,
    priority,
    realistic,
    scale,
)
from systems import MAILSPOOL, ZOPE  # noqa: E402

SCENARIOS: dict[str, tuple[str, Callable[[Env], None]]] = {
    "drain-fast": ("drain, fast relay (+ raw smtplib limit)", drain.run_fast),
    "drain-slow": ("drain, slow relay (20 ms before the final 250)", drain.run_slow),
    "drain-tls": ("drain, STARTTLS relay", drain.run_tls),
    "enqueue": ("enqueue, 1 and 100 per transaction (+ fsync floor)", enqueue.run),
    "commits": ("commits under concurrency: 1, 4, 16 threads and 4 processes", commits.run),
    "pickup": ("pickup latency and idle CPU", pickup.run),
    "scale": ("scale: 100,000 queued", scale.run),
    "priority": ("priority: urgent mail behind 100,000 bulk", priority.run),
    "drain-ratelimited": (
        f"drain, relay taking {realistic.RATE:g} messages/s (454 at MAIL for the excess)",
        realistic.run_ratelimited,
    ),
    "drain-flaky": (
        f"drain, one-off faults at every phase for 1 in {realistic.FAULT_EVERY}",
        realistic.run_flaky,
    ),
    "drain-postfix": (
        "drain, a real Postfix with its anvil rate limit (only when asked)",
        realistic.run_postfix,
    ),
    "pg-enqueue": (
        "PostgreSQL: what one mail adds to the application's transaction",
        outbox.run_enqueue,
    ),
    "pg-drain-fast": (
        "PostgreSQL: drain with 1 and 4 processors, fast relay",
        outbox.run_drain_fast,
    ),
    "pg-drain-slow": (
        "PostgreSQL: drain with 1 and 4 processors, 20 ms relay",
        outbox.run_drain_slow,
    ),
    "pg-pickup": ("PostgreSQL: pickup latency (LISTEN/NOTIFY) and idle CPU", pg_pickup.run),
}
#: The PostgreSQL queue against the Maildir spool and django-mailer
#: (``--scenario postgres`` runs them all).
POSTGRES = ("pg-enqueue", "pg-drain-fast", "pg-drain-slow", "pg-pickup")
#: Run only when named with --scenario (drain-postfix needs Postfix and
#: root; the pg-* ones a PostgreSQL server, and take ~15 min).
OPTIONAL = ("drain-postfix", *POSTGRES)


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark mailspool against zope.sendmail and repoze.sendmail.",
    )
    p.add_argument("--quick", action="store_true", help="fewer messages and runs (smoke run)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=[*sorted(SCENARIOS), "postgres"],
        help="run only this scenario (repeatable; 'postgres': every pg-* one; "
        "default: all but drain-postfix and pg-*)",
    )
    p.add_argument("--messages", type=int, help="messages per trial (default 2,000)")
    p.add_argument("--runs", type=int, help="runs per system (default: per scenario)")
    p.add_argument("--scale-messages", type=int, help="queue size for scale (default 100,000)")
    p.add_argument(
        "--scale-fill",
        choices=("commit", "fast"),
        default="commit",
        help="fill the scale queue by commits (default) or by writing the files without fsync",
    )
    p.add_argument("--tmpdir", help="where the spools go (default: the system's temp dir)")
    p.add_argument(
        "--install-sink",
        action="store_true",
        help="apt-get install postfix (for smtp-sink) when smtp-sink is missing",
    )
    p.add_argument(
        "--install-postfix",
        action="store_true",
        help="apt-get install postfix when it is missing (for drain-postfix; root only)",
    )
    p.add_argument(
        "--postgres",
        default=os.environ.get("MAILSPOOL_BENCH_POSTGRES", DEFAULT_SERVER),
        metavar="URL",
        help="PostgreSQL server for pg-* (a user allowed to create databases; the bench "
        "makes a scratch database there and drops it; default: $MAILSPOOL_BENCH_POSTGRES "
        f"or {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--install-django-mailer",
        action="store_true",
        help="pip install django-mailer when it is missing (a peer for pg-*)",
    )
    p.add_argument(
        "--out", default=os.path.join(HERE, "results"), help="directory for JSON and PNG"
    )
    a = p.parse_args(argv)
    named: list[str] = []
    for key in a.scenario or ():
        named.extend(POSTGRES if key == "postgres" else (key,))
    return Options(
        quick=a.quick,
        scenarios=tuple(dict.fromkeys(named or (k for k in SCENARIOS if k not in OPTIONAL))),
        messages=a.messages,
        runs=a.runs,
        scale_messages=a.scale_messages,
        scale_fill=a.scale_fill,
        tmpdir=a.tmpdir,
        install_sink=a.install_sink,
        install_postfix=a.install_postfix,
        out=a.out,
        pg_server=a.postgres,
        install_django_mailer=a.install_django_mailer,
    )


def find_sink(install: bool) -> str | None:
    path = SmtpSink.find()
    if path or not install:
        return path
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("installing postfix for smtp-sink (the MTA is not started) ...")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "postfix"], check=False, env=env)
    return SmtpSink.find()


def _median(results: Results, scenario: str, metric: str, system: str) -> float | None:
    s = results.find(scenario, metric, system)
    return s.median if s is not None else None


def targets(results: Results) -> list[dict[str, Any]]:
    """The targets, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def ratio(
        name: str,
        scenario: str,
        metric: str,
        a: str,
        b: str,
        minimum: float | None,
    ) -> None:
        """``a``/``b`` against ``minimum``; with None, a figure shown for comparison."""
        ma, mb = _median(results, scenario, metric, a), _median(results, scenario, metric, b)
        if ma is None or mb is None:
            out.append({"target": name, "value": None, "met": None})
            return
        r = ma / mb
        if minimum is None:
            out.append({"target": name, "value": f"{r:.2f}x", "met": None, "info": True})
            return
        out.append({"target": name, "value": f"{r:.2f}x", "met": r >= minimum})

    def bound(name: str, scenario: str, metric: str, system: str, limit: float, unit: str) -> None:
        m = _median(results, scenario, metric, system)
        if m is None:
            out.append({"target": name, "value": None, "met": None})
            return
        out.append({"target": name, "value": f"{m:.3g} {unit}", "met": m < limit})

    fast, slow, tls = "drain, fast relay", "drain, slow relay", "drain, STARTTLS relay"
    ratio("drain fast: >= 3x zope.sendmail", fast, "throughput", MAILSPOOL, ZOPE, 3)
    ratio(
        "drain fast: >= 80% of raw smtplib",
        fast,
        "throughput",
        MAILSPOOL,
        drain.RAW,
        0.8,
    )
    ratio(
        "drain fast: metrics on cost < 5% of the CPU per message (off/on >= 0.95x)",
        fast,
        "CPU per message",
        MAILSPOOL,
        drain.METRICS,
        0.95,
    )
    ratio(
        "drain fast: throughput with metrics on, ratio to off (a comparison: the wall "
        "clock follows the machine's load)",
        fast,
        "throughput",
        drain.METRICS,
        MAILSPOOL,
        None,
    )
    ratio(
        "drain slow: >= 10x zope.sendmail (default connections)",
        slow,
        "throughput",
        MAILSPOOL,
        ZOPE,
        10,
    )
    ratio(
        "drain slow, connections=4, ratio to zope.sendmail (a comparison, not a target)",
        slow,
        "throughput",
        "mailspool (connections=4)",
        ZOPE,
        None,
    )
    ratio("drain STARTTLS: >= 5x zope.sendmail", tls, "throughput", MAILSPOOL, ZOPE, 5)
    ratio(
        "enqueue 1/tx: >= 0.8x fsync floor",
        "enqueue",
        "1 message per transaction",
        MAILSPOOL,
        enqueue.FLOOR,
        0.8,
    )
    a = _median(results, "enqueue", "100 messages per transaction", MAILSPOOL)
    b = _median(results, "enqueue", "1 message per transaction", MAILSPOOL)
    out.append(
        {
            "target": "enqueue 100/tx: clearly faster per message than 1/tx (>= 1.5x)",
            "value": f"{a / b:.2f}x" if a and b else None,
            "met": (a / b >= 1.5) if a and b else None,
        }
    )
    realistic_targets(results, out)
    commits.targets(results, out)
    postgres_targets(results, out)
    bound("pickup: median <= 20 ms", "pickup", "latency commit -> relay", MAILSPOOL, 20.0001, "ms")
    idle = next((s for s in results.series if s.metric.startswith("idle CPU")), None)
    if idle is not None:
        bound("pickup: idle CPU < 1%", "pickup", idle.metric, MAILSPOOL, 1.0, "%")
    prio = next((s.scenario for s in results.series if s.scenario.startswith("priority")), None)
    if prio:
        bound(
            "priority: urgent behind the bulk drain, median <= 1 s",
            prio,
            "urgent: commit -> sent, median",
            MAILSPOOL,
            1000.0001,
            "ms",
        )
    scale_name = next((s.scenario for s in results.series if s.scenario.startswith("scale")), None)
    if scale_name:
        bound(
            "scale: `mailspool status` < 1 s",
            scale_name,
            "`mailspool status` wall time",
            MAILSPOOL,
            1.0,
            "s",
        )
        bound(
            "scale: `mailspool list --limit 50` < 1 s",
            scale_name,
            "`mailspool list --limit 50` wall time",
            MAILSPOOL,
            1.0,
            "s",
        )
        big_n = results.scenario_info.get(scale_name, {}).get("messages", 0)
        full = _median(results, scale_name, f"commit latency p50, {big_n:,} queued", MAILSPOOL)
        empty = _median(results, scale_name, "commit latency p50, empty queue", MAILSPOOL)
        out.append(
            {
                "target": "scale: commits into the full queue no slower (p50 <= 1.2x empty)",
                "value": f"{full / empty:.2f}x" if full and empty else None,
                "met": (full / empty <= 1.2) if full and empty else None,
            }
        )
        metrics = [
            s.metric
            for s in results.series
            if s.scenario == scale_name and s.metric.startswith("drain")
        ]
        if len(metrics) == 2:
            small = _median(results, scale_name, metrics[0], MAILSPOOL)
            big = _median(results, scale_name, metrics[1], MAILSPOOL)
            out.append(
                {
                    "target": f"scale: {metrics[1]} not below the {metrics[0]} "
                    "(>= 0.95x, for noise)",
                    "value": f"{big / small:.2f}x" if big and small else None,
                    "met": (big / small >= 0.95) if big and small else None,
                }
            )
        big_n = results.scenario_info.get(scale_name, {}).get("messages", 0)
        rss = next(
            (
                s
                for s in results.series
                if s.scenario == scale_name
                and s.metric == "processor peak RSS"
                and s.system == f"{MAILSPOOL} (drain of {big_n:,})"
            ),
            None,
        )
        if rss is not None:
            m = rss.median
            out.append(
                {
                    "target": "scale: processor peak RSS < 100 MB",
                    "value": f"{m:.1f} MB" if m is not None else None,
                    "met": (m < 100) if m is not None else None,
                }
            )
    return out


def realistic_targets(results: Results, out: list[dict[str, Any]]) -> None:
    """The targets of the drains against realistic relays."""

    def check(name: str, scenario: str, metric: str, ok: Callable[[float], bool], fmt: str) -> None:
        s = results.find(scenario, metric, MAILSPOOL)
        if s is None or not s.ok:
            out.append({"target": name, "value": None, "met": None})
            return
        worst = max(s.values) if "lost" in metric else s.median
        assert worst is not None
        out.append({"target": name, "value": fmt.format(worst), "met": ok(worst)})

    limited, flaky = "drain, rate-limited relay", "drain, flaky relay"
    check(
        "drain rate-limited: >= 80% of the relay's rate sustained",
        limited,
        "sustained rate",
        lambda v: v >= 80,
        "{:.0f}%",
    )
    check(
        "drain rate-limited: refused attempts < 10% of messages",
        limited,
        "refused attempts",
        lambda v: v < 10,
        "{:.1f}%",
    )
    check(
        "drain flaky: within 2x the clean drain's time",
        flaky,
        "time, flaky / clean",
        lambda v: v <= 2,
        "{:.2f}x",
    )
    check("drain flaky: nothing lost", flaky, "lost messages", lambda v: v == 0, "{:.0f}")
    s = results.find(flaky, "duplicates", MAILSPOOL)
    if s is not None and s.ok:
        out.append(
            {
                "target": "drain flaky: duplicates (only the lost-reply window may give one)",
                "value": f"{max(s.values):.0f}",
                "met": None,
                "info": True,
            }
        )
    postfix = "drain, Postfix with its rate limit"
    for metric, unit in (("sustained rate", "% of its limit"), ("refused attempts", "% refused")):
        m = _median(results, postfix, metric, MAILSPOOL)
        if m is not None:
            out.append(
                {
                    "target": f"drain Postfix: {metric} (a comparison)",
                    "value": f"{m:.0f} {unit}",
                    "met": None,
                    "info": True,
                }
            )


def postgres_targets(results: Results, out: list[dict[str, Any]]) -> None:
    """Issue 18's targets for the PostgreSQL queue."""

    def ratio(name: str, scenario: str, a: str, b: str, minimum: float | None) -> None:
        ma = _median(results, scenario, "throughput", a)
        mb = _median(results, scenario, "throughput", b)
        if ma is None or mb is None:
            if results.find(scenario, "throughput", a) is not None:
                out.append({"target": name, "value": None, "met": None})
            return
        r = ma / mb
        met = None if minimum is None else r >= minimum
        out.append({"target": name, "value": f"{r:.2f}x", "met": met, "info": minimum is None})

    fast, slow = "PostgreSQL drain, fast relay", "PostgreSQL drain, 20 ms relay"
    pg1, pg4 = f"{PG}, 1 processor", f"{PG}, 4 processors"
    dm1 = f"{DJANGO_MAILER}, 1 processor"
    ratio("pg drain fast: >= 5x django-mailer (1 processor each)", fast, pg1, dm1, 5)
    ratio("pg drain fast: 4 processors / 1 (a comparison)", fast, pg4, pg1, None)
    ratio(
        "pg drain fast: PostgreSQL / Maildir (a comparison)",
        fast,
        pg1,
        f"{MAILDIR}, 1 processor",
        None,
    )
    ratio(
        "pg drain 20 ms: 4 processors >= 3x one (connections=1 each)",
        slow,
        f"{pg4}, connections=1",
        f"{pg1}, connections=1",
        3,
    )
    ratio(
        "pg drain 20 ms: 4 processors / 1 (default connections, a comparison)", slow, pg4, pg1, None
    )
    ratio("pg drain 20 ms: >= 5x django-mailer (1 processor each)", slow, pg1, dm1, 5)
    scenario = "PostgreSQL pickup"
    for metric, label in (
        ("latency commit -> relay", "pg pickup: median <= 20 ms"),
        ("latency commit -> relay, p90", "pg pickup: p90 (a comparison)"),
    ):
        m = _median(results, scenario, metric, PG)
        if m is not None:
            met = m <= 20 if "median" in label else None
            out.append({"target": label, "value": f"{m:.3g} ms", "met": met, "info": met is None})
    added = "enqueue in the application's transaction"
    for system in (PG, MAILDIR, DJANGO_MAILER):
        m = _median(results, added, "added by the mail", system)
        if m is not None:
            out.append(
                {
                    "target": f"pg enqueue: added to the transaction by {system} (a comparison)",
                    "value": f"{m:.3g} ms",
                    "met": None,
                    "info": True,
                }
            )


def print_targets(checks: list[dict[str, Any]], opts: Options) -> None:
    if opts.quick:
        # Too few messages for a verdict: a slow relay's drain of 200 ends
        # before the processor has grown its connections, for one.
        print("\nTargets, not judged in a --quick run (too few messages):")
    else:
        print("\nTargets:")
    only_postgres = all(k in POSTGRES for k in opts.scenarios)
    for t in checks:
        if only_postgres and t["value"] is None and not t["target"].startswith("pg "):
            continue  # another scenario's target: not run, not worth a line
        if t.get("info"):
            mark = "info  "
        elif opts.quick:
            mark = "quick "
        else:
            mark = {True: "met   ", False: "MISSED", None: "n/a   "}[t["met"]]
        value = t["value"] if t["value"] is not None else "not measured"
        print(f"  [{mark}] {t['target']}: {value}")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # the finally blocks drop the scratch database


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    sink = find_sink(opts.install_sink)
    tmp = tempfile.mkdtemp(prefix="mailspool-bench-", dir=opts.tmpdir)
    info = machine_info(tmp)
    results = Results()
    env = Env(opts=opts, results=results, tmp=tmp, sink_path=sink, pg_server=opts.pg_server)
    if any(k in POSTGRES for k in opts.scenarios):
        env.django_mailer = find_django_mailer(opts.install_django_mailer)
        info["versions"]["django-mailer"] = env.django_mailer or "not installed"
        info["versions"].update(harness.versions("Django", "psycopg"))
        if env.django_mailer is None:
            results.notes.append(
                "django-mailer is not installed: its rows are left out "
                "(run with --install-django-mailer)"
            )
    print(f"mailspool benchmarks — {info['date']}")
    print(f"  machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}")
    print(f"  spools:  {info['spool_filesystem']}")
    print(f"  load:    {' '.join(f'{x:.2f}' for x in info['load_at_start'])}")
    print("  versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    if sink:
        print(f"  fast relay: {sink}")
    else:
        print(
            "  fast relay: smtp-sink NOT FOUND -> falling back to an aiosmtpd sink "
            "(slower; install Debian's postfix package or pass --install-sink)"
        )
    started = time.monotonic()
    try:
        for key in opts.scenarios:
            title, fn = SCENARIOS[key]
            print(f"\n== {key}: {title}")
            t0 = time.monotonic()
            try:
                fn(env)
            except Exception as exc:  # a broken scenario must not hide the others
                import traceback

                traceback.print_exc()
                results.notes.append(f"{key}: scenario failed: {exc!r}")
            print(f"   ({time.monotonic() - t0:.0f} s)")
    finally:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
    info["load_at_end"] = os.getloadavg()
    loads = sorted(harness.LOAD_SAMPLES) or [0.0]
    info["load_during_trials"] = {
        "min": loads[0],
        "median": loads[len(loads) // 2],
        "max": loads[-1],
        "trials": len(harness.LOAD_SAMPLES),
    }
    info["duration_s"] = round(time.monotonic() - started, 1)

    print("\n" + results.table())
    checks = targets(results)
    print_targets(checks, opts)
    for note in results.notes:
        print(f"\nNote: {note}")
    ld = info["load_during_trials"]
    print(
        f"\n1-minute load average at the start of each trial: median {ld['median']:.2f} "
        f"(min {ld['min']:.2f}, max {ld['max']:.2f}) on {info['cores']} cores; "
        f"{info['duration_s']:.0f} s in all"
    )

    os.makedirs(opts.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = results.to_json(
        {
            "machine": info,
            "options": vars(opts) | {"scenarios": list(opts.scenarios)},
            "targets": checks,
        }
    )
    data["markdown"] = results.markdown()
    for name in (f"bench-{stamp}.json", "latest.json"):
        write_json(os.path.join(opts.out, name), data)
    png = os.path.join(opts.out, "latest.png")
    results.plot(png, f"mailspool vs zope.sendmail vs repoze.sendmail — {info['date']}")
    shutil.copyfile(png, os.path.join(opts.out, f"bench-{stamp}.png"))
    print(f"\nwrote {opts.out}/latest.json and latest.png (and bench-{stamp}.*)")
    errors = any(s.errors for s in results.series)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
