"""What the command shows of a running processor: ``--metrics`` and ``status --watch``.

``run`` and ``drain`` write their counts and relay state into the spool's
``stats/`` directory each second (:class:`~mailspool.processor.observe.StatsFile`)
and, with ``--metrics HOST:PORT``, serve Prometheus metrics
(:mod:`mailspool.metrics`, imported only then).  ``status --watch`` reads
the spool's counts and those stats files once a second: the rates per
minute are the differences of the processors' counts over the last minute
(or since the view started), so they need no history on disk.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from mailspool.cli.common import EXIT_USAGE, STATE_NAMES, age_text, fail, when
from mailspool.processor.observe import StatsFile, read_stats
from mailspool.queue import InDirectory

if TYPE_CHECKING:
    from mailspool.processor.loop import QueueProcessor
    from mailspool.queue import QueueBackend as Spool

__all__ = ["observed", "watch"]

#: Rates are counted over this many seconds.
WINDOW = 60.0
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: any terminal, over SSH too


@contextlib.contextmanager
def observed(processor: QueueProcessor, metrics: str | None) -> Iterator[None]:
    """Write the stats file, and serve metrics on ``metrics`` (``HOST:PORT``), meanwhile.

    Only a queue in a directory has a place for the stats file: for a
    PostgreSQL queue (a URL, not a path) none is written.

    Raises:
        CommandError: ``prometheus_client`` is missing, or a bad address (exit
            code 2); the address cannot be listened on (exit code 1).
    """
    with contextlib.ExitStack() as stack:
        if metrics is not None:
            stack.enter_context(_serving(processor, metrics))
        if isinstance(processor.spool, InDirectory):  # a Maildir spool
            stack.enter_context(StatsFile(processor))
        yield


@contextlib.contextmanager
def _serving(processor: QueueProcessor, address: str) -> Iterator[None]:
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector

        from mailspool.metrics import Metrics, parse_address, serve
    except ImportError:
        fail("--metrics needs prometheus_client: pip install 'mailspool[metrics]'", EXIT_USAGE)
    try:
        parse_address(address)
    except ValueError as exc:
        fail(f"--metrics: {exc}", EXIT_USAGE)
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    metrics = Metrics(registry, processor=processor)
    try:
        server = serve(address, registry)
    except OSError as exc:
        metrics.close()
        fail(f"--metrics: cannot listen on {address}: {exc.strerror or exc}")
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        metrics.close()


class _Rates:
    """Sent and deferred per minute, from the running processors' counts."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()

    def add(self, now: float, stats: list[dict[str, Any]]) -> tuple[float, float] | None:
        """Record this look; (sent, deferred) per minute, None on the first look."""
        totals = {
            f"{s.get('pid')}-{s.get('started')}": (int(s.get("sent", 0)), int(s.get("deferred", 0)))
            for s in stats
        }
        self._seen.append((now, totals))
        while len(self._seen) > 2 and now - self._seen[1][0] >= WINDOW:
            self._seen.popleft()
        then, before = self._seen[0]
        if now <= then:
            return None
        sent = deferred = 0
        for key, (s, d) in totals.items():
            s0, d0 = before.get(key, (0, 0))  # a processor started since: all of its counts
            sent, deferred = sent + max(0, s - s0), deferred + max(0, d - d0)
        per = 60.0 / (now - then)
        return sent * per, deferred * per


def _relay(stats: list[dict[str, Any]], now: float) -> str:
    if not stats:
        return "no processor running"
    views = [s.get("relay") or {} for s in stats]
    paused = [v for v in views if v.get("paused")]
    name = views[0].get("relay", "?")
    if paused:
        until = max(float(v.get("paused_until", 0)) for v in paused)
        return f"{name} PAUSED until {when(until)} (in {max(0.0, until - now):.0f}s)"
    rate = views[0].get("rate")
    learned = " learned from the relay" if views[0].get("rate_learned") else ""
    limit = f", pacing {rate:.3g}/s{learned}" if rate else ""
    conns = sum(int(v.get("open_connections", 0)) for v in views)
    return f"{name} ok ({len(stats)} processor(s), {conns} connection(s){limit})"


def _look(spool: Spool, rates: _Rates) -> dict[str, Any]:
    now = time.time()
    census = spool.census()
    counts, oldest = dict(census.counts), census.oldest_of()
    # processors write stats into a Maildir spool
    stats = read_stats(spool.path, now) if isinstance(spool, InDirectory) else []
    return {
        "now": now,
        "counts": counts,
        "oldest": None if oldest is None else max(0.0, now - oldest),
        "rates": rates.add(now, stats),
        "relay": _relay(stats, now),
    }


def _rates_text(rates: tuple[float, float] | None) -> str:
    if rates is None:
        return "sent -/min deferred -/min"
    return f"sent {rates[0]:.0f}/min deferred {rates[1]:.0f}/min"


def _line(v: dict[str, Any]) -> str:
    counts = " ".join(f"{s}={v['counts'].get(s, 0)}" for s in STATE_NAMES)
    oldest = "-" if v["oldest"] is None else age_text(v["oldest"])
    stamp = time.strftime("%H:%M:%S", time.localtime(v["now"]))
    return f"{stamp} {counts} {_rates_text(v['rates'])} oldest={oldest} relay: {v['relay']}"


def _screen(spool: Spool, v: dict[str, Any]) -> str:
    lines = [f"mailspool {spool.location}   {time.strftime('%H:%M:%S')}   (Ctrl-C to quit)", ""]
    for s in STATE_NAMES:
        lines.append(f"  {s.replace('_', ' '):<12} {v['counts'].get(s, 0):>9}")
    oldest = "none" if v["oldest"] is None else age_text(v["oldest"])
    lines += [
        "",
        f"  rates        {_rates_text(v['rates'])}",
        f"  oldest       {oldest}",
        f"  relay        {v['relay']}",
    ]
    return _CLEAR + "\n".join(lines) + "\n"


def watch(spool: Spool, *, out: IO[str] | None = None, interval: float = 1.0) -> int:
    """Show the queue live until Ctrl-C; returns 0.

    On a terminal the view is redrawn in place; otherwise one line per look.
    """
    out = sys.stdout if out is None else out
    tty = out.isatty()
    rates = _Rates()
    try:
        while True:
            v = _look(spool, rates)
            out.write(_screen(spool, v) if tty else _line(v) + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
            out.flush()
        return 0
