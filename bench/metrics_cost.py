"""What metrics cost per message, against what a drain costs per message.

    python bench/metrics_cost.py [--messages 2000] [--repeats 5]

The drain row "mailspool (metrics on)" of ``run.py``'s drain-fast compares
whole drains, and on a busy machine their times (even their CPU times)
move by more than the few per cent at stake.  This measures the two
quantities separately, each as the minimum of several repeats (the
minimum is what the work costs when nothing else disturbs it):

* a drain's CPU time per message (every thread of the process), metrics
  off, to Postfix's ``smtp-sink`` (Debian: postfix);
* the time the metrics subscriber spends on the events of one message:
  the events of that drain, recorded, then fed to a ``Metrics`` (as
  ``run --metrics`` subscribes it) in a loop.

The ratio of the two is the share of a message's work that metrics add.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import transaction
import zope.event

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer  # noqa: E402
from mailspool.metrics import Metrics  # noqa: E402
from relays import SmtpSink  # noqa: E402


def fill(path: str, n: int) -> None:
    delivery = QueuedMailDelivery(path)
    for start in range(0, n, 100):
        with transaction.manager:
            for i in range(start, min(n, start + 100)):
                delivery.send("app@example.org", ["jane@example.org"], f"Subject: {i}\n\nhi\n")


def drain_cpu(path: str, port: int, n: int, events: list[object]) -> float:
    """CPU seconds per message of one drain; its events appended to ``events``."""
    processor = QueueProcessor(path, SMTPMailer(host="127.0.0.1", port=port, tls="none"))
    zope.event.subscribers.append(events.append)
    try:
        cpu = time.process_time()
        summary = processor.drain()
        cpu = time.process_time() - cpu
    finally:
        zope.event.subscribers.remove(events.append)
        processor.stop()
    if summary.sent != n:
        raise SystemExit(f"drain sent {summary.sent} of {n}")
    return cpu / n


def subscriber_cost(events: list[object], n: int, repeats: int) -> float:
    """Seconds the metrics subscriber spends on one message's events (minimum of repeats)."""
    best = float("inf")
    for _ in range(repeats):
        metrics = Metrics()
        zope.event.subscribers.remove(metrics)  # fed directly below
        t = time.perf_counter()
        for event in events:
            metrics(event)
        best = min(best, (time.perf_counter() - t) / n)
        metrics.close()
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    binary = SmtpSink.find()
    if binary is None:
        print("needs smtp-sink (Debian: postfix)", file=sys.stderr)
        return 2
    sink = SmtpSink(binary)
    sink.start()
    n = a.messages
    cpu: list[float] = []
    events: list[object] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(a.repeats):
                path = os.path.join(tmp, f"spool{k}")
                fill(path, n)
                recorded: list[object] = []
                cpu.append(drain_cpu(path, sink.port, n, recorded))
                events = recorded
    finally:
        sink.stop()
    per_message = min(cpu)
    cost = subscriber_cost(events, n, a.repeats * 4)
    print(f"drain, metrics off: {per_message * 1e6:.1f} µs of CPU per message (min of {a.repeats})")
    print(f"metrics subscriber: {cost * 1e6:.2f} µs per message ({len(events) / n:g} events each)")
    print(f"metrics cost: {100 * cost / per_message:.2f} % of a message's work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
