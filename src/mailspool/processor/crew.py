"""The sender threads of a queue processor, how many there are, and what feeds them.

A processor starts with :data:`INITIAL_CONNECTIONS` sender threads; each
takes an id of the current :class:`~mailspool.processor.passes.Pass` from
the jobs queue, waits for a free slot, and hands it to the
:class:`~mailspool.processor.sender.Sender`, then dispatches the events,
outside any transaction of the application.  Like Postfix's destination
concurrency, the number of threads (and connections) grows with the
relay's latency, measured as the messages go (:data:`WAIT_RATIO`).  The
dispatcher feeds them the ids the spool lists as due.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Generator

from mailspool import events
from mailspool.processor.outcome import NOTHING, Done
from mailspool.processor.passes import Pass
from mailspool.processor.policy import RelayState
from mailspool.processor.sender import Sender
from mailspool.queue import QueueBackend

__all__ = ["INITIAL_CONNECTIONS", "LOST_RUN", "RECENT", "WAIT_RATIO", "Crew", "ThreadClock"]

log = logging.getLogger("mailspool.processor")

_SENDER = "mailspool-sender-"  # the names of the sender threads
#: Sender threads (and connections) a processor starts with; more are added,
#: up to ``connections``, while the relay is slow to answer.
INITIAL_CONNECTIONS = 1
#: With ``n`` connections, another is added while a message waits for the
#: relay's replies more than ``WAIT_RATIO * n - 1`` times the CPU time it
#: takes.  By Little's law about ``1 + wait / cpu`` threads keep one
#: interpreter busy; the factor leaves room for what each thread costs in
#: turns at the interpreter lock.  A fast local relay (a reply in tens of
#: microseconds) keeps one connection, one that spends as much CPU on a
#: message as the processor gets two or three, one 20 ms away all of
#: ``connections``.  Only the wait for the relay counts: not the disk, not
#: a CPU busy with other processes (more threads help with neither).
WAIT_RATIO = 2.0
#: The times are the medians of this many messages, all sent since the last
#: look (one every this many messages): one message that waited for a CPU,
#: or that opened the connection, decides nothing.
RECENT = 16
#: After this many claims in a row lost to another processor, a pass lists
#: the spool again instead of following that processor through names it
#: has taken already.
LOST_RUN = 4


class ThreadClock:
    """The calling thread's CPU time and time spent waiting for a CPU, in seconds.

    On Linux both come from ``/proc/thread-self/schedstat`` in one read;
    elsewhere the CPU time comes from :func:`time.thread_time` and the wait
    counts as zero.  Make it in the thread that reads it; close it there.
    """

    def __init__(self) -> None:
        try:
            self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = -1

    def read(self) -> tuple[float, float]:
        """(CPU time, time runnable but waiting for a CPU) so far."""
        if self._fd >= 0:
            try:
                fields = os.pread(self._fd, 64, 0).split()
                cpu = int(fields[0])
                if cpu > 0:  # a kernel that does not account it says 0: not usable
                    return cpu / 1e9, int(fields[1]) / 1e9
            except (OSError, ValueError, IndexError):
                pass
            os.close(self._fd)
            self._fd = -1
        return time.thread_time(), 0.0

    def __enter__(self) -> ThreadClock:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Crew:
    """The sender threads of one processor: fed, started, grown, and ended.

    Args:
        sender: what handles each message.
        relay: the relay's parallelism, which the threads respect and grow.
        connections: at most this many threads.
        blocked: true when nothing new may be started.
        stopping: true once the processor is asked to stop.
    """

    def __init__(
        self,
        sender: Sender,
        relay: RelayState,
        *,
        connections: int,
        blocked: Callable[[float], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self._sender = sender
        self.relay = relay
        self.connections = connections
        self._blocked = blocked
        self._stopping = stopping
        #: the ids handed to the threads (None: a thread's signal to end)
        self.jobs: queue.SimpleQueue[tuple[str, Pass] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # (wait for the relay, CPU time) of the messages since the last look, seconds.
        self._recent: list[tuple[float, float | None]] = []
        # The CPU time per message a sender thread measured last, seconds.
        self._busy = 0.0

    def dispatch(self, p: Pass, spool: QueueBackend) -> None:
        """Hand the ids due in pass ``p`` to the threads, as fast as they take them."""
        # Another processor on the spool may be working through the same
        # names: after LOST_RUN claims in a row lost to it, list the spool
        # again (what it took is gone from the listing) at another place.
        while self._dispatch_listing(p, spool):
            pass

    def _dispatch_listing(self, p: Pass, spool: QueueBackend) -> bool:
        """Queue the ids of one listing; True to list again (claims were being lost)."""
        sender = self._sender
        sender.lost_run = 0
        ids = spool.due(p.now)
        try:
            for id in ids:
                sender.outage.worked(p.mark)  # it answered: over, unless a claim failed since
                if sender.skips.skipped(id, p.now):
                    continue
                if sender.lost_run >= LOST_RUN:
                    return True
                if not p.queue(self._blocked):
                    return False
                self.jobs.put((id, p))
        finally:
            if isinstance(ids, Generator):  # a backend's generator: let go of what it holds
                ids.close()
        sender.outage.worked(p.mark)
        return False

    def finish(self, p: Pass) -> None:
        """Wait until pass ``p`` is settled, making its quick retries meanwhile.

        A message deferred after a one-off fault is queued again when its
        time comes, unless nothing may be started any more (stopping, the
        relay paused): then it stays deferred, and is counted so.
        """
        while True:
            due = p.due()
            if not due:
                return
            for id, partly in due:
                if p.requeue(self._blocked):
                    self.jobs.put((id, p))
                else:
                    p.count("deferred", partly)

    def start(self) -> None:
        """Start the first threads, unless they run."""
        with self._lock:
            if self.threads:
                return
            for _ in range(min(INITIAL_CONNECTIONS, self.connections)):
                self._new_thread()

    def stop(self) -> None:
        """End the threads (between passes) and wait for them."""
        with self._lock:
            threads, self.threads = self.threads, []
            for _ in threads:
                self.jobs.put(None)
            for t in threads:
                t.join()

    @staticmethod
    def calling() -> bool:
        """True when called from a sender thread."""
        return threading.current_thread().name.startswith(_SENDER)

    def _work(self) -> None:
        with ThreadClock() as clock:
            self._work_with(clock)

    def _work_with(self, clock: ThreadClock) -> None:
        # While the connections tell how long each message waited for the
        # relay, this thread reads its CPU clock once per RECENT messages and
        # reports their mean; otherwise it reads it around every message and
        # counts as waiting whatever was neither CPU nor waiting for a CPU.
        told = False
        sent = 0  # messages since ``mark``
        mark = 0.0  # this thread's CPU time when the first of them began
        while True:
            job = self.jobs.get()
            if job is None:
                return
            id, p = job
            done = counted = NOTHING
            try:
                if p.start(self.relay.parallelism, self._blocked):
                    if not told:
                        started, (cpu, delay) = time.monotonic(), clock.read()
                    done = self._sender.handle(id, p.now, p.tries.get(id, 0), id in p.lost)
                    waited = self._sender.relay_wait()
                    counted = self._again(id, p, done)
                    if done.outcome is not None:
                        if not told and waited is not None:
                            told, mark = True, cpu  # from this message on
                        if not told:
                            wall = time.monotonic() - started
                            cpu_after, delay_after = clock.read()
                            cpu = cpu_after - cpu
                            self._observe(wall - (delay_after - delay) - cpu, cpu, p)
                        else:
                            sent += 1
                            if sent >= RECENT:
                                now = clock.read()[0]
                                self._busy = (now - mark) / sent
                                sent, mark = 0, now
                            if waited is not None:  # None: not sent, nothing to learn
                                self._observe(waited, None, p)
                    events.notify(done.events)  # outside any transaction; never raises
            except Exception:  # the sender catches per message; this is the last guard
                log.exception("mail %s: unexpected error in the sender", id)
            finally:
                p.done(counted.outcome, counted.partly)

    def _again(self, id: str, p: Pass, done: Done) -> Done:
        """Queue ``id`` again in pass ``p`` when ``done`` says so; return what
        to count for it now (nothing while it is to be tried again)."""
        if done.retry_in is not None:  # a one-off fault: a quick retry, soon
            p.retry_later(id, done.retry_in, done.partly, done.lost)
            return NOTHING  # counted by its last attempt in this pass
        if done.again and p.requeue(self._blocked):
            self.jobs.put((id, p))  # refused for now: again in this pass
        return done

    def _new_thread(self) -> None:
        t = threading.Thread(target=self._work, name=f"{_SENDER}{len(self.threads)}", daemon=True)
        t.start()
        self.threads.append(t)

    def _observe(self, waited: float, cpu: float | None, p: Pass) -> None:
        """:meth:`_judge` every RECENT messages by the medians of ``waited`` and ``cpu``.

        ``cpu`` None: the thread did not read its clock for this message;
        the latest mean a thread reported (``_busy``) stands for it.
        """
        recent = self._recent
        recent.append((waited, cpu))
        if len(recent) < RECENT:
            return
        # One look per RECENT messages: sorting after every message would
        # cost the fast relay, which never needs another connection, the most.
        self._recent = []
        waits = sorted(w for w, _ in recent)
        cpus = sorted(self._busy if c is None else c for _, c in recent)
        self._judge(waits[RECENT // 2], cpus[RECENT // 2], p)

    def _judge(self, wait: float, busy: float, p: Pass) -> None:
        """Add a connection while the relay is slow and messages wait for one.

        Like Postfix's destination concurrency, parallelism grows with the
        relay's latency: a slow relay (a remote one, or one that scans mail)
        gets up to ``connections`` at once, a fast local one stays at one,
        where more threads would only take turns at the interpreter lock.
        ``wait`` is how long a message waited for the relay's replies (see
        :data:`WAIT_RATIO`), ``busy`` the CPU time its thread spent on it.
        """
        if (
            wait <= (WAIT_RATIO * len(self.threads) - 1) * busy
            or p.queued == 0
            or len(self.threads) >= self.connections
            or self._stopping()
        ):
            return
        # Never wait for the lock: stop() holds it while joining us.
        if not self._lock.acquire(blocking=False):
            return
        try:
            n = len(self.threads)
            if n == 0 or n >= self.connections or self.relay.parallelism(p.now) < n:
                return  # stopped, full, or lowered after a 421: do not grow now
            self._new_thread()
            self.relay.grow(n + 1)
        finally:
            self._lock.release()
