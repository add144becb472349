"""What the queue processor lets an operator see: facts, counts, relay state.

Nothing here needs a third-party package; :mod:`mailspool.metrics` (which
needs ``prometheus_client``), the JSON log format (:mod:`mailspool.jsonlog`)
and ``status --watch`` (:mod:`mailspool.cli.observe`) build on it.

* :func:`~mailspool.processor.facts.attempt_facts` (a module of its own,
  which the sender imports) turns one settled attempt into an
  :class:`~mailspool.events.Attempt`: the address-free facts the processor
  attaches to the attempt's events and to its log record.
* :func:`relay_view` says what a processor knows of its relay now: paused
  or not, the sending rate it paces at (configured, or learned by its
  :class:`~mailspool.processor.pacing.Pacer`), the connections it holds.
  It is the one place the metrics and the stats file read those from a
  processor.
* :class:`Tally` counts outcomes from the events, and :class:`StatsFile`
  writes them with the relay view into the spool's ``stats/`` directory
  once a second, where ``mailspool status --watch`` reads them (one small
  file per running processor, removed when it stops).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import zope.event

from mailspool.events import Attempt, MailDeferred, MailFailed, MailQuarantined, MailSent
from mailspool.message import host_name

if TYPE_CHECKING:
    from mailspool.processor.loop import QueueProcessor

__all__ = [
    "OUTCOMES",
    "RelayView",
    "StatsFile",
    "Tally",
    "counts_once",
    "read_stats",
    "relay_view",
]

log = logging.getLogger(__name__)

#: The outcomes counted, in the order they are shown.
OUTCOMES = ("sent", "deferred", "failed", "quarantined")
#: The directory in the spool where running processors write their counts.
STATS_DIR = "stats"
#: A stats file not rewritten for this many seconds belongs to a processor
#: that is gone (killed before it could remove it).
STALE_AFTER = 10.0


@dataclass(frozen=True)
class RelayView:
    """A processor's relay, as an operator sees it.

    Attributes:
        relay: ``host:port``.
        paused: deliveries are paused (the relay failed; a probe is due at
            ``paused_until``).
        paused_until: a ``time.time()`` value, 0 when not paused.
        failures: failed probes in a row.
        rate: messages per second the processor paces at now: the configured
            limit, or lower, learned from the relay's "too fast" replies
            (None: not paced).
        rate_limit: the configured limit (None: none).
        rate_learned: ``rate`` was learned from the relay.
        connections: connections it may use now.
        open_connections: connections open now.
    """

    relay: str
    paused: bool
    paused_until: float
    failures: int
    rate: float | None
    rate_limit: float | None
    rate_learned: bool
    connections: int
    open_connections: int


def relay_view(processor: QueueProcessor, now: float | None = None) -> RelayView:
    """What ``processor`` knows of its relay now (cheap: no I/O, no lock held long)."""
    now = time.time() if now is None else now
    relay = processor.relay
    paused = relay.paused(now)
    return RelayView(
        relay=processor._sender.where,
        paused=paused,
        paused_until=relay.paused_until if paused else 0.0,
        failures=relay.failures,
        rate=processor.pacer.rate,
        rate_limit=processor.rate_limit,
        rate_learned=processor.pacer.learned,
        connections=relay.parallelism(now),
        open_connections=processor.pool.open,
    )


class Tally:
    """Counts the processor's outcomes from its events while subscribed.

    Counts messages: an attempt that sent to some recipients and deferred
    others counts once, as deferred (its events carry the same
    :class:`~mailspool.events.Attempt`).
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(OUTCOMES, 0)
        self._lock = threading.Lock()

    def __call__(self, event: object) -> None:
        if isinstance(event, MailQuarantined):
            outcome = "quarantined"
        else:
            facts = counts_once(event)
            if facts is None:
                return  # not the processor's, or another event of the same attempt
            outcome = facts.outcome
        with self._lock:
            self.counts[outcome] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    @contextlib.contextmanager
    def subscribed(self) -> Iterator[Tally]:
        zope.event.subscribers.append(self)
        try:
            yield self
        finally:
            zope.event.subscribers.remove(self)


def _kind(event: object) -> str:
    """``"sent"``, ``"deferred"`` or ``"failed"``: the outcome an event tells."""
    if isinstance(event, MailSent):
        return "sent"
    return "deferred" if isinstance(event, MailDeferred) else "failed"


def counts_once(event: object) -> Attempt | None:
    """The attempt of ``event`` if this is the one event of it that tells the
    message's outcome (each attempt has exactly one such event), else None."""
    if not isinstance(event, (MailSent, MailDeferred, MailFailed)):
        return None
    facts = event.attempt
    if facts is None or _kind(event) != facts.outcome:
        return None
    return facts


class StatsFile:
    """Writes a processor's counts and relay state into ``SPOOL/stats/`` each second.

    One JSON file per process (``HOST-PID.json``), replaced atomically,
    removed by :meth:`stop`.  Losing it costs nothing but the live rates of
    ``status --watch``: it is never synced to disk.
    """

    def __init__(self, processor: QueueProcessor, interval: float = 1.0) -> None:
        self.processor = processor
        self.interval = interval
        self.tally = Tally()
        self.dir = os.path.join(processor.spool.location, STATS_DIR)
        self.path = os.path.join(self.dir, f"{host_name()}-{os.getpid()}.json")
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self) -> None:
        """Write the file now; a failure is logged once at debug level and ignored."""
        now = time.time()
        obj: dict[str, Any] = {
            "pid": os.getpid(),
            "started": self.started,
            "updated": now,
            **self.tally.snapshot(),
            "relay": asdict(relay_view(self.processor, now)),
        }
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.path, exc)

    def start(self) -> None:
        zope.event.subscribers.append(self.tally)
        self.write()
        self._thread = threading.Thread(target=self._run, name="mailspool-stats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(ValueError):
            zope.event.subscribers.remove(self.tally)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def __enter__(self) -> StatsFile:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def read_stats(spool_path: str, now: float | None = None) -> list[dict[str, Any]]:
    """The stats of the processors running on a spool now (stale files skipped)."""
    now = time.time() if now is None else now
    out: list[dict[str, Any]] = []
    d = os.path.join(spool_path, STATS_DIR)
    try:
        names = sorted(n for n in os.listdir(d) if n.endswith(".json"))
    except OSError:
        return out
    for name in names:
        try:
            with open(os.path.join(d, name), encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError):
            continue  # being replaced, or not ours
        if isinstance(obj, dict) and now - float(obj.get("updated", 0)) <= STALE_AFTER:
            out.append(obj)
    return out
