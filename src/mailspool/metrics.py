"""Prometheus metrics for mailspool (the optional extra ``mailspool[metrics]``).

Only this module imports ``prometheus_client``; nothing imports this module
unless metrics are asked for (``mailspool run --metrics``, or an
application that creates :class:`Metrics`).

How it hooks in: counters and histograms are fed by the mail events the
deliveries and the queue processor dispatch anyway (a ``zope.event``
subscriber; the processor attaches an :class:`~mailspool.events.Attempt`
to the events of each attempt); gauges are read when Prometheus scrapes,
from the spool's own counting (directory listings, no file read) and from
:func:`~mailspool.observe.relay_view`, cached for a second so that several
scrapers cost one look.  Labels are classes of replies, never addresses.

In an application that already exposes a registry::

    from prometheus_client import REGISTRY
    from mailspool.metrics import Metrics

    metrics = Metrics(REGISTRY, processor=processor)  # once per process
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import zope.event
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mailspool.events import MailQuarantined, MailQueued, MailSent
from mailspool.observe import counts_once, relay_view

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from mailspool.processor.loop import QueueProcessor

__all__ = ["Metrics", "parse_address", "serve"]

#: The states ``status`` counts, in its order.
STATE_NAMES = ("ready", "in_flight", "deferred", "held", "failed", "quarantined")
#: Commit to the relay's acceptance: from a fraction of a second to days.
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)
#: One SMTP transaction, or one commit's write into the spool.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def _reply_class(code: int | None) -> str:
    return "none" if code is None else f"{code // 100}xx"


class Metrics:
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
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        processor: QueueProcessor | None = None,
        cache: float = 1.0,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.sent = Counter(
            "mailspool_messages_sent",
            "Messages accepted by the relay for every recipient.",
            registry=r,
        )
        self.deferred = Counter(
            "mailspool_messages_deferred",
            "Attempts that left a message deferred, by the class of the reply.",
            ["reason"],
            registry=r,
        )
        self.failed = Counter(
            "mailspool_messages_failed",
            "Messages failed for good, by the class of the reply (or expired).",
            ["reason"],
            registry=r,
        )
        self.quarantined = Counter(
            "mailspool_messages_quarantined", "Unreadable spool files set aside.", registry=r
        )
        self.queued = Counter(
            "mailspool_messages_queued", "Messages committed into the spool.", registry=r
        )
        self.attempts = Counter(
            "mailspool_delivery_attempts",
            "Delivery attempts, by the class of the reply that decided them.",
            ["reply_class"],
            registry=r,
        )
        self.delivery = Histogram(
            "mailspool_delivery_seconds",
            "From the commit that queued a message to the relay's acceptance.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.transaction = Histogram(
            "mailspool_smtp_transaction_seconds",
            "One SMTP transaction, MAIL FROM to the reply to the data.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.enqueue = Histogram(
            "mailspool_enqueue_seconds",
            "Time a commit spent writing its messages durably into the spool.",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        for reason in ("4xx", "no_reply"):
            self.deferred.labels(reason)
        for reason in ("5xx", "expired", "no_reply"):
            self.failed.labels(reason)
        for cls in ("2xx", "4xx", "5xx", "none"):
            self.attempts.labels(cls)
        self._gauges: list[_Gauges] = []
        self._cache = cache
        zope.event.subscribers.append(self)
        if processor is not None:
            self.watch(processor)

    def __call__(self, event: object) -> None:
        """The ``zope.event`` subscriber: count one event."""
        if isinstance(event, MailQueued):
            self.queued.inc()
            if event.enqueue_seconds is not None:
                self.enqueue.observe(event.enqueue_seconds)
            return
        if isinstance(event, MailQuarantined):
            self.quarantined.inc()
            return
        if isinstance(event, MailSent) and event.attempt is not None:
            self.delivery.observe(event.attempt.since_commit)
        facts = counts_once(event)
        if facts is None:
            return
        self.attempts.labels(_reply_class(facts.code)).inc()
        if facts.smtp_seconds is not None:
            self.transaction.observe(facts.smtp_seconds)
        if facts.outcome == "sent":
            self.sent.inc()
        elif facts.outcome == "deferred":
            self.deferred.labels(facts.reason).inc()
        else:
            self.failed.labels(facts.reason).inc()

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
        for c in (
            self.sent,
            self.deferred,
            self.failed,
            self.quarantined,
            self.queued,
            self.attempts,
            self.delivery,
            self.transaction,
            self.enqueue,
            *self._gauges,
        ):
            self.registry.unregister(c)
        self._gauges.clear()


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
                ready = spool.oldest(("ready",))
                others = spool.oldest(("in_flight", "deferred", "held"))
                waiting = min((t for t in (ready, others) if t is not None), default=None)
                self._spool = (spool.counts(), ready, waiting)
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
                "mailspool_relay_rate_limit",
                "Messages per second the processor allows itself.",
                value=view.rate,
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
