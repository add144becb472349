"""One message from the spool to the relay: claim, send, settle per recipient.

This is the per-message boundary of the queue processor.  A sender thread
of :class:`~mailspool.processor.QueueProcessor` calls :meth:`Sender.handle`
with one spool id; it claims the message (an ``flock`` that dies with the
process: no two senders ever hold one message), sends it over a pooled
connection, and settles it recipient by recipient (:mod:`mailspool.processor.outcome`):

* accepted: sent for good, never sent to again;
* 5xx: failed, with the relay's code and text;
* 4xx: deferred until the :class:`~mailspool.processor.policy.RetryPolicy`
  says (with jitter; after a 4xx to ``MAIL`` or the data, quick retries in
  the same pass: see :meth:`Sender._settle`), counted as an attempt; once
  the message is older than ``give_up_after`` its pending recipients fail
  as expired.

What is whose trouble, and what it does to the relay's state, is
:mod:`mailspool.processor.connector`'s: when a session cannot be opened
the message goes back untouched (but a 421 greeting while other sessions
work lowers only the number of connections, and the message is tried again
in the same pass); when the relay says "too fast" it goes back untouched
and is tried again in the same pass, paced; when the session breaks in a
transaction the message is deferred, with quick retries in the pass,
unless the relay is gone or paused as a whole, and then it goes back
untouched.

The wait for the rate comes before a transaction, with no connection held,
and nothing of the next message is sent with a message's final dot (that
would hide the relay's acceptance if it stopped then: a duplicate).

Exceptions are caught broadly in :meth:`Sender.handle` (a bug while one
message is handled is logged with its traceback, the message deferred, and
the next one taken), and where the connector opens a connection (whatever
fails there is the relay's trouble, not the message's).

Every attempt is told in one log line (logger ``mailspool.processor``)
naming the spool id, the Message-Id, the sender, each recipient's outcome
and the relay's reply; relay pauses are told once per outage.

An outcome the spool cannot take (it is full) is not dropped: the claim is
kept and the same outcome written again until the spool takes it
(:mod:`mailspool.processor.unwritten`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import threading
import time
from collections.abc import Callable

from mailspool.errors import DeliveryError, QueueUnavailable, SpoolError
from mailspool.events import Attempt, MailQuarantined
from mailspool.processor import unwritten
from mailspool.processor.connector import Connector, NotNow, RelayTrouble
from mailspool.processor.facts import attempt_facts, facts_read
from mailspool.processor.outage import Outage
from mailspool.processor.outcome import (
    NOTHING,
    Done,
    Verdict,
    classify,
    one_line,
    too_fast,
    trouble_kind,
    when,
)
from mailspool.processor.pacing import Pacer
from mailspool.processor.policy import QUICK_IN_PASS, QUICK_TRIES, RelayState, RetryPolicy
from mailspool.processor.pool import ConnectionPool
from mailspool.processor.skips import Skips
from mailspool.processor.unwritten import WAITING, Unwritten
from mailspool.queue import QueueBackend, QueueClaim
from mailspool.smtp.result import Reply, SendResult
from mailspool.smtp.seams import Connection, Mailer, TimedConnection
from mailspool.smtp.session import SMTPConnection

__all__ = ["Done", "Sender"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")

#: A wait for the rate is cut into steps this long (seconds), each followed
#: by closing the pooled connections idle too long.
_WAIT_STEP = 5.0


def _timed(conn: Connection) -> TimedConnection | None:
    """``conn`` when it counts the seconds it waited for the relay, else None.

    An SMTPConnection always does, and is told by its type: ``isinstance``
    against a runtime-checkable Protocol looks up each of its names and
    cost about 86,000 instructions per message on Python 3.11
    (bench/count.py), a sixth of a drained message's work.
    """
    if type(conn) is SMTPConnection:
        return conn
    return conn if isinstance(conn, TimedConnection) else None


class _ThreadTimes(threading.local):
    """What one sender thread measures of its current message (monotonic seconds)."""

    started: float | None = None  # the pacer's clock when the transaction began
    began: float | None = None  # time.monotonic() then, for the attempt's facts
    relay_wait: float | None = None  # waited for the relay's replies, if the connection tells


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
        pacer: the sending rate (configured limit, and what the relay accepts).
        stopping: true once the processor is asked to stop.
        sleep: waits the given seconds; returns True when cut short by a stop.
        outage: told when the queue cannot be reached while claiming.
    """

    def __init__(
        self,
        spool: QueueBackend,
        mailer: Mailer,
        *,
        retry: RetryPolicy,
        relay: RelayState,
        pool: ConnectionPool,
        pacer: Pacer,
        stopping: Callable[[], bool],
        sleep: Callable[[float], bool],
        outage: Outage | None = None,
    ) -> None:
        unwritten.hook_exit()
        self.spool = spool
        self.mailer = mailer
        self.retry = retry
        self.relay = relay
        self.pool = pool
        self.pacer = pacer
        self._connector = Connector(mailer, relay=relay, pool=pool, pacer=pacer, stopping=stopping)
        self.where = self._connector.where
        self._stopping = stopping
        self._sleep = sleep
        self.outage = outage if outage is not None else Outage(spool.location)
        self.skips = Skips()  # messages that could not even be deferred
        self._key = os.path.realpath(spool.location)  # whose waiting outcomes are ours
        self._local = _ThreadTimes()
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
        wait = self._local.relay_wait
        self._local.relay_wait = None
        return wait

    def handle(self, id: str, now: float, retried: int = 0, resent: bool = False) -> Done:
        """Claim, send and settle the message ``id``; never raises for its sake.

        Args:
            id: the spool id.
            now: the time of the pass (the processor's clock).
            retried: attempts this pass made at it before (it met one-off
                faults: see :meth:`_settle`).
            resent: one of those lost the reply after the final dot.

        Returns:
            What became of it (see :class:`Done`).

        Raises:
            SpoolError: the spool itself failed while claiming (e.g. too
                many open files); the message is untouched.  A queue that
                cannot be reached (:class:`~mailspool.errors.QueueUnavailable`)
                is told to ``outage`` instead.
        """
        if self._stopping() or self.relay.paused(now) or self.waiting():
            return NOTHING  # not started: stays where it is
        try:
            claim = self.spool.claim(id)
        except QueueUnavailable as exc:  # an outage: no message's fault
            self.outage.failed(exc)
            return NOTHING
        if claim is None:
            return self._lost(id)
        self.lost_run = 0
        self._local.retried = retried
        self._local.resent = resent
        try:
            done = self._handle(claim, now)
        except BaseException:
            self._let_go(claim, failing=True)
            raise
        self._let_go(claim, failing=False)
        return done

    def _handle(self, claim: QueueClaim, now: float) -> Done:
        try:
            return self._deliver(claim, now)
        except NotNow:
            claim.release()
            return NOTHING
        except Exception as exc:  # the one catch-all: log, defer, keep going
            return self._after_error(claim, now, exc)

    def _let_go(self, claim: QueueClaim, *, failing: bool) -> None:
        """Release a claim left unsettled, unless its outcome waits to be written."""
        if not claim.held or WAITING.holds(self._key, claim):
            return
        try:
            claim.release()  # untouched, back to ready
        except SpoolError:
            if not failing:
                raise
            log.exception("spool %s: cannot release %s", self.spool.location, claim.id)

    def _deliver(self, claim: QueueClaim, now: float) -> Done:
        env = claim.envelope
        result: SendResult | None = None
        error: BaseException | None = None
        quick = lost = False
        self._local.started = None
        try:
            result = self._send(claim, now)
        except RelayTrouble as trouble:  # the relay is paused already, or crowded
            return self._untouched(claim, trouble.error, again=trouble.again)
        except (DeliveryError, OSError) as exc:
            kind = trouble_kind(exc)
            if kind == "relay":
                self._connector.pause(now, exc)
                return self._untouched(claim, exc)
            if kind == "rate":
                return self._too_fast(claim, now, exc)
            if kind == "session":
                # An outage, or this session's bad luck?  Ask for a new one.
                if not self._connector.replace(now) or self._connector.cohort(now, exc):
                    return self._untouched(claim, exc)
                quick = True
                # Lost after the final dot, it may have been delivered: one
                # quick retry at most (see _settle), never a second one.
                lost = getattr(exc, "maybe_sent", False) is True
            else:
                self.relay.worked()
                # A 4xx to MAIL or to the data is most often a passing fault
                # of the relay; one at RCPT (greylisting) wants the usual
                # wait, and so does a recipient deferred at RCPT when the
                # data got a 5xx.
                quick = (
                    isinstance(exc, DeliveryError)
                    and exc.transient
                    and exc.phase in ("mail", "data")
                )
            error = exc
            carried = exc.result if isinstance(exc, DeliveryError) else None
            result = carried if isinstance(carried, SendResult) else None
        else:
            self.relay.accepted()
            self.pacer.accepted()
        back = self.relay.answered(now)  # the failures in a row: the first was no probe
        if back:
            log.info("relay %s is back after %d failed probe(s)", self.where, back - 1)
        verdict = classify(env.recipients, result, error)
        reply = result.reply if result is not None and error is None else None
        return self._settle(claim, now, verdict, reply, error, quick=quick, lost=lost)

    def _send(self, claim: QueueClaim, now: float) -> SendResult:
        # The wait for the rate comes before the transaction, with no
        # connection held: nothing is sent ahead and then left waiting.
        wait = self.pacer.reserve()
        if wait > 0 and self._wait(wait):
            raise NotNow()
        if self.relay.paused(now):
            raise NotNow()
        conn = self.pool.take()
        if conn is None:
            conn = self._connector.open(now)
        timed = _timed(conn)
        waited = timed.waited if timed is not None else None
        self._local.started = self.pacer.clock()
        self._local.began = time.monotonic()
        try:
            result = conn.send(claim.envelope, claim.data)
            if timed is not None and waited is not None:
                self._local.relay_wait = timed.waited - waited
        except (DeliveryError, OSError) as exc:
            if too_fast(exc):
                # A fresh session for the next message: a relay counts the
                # errors of a session (Postfix answers slower and slower).
                self.pool.discard(conn)
            else:
                self.pool.give_back(conn, keep=self.relay.parallelism(now))  # closed unless usable
            raise
        except BaseException:
            self.pool.discard(conn)  # a bug: the session is in an unknown state
            raise
        self.pool.give_back(conn, keep=self.relay.parallelism(now))
        return result

    def _wait(self, seconds: float) -> bool:
        """Wait for the rate; True when a stop cut it short.

        Idle pooled connections are closed (with QUIT) along the way, before
        the relay's own idle timeout would close them.
        """
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return self._stopping()
            if self._sleep(min(left, _WAIT_STEP)) or self._stopping():
                return True
            self.pool.close_idle()

    # -- relay trouble ---------------------------------------------------------------

    @property
    def trouble(self) -> str:
        """The failure that paused the relay last, on one line (for ``status``)."""
        return self._connector.trouble

    def _too_fast(self, claim: QueueClaim, now: float, exc: BaseException) -> Done:
        """The relay refused for rate: slow down; the message goes back, not counted."""
        started = self._local.started
        if self._connector.too_fast(now, exc, started):
            return self._untouched(claim, exc)
        return self._untouched(claim, exc, again=True, level=logging.DEBUG)

    def _untouched(
        self,
        claim: QueueClaim,
        exc: BaseException,
        *,
        again: bool = False,
        level: int = logging.INFO,
    ) -> Done:
        claim.release()
        log.log(
            level,
            "mail %s <%s> from %s: not sent to %s, %s (%s); back in the queue untouched%s",
            claim.id,
            claim.message_id or "",
            claim.envelope.sender,
            ", ".join(claim.envelope.recipients),
            "relay busy" if again else "relay unavailable",
            one_line(str(exc)),
            ", tried again in this pass" if again else "",
        )
        return Done(None, again=again)

    # -- settling ----------------------------------------------------------------------

    def _settle(
        self,
        claim: QueueClaim,
        now: float,
        verdict: Verdict,
        reply: Reply | None,
        error: BaseException | None,
        *,
        quick: bool = False,
        lost: bool = False,
    ) -> Done:
        """Write the attempt's outcome; a deferred one gets its retry time.

        After a one-off fault (``quick``), a message that this pass tried
        every time is tried again in this pass, soon (``retry_in``), up to
        :data:`QUICK_TRIES` attempts; after a reply lost after the final dot
        (``lost``: it may have been delivered) once per pass at most: a
        second lost reply sends it to the usual schedule.  Otherwise the
        usual schedule, the quick tries counting as one step.
        """
        attempt = claim.attempts + 1
        retried: int = getattr(self._local, "retried", 0)
        resent: bool = getattr(self._local, "resent", False)
        retry_at: float | None = None
        retry_in: float | None = None
        if verdict.deferred:
            # Only a message this pass tried every time gets quick retries:
            # one deferred before waits for its schedule.
            fresh = claim.attempts == retried
            quick = quick and fresh and retried + 1 < QUICK_TRIES and not (lost and resent)
            # The quick tries of one pass count as one step of the schedule.
            step = retried + 1 if quick else attempt - retried if fresh else attempt
            # give_up_after counts from when the message became due: the
            # commit, or the later time it was scheduled for.
            retry_at = self.retry.retry_at(
                now, step, claim.due_since, spread=random.random(), quick=quick
            )
            if retry_at is None:
                verdict = verdict.expired(self.retry.give_up_after)
            elif quick and retry_at - now <= QUICK_IN_PASS:
                retry_in = retry_at - now
        u = Unwritten(claim, verdict, retry_at, reply, error, attempt, why="")
        u.facts = self._facts(claim, verdict, reply, attempt)
        # None: the spool cannot take the outcome yet; the claim stays held.
        done = unwritten.write(self._key, u, first=True)
        if done is None:
            return NOTHING
        if retry_in is not None and done.outcome == "deferred":
            return dataclasses.replace(done, retry_in=retry_in, lost=lost)
        return done

    def _facts(
        self, claim: QueueClaim, verdict: Verdict, reply: Reply | None, attempt: int
    ) -> Attempt | None:
        began = self._local.began
        self._local.began = None
        if not facts_read(verdict, log):
            return None
        took = None if began is None else time.monotonic() - began
        return attempt_facts(claim, verdict, reply, attempt, relay=self.where, seconds=took)

    # -- outcomes waiting to be written ------------------------------------------------

    def waiting(self) -> int:
        """How many outcomes for this spool wait to be written (the spool is full)."""
        return WAITING.count(self._key)

    def write_waiting(self) -> list[Done]:
        """Try again to write the outcomes the spool could not take.

        Returns:
            What became of those now written (their events not dispatched).
        """
        return unwritten.write_again(self._key, self._let_go)

    def last_chance(self) -> list[Done]:
        """Before the processor stops: write what waits, once more
        (:func:`mailspool.processor.unwritten.last_chance`)."""
        return unwritten.last_chance(self._key, self._let_go)

    def _after_error(self, claim: QueueClaim, now: float, exc: Exception) -> Done:
        """A bug or an unusual fault while handling ``claim``: defer it like a 4xx."""
        attempt = claim.attempts + 1
        retry_at = self.retry.retry_at(now, attempt, claim.due_since, spread=random.random())
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
            self.skips.add(claim.id, until)
            return NOTHING
        log.exception("%s; deferred until %s (attempt %d)", head, when(retry_at), attempt)
        return Done("deferred")

    # -- helpers -----------------------------------------------------------------------

    def _lost(self, id: str) -> Done:
        """What became of ``id`` when claiming it failed: quarantined, or taken."""
        if self._quarantined(id):
            return Done("quarantined", (MailQuarantined(id),))
        self.lost_run += 1
        return NOTHING

    def _quarantined(self, id: str) -> bool:
        """Did this thread's failed claim just move ``id`` to quarantine?

        No system call: a claim lost to another processor on the same
        spool is common when several drain it, and must stay cheap.
        """
        return self.spool.quarantined_last(id)
