"""Prometheus metrics for mailspool (the optional extra ``mailspool[metrics]``).

Only this module imports ``prometheus_client``; nothing imports this module
unless metrics are asked for (``mailspool run --metrics``, or an
application that creates :class:`Metrics`).

How it hooks in: counters and histograms are fed by the mail events the
deliveries and the queue processor dispatch anyway (a ``zope.event``
subscriber; the processor attaches an :class:`~mailspool.events.Attempt`
to the events of each attempt); gauges are read when Prometheus scrapes,
from the spool's own counting (directory listings, no file read) and from
:func:`~mailspool.processor.observe.relay_view`, cached for a second so that several
scrapers cost one look.  Labels are classes of replies, never addresses.

In an application that already exposes a registry::

    from prometheus_client import REGISTRY
    from mailspool.metrics import Metrics

    metrics = Metrics(REGISTRY, processor=processor)  # once per process
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import zope.event
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from mailspool.events import MailEvent, MailQuarantined, MailQueued, MailSent
from mailspool.processor.observe import counts_once, relay_view
from mailspool.queue import State

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from mailspool.processor.loop import QueueProcessor

__all__ = ["Metrics", "parse_address", "serve"]

#: The states ``status`` counts, in its order.
STATE_NAMES = tuple(str(s) for s in State)
#: Commit to the relay's acceptance: from a fraction of a second to days.
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
#: One SMTP transaction, or one commit's write into the spool.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _reply_class(code: int | None) -> str:
    return "none" if code is None else f"{code // 100}xx"


class _Histogram:
    """Counts per bucket and a sum: what a Prometheus histogram exports."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: upper bound included
        self.sum += value

    def family(self, name: str, text: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
        return HistogramMetricFamily(name, text, buckets=buckets, sum_value=self.sum)


class Metrics(Collector):
    """mailspool's metrics in a registry; counts the mail events of this process.

    Args:
        registry: where to register (default: a registry of its own, in
            ``.registry``); pass ``prometheus_client.REGISTRY`` to have them
            served with the application's own.
        processor: a processor whose queue and relay gauges to export
            (also later with :meth:`watch`).
        cache: seconds a look at the spool is reused by the next scrapes.

    Counters count every processor and delivery of the process: make one
    per process.  :meth:`close` unsubscribes and unregisters.

    The counts are plain integers under one lock, turned into Prometheus
    families only when scraped: an event costs a dictionary look-up and an
    addition, not the client library's per-metric locks.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        processor: QueueProcessor | None = None,
        cache: float = 1.0,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self._lock = threading.Lock()
        self.sent = self.quarantined = self.queued = 0
        self.deferred = dict.fromkeys(("4xx", "no_reply"), 0)
        self.failed = dict.fromkeys(("5xx", "expired", "no_reply"), 0)
        self.attempts = dict.fromkeys(("2xx", "4xx", "5xx", "none"), 0)
        self.delivery = _Histogram(DELIVERY_BUCKETS)
        self.transaction = _Histogram(FAST_BUCKETS)
        self.enqueue = _Histogram(FAST_BUCKETS)
        self._gauges: list[_Gauges] = []
        self._cache = cache
        self.registry.register(self)
        zope.event.subscribers.append(self)
        if processor is not None:
            self.watch(processor)

    def __call__(self, event: object) -> None:
        """The ``zope.event`` subscriber: count one event (for every message: lean)."""
        facts = event.attempt if isinstance(event, MailEvent) else None
        if facts is None:
            if isinstance(event, MailQueued):
                with self._lock:
                    self.queued += 1
                    if event.enqueue_seconds is not None:
                        self.enqueue.observe(event.enqueue_seconds)
            elif isinstance(event, MailQuarantined):
                with self._lock:
                    self.quarantined += 1
            return
        sent = isinstance(event, MailSent)
        once = counts_once(event) is not None  # one event of each attempt counts it
        if not (sent or once):
            return
        code = facts.code
        with self._lock:
            if sent:
                self.delivery.observe(facts.since_commit)
            if not once:
                return
            cls = "none" if code is None else _CLASSES.get(code // 100) or f"{code // 100}xx"
            self.attempts[cls] = self.attempts.get(cls, 0) + 1
            if facts.smtp_seconds is not None:
                self.transaction.observe(facts.smtp_seconds)
            if facts.outcome == "sent":
                self.sent += 1
            else:
                tally = self.deferred if facts.outcome == "deferred" else self.failed
                tally[facts.reason] = tally.get(facts.reason, 0) + 1

    def collect(self) -> Iterator[Metric]:
        """The counters and histograms, as the registry asks when scraped."""
        with self._lock:
            sent, quarantined, queued = self.sent, self.quarantined, self.queued
            deferred, failed, attempts = dict(self.deferred), dict(self.failed), dict(self.attempts)
            hists = [
                h.family(name, text)
                for h, name, text in (
                    (self.delivery, "mailspool_delivery_seconds", _DELIVERY),
                    (self.transaction, "mailspool_smtp_transaction_seconds", _TRANSACTION),
                    (self.enqueue, "mailspool_enqueue_seconds", _ENQUEUE),
                )
            ]
        yield CounterMetricFamily("mailspool_messages_sent", _SENT, value=sent)
        for name, text, label, values in (
            ("mailspool_messages_deferred", _DEFERRED, "reason", deferred),
            ("mailspool_messages_failed", _FAILED, "reason", failed),
            ("mailspool_delivery_attempts", _ATTEMPTS, "reply_class", attempts),
        ):
            family = CounterMetricFamily(name, text, labels=[label])
            for key, n in values.items():
                family.add_metric([key], n)
            yield family
        yield CounterMetricFamily("mailspool_messages_quarantined", _QUARANTINED, value=quarantined)
        yield CounterMetricFamily("mailspool_messages_queued", _QUEUED, value=queued)
        yield from hists

    def watch(self, processor: QueueProcessor) -> None:
        """Export the queue and relay gauges of ``processor`` (one per :class:`Metrics`)."""
        if self._gauges:
            raise ValueError("these metrics watch a processor already")
        gauges = _Gauges(processor, self._cache)
        self.registry.register(gauges)
        self._gauges.append(gauges)

    def close(self) -> None:
        """Stop counting and take the metrics out of the registry."""
        if self in zope.event.subscribers:
            zope.event.subscribers.remove(self)
        for c in (self, *self._gauges):
            self.registry.unregister(c)
        self._gauges.clear()


_CLASSES = {2: "2xx", 4: "4xx", 5: "5xx"}
_SENT = "Messages accepted by the relay for every recipient."
_DEFERRED = "Attempts that left a message deferred, by the class of the reply."
_FAILED = "Messages failed for good, by the class of the reply (or expired)."
_ATTEMPTS = "Delivery attempts, by the class of the reply that decided them."
_QUARANTINED = "Unreadable spool files set aside."
_QUEUED = "Messages committed into the spool by this process."
_DELIVERY = "From the commit that queued a message to the relay's acceptance."
_TRANSACTION = "One SMTP transaction, MAIL FROM to the reply to the data."
_ENQUEUE = "Time a commit spent writing its messages durably into the spool."


class _Gauges(Collector):
    """The queue and relay gauges, computed when scraped."""

    def __init__(self, processor: QueueProcessor, cache: float) -> None:
        self.processor = processor
        self.cache = cache
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._spool: tuple[dict[str, int], float | None, float | None] = ({}, None, None)

    def _look(self) -> tuple[dict[str, int], float | None, float | None]:
        """(counts per state, oldest ready, oldest waiting): at most once per ``cache``."""
        with self._lock:
            if time.monotonic() - self._at >= self.cache:
                spool = self.processor.spool
                census = spool.census()  # one look at the queue per scrape
                ready, waiting = census.oldest_of(("ready",)), census.oldest_of()
                self._spool = (dict(census.counts), ready, waiting)
                self._at = time.monotonic()
            return self._spool

    def collect(self) -> Iterator[Metric]:
        counts, ready, waiting = self._look()
        now = time.time()
        depth = GaugeMetricFamily(
            "mailspool_queue_messages", "Messages in the spool, by state.", labels=["state"]
        )
        for state in STATE_NAMES:
            depth.add_metric([state], counts.get(state, 0))
        yield depth
        for name, text, t in (
            ("ready", "The oldest message ready to send (0 when none).", ready),
            ("waiting", "The oldest message not yet sent or failed (0 when none).", waiting),
        ):
            age = 0.0 if t is None else max(0.0, now - t)
            yield GaugeMetricFamily(f"mailspool_oldest_{name}_age_seconds", text, value=age)
        view = relay_view(self.processor, now)
        yield GaugeMetricFamily(
            "mailspool_relay_paused",
            "1 while deliveries wait for a failed relay.",
            value=view.paused,
        )
        yield GaugeMetricFamily(
            "mailspool_relay_failures",
            "Failed connections to the relay in a row.",
            value=view.failures,
        )
        if view.rate is not None:
            yield GaugeMetricFamily(
                "mailspool_relay_send_rate",
                "Messages per second the processor paces at now (configured or learned).",
                value=view.rate,
            )
        if view.rate_limit is not None:
            yield GaugeMetricFamily(
                "mailspool_relay_rate_limit",
                "The configured limit, messages per second.",
                value=view.rate_limit,
            )
        yield GaugeMetricFamily(
            "mailspool_relay_rate_learned",
            "1 when the sending rate was learned from the relay's 'too fast' replies.",
            value=view.rate_learned,
        )
        yield GaugeMetricFamily(
            "mailspool_relay_connections_allowed",
            "Connections to the relay the processor may use now.",
            value=view.connections,
        )
        yield GaugeMetricFamily(
            "mailspool_relay_connections_open",
            "Connections to the relay open now.",
            value=view.open_connections,
        )


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port).

    Raises:
        ValueError: not of that form, or a port outside 0-65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, like 127.0.0.1:9464, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def serve(address: str, registry: CollectorRegistry) -> Any:
    """Serve ``/metrics`` for ``registry`` on ``address`` (``HOST:PORT``) in a thread.

    Returns:
        The server; ``server.shutdown()`` then ``server.server_close()`` stop it.
        ``server.server_port`` is the port (useful with port 0).

    Raises:
        ValueError: a malformed address.
        OSError: the address cannot be listened on.
    """
    host, port = parse_address(address)
    server: WSGIServer
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
