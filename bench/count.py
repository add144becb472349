"""Work per message, counted in instructions, not timed.

Wall times on a shared two-core machine stray by a third from run to run;
the number of instructions a process executes does not.  This script counts
the user-space instructions mailspool executes per message, for an enqueue
(``send()`` + commit, one message per transaction) and for a drain (claim,
send to a relay, settle), with Valgrind's ``cachegrind`` (``I refs``), which
gives the same count twice for the same inputs.

Each measure runs twice, with N and 2N messages, in a fresh process under
Valgrind; the difference divided by N is the cost of one message, without
the interpreter's start-up, the imports and the set-up.  The drain is
counted twice: as it is, and with Prometheus metrics on (a
``mailspool.metrics.Metrics`` subscribed, as ``run --metrics`` has it).  The relay (Postfix's
``smtp-sink`` when installed, else an aiosmtpd sink) runs in a process of
its own and is not counted.

    python bench/count.py [--messages N]

It needs ``valgrind`` (Debian's package).  Results go in docs/benchmarks.md
("Work per message").
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from relays import AiosmtpdRelay, SmtpSink  # noqa: E402

_IREFS = re.compile(rb"I\s+refs:\s+([\d,]+)")

ENQUEUE = """
import sys, transaction
from mailspool import QueuedMailDelivery
n, spool = int(sys.argv[1]), sys.argv[2]
delivery = QueuedMailDelivery(spool)
body = b"Subject: count\\r\\n\\r\\n" + b"y" * 76 + b"\\r\\n"
for i in range(n):
    with transaction.manager:
        delivery.send("app@example.org", ["jane@example.org"], body)
"""

FILL_AND_DRAIN = """
import sys, transaction
from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
n, spool, port, mode = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
if mode == "fill":
    delivery = QueuedMailDelivery(spool)
    body = b"Subject: count\\r\\n\\r\\n" + b"y" * 76 + b"\\r\\n"
    with transaction.manager:
        for i in range(n):
            delivery.send("app@example.org", ["jane@example.org"], body)
else:
    if mode == "drain-metrics":  # as `run --metrics` counts
        from mailspool.metrics import Metrics
        Metrics()
    mailer = SMTPMailer("127.0.0.1", port, tls="none")
    with QueueProcessor(spool, mailer, connections=1, watch=False) as p:
        summary = p.process_once()
    assert summary.sent == n, summary
"""


def _irefs(code: str, *args: str) -> int:
    """Instructions executed by ``python -c code args`` under cachegrind."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
            sys.executable,
            "-c",
            code,
            *args,
        ],
        capture_output=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts each run
    )
    m = _IREFS.search(out.stderr)
    if m is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{out.stderr.decode()}")
    return int(m.group(1).replace(b",", b""))


def enqueue_per_message(n: int, tmp: str) -> float:
    counts = []
    for k in (n, 2 * n):
        spool = tempfile.mkdtemp(dir=tmp)
        counts.append(_irefs(ENQUEUE, str(k), spool))
        shutil.rmtree(spool)
    return (counts[1] - counts[0]) / n


def drain_per_message(n: int, tmp: str, port: int, mode: str = "drain") -> float:
    counts = []
    for k in (n, 2 * n):
        spool = tempfile.mkdtemp(dir=tmp)
        subprocess.run(
            [sys.executable, "-c", FILL_AND_DRAIN, str(k), spool, str(port), "fill"], check=True
        )
        counts.append(_irefs(FILL_AND_DRAIN, str(k), spool, str(port), mode))
        shutil.rmtree(spool)
    return (counts[1] - counts[0]) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/count.py", description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=200, help="N (default 200)")
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench/count.py needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    sink_path = SmtpSink.find()
    relay = SmtpSink(sink_path) if sink_path else AiosmtpdRelay()
    relay.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-count-") as tmp:
            enqueue = enqueue_per_message(a.messages, tmp)
            drain = drain_per_message(a.messages, tmp, relay.port)
            metrics = drain_per_message(a.messages, tmp, relay.port, "drain-metrics")
    finally:
        relay.stop()
    v = sys.version_info
    print(
        textwrap.dedent(
            f"""\
            Python {v.major}.{v.minor}.{v.micro}, {a.messages} and {2 * a.messages} messages,
            relay: {relay.description}
            instructions per enqueued message (send + commit, 1 per transaction): {enqueue:,.0f}
            instructions per drained message (claim, send, settle):              {drain:,.0f}
            the same with Prometheus metrics on (mailspool.metrics.Metrics):     {metrics:,.0f}
            metrics cost: {100 * (metrics / drain - 1):+.2f} %"""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
