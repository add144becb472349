"""One message from the spool to the relay: claim, send, settle per recipient.

This is the per-message boundary of the queue processor.  A sender thread
of :class:`~mailspool.processor.QueueProcessor` calls :meth:`Sender.handle`
with one spool id; it claims the message (an ``flock`` that dies with the
process: no two senders ever hold one message), sends it over a pooled
connection, and settles it recipient by recipient (:mod:`mailspool.processor.outcome`):

* accepted: sent for good, never sent to again;
* 5xx: failed, with the relay's code and text;
* 4xx, a lost connection, a timeout: deferred until the
  :class:`~mailspool.policy.RetryPolicy` says, counted as an attempt; once
  the message is older than ``give_up_after`` its pending recipients fail
  as expired.

Trouble that is about the relay and not the message (cannot connect, a
421, a bad greeting, TLS or AUTH failing; ``about_relay`` on the error)
fails nothing and counts nothing: the message goes back untouched and the
relay is paused (:class:`~mailspool.policy.RelayState`).  Connections are
opened one at a time, under a lock that re-checks the pause, so a dead
relay sees one attempt per backoff step, not one per queued message.

Exceptions are caught broadly in exactly two places here, each for a
reason of its own: opening a connection (whatever fails there is the
relay's trouble, not the message's) and :meth:`Sender.handle` itself (a
bug while one message is handled is logged with its traceback, the
message deferred, and the next one taken).

Every attempt is told in one log line (logger ``mailspool.processor.loop``) naming
the spool id, the Message-Id, the sender, each recipient's outcome and the
relay's reply; relay pauses are told once per outage.

An outcome the spool cannot take (the disk is full as it is written:
``settle()`` fails and changes nothing) is not dropped: releasing the
message would send it again to the recipients the relay has just accepted.
The claim is kept, its lock held and its file left in ``cur/``, and the very
same outcome is written again at the start of each pass until the spool
takes it; meanwhile no new message is sent (its outcome could not be
written either).  One error is logged when it begins, one line when the
outcome is written.  These waiting outcomes belong to the process, like
the locks they hold: a processor that stops tries once more and leaves the
rest to the next processor of the same spool in this process, and to a
last try at exit.  Only the end of the process before the spool has room
can then send the message again (and a stop says so, naming the
recipients).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailspool.errors import DeliveryError, SpoolError
from mailspool.events import MailEvent
from mailspool.message import Envelope
from mailspool.processor.outcome import Verdict, classify, human, one_line, report, when
from mailspool.processor.policy import RateLimiter, RelayState, RetryPolicy
from mailspool.processor.pool import Connection, ConnectionPool, connect, relay_name
from mailspool.queue import QueueBackend, QueueClaim
from mailspool.smtp.mailer import Reply, SendResult

__all__ = ["Done", "Sender"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")


@dataclass(frozen=True)
class Done:
    """What became of one message, and the events to dispatch for it.

    ``outcome`` is ``"sent"``, ``"deferred"``, ``"failed"``,
    ``"quarantined"``, or None when nothing was attempted (taken by someone
    else, relay paused, stopping) and the message stays where it was, or
    when its outcome is waiting to be written (the spool is full).
    """

    outcome: str | None
    events: tuple[MailEvent, ...] = ()


@dataclass
class _Ahead:
    """The next message of a sender thread, claimed while the last one was sent.

    ``conn`` holds its ``MAIL``, ``RCPT`` and ``DATA``, sent after the last
    message's final dot (see :meth:`~mailspool.smtp.SMTPConnection.send`),
    or is None when they were not sent.  ``claim`` None: the claim failed,
    and ``done`` is what became of the message.
    """

    id: str
    claim: QueueClaim | None
    conn: Connection | None = None
    done: Done = Done(None)


@dataclass
class _Unwritten:
    """An attempt's outcome that the spool could not take yet, with the
    claim it keeps held (file in ``cur/``, lock taken) until it does."""

    claim: QueueClaim
    verdict: Verdict
    retry_at: float | None
    reply: Reply | None
    error: BaseException | None
    attempt: int
    why: str  # the write error, for the log
    failures: int = 1  # times writing it failed
    busy: bool = False  # being written now
    warned: bool = False  # a stop said that it may be sent again


class _Waiting:
    """The outcomes waiting to be written, per spool, for the whole process.

    Process-wide because the locks their claims hold are the process's: a
    processor that stops hands them to the next one on the same spool (and
    to the try at exit) rather than dropping a lock, which would have the
    message sent again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spools: dict[str, dict[str, _Unwritten]] = {}

    def add(self, key: str, u: _Unwritten) -> None:
        with self._lock:
            self._spools.setdefault(key, {})[u.claim.id] = u

    def count(self, key: str) -> int:
        # One read of a dict's size: no lock needed (asked twice per message).
        return len(self._spools.get(key, ()))

    def take(self, key: str | None = None) -> list[tuple[str, _Unwritten]]:
        """Mark the idle ones (of ``key``, or of every spool) busy; return them."""
        with self._lock:
            keys = list(self._spools) if key is None else [key]
            taken = []
            for k in keys:
                for u in self._spools.get(k, {}).values():
                    if not u.busy:
                        u.busy = True
                        taken.append((k, u))
            return taken

    def put_back(self, u: _Unwritten) -> None:
        with self._lock:
            u.busy = False

    def drop(self, key: str, u: _Unwritten) -> None:
        with self._lock:
            waiting = self._spools.get(key, {})
            if waiting.get(u.claim.id) is u:
                del waiting[u.claim.id]
            if not waiting:
                self._spools.pop(key, None)

    def holds(self, key: str, claim: QueueClaim) -> bool:
        with self._lock:
            u = self._spools.get(key, {}).get(claim.id)
            return u is not None and u.claim is claim

    def forget(self) -> None:
        """In a child made by fork(): the claims are the parent's."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._spools = {}


_WAITING = _Waiting()


def _outcome(verdict: Verdict) -> str:
    if verdict.deferred:
        return "deferred"
    return "failed" if verdict.failed else "removed"


def _write(key: str, u: _Unwritten, *, first: bool) -> Done | None:
    """Write ``u``'s outcome to the spool; None when the spool cannot take it.

    ``first``: this is the attempt's own settle (logged once and kept on
    failure); otherwise a retry of one that waits (silent on failure).
    """
    claim, v = u.claim, u.verdict
    told = report(
        claim.id,
        claim.message_id,
        claim.envelope.sender,
        v,
        reply=u.reply,
        error=u.error,
        retry_at=u.retry_at,
        attempt=u.attempt,
    )
    try:
        outcome = claim.settle(
            sent=v.sent, failed=v.failed, deferred=v.deferred, retry_at=u.retry_at
        )
    except OSError as exc:  # SpoolError is an OSError
        if not claim.held:
            # The new state was renamed into place; only syncing its
            # directory failed.  It is the message now: tell it as settled.
            log.error("mail %s: outcome written, but not synced to disk: %s", claim.id, exc)
            outcome = _outcome(v)
        elif first:
            u.why = one_line(exc.strerror or str(exc))
            _WAITING.add(key, u)
            accepted = ", ".join(v.sent)
            log.error(
                "%s; but the spool cannot record this outcome (%s): the message stays "
                "claimed by this process and the same outcome is written as soon as the "
                "spool takes it; no new message is sent until then%s",
                told.line,
                u.why,
                f"; if the process ends before, {accepted} will get it again" if accepted else "",
            )
            return None
        else:
            u.failures += 1
            u.why = one_line(exc.strerror or str(exc))
            _WAITING.put_back(u)
            return None
    if first:
        log.log(told.level, "%s", told)  # the line is made only if it is logged
    else:
        _WAITING.drop(key, u)
        log.log(
            told.level,
            "%s (written to the spool now, after %d failed write(s))",
            told.line,
            u.failures,
        )
    return Done({"removed": "sent"}.get(outcome, outcome), told.events)


def _write_before_exit() -> None:
    """At interpreter exit, the last try for the outcomes still waiting."""
    for key, u in _WAITING.take():
        try:
            if _write(key, u, first=False) is not None:
                continue
        except Exception:  # nothing may stop the exit
            log.exception("mail %s: cannot write its outcome", u.claim.id)
        if u.verdict.sent:
            log.critical(
                "mail %s <%s>: exiting with the outcome of its delivery unwritten (%s): "
                "%s will get it again",
                u.claim.id,
                u.claim.message_id or "",
                u.why,
                ", ".join(u.verdict.sent),
            )


_hooked = False
_hook_lock = threading.Lock()


def _hook_exit() -> None:
    """The exit and fork hooks, registered once, when the first sender is made."""
    global _hooked
    with _hook_lock:
        if not _hooked:
            atexit.register(_write_before_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_WAITING.forget)
            _hooked = True


class _RelayTrouble(Exception):
    """Opening a connection failed; the relay is paused already."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _NotNow(Exception):
    """The relay was paused, or a stop requested, before this message was sent."""


class Sender:
    """Delivers single messages; shared by the processor's sender threads.

    Args:
        spool: where the messages are.
        mailer: an ``SMTPMailer``, or anything with ``connect()``,
            ``send_envelope()`` or ``send()`` (see
            :class:`~mailspool.processor.QueueProcessor`).
        retry: the retry policy.
        relay: the relay's pause and parallelism, shared with the dispatcher.
        pool: the connections to the relay.
        rate: the rate limit, if any.
        stopping: true once the processor is asked to stop.
        sleep: waits the given seconds; returns True when cut short by a stop.
    """

    def __init__(
        self,
        spool: QueueBackend,
        mailer: Any,
        *,
        retry: RetryPolicy,
        relay: RelayState,
        pool: ConnectionPool,
        rate: RateLimiter | None,
        stopping: Callable[[], bool],
        sleep: Callable[[float], bool],
    ) -> None:
        if not _hooked:
            _hook_exit()
        self.spool = spool
        self.mailer = mailer
        self.retry = retry
        self.relay = relay
        self.pool = pool
        self.rate = rate
        self.where = relay_name(mailer)
        self._stopping = stopping
        self._sleep = sleep
        self._connect_lock = threading.Lock()
        self._skip: dict[str, float] = {}  # messages that could not even be deferred
        self._skip_lock = threading.Lock()
        self._key = os.path.realpath(spool.location)  # whose waiting outcomes are ours
        self._local = threading.local()
        #: Claims lost in a row (taken by another processor, or gone); reset
        #: by each claim made.  Read by the dispatcher, written by every
        #: sender thread: a hint, not a count.
        self.lost_run = 0

    # -- the per-message boundary -------------------------------------------------

    def relay_wait(self) -> float | None:
        """Seconds the calling thread's last message waited for the relay's replies.

        None when its connection does not tell (a mailer without
        ``connect()``) or the message was not sent.  Read and forgotten.
        """
        wait: float | None = getattr(self._local, "relay_wait", None)
        self._local.relay_wait = None
        return wait

    def handle(self, id: str, now: float, peek: Callable[[], str | None] | None = None) -> Done:
        """Claim, send and settle the message ``id``; never raises for its sake.

        Args:
            id: the spool id.
            now: the time of the pass (the processor's clock).
            peek: gives the id this thread handles next, if one is there
                already (None: none).  That message is claimed before
                this one is sent, so that a connection that pipelines can
                send its commands with this message's final dot.  The
                next call must then be for that id, or :meth:`let_go_ahead`.

        Returns:
            What became of it (see :class:`Done`).

        Raises:
            SpoolError: the spool itself failed while claiming (e.g. too
                many open files); the message is untouched.
        """
        ahead: _Ahead | None = getattr(self._local, "ahead", None)
        if ahead is not None and ahead.id != id:
            self.let_go_ahead()
            ahead = None
        self._local.ahead = None
        if self._stopping() or self.relay.paused(now) or self.waiting():
            if ahead is not None:
                self._local.ahead = ahead
                self.let_go_ahead()
            return Done(None)  # not started: stays where it is
        if ahead is None:
            claim = self.spool.claim(id)
            if claim is None:
                return self._lost(id)
            self.lost_run = 0
        elif ahead.claim is None:
            return ahead.done
        else:
            claim = ahead.claim
        try:
            done = self._handle(claim, now, ahead.conn if ahead is not None else None, peek)
        except BaseException:
            self._let_go(claim, failing=True)
            raise
        self._let_go(claim, failing=False)
        return done

    def let_go_ahead(self) -> None:
        """Give back the message claimed ahead by this thread, if any, untouched.

        Its connection is closed: the relay waits for that message's data.
        """
        ahead: _Ahead | None = getattr(self._local, "ahead", None)
        self._local.ahead = None
        if ahead is None:
            return
        if ahead.conn is not None:
            self.pool.discard(ahead.conn)
        if ahead.claim is not None:
            self._let_go(ahead.claim, failing=True)

    def _claim_ahead(
        self, conn: Connection, peek: Callable[[], str | None] | None
    ) -> tuple[Envelope, bytes] | None:
        """Claim the message this thread sends next; its (envelope, data), or None."""
        if peek is None or not getattr(conn, "sends_ahead", False):
            return None
        id = peek()
        if id is None:
            return None
        try:
            claim = self.spool.claim(id)
        except (SpoolError, ValueError):  # e.g. too many open files: it waits for the next pass
            log.exception("mail %s: cannot claim it", id)
            self._local.ahead = _Ahead(id, None)
            return None
        if claim is None:
            self._local.ahead = _Ahead(id, None, done=self._lost(id))
            return None
        self.lost_run = 0
        self._local.ahead = _Ahead(id, claim)
        return claim.envelope, claim.data

    def _handle(
        self,
        claim: QueueClaim,
        now: float,
        conn: Connection | None = None,
        peek: Callable[[], str | None] | None = None,
    ) -> Done:
        try:
            return self._deliver(claim, now, conn, peek)
        except _NotNow:
            claim.release()
            return Done(None)
        except Exception as exc:  # the one catch-all: log, defer, keep going
            return self._after_error(claim, now, exc)

    def _let_go(self, claim: QueueClaim, *, failing: bool) -> None:
        """Release a claim left unsettled, unless its outcome waits to be written."""
        if not claim.held or _WAITING.holds(self._key, claim):
            return
        try:
            claim.release()  # untouched, back to ready
        except SpoolError:
            if not failing:
                raise
            log.exception("spool %s: cannot release %s", self.spool.location, claim.id)

    def _deliver(
        self,
        claim: QueueClaim,
        now: float,
        conn: Connection | None = None,
        peek: Callable[[], str | None] | None = None,
    ) -> Done:
        env = claim.envelope
        result: SendResult | None = None
        error: BaseException | None = None
        try:
            result = self._send(claim, now, conn, peek)
        except _RelayTrouble as trouble:  # the relay is paused already
            return self._untouched(claim, trouble.error)
        except (DeliveryError, OSError) as exc:
            if getattr(exc, "about_relay", False):
                self._pause(now, exc)
                return self._untouched(claim, exc)
            error = exc
            carried = getattr(exc, "result", None)
            result = carried if isinstance(carried, SendResult) else None
        back = self.relay.answered(now)
        if back:
            log.info("relay %s is back after %d failed probe(s)", self.where, back)
        verdict = classify(env.recipients, result, error)
        reply = result.reply if result is not None and error is None else None
        return self._settle(claim, now, verdict, reply, error)

    def _send(
        self,
        claim: QueueClaim,
        now: float,
        conn: Connection | None = None,
        peek: Callable[[], str | None] | None = None,
    ) -> SendResult:
        if conn is None:
            conn = self.pool.take()
        if conn is None:
            # One connection attempt at a time: a dead relay sees one probe.
            with self._connect_lock:
                if self._stopping() or self.relay.paused(now):
                    raise _NotNow()
                try:
                    conn = connect(self.mailer)
                except Exception as exc:  # whatever it is, it is not the message's fault
                    self._pause(now, exc)  # before the next sender may try
                    raise _RelayTrouble(exc) from exc
                self.pool.add(conn)
        if self.rate is not None:
            wait = self.rate.reserve()
            if wait > 0 and (self._sleep(wait) or self._stopping()):
                self._give_back(conn, now)
                raise _NotNow()
        then = self._claim_ahead(conn, peek)
        waited = getattr(conn, "waited", None)
        try:
            if then is None:
                result = conn.send(claim.envelope, claim.data)
            else:
                send: Any = conn.send  # one that sends_ahead takes ``then``
                result = send(claim.envelope, claim.data, then=then)
            if waited is not None:
                self._local.relay_wait = getattr(conn, "waited", waited) - waited
        except (DeliveryError, OSError):
            self._give_back(conn, now)  # closed unless the mailer kept it usable
            raise
        except BaseException:
            self.pool.discard(conn)  # a bug: the session is in an unknown state
            raise
        self._give_back(conn, now)
        return result

    def _give_back(self, conn: Connection, now: float) -> None:
        ahead: _Ahead | None = getattr(self._local, "ahead", None)
        if ahead is not None and ahead.claim is not None and getattr(conn, "pending", False):
            ahead.conn = conn  # it waits for the message claimed ahead
            return
        self.pool.give_back(conn, keep=self.relay.parallelism(now))

    # -- relay trouble ---------------------------------------------------------------

    def _pause(self, now: float, exc: BaseException) -> None:
        """Record relay-level trouble: one error per outage, a warning per failed probe."""
        code = getattr(exc, "code", None)
        # A 421 while other connections are open means "too many connections".
        others = self.pool.count_alive() if code == 421 else 0
        pause = self.relay.trouble(now, crowded=others > 0, others=others)
        if pause is None:
            return  # already paused for this step
        if pause.failures == 1:
            log.error(
                "relay %s unavailable: %s; deliveries paused for %s, then one "
                "message probes it (no message is failed for this)%s",
                self.where,
                one_line(str(exc)),
                human(pause.delay),
                "; fewer connections for a while" if pause.lowered else "",
            )
        else:
            log.warning(
                "relay %s still unavailable (probe %d): %s; next probe in %s",
                self.where,
                pause.failures,
                one_line(str(exc)),
                human(pause.delay),
            )

    def _untouched(self, claim: QueueClaim, exc: BaseException) -> Done:
        claim.release()
        log.info(
            "mail %s <%s> from %s: not sent to %s, relay unavailable (%s); "
            "back in the queue untouched",
            claim.id,
            claim.message_id or "",
            claim.envelope.sender,
            ", ".join(claim.envelope.recipients),
            one_line(str(exc)),
        )
        return Done(None)

    # -- settling ----------------------------------------------------------------------

    def _settle(
        self,
        claim: QueueClaim,
        now: float,
        verdict: Verdict,
        reply: Reply | None,
        error: BaseException | None,
    ) -> Done:
        attempt = claim.attempts + 1
        retry_at: float | None = None
        if verdict.deferred:
            # give_up_after counts from when the message became due: the
            # commit, or the later time it was scheduled for.
            retry_at = self.retry.retry_at(now, attempt, claim.due_since)
            if retry_at is None:
                verdict = verdict.expired(self.retry.give_up_after)
        u = _Unwritten(claim, verdict, retry_at, reply, error, attempt, why="")
        # None: the spool cannot take the outcome yet; the claim stays held.
        return _write(self._key, u, first=True) or Done(None)

    # -- outcomes waiting to be written ------------------------------------------------

    def waiting(self) -> int:
        """How many outcomes for this spool wait to be written (the spool is full)."""
        return _WAITING.count(self._key)

    def write_waiting(self) -> list[Done]:
        """Try again to write the outcomes the spool could not take.

        Returns:
            What became of those now written (their events not dispatched).
        """
        done: list[Done] = []
        for key, u in _WAITING.take(self._key):
            try:
                d = _write(key, u, first=False)
            except Exception:  # a bug, not a full disk: give the message back
                log.exception("mail %s: cannot write its outcome; released", u.claim.id)
                _WAITING.drop(key, u)
                self._let_go(u.claim, failing=True)
                continue
            if d is not None:
                done.append(d)
        return done

    def last_chance(self) -> list[Done]:
        """Before the processor stops: write what waits, once more.

        A message whose outcome still cannot be written is released when
        the relay accepted none of its recipients (nothing is sent twice);
        otherwise it stays claimed, for a later processor of this spool in
        this process or the try at exit, and an error names the recipients
        that get it again if the process ends first.

        Returns:
            What became of those now written (their events not dispatched).
        """
        done = self.write_waiting()
        for key, u in _WAITING.take(self._key):
            claim = u.claim
            if not u.verdict.sent:
                _WAITING.drop(key, u)
                self._let_go(claim, failing=True)
                log.warning(
                    "mail %s <%s>: its outcome could not be written (%s); back in the "
                    "queue as it was (no recipient had accepted it)",
                    claim.id,
                    claim.message_id or "",
                    u.why,
                )
                continue
            if not u.warned:
                u.warned = True
                log.error(
                    "mail %s <%s>: stopping with the outcome of its delivery unwritten (%s): "
                    "the message stays claimed until this process ends; if the spool cannot "
                    "take the outcome by then, %s will get it a second time",
                    claim.id,
                    claim.message_id or "",
                    u.why,
                    ", ".join(u.verdict.sent),
                )
            _WAITING.put_back(u)
        return done

    def _after_error(self, claim: QueueClaim, now: float, exc: Exception) -> Done:
        """A bug or an unusual fault while handling ``claim``: defer it like a 4xx."""
        attempt = claim.attempts + 1
        retry_at = self.retry.retry_at(now, attempt, claim.due_since)
        head = (
            f"mail {claim.id} <{claim.message_id or ''}> from {claim.envelope.sender}: "
            f"unexpected error while sending to {', '.join(claim.envelope.recipients)}"
        )
        reason = f"internal error: {type(exc).__name__}: {exc}"
        try:
            if retry_at is None:  # as old as a message may get: give up like for a 4xx
                verdict = Verdict(deferred={r: (None, reason) for r in claim.envelope.recipients})
                verdict = verdict.expired(self.retry.give_up_after)
                claim.settle(failed=verdict.failed)
                log.exception("%s; failed (expired)", head)
                return Done("failed")
            claim.defer(retry_at, reason)
        except Exception:
            until = now + self.retry.delay(attempt)
            log.exception("%s; cannot defer it either, leaving it until %s", head, when(until))
            with self._skip_lock:
                self._skip[claim.id] = until
            return Done(None)
        log.exception("%s; deferred until %s (attempt %d)", head, when(retry_at), attempt)
        return Done("deferred")

    # -- helpers -----------------------------------------------------------------------

    def _lost(self, id: str) -> Done:
        """What became of ``id`` when claiming it failed: quarantined, or taken."""
        if self._quarantined(id):
            return Done("quarantined")
        self.lost_run += 1
        return Done(None)

    def _quarantined(self, id: str) -> bool:
        """Did this thread's failed claim just move ``id`` to quarantine?

        No system call: a claim lost to another processor on the same
        spool is common when several drain it, and must stay cheap.
        """
        return self.spool.quarantined_last(id)

    def skipped(self, id: str, now: float) -> bool:
        """True for a message that could not be deferred, until its retry time."""
        with self._skip_lock:
            until = self._skip.get(id)
            if until is None:
                return False
            if now < until:
                return True
            del self._skip[id]
            return False

    def next_unskip(self, now: float) -> float | None:
        """The earliest time a skipped message is due again, if any (forgets past ones)."""
        with self._skip_lock:
            self._skip = {id: t for id, t in self._skip.items() if t > now}
            return min(self._skip.values(), default=None)
