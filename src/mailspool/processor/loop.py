"""The queue processor: delivers what the spool holds, nothing lost, nothing twice.

Theory of operation
-------------------
One *pass* (:meth:`QueueProcessor.process_once`) streams the ids the spool
says are due (``Spool.due``: directory entries, never the whole queue) and
hands them, one by one, to a fixed set of sender threads; never more are
in flight than the relay currently allows (:class:`~mailspool.policy.RelayState`:
one while probing a relay that failed, fewer after a 421 "too many
connections" or a "too fast"), so memory stays flat whatever the size of
the queue.  A message the relay refused for now without fault of its own
(too fast, too many connections) is queued again in the same pass, paced
(:class:`~mailspool.processor.pacing.Pacer`), and one deferred after a
one-off fault (a 4xx to ``MAIL`` or the data, a broken session) is tried
again in the same pass a moment later (quick retries,
:meth:`~mailspool.processor.sender.Sender._settle`): a pass ends only when
every due message was settled, or early while the relay is paused.  A few
ids are queued ahead of the threads, which start one only when a slot is
free: the dispatcher is then woken once per few messages, not per message.  Each
thread hands its message to the :class:`~mailspool.sender.Sender`, which
claims, sends over a pooled connection (:mod:`mailspool.processor.pool`) and
settles it per recipient, then dispatches the events, outside any
transaction of the application.

The loop (:meth:`QueueProcessor.run`, or the thread :meth:`start` makes)
repeats passes.  Between them it sleeps in a :class:`~mailspool.wakeup.Waiter`
until :meth:`wake` is called (after a commit, or by a signal handler),
inotify sees new mail, the next deferred message is due, the relay pause
ends, or ``interval`` seconds have passed (the safety net, and the only way
to see new mail where inotify is unavailable).  An idle processor therefore
sleeps in the kernel.  Signal handlers only set a flag and write one byte
to a socket: the loop stops starting messages and returns once those in
flight are settled.

When the spool is full as an outcome is written, the message is not
released (its accepted recipients would get it again): the claim is kept
and the same outcome written at the start of each pass until the spool
takes it, and nothing new is sent meanwhile (:mod:`mailspool.processor.sender` has
the details; a stop tries once more and says what may be sent again).

What the processor catches broadly, and why: the sender catches per message
(a bug there defers one message, the next is taken); here a sender thread
guards against anything the sender let through, a pass survives a spool that
cannot be listed, and the loop survives anything at all, so that no
exception ever stops the processor.

:class:`RetryPolicy` (from :mod:`mailspool.processor.policy`) and :class:`Summary`
(from :mod:`mailspool.processor.outcome`) are re-exported here, where users import them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from zope.interface import implementer

from mailspool import events
from mailspool.backends import open_queue
from mailspool.errors import QueueUnavailable
from mailspool.interfaces import IMailQueueProcessor
from mailspool.processor import relayfile
from mailspool.processor.crew import INITIAL_CONNECTIONS, Crew
from mailspool.processor.outage import Outage
from mailspool.processor.outcome import Summary
from mailspool.processor.pacing import Pacer
from mailspool.processor.passes import Pass
from mailspool.processor.policy import RelayState, RetryPolicy
from mailspool.processor.pool import ConnectionPool
from mailspool.processor.sender import Sender
from mailspool.processor.wakeup import Waiter
from mailspool.queue import QueueBackend
from mailspool.smtp.seams import Mailer

__all__ = ["QueueProcessor", "RetryPolicy", "Summary"]

log = logging.getLogger("mailspool.processor")

#: Seconds between looks for claims abandoned by a dead processor, while
#: another processor holds claims in ``cur/``.
ABANDONED_CHECK = 1.0


def _check(connections: int, interval: float, rate_limit: float | None) -> None:
    """Refuse the processor's arguments that make no sense."""
    if connections < 1:
        raise ValueError(f"connections must be at least 1, got {connections!r}")
    if not interval > 0:
        raise ValueError(f"interval must be greater than 0, got {interval!r}")
    if rate_limit is not None and not rate_limit > 0:
        raise ValueError(f"rate_limit must be greater than 0, got {rate_limit!r}")


@implementer(IMailQueueProcessor)
class QueueProcessor:
    """Delivers the spool's messages through a mailer; any number may share a spool.

    Args:
        spool: the spool directory, a PostgreSQL queue's ``postgresql://``
            URL, or any :class:`~mailspool.queue.QueueBackend` (see
            :func:`mailspool.backends.open_queue`): a
            :class:`~mailspool.maildir.spool.Spool`, a
            :class:`~mailspool.postgres.PostgresQueue` (one made with
            ``connect=False`` may be down when the processor starts: it
            waits for it, as for a database that goes away while it runs).
        mailer: an :class:`~mailspool.SMTPMailer` or anything with
            ``connect()`` returning a connection with ``send(envelope, data)``,
            ``alive`` and ``close()``; a mailer with only ``send_envelope`` or
            ``send`` works too (no connection reuse then).
        connections: at most this many sender threads and connections
            (default 16).  A processor starts with one and adds one at a
            time, up to this number, while mail waits and its threads spend
            most of each message waiting for the relay
            (:data:`~mailspool.processor.crew.WAIT_RATIO`).
        interval: seconds between looks at the spool (new mail is seen at
            once through :meth:`wake` or inotify; this is the safety net).
        retry: the :class:`RetryPolicy` (default: Postfix-like).
        rate_limit: at most this many messages per second to the relay
            (``None``: no limit).  Per processor.
        clock: the ``time.time``-like clock for retries, expiry and pauses.
        watch: use inotify (Linux) to see new mail at once.

    Raises:
        ValueError: ``connections`` below 1, a non-positive ``interval`` or
            ``rate_limit``.
    """

    def __init__(
        self,
        spool: str | os.PathLike[str] | QueueBackend,
        mailer: Mailer,
        *,
        connections: int = 16,
        interval: float = 3.0,
        retry: RetryPolicy | None = None,
        rate_limit: float | None = None,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
    ) -> None:
        _check(connections, interval, rate_limit)
        self.spool = open_queue(spool)
        self.mailer = mailer
        self.connections = connections
        self.interval = float(interval)
        self.retry = retry if retry is not None else RetryPolicy()
        self.rate_limit = rate_limit
        self.watch = watch
        #: The relay as this processor sees it: pause, probes, parallelism.
        self.relay = RelayState(self.retry, min(INITIAL_CONNECTIONS, connections))
        self.pool = ConnectionPool()
        #: The sending rate: ``rate_limit`` at most, lower while the relay
        #: says "too fast" (:class:`~mailspool.processor.pacing.Pacer`).
        self.pacer = Pacer(rate_limit)
        self._clock = clock
        self._stop_flag = False  # set by stop() and signal handlers: plain, lock-free
        self._stop_event = threading.Event()  # for sleeps that stop() must cut short
        #: Whether the queue can be reached (a database queue may be down).
        self.outage = Outage(self.spool.location)
        self._sender = Sender(
            self.spool,
            mailer,
            retry=self.retry,
            relay=self.relay,
            pool=self.pool,
            pacer=self.pacer,
            stopping=self._stopping,
            sleep=self._stop_event.wait,
            outage=self.outage,
        )
        #: Leaves what was learned about the relay where ``status`` reads it.
        self._publish = relayfile.Publisher(
            self.spool, self._sender, self.pacer, rate_limit=rate_limit, clock=clock
        )
        self._crew = Crew(
            self._sender,
            self.relay,
            connections=connections,
            blocked=self._blocked,
            stopping=self._stopping,
        )
        self._pass_lock = threading.Lock()
        self._signal: int | None = None
        self._waiter: Waiter | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<QueueProcessor {self.spool.location} -> {self._sender.where}>"

    @property
    def queuePath(self) -> str:  # the classic name
        """The spool directory."""
        return self.spool.location

    def __enter__(self) -> QueueProcessor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- passes ------------------------------------------------------------------

    def process_once(self, now: float | None = None) -> Summary:
        """Make one pass over what is due and wait until it is all settled.

        Args:
            now: the time of the pass (a ``time.time()`` value), for tests
                that drive retries and expiry; default the processor's clock.

        Outcomes that the spool could not take before (it was full) are
        written first; while some still cannot be, nothing new is sent.

        Returns:
            The counts of this pass.  Never raises for a message's sake:
            errors are logged and the message deferred.
        """
        with self._pass_lock:
            now = self._clock() if now is None else now
            p = Pass(now, self.connections)
            self._write_waiting(p)
            if not self.relay.paused(now) and not self._sender.waiting():
                self._crew.start()
                p.mark = self.outage.mark()
                try:
                    self._crew.dispatch(p, self.spool)
                except QueueUnavailable as exc:  # a database down: wait for it, quietly
                    self.outage.failed(exc)
                except Exception:  # the spool could not be listed (e.g. it was removed)
                    log.exception("spool %s: cannot list what is due", self.spool.location)
                finally:
                    self._crew.finish(p)  # with the quick retries of one-off faults
            self._publish(now)
            c = p.counts
            return Summary(
                c["sent"],
                c["deferred"],
                c["failed"],
                c["quarantined"],
                self.relay.paused(now),
                self._sender.waiting(),
                c["partly"],
            )

    def _write_waiting(self, p: Pass | None, *, stopping: bool = False) -> None:
        """Write the outcomes the spool could not take (see :mod:`mailspool.processor.sender`)."""
        try:
            if stopping:
                written = self._sender.last_chance()
            elif self._sender.waiting():
                written = self._sender.write_waiting()
            else:
                return
        except Exception:  # e.g. the spool is gone: the next pass tries again
            log.exception("spool %s: cannot write the outcomes waiting", self.spool.location)
            return
        for done in written:
            events.notify(done.events)  # never raises
            if p is not None:
                p.count(done.outcome, done.partly)

    def _blocked(self, now: float) -> bool:
        """True when nothing new may be started: stopping, relay paused, spool full,
        queue unreachable."""
        # Asked two or three times per message: no call that can be spared.
        return (
            self._stop_flag
            or self.relay.paused(now)
            or self._sender.waiting() > 0
            or self.outage.down()
        )

    def drain(self, *, progress: Callable[[Summary], None] | None = None) -> Summary:
        """Deliver everything that is due now, pass after pass, then return.

        Abandoned claims and orphans are swept first.  Stops early when the
        relay is paused (``relay_paused`` in the result) or a stop is asked.
        Unless the processor's loop is running, the connections are closed
        with QUIT before this returns, not left open until the relay's idle
        timeout (the next pass opens what it needs).

        Args:
            progress: called with the running total after each pass.

        Returns:
            The total over all passes.
        """
        self._sweep()
        total = Summary()
        while not self._stopping():
            s = self.process_once()
            total = total + s
            if progress is not None:
                progress(total)
            if s.total == 0 or s.relay_paused:
                break
        if self._waiter is None:  # not within the loop, whose passes reuse them
            self.pool.close_all()
        return total

    def _stop_threads(self, timeout: float | None = None) -> bool:
        """End the sender threads between passes and close the connections;
        try once more to write the outcomes the spool could not take.

        Returns False when a pass did not end within ``timeout``.
        """
        if self._crew.calling():
            return False  # e.g. a subscriber calling stop(): the pass waits for us
        if not self._pass_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            self._crew.stop()
            self.pool.close_all()
            self._write_waiting(None, stopping=True)
        finally:
            self._pass_lock.release()
        return True

    def _stopping(self) -> bool:
        return self._stop_flag

    def _sweep(self) -> None:
        try:
            n = self.spool.sweep()
        except QueueUnavailable as exc:  # the first pass waits for it
            self.outage.failed(exc)
            return
        except Exception:  # a spool that cannot be swept can still be drained
            log.exception("spool %s: sweep failed", self.spool.location)
            return
        if n:
            log.info("spool %s: %d abandoned or orphaned file(s) swept", self.spool.location, n)

    # -- the loop ---------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the spool now: new mail was committed.

        Cheap and thread-safe; pass it as ``QueuedMailDelivery(on_commit=...)``.
        Does nothing when the processor is not running.
        """
        waiter = self._waiter
        if waiter is not None:
            waiter.wake()

    def start(self) -> None:
        """Run the loop in a background (daemon) thread; :meth:`stop` ends it.

        Raises:
            RuntimeError: already running.
        """
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("the processor is already running")
        self._stop_flag = False
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._loop, name="mailspool-processor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop: nothing new is started, messages in flight are settled.

        Also closes the connections after :meth:`process_once` (or use
        the processor as a context manager; :meth:`drain` closes its own).  An
        outcome that the spool could not take (it is full) is tried once
        more; if it still cannot be written, the message stays claimed by
        this process (a later processor of the same spool in it, or the
        exit, tries again) and an error names the recipients that would
        get it a second time if the process ended first.

        Args:
            timeout: seconds to wait for the messages in flight (``None``: as
                long as they take).
        """
        self._stop_flag = True
        self._stop_event.set()
        self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("processor still settling messages after %ss", timeout)
                return
            self._thread = None
        if not self._stop_threads(timeout):
            log.warning("processor still settling messages after %ss", timeout)

    def run(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT (or :meth:`stop`).

        On a signal nothing new is started; messages in flight are settled,
        then this returns (an outcome the full spool could not take is
        tried once more, as :meth:`stop` does).  Handlers are installed only in the main thread,
        and the previous ones restored on return.
        """
        self._stop_flag = False
        self._stop_event.clear()
        previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only flags and one byte on a socket: no locks, no logging here.
        self._signal = signum
        self._stop_flag = True
        self.wake()

    def _loop(self) -> None:
        self._sweep()
        waiter = Waiter(self.spool.waker() if self.watch else None)
        self._waiter = waiter
        waker = f"{waiter.waker.kind}, and " if waiter.waker is not None else ""
        log.info(
            "processing %s -> %s (%d connection(s), %s)",
            self.spool.location,
            self._sender.where,
            self.connections,
            f"{waker}looking every {self.interval:g}s",
        )
        try:
            while not self._stopping():
                try:
                    waiter.consume()  # before the pass: a wake during it means "again"
                    now = self._clock()
                    summary = self.process_once(now)
                    if self._stopping():
                        break
                    if self.outage.down():  # look again later, or when the waker says
                        waiter.wait(self.outage.left())
                        continue
                    if summary.total and not summary.relay_paused:
                        continue  # more may have become due meanwhile
                    waiter.wait(self._timeout(now))
                except Exception:  # e.g. no thread could be started: keep going
                    log.exception("processor: unexpected error; next look in %gs", self.interval)
                    self._stop_event.wait(self.interval)
        finally:
            self._waiter = None
            waiter.close()
            self._stop_event.set()
            self._stop_threads()
            if self._signal is not None:
                name = signal.Signals(self._signal).name
                log.info("stopped on %s; messages in flight were settled", name)
                self._signal = None

    def _timeout(self, now: float) -> float:
        """How long the loop may sleep: until something could be due."""
        # inotify brings new mail at once; the look every ``interval`` also
        # finds claims left by a processor that died, and works on any disk.
        candidates = [self.interval]
        try:
            next_due = self.spool.next_due()
        except QueueUnavailable as exc:
            self.outage.failed(exc)
            next_due = None
        except Exception:
            log.exception("spool %s: cannot find the next due time", self.spool.location)
            next_due = None
        if next_due is not None and next_due > now:
            candidates.append(next_due - now)
        if self.spool.claimed_elsewhere():
            # A processor that dies leaves no event behind: look again soon,
            # so its messages are taken up within a second, not an interval.
            candidates.append(ABANDONED_CHECK)
        if self.relay.paused(now):
            candidates.append(self.relay.paused_until - now)
        unskip = self._sender.skips.next_unskip(now)
        if unskip is not None:
            candidates.append(unskip - now)
        idle = self.pool.close_idle()
        if idle is not None:
            candidates.append(idle)
        return max(0.0, min(candidates))
