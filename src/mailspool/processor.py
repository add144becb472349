"""The queue processor: delivers what the spool holds, nothing lost, nothing twice.

Theory of operation
-------------------
One *pass* (:meth:`QueueProcessor.process_once`) streams the ids the spool
says are due (``Spool.due``: directory entries, never the whole queue) and
hands them, one by one, to a fixed set of worker threads; never more are in
flight than the relay currently allows, so memory stays flat whatever the
size of the queue.  A worker claims its message (an ``flock`` that dies with
the process: no two senders ever hold one message), sends it over the
worker's own reused connection, and settles it per recipient:

* accepted: sent for good, never sent to again;
* 5xx: failed, with the relay's code and text;
* 4xx, a lost connection, a timeout: deferred until the
  :class:`RetryPolicy` says, counted as an attempt; once the message is older
  than ``give_up_after`` its pending recipients fail as expired.

Trouble that is about the relay and not the message (cannot connect, a 421,
a bad greeting, TLS or AUTH failing) fails nothing and counts nothing: the
message goes back untouched and the whole relay is *paused*.  Nothing is
attempted until the pause ends; then one message at a time *probes* it, and
each failed probe doubles the pause.  Connections are opened one at a time,
so a dead relay sees one attempt per backoff step, not one per queued
message.  A 421 while other connections work ("too many connections") also
halves the parallelism for a while.

The loop (:meth:`QueueProcessor.run`, or the thread :meth:`start` makes)
repeats passes.  Between them it blocks in ``select()`` on a wake-up socket
(:meth:`wake`, signal handlers) and an inotify descriptor watching ``new/``
and ``deferred/`` (Linux, through ctypes), until the next deferred message
is due or ``interval`` seconds have passed (the safety net, and the only
way to see new mail where inotify is unavailable).  An idle
processor therefore sleeps in the kernel.  Signal handlers only set a flag
and write one byte to the socket: the loop stops starting messages and
returns once those in flight are settled.

Exceptions are caught broadly at the per-message boundary (``_handle``):
logged with the traceback, the message deferred, the next one taken.  Only
three other places catch broadly, each for a reason of its own: opening a
connection (whatever fails there is the relay's trouble, not the message's),
listing the spool (a pass ends, the loop goes on), and the loop itself, so
that no exception ever stops the processor.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Protocol

from zope.interface import implementer

from mailspool import events
from mailspool.errors import DeliveryError, is_transient
from mailspool.events import MailDeferred, MailEvent, MailFailed, MailSent
from mailspool.interfaces import IMailQueueProcessor
from mailspool.mailer import SendResult
from mailspool.message import Envelope
from mailspool.spool import Claim, Spool

__all__ = ["QueueProcessor", "RetryPolicy", "Summary"]

log = logging.getLogger(__name__)

#: Seconds a connection may stay unused before the processor closes it.
IDLE_TIMEOUT = 30.0
#: Seconds the parallelism stays lowered after a 421.
THROTTLE_PERIOD = 600.0
_REPLY_MAX = 300  # characters of a relay reply in a log line
_SENDER = "mailspool-sender-"  # the names of the worker threads


# --- policy and outcomes (pure values) -------------------------------------------


def _backoff(first: float, factor: float, cap: float, n: int) -> float:
    try:
        delay = first * factor ** (max(1, n) - 1)
    except OverflowError:
        return cap
    return min(cap, delay)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a message again, and when to give up on it.

    All times are seconds.  The defaults follow Postfix and RFC 5321 4.5.4.1.

    Attributes:
        first_delay: wait after the first failed attempt.
        factor: each further failed attempt multiplies the wait by this.
        max_delay: the longest wait between attempts.
        give_up_after: a message still undelivered this long after it was
            queued fails ("expired") at its next temporary failure; the last
            retry is moved forward to that time.
        relay_first_delay: how long the relay is paused after its first
            relay-level failure (cannot connect, 421, TLS, AUTH).
        relay_max_delay: the longest relay pause.

    Raises:
        ValueError: a delay is not positive, ``factor`` is below 1, or a
            maximum is shorter than its first delay.
    """

    first_delay: float = 300.0
    factor: float = 2.0
    max_delay: float = 3600.0
    give_up_after: float = 5 * 86400.0
    relay_first_delay: float = 30.0
    relay_max_delay: float = 600.0

    def __post_init__(self) -> None:
        for name in ("first_delay", "give_up_after", "relay_first_delay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be greater than 0, got {getattr(self, name)!r}")
        if not self.factor >= 1:
            raise ValueError(f"factor must be at least 1, got {self.factor!r}")
        if not self.max_delay >= self.first_delay:
            raise ValueError("max_delay must not be shorter than first_delay")
        if not self.relay_max_delay >= self.relay_first_delay:
            raise ValueError("relay_max_delay must not be shorter than relay_first_delay")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1 for the first)."""
        return _backoff(self.first_delay, self.factor, self.max_delay, attempts)

    def relay_delay(self, failures: int) -> float:
        """Seconds to pause the relay after its ``failures``-th failure in a row."""
        return _backoff(self.relay_first_delay, self.factor, self.relay_max_delay, failures)


@dataclass(frozen=True)
class Summary:
    """What one pass (or a whole drain) did, counted in messages.

    ``sent``: every recipient accepted, the message left the queue;
    ``deferred``: some recipient is waiting for a retry; ``failed``: none
    pending and some failed (the message is in the failed area);
    ``quarantined``: unreadable files moved aside.  ``relay_paused``: the
    relay was unavailable at the end; nothing was failed for it.
    ``a + b`` adds the counts and keeps ``b.relay_paused`` (the later state).
    """

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    quarantined: int = 0
    relay_paused: bool = False

    @property
    def total(self) -> int:
        """How many messages were settled or quarantined."""
        return self.sent + self.deferred + self.failed + self.quarantined

    def __add__(self, other: Summary) -> Summary:
        return Summary(
            self.sent + other.sent,
            self.deferred + other.deferred,
            self.failed + other.failed,
            self.quarantined + other.quarantined,
            other.relay_paused,
        )


Reason = tuple[int | None, str]


@dataclass
class _Verdict:
    """One attempt's outcome per recipient, before it is written to the spool."""

    sent: list[str] = field(default_factory=list)
    failed: dict[str, Reason] = field(default_factory=dict)
    deferred: dict[str, Reason] = field(default_factory=dict)


def _classify(
    pending: tuple[str, ...], result: SendResult | None, exc: BaseException | None
) -> _Verdict:
    """Sort the pending recipients by what the relay said (no I/O).

    ``result`` is what the mailer returned, or the ``.result`` an error
    carried (refusals at RCPT); ``exc`` the error, if any, which applies to
    every recipient that has no reply of its own: a failed DATA applies to
    all the recipients accepted at RCPT.
    """
    v = _Verdict()
    default: Reason | None = None
    permanent = False
    if exc is not None:
        code = getattr(exc, "code", None)
        text = getattr(exc, "text", None) or str(exc) or type(exc).__name__
        default = (code if isinstance(code, int) else None, text)
        permanent = not is_transient(exc)
    accepted = set(result.accepted) if result is not None and exc is None else set()
    refused = dict(result.refused) if result is not None else {}
    for addr in pending:
        if addr in accepted:
            v.sent.append(addr)
        elif addr in refused:
            reply = refused[addr]
            target = v.failed if 500 <= reply.code < 600 else v.deferred
            target[addr] = (reply.code, reply.text)
        elif default is not None:
            (v.failed if permanent else v.deferred)[addr] = default
        else:
            v.deferred[addr] = (None, "the relay gave no reply for this recipient")
    return v


def _one_line(text: str) -> str:
    text = " / ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= _REPLY_MAX else text[: _REPLY_MAX - 3] + "..."


def _reason(r: Reason) -> str:
    return _one_line(f"{r[0]} {r[1]}" if r[0] is not None else r[1])


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _when(t: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%SZ"
        )
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f}"


# --- the relay as this processor sees it (no I/O; times are clock values) ---------


class _Relay:
    """Pause, probe and throttle state, shared by the workers."""

    def __init__(self, policy: RetryPolicy, connections: int) -> None:
        self._policy = policy
        self._max = connections
        self._lock = threading.Lock()
        self.limit = connections
        self.throttled_until = 0.0
        self.failures = 0
        self.paused_until = 0.0

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def parallelism(self, now: float) -> int:
        with self._lock:
            if self.failures:
                return 1  # probing: one message at a time until one gets through
            if self.limit < self._max and now >= self.throttled_until:
                self.limit = self._max
            return self.limit

    def trouble(self, now: float, code: int | None, *, lower: bool = False) -> float | None:
        """Record a relay-level failure; the pause if it starts a new step, else None.

        ``lower`` halves the parallelism for :data:`THROTTLE_PERIOD`.
        """
        with self._lock:
            if now < self.paused_until:
                return None  # another worker already paused it for this step
            if lower:
                self.limit = max(1, self.limit // 2)
                self.throttled_until = now + THROTTLE_PERIOD
            self.failures += 1
            delay = self._policy.relay_delay(self.failures)
            self.paused_until = now + delay
            return delay

    def answered(self, now: float) -> int:
        """The relay worked on a message; return how many probes had failed before.

        A message that was under way when the pause began proves nothing: the
        pause stands until its end, then a probe decides.
        """
        with self._lock:
            if now < self.paused_until:
                return 0
            failures, self.failures = self.failures, 0
            return failures


class _RateLimit:
    """Messages per second, spaced evenly (a token bucket holding one token)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Take the next slot; return how long to wait for it (monotonic seconds)."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self._interval
            return slot - now


# --- connections -------------------------------------------------------------------


class _Connection(Protocol):
    @property
    def alive(self) -> bool: ...

    def send(self, envelope: Envelope, data: bytes) -> SendResult: ...

    def close(self) -> None: ...


class _MailerConnection:
    """For a mailer without ``connect()``: each send goes through the mailer."""

    alive = True

    def __init__(self, mailer: Any) -> None:
        self._mailer = mailer

    def send(self, envelope: Envelope, data: bytes) -> SendResult:
        send_envelope = getattr(self._mailer, "send_envelope", None)
        if send_envelope is not None:
            result: SendResult = send_envelope(envelope, data)
        else:
            result = self._mailer.send(envelope.sender, list(envelope.recipients), data)
        return result

    def close(self) -> None:
        pass


class _Worker:
    """One sender thread and its connection to the relay."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: _Connection | None = None
        self.idle_since = time.monotonic()
        self.lock = threading.Lock()  # held while the connection is in use
        self.thread: threading.Thread | None = None

    def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection: nothing left to do
                log.debug("closing a connection failed", exc_info=True)


class _RelayTrouble(Exception):
    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _NotNow(Exception):
    """The relay was paused, or a stop requested, before this message was sent."""


class _Pass:
    """The bookkeeping of one pass: what is in flight, what was done."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.cond = threading.Condition()
        self.in_flight = 0
        self.counts = dict.fromkeys(("sent", "deferred", "failed", "quarantined"), 0)

    def done(self, outcome: str | None) -> None:
        with self.cond:
            self.in_flight -= 1
            if outcome in self.counts:
                self.counts[outcome] += 1
            self.cond.notify_all()


# --- waiting: a wake-up socket and inotify ---------------------------------------------

_IN_ATTRIB, _IN_MOVED_TO, _IN_CREATE = 0x4, 0x80, 0x100


class _Inotify:
    """An inotify descriptor (Linux, through ctypes); any event means "look"."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, watches: Mapping[str, int]) -> _Inotify | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init1 = libc.inotify_init1
            add_watch = libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        init1.argtypes, init1.restype = [ctypes.c_int], ctypes.c_int
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add_watch.restype = ctypes.c_int
        fd = init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.debug("inotify unavailable: %s", os.strerror(ctypes.get_errno()))
            return None
        for path, mask in watches.items():
            if add_watch(fd, os.fsencode(path), mask) < 0:
                log.debug("cannot watch %s: %s", path, os.strerror(ctypes.get_errno()))
                os.close(fd)
                return None
        return cls(fd)

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        os.close(self.fd)


class _Waiter:
    """Where the loop sleeps: until woken, a watched directory changes, or a timeout."""

    def __init__(self, watches: Mapping[str, int] | None) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._r, selectors.EVENT_READ)
        self.inotify = _Inotify.open(watches) if watches else None
        if self.inotify is not None:
            self._selector.register(self.inotify.fd, selectors.EVENT_READ)

    def wake(self) -> None:
        """Make the current or next wait return; safe in a signal handler."""
        with contextlib.suppress(OSError):  # full (already woken) or closed
            self._w.send(b"\0")

    def wait(self, timeout: float) -> None:
        self._selector.select(max(0.0, timeout))

    def consume(self) -> None:
        """Forget what woke us; called before each pass, so nothing is missed."""
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if self.inotify is not None:
            self.inotify.drain()

    def close(self) -> None:
        self._selector.close()
        self._r.close()
        self._w.close()
        if self.inotify is not None:
            self.inotify.close()


# --- the processor ---------------------------------------------------------------------


@dataclass
class _Done:
    """What a worker did with one message: the outcome, and what to tell."""

    outcome: str | None
    events: list[MailEvent] = field(default_factory=list)


@implementer(IMailQueueProcessor)
class QueueProcessor:
    """Delivers the spool's messages through a mailer; any number may share a spool.

    Args:
        spool: the spool directory, or a :class:`~mailspool.spool.Spool`.
        mailer: an :class:`~mailspool.SMTPMailer` or anything with
            ``connect()`` returning a connection with ``send(envelope, data)``,
            ``alive`` and ``close()``; a mailer with only ``send_envelope`` or
            ``send`` works too (no connection reuse then).
        connections: worker threads, each with its own reused connection.
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
        spool: str | os.PathLike[str] | Spool,
        mailer: Any,
        *,
        connections: int = 4,
        interval: float = 3.0,
        retry: RetryPolicy | None = None,
        rate_limit: float | None = None,
        clock: Callable[[], float] = time.time,
        watch: bool = True,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections must be at least 1, got {connections!r}")
        if not interval > 0:
            raise ValueError(f"interval must be greater than 0, got {interval!r}")
        if rate_limit is not None and not rate_limit > 0:
            raise ValueError(f"rate_limit must be greater than 0, got {rate_limit!r}")
        self.spool = spool if isinstance(spool, Spool) else Spool(spool)
        self.mailer = mailer
        self.connections = connections
        self.interval = float(interval)
        self.retry = retry if retry is not None else RetryPolicy()
        self.rate_limit = rate_limit
        self.watch = watch
        self._clock = clock
        self._relay = _Relay(self.retry, connections)
        self._rate = _RateLimit(rate_limit) if rate_limit is not None else None
        self._jobs: queue.SimpleQueue[tuple[str, _Pass] | None] = queue.SimpleQueue()
        self._workers: list[_Worker] = []
        self._workers_lock = threading.Lock()
        self._pass_lock = threading.Lock()
        self._connect_lock = threading.Lock()
        self._skip: dict[str, float] = {}
        self._skip_lock = threading.Lock()
        self._stop_flag = False  # set by stop() and signal handlers: plain, lock-free
        self._stop_event = threading.Event()  # for sleeps that stop() must cut short
        self._signal: int | None = None
        self._waiter: _Waiter | None = None
        self._thread: threading.Thread | None = None
        self._where = _relay_name(mailer)

    def __repr__(self) -> str:
        return f"<QueueProcessor {self.spool.path} -> {self._where}>"

    @property
    def queuePath(self) -> str:  # the classic name
        """The spool directory."""
        return self.spool.path

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

        Returns:
            The counts of this pass.  Never raises for a message's sake:
            errors are logged and the message deferred.
        """
        with self._pass_lock:
            now = self._clock() if now is None else now
            if self._relay.paused(now):
                return Summary(relay_paused=True)
            self._start_workers()
            p = _Pass(now)
            try:
                self._dispatch(p)
            except Exception:  # the spool could not be listed (e.g. it was removed)
                log.exception("spool %s: cannot list what is due", self.spool.path)
            finally:
                with p.cond:
                    p.cond.wait_for(lambda: p.in_flight == 0)
            c = p.counts
            return Summary(
                c["sent"], c["deferred"], c["failed"], c["quarantined"], self._relay.paused(now)
            )

    def _dispatch(self, p: _Pass) -> None:
        ids = self.spool.due(p.now)
        try:
            for id in ids:
                if self._skipped(id, p.now):
                    continue
                with p.cond:
                    while True:
                        if self._stopping() or self._relay.paused(p.now):
                            return
                        if p.in_flight < self._relay.parallelism(p.now):
                            break
                        p.cond.wait()
                    p.in_flight += 1
                self._jobs.put((id, p))
        finally:
            close = getattr(ids, "close", None)
            if close is not None:
                close()

    def drain(self, *, progress: Callable[[Summary], None] | None = None) -> Summary:
        """Deliver everything that is due now, pass after pass, then return.

        Abandoned claims and orphans are swept first.  Stops early when the
        relay is paused (``relay_paused`` in the result) or a stop is asked.

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
        return total

    # -- one message: the per-message boundary -------------------------------------

    def _work(self, worker: _Worker) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                with worker.lock:
                    worker.drop()
                return
            id, p = job
            done = _Done(None)
            try:
                with worker.lock:
                    done = self._handle(worker, id, p.now)
                events.notify(done.events)  # outside any transaction; never raises
            except Exception:  # _handle catches per message; this is the last guard
                log.exception("mail %s: unexpected error in the sender", id)
            finally:
                p.done(done.outcome)

    def _handle(self, worker: _Worker, id: str, now: float) -> _Done:
        if self._stopping() or self._relay.paused(now):
            return _Done(None)  # not started: stays where it is
        claim = self.spool.claim(id)
        if claim is None:
            return _Done("quarantined" if self._quarantined(id) else None)
        with claim:  # leaving without settling releases the message untouched
            try:
                return self._deliver(worker, claim, now)
            except _NotNow:
                claim.release()
                return _Done(None)
            except Exception as exc:  # the one catch-all: log, defer, keep going
                log.exception("mail %s: unexpected error while sending; deferred", id)
                worker.drop()
                return self._defer_after_error(claim, now, exc)

    def _defer_after_error(self, claim: Claim, now: float, exc: Exception) -> _Done:
        retry_at = now + self.retry.delay(claim.attempts + 1)
        try:
            claim.defer(retry_at, f"internal error: {type(exc).__name__}: {exc}")
        except Exception:
            log.exception("mail %s: cannot defer; leaving it until %s", claim.id, _when(retry_at))
            with self._skip_lock:
                self._skip[claim.id] = retry_at
            return _Done(None)
        return _Done("deferred")

    def _deliver(self, worker: _Worker, claim: Claim, now: float) -> _Done:
        env = claim.envelope
        result: SendResult | None = None
        error: BaseException | None = None
        try:
            result = self._send(worker, env, claim.data, now)
        except _RelayTrouble as trouble:  # the relay is paused already
            return self._relay_trouble(claim, trouble.error)
        except (DeliveryError, OSError) as exc:
            if getattr(exc, "about_relay", False):
                self._pause(now, exc)
                return self._relay_trouble(claim, exc)
            error = exc
            carried = getattr(exc, "result", None)
            result = carried if isinstance(carried, SendResult) else None
        back = self._relay.answered(now)
        if back:
            log.info("relay %s is back after %d failed probe(s)", self._where, back)
        return self._settle(claim, now, _classify(env.recipients, result, error), result, error)

    def _send(self, worker: _Worker, env: Envelope, data: bytes, now: float) -> SendResult:
        conn = worker.conn
        if conn is not None and (
            not conn.alive or time.monotonic() - worker.idle_since > IDLE_TIMEOUT
        ):
            worker.drop()
            conn = None
        if conn is None:
            # One connection attempt at a time: a dead relay sees one probe.
            with self._connect_lock:
                if self._stopping() or self._relay.paused(now):
                    raise _NotNow()
                try:
                    conn = self._connect()
                except Exception as exc:  # whatever it is, it is not the message's fault
                    self._pause(now, exc)  # before the next worker may try
                    raise _RelayTrouble(exc) from exc
            worker.conn = conn
        if self._rate is not None:
            wait = self._rate.reserve()
            if wait > 0 and (self._stop_event.wait(wait) or self._stopping()):
                raise _NotNow()
        try:
            return conn.send(env, data)
        finally:
            worker.idle_since = time.monotonic()
            if not conn.alive:
                worker.drop()

    def _connect(self) -> _Connection:
        connect = getattr(self.mailer, "connect", None)
        if connect is None:
            return _MailerConnection(self.mailer)
        conn: _Connection = connect()
        return conn

    def _pause(self, now: float, exc: BaseException) -> None:
        """Record relay-level trouble: one error per pause, a warning per failed probe."""
        code = getattr(exc, "code", None)
        code = code if isinstance(code, int) else None
        # A 421 while other connections work means "too many connections".
        crowded = code == 421 and any(w.conn is not None for w in self._workers)
        delay = self._relay.trouble(now, code, lower=crowded)
        if delay is None:
            return  # already paused for this step
        failures = self._relay.failures
        if failures == 1:
            log.error(
                "relay %s unavailable: %s; deliveries paused for %s, then one "
                "message probes it (no message is failed for this)%s",
                self._where,
                _one_line(str(exc)),
                _human(delay),
                "; fewer connections for a while" if crowded else "",
            )
        else:
            log.warning(
                "relay %s still unavailable (probe %d): %s; next probe in %s",
                self._where,
                failures,
                _one_line(str(exc)),
                _human(delay),
            )

    def _relay_trouble(self, claim: Claim, exc: BaseException) -> _Done:
        claim.release()
        log.info(
            "mail %s <%s>: not sent, relay unavailable (%s); back in the queue untouched",
            claim.id,
            claim.message_id or "",
            _one_line(str(exc)),
        )
        return _Done(None)

    def _settle(
        self,
        claim: Claim,
        now: float,
        v: _Verdict,
        result: SendResult | None,
        error: BaseException | None,
    ) -> _Done:
        expires = claim.queued_at + self.retry.give_up_after
        retry_at: float | None = None
        if v.deferred and now >= expires:
            limit = _human(self.retry.give_up_after)
            for addr, r in v.deferred.items():
                v.failed[addr] = (r[0], f"expired: not delivered within {limit}; last: {r[1]}")
            v.deferred = {}
        attempt = claim.attempts + 1
        if v.deferred:
            retry_at = min(now + self.retry.delay(attempt), expires)
        outcome = claim.settle(sent=v.sent, failed=v.failed, deferred=v.deferred, retry_at=retry_at)
        # Settled: from here on nothing may fail the message.
        mid, sender = claim.message_id, claim.envelope.sender
        shown = mid or ""  # a legacy file may have no Message-Id
        parts: list[str] = []
        evs: list[MailEvent] = []
        if v.sent:
            reply = f" ({_one_line(str(result.reply))})" if result and result.reply else ""
            parts.append(f"sent to {', '.join(v.sent)}{reply}")
            evs.append(MailSent(mid, sender, v.sent))
        if v.failed:
            text = "; ".join(f"{a}: {_reason(r)}" for a, r in v.failed.items())
            parts.append(f"failed for {text}")
            evs.append(
                MailFailed(mid, sender, tuple(v.failed), text, error=error, reasons=v.failed)
            )
        if v.deferred:
            text = "; ".join(f"{a}: {_reason(r)}" for a, r in v.deferred.items())
            assert retry_at is not None
            parts.append(f"deferred until {_when(retry_at)} (attempt {attempt}) for {text}")
            evs.append(
                MailDeferred(mid, sender, tuple(v.deferred), text, retry_at=retry_at, error=error)
            )
        level = logging.ERROR if v.failed else logging.WARNING if v.deferred else logging.INFO
        log.log(level, "mail %s <%s> from %s: %s", claim.id, shown, sender, "; ".join(parts))
        return _Done({"removed": "sent"}.get(outcome, outcome), evs)

    # -- helpers --------------------------------------------------------------------

    def _quarantined(self, id: str) -> bool:
        try:
            return self.spool.get(id).state == "quarantined"
        except (KeyError, ValueError, OSError):
            return False

    def _skipped(self, id: str, now: float) -> bool:
        with self._skip_lock:
            until = self._skip.get(id)
            if until is None:
                return False
            if now < until:
                return True
            del self._skip[id]
            return False

    def _stopping(self) -> bool:
        return self._stop_flag

    def _start_workers(self) -> None:
        with self._workers_lock:
            if self._workers:
                return
            for n in range(self.connections):
                worker = _Worker(n)
                worker.thread = threading.Thread(
                    target=self._work, args=(worker,), name=f"{_SENDER}{n}", daemon=True
                )
                worker.thread.start()
                self._workers.append(worker)

    def _stop_workers(self, timeout: float | None = None) -> bool:
        """End the sender threads (each closes its own connection) between passes.

        Returns False when a pass did not end within ``timeout``.
        """
        if threading.current_thread().name.startswith(_SENDER):
            return False  # e.g. a subscriber calling stop(): the pass waits for us
        if not self._pass_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        try:
            with self._workers_lock:
                workers, self._workers = self._workers, []
                for _ in workers:
                    self._jobs.put(None)
                for w in workers:
                    if w.thread is not None:
                        w.thread.join()
        finally:
            self._pass_lock.release()
        return True

    def _close_idle(self) -> float | None:
        """Close connections unused for IDLE_TIMEOUT; return when the next one will be."""
        soonest: float | None = None
        now = time.monotonic()
        for w in list(self._workers):
            if w.conn is None or not w.lock.acquire(blocking=False):
                continue
            try:
                if w.conn is None:
                    continue
                left = w.idle_since + IDLE_TIMEOUT - now
                if left <= 0 or not w.conn.alive:
                    w.drop()
                elif soonest is None or left < soonest:
                    soonest = left
            finally:
                w.lock.release()
        return soonest

    def _sweep(self) -> None:
        try:
            n = self.spool.sweep()
        except Exception:  # a spool that cannot be swept can still be drained
            log.exception("spool %s: sweep failed", self.spool.path)
            return
        if n:
            log.info("spool %s: %d abandoned or orphaned file(s) swept", self.spool.path, n)

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

        Also closes the connections after :meth:`process_once` or
        :meth:`drain` (or use the processor as a context manager).

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
        if not self._stop_workers(timeout):
            log.warning("processor still settling messages after %ss", timeout)

    def run(self) -> None:
        """Run in the foreground until SIGTERM or SIGINT (or :meth:`stop`).

        On a signal nothing new is started; messages in flight are settled,
        then this returns.  Handlers are installed only in the main thread,
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

    def _watches(self) -> dict[str, int] | None:
        if not self.watch:
            return None
        root = self.spool.path
        return {
            os.path.join(root, "new"): _IN_MOVED_TO | _IN_CREATE,
            os.path.join(root, "deferred"): _IN_MOVED_TO | _IN_CREATE | _IN_ATTRIB,
        }

    def _loop(self) -> None:
        self._sweep()
        waiter = _Waiter(self._watches())
        self._waiter = waiter
        log.info(
            "processing %s -> %s (%d connection(s), %s)",
            self.spool.path,
            self._where,
            self.connections,
            f"{'inotify, and ' if waiter.inotify else ''}looking every {self.interval:g}s",
        )
        try:
            while not self._stopping():
                try:
                    waiter.consume()  # before the pass: a wake during it means "again"
                    now = self._clock()
                    summary = self.process_once(now)
                    if self._stopping():
                        break
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
            self._stop_workers()
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
        except Exception:
            log.exception("spool %s: cannot find the next due time", self.spool.path)
            next_due = None
        if next_due is not None and next_due > now:
            candidates.append(next_due - now)
        if self._relay.paused(now):
            candidates.append(self._relay.paused_until - now)
        with self._skip_lock:
            candidates.extend(until - now for until in self._skip.values() if until > now)
        idle = self._close_idle()
        if idle is not None:
            candidates.append(idle)
        return max(0.0, min(candidates))


def _relay_name(mailer: Any) -> str:
    host, port = getattr(mailer, "host", None), getattr(mailer, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"{host}:{port}"
    return type(mailer).__name__
