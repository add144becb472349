"""One message from the spool to the relay: claim, send, settle per recipient.

This is the per-message boundary of the queue processor.  A sender thread
of :class:`~mailspool.processor.QueueProcessor` calls :meth:`Sender.handle`
with one spool id; it claims the message (an ``flock`` that dies with the
process: no two senders ever hold one message), sends it over a pooled
connection, and settles it recipient by recipient (:mod:`mailspool.processor.outcome`):

* accepted: sent for good, never sent to again;
* 5xx: failed, with the relay's code and text;
* 4xx: deferred until the :class:`~mailspool.processor.policy.RetryPolicy`
  says (with jitter; a quick first retry for a 4xx to ``MAIL`` or the
  data), counted as an attempt; once the message is older than
  ``give_up_after`` its pending recipients fail as expired.

What is whose trouble is decided by the phase and the evidence
(:func:`~mailspool.processor.outcome.trouble_kind`; the table is in
docs/operations.md):

* opening a session fails (connect, greeting, EHLO, STARTTLS, AUTH, or a
  refusal about our configuration): the message goes back untouched and
  the relay is paused (:class:`~mailspool.processor.policy.RelayState`);
  but a 421 greeting while other sessions work only lowers the number of
  connections, and the message is tried again in the same pass;
* the relay says "too fast" at ``MAIL``: the learned rate is cut
  (:class:`~mailspool.processor.pacing.Pacer`), the message goes back
  untouched and is tried again in the same pass, paced;
* the session breaks in a transaction (lost, no reply, a 421 after
  ``MAIL``): a new connection is opened at once.  If that fails the relay
  is gone: paused, the message untouched.  If it works the message is
  deferred with a quick first retry, unless :data:`~mailspool.processor.policy.COHORT`
  transactions broke in a row: then the relay is paused as a whole.

Connections are opened one at a time, under a lock that re-checks the
pause, so a dead relay sees one attempt per backoff step, not one per
queued message.  The wait for the rate comes before a transaction, with
no connection held, and nothing of the next message is sent with a
message's final dot (that would hide the relay's acceptance if it stopped
then: a duplicate).

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
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailspool.errors import ClaimLost, DeliveryError, QueueUnavailable, SpoolError
from mailspool.events import Attempt, MailEvent, MailQuarantined
from mailspool.processor.observe import attempt_facts
from mailspool.processor.outage import Outage
from mailspool.processor.outcome import (
    Verdict,
    classify,
    human,
    one_line,
    per_second,
    report,
    too_fast,
    trouble_kind,
    when,
)
from mailspool.processor.pacing import Pacer
from mailspool.processor.policy import COHORT, THROTTLE_PERIOD, RelayState, RetryPolicy
from mailspool.processor.pool import Connection, ConnectionPool, connect, relay_name
from mailspool.queue import QueueBackend, QueueClaim
from mailspool.smtp.mailer import Reply, SendResult

__all__ = ["Done", "Sender"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")

#: A wait for the rate is cut into steps this long (seconds), each followed
#: by closing the pooled connections idle too long.
_WAIT_STEP = 5.0


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
    #: Not attempted, but to be tried again in this pass (the relay said
    #: "too fast", or refused one connection more than it takes).
    again: bool = False
    #: deferred or failed, but some recipients accepted it in this attempt
    partly: bool = False


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
    facts: Attempt | None = None  # for the events and the log record


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
        said = (u.reply.code, u.reply.text) if u.reply is not None and v.sent else None
        outcome = claim.settle(
            sent=v.sent, failed=v.failed, deferred=v.deferred, retry_at=u.retry_at, reply=said
        )
    except ClaimLost as exc:  # a database queue: another holder has the message now
        _WAITING.drop(key, u)
        accepted = ", ".join(v.sent)
        log.error(
            "%s; but this outcome is not recorded: %s%s",
            told.line,
            one_line(str(exc)),
            f"; {accepted} may get it a second time" if accepted else "",
        )
        return None
    except OSError as exc:  # SpoolError is an OSError
        if not claim.held:
            # The new state was renamed into place; only syncing its
            # directory failed.  It is the message now: tell it as settled.
            log.error("mail %s: outcome written, but not synced to disk: %s", claim.id, exc)
            outcome = _outcome(v)
        elif first:
            u.why = one_line(exc.strerror or str(exc))
            _WAITING.add(key, u)
            _tell_waiting(told.line, u, exc)
            return None
        else:
            u.failures += 1
            u.why = one_line(exc.strerror or str(exc))
            _WAITING.put_back(u)
            return None
    for event in told.events:
        event.attempt = u.facts
    extra = {"attempt": u.facts}
    if first:
        log.log(told.level, "%s", told, extra=extra)  # the line is made only if it is logged
    else:
        _WAITING.drop(key, u)
        log.log(
            told.level,
            "%s (written to the spool now, after %d failed write(s))",
            told.line,
            u.failures,
            extra=extra,
        )
    outcome = {"removed": "sent"}.get(outcome, outcome)
    return Done(outcome, told.events, partly=bool(v.sent) and outcome != "sent")


def _tell_waiting(line: str, u: _Unwritten, exc: OSError) -> None:
    """Log, once, that an attempt's outcome waits to be written, and what that risks."""
    accepted = ", ".join(u.verdict.sent)
    if isinstance(exc, QueueUnavailable):  # its claim may not outlast the outage
        log.error(
            "%s; but the queue cannot record this outcome now (%s): it is written "
            "as soon as the queue is back; no new message is sent until then%s",
            line,
            u.why,
            f"; if another processor takes the message first, {accepted} will get it again"
            if accepted
            else "",
        )
        return
    log.error(
        "%s; but the spool cannot record this outcome (%s): the message stays "
        "claimed by this process and the same outcome is written as soon as the "
        "spool takes it; no new message is sent until then%s",
        line,
        u.why,
        f"; if the process ends before, {accepted} will get it again" if accepted else "",
    )


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
    """Opening a connection failed; the relay is paused already (or, with
    ``again``, only fewer connections are allowed: try the message again)."""

    def __init__(self, error: BaseException, *, again: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.again = again


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
        pacer: the sending rate (configured limit, and what the relay accepts).
        stopping: true once the processor is asked to stop.
        sleep: waits the given seconds; returns True when cut short by a stop.
        outage: told when the queue cannot be reached while claiming.
    """

    def __init__(
        self,
        spool: QueueBackend,
        mailer: Any,
        *,
        retry: RetryPolicy,
        relay: RelayState,
        pool: ConnectionPool,
        pacer: Pacer,
        stopping: Callable[[], bool],
        sleep: Callable[[float], bool],
        outage: Outage | None = None,
    ) -> None:
        if not _hooked:
            _hook_exit()
        self.spool = spool
        self.mailer = mailer
        self.retry = retry
        self.relay = relay
        self.pool = pool
        self.pacer = pacer
        self.where = relay_name(mailer)
        self._stopping = stopping
        self._sleep = sleep
        self.outage = outage if outage is not None else Outage(spool.location)
        self._connect_lock = threading.Lock()
        self._skip: dict[str, float] = {}  # messages that could not even be deferred
        self._skip_lock = threading.Lock()
        self._key = os.path.realpath(spool.location)  # whose waiting outcomes are ours
        self._local = threading.local()
        #: the failure that paused the relay last, on one line (for ``status``)
        self.trouble = ""
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

    def handle(self, id: str, now: float) -> Done:
        """Claim, send and settle the message ``id``; never raises for its sake.

        Args:
            id: the spool id.
            now: the time of the pass (the processor's clock).

        Returns:
            What became of it (see :class:`Done`).

        Raises:
            SpoolError: the spool itself failed while claiming (e.g. too
                many open files); the message is untouched.  A queue that
                cannot be reached (:class:`~mailspool.errors.QueueUnavailable`)
                is told to ``outage`` instead.
        """
        if self._stopping() or self.relay.paused(now) or self.waiting():
            return Done(None)  # not started: stays where it is
        try:
            claim = self.spool.claim(id)
        except QueueUnavailable as exc:  # an outage: no message's fault
            self.outage.failed(exc)
            return Done(None)
        if claim is None:
            return self._lost(id)
        self.lost_run = 0
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

    def _deliver(self, claim: QueueClaim, now: float) -> Done:
        env = claim.envelope
        result: SendResult | None = None
        error: BaseException | None = None
        quick = False
        self._local.started = None
        try:
            result = self._send(claim, now)
        except _RelayTrouble as trouble:  # the relay is paused already, or crowded
            return self._untouched(claim, trouble.error, again=trouble.again)
        except (DeliveryError, OSError) as exc:
            kind = trouble_kind(exc)
            if kind == "relay":
                self._pause(now, exc)
                return self._untouched(claim, exc)
            if kind == "rate":
                return self._too_fast(claim, now, exc)
            if kind == "session":
                # An outage, or this session's bad luck?  Ask for a new one.
                if not self._relay_takes_connections(now) or self._cohort(now, exc):
                    return self._untouched(claim, exc)
                quick = True
            else:
                self.relay.worked()
                # A 4xx to MAIL or to the data is most often a passing fault
                # of the relay; one at RCPT (greylisting) wants the usual wait.
                quick = getattr(exc, "phase", "") in ("mail", "data")
            error = exc
            carried = getattr(exc, "result", None)
            result = carried if isinstance(carried, SendResult) else None
        else:
            self.relay.accepted()
            self.pacer.accepted()
        back = self.relay.answered(now)  # the failures in a row: the first was no probe
        if back:
            log.info("relay %s is back after %d failed probe(s)", self.where, back - 1)
        verdict = classify(env.recipients, result, error)
        reply = result.reply if result is not None and error is None else None
        return self._settle(claim, now, verdict, reply, error, quick=quick)

    def _send(self, claim: QueueClaim, now: float) -> SendResult:
        # The wait for the rate comes before the transaction, with no
        # connection held: nothing is sent ahead and then left waiting.
        wait = self.pacer.reserve()
        if wait > 0 and self._wait(wait):
            raise _NotNow()
        if self.relay.paused(now):
            raise _NotNow()
        conn = self.pool.take()
        if conn is None:
            conn = self._connect(now)
        waited = getattr(conn, "waited", None)
        self._local.started = self.pacer.clock()
        self._local.began = time.monotonic()
        try:
            result = conn.send(claim.envelope, claim.data)
            if waited is not None:
                self._local.relay_wait = getattr(conn, "waited", waited) - waited
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

    def _connect(self, now: float) -> Connection:
        """Open a connection (one at a time: a dead relay sees one probe)."""
        with self._connect_lock:
            if self._stopping() or self.relay.paused(now):
                raise _NotNow()
            try:
                conn = connect(self.mailer)
            except Exception as exc:  # whatever it is, it is not the message's fault
                others = self.pool.count_alive() if getattr(exc, "code", None) == 421 else 0
                if others:  # "too many connections": fewer, but no pause
                    self._crowded(now, exc, others)
                    raise _RelayTrouble(exc, again=True) from exc
                self._pause(now, exc)  # before the next sender may try
                raise _RelayTrouble(exc) from exc
            self.pool.add(conn)
            return conn

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

    def _relay_takes_connections(self, now: float) -> bool:
        """After a session broke in a transaction: replace it, and see whether
        the relay still takes connections (False: it is paused now)."""
        with self._connect_lock:
            if self.relay.paused(now):
                return False
            try:
                conn = connect(self.mailer)
            except Exception as exc:  # whatever it is, the relay is the trouble
                self._pause(now, exc)
                return False
            self.pool.add(conn)
        self.pool.give_back(conn, keep=self.relay.parallelism(now))
        return True

    def _cohort(self, now: float, exc: BaseException) -> bool:
        """Count a broken session; True when it completes a cohort (relay paused)."""
        pause = self.relay.broken(now)
        if pause is None:
            return False
        self.trouble = f"broke {COHORT} transactions in a row (last: {one_line(str(exc))})"
        log.error(
            "relay %s broke %d transactions in a row (last: %s); deliveries paused "
            "for %s, then one message probes it (no message is failed for this)",
            self.where,
            COHORT,
            one_line(str(exc)),
            human(pause.delay),
        )
        return True

    def _too_fast(self, claim: QueueClaim, now: float, exc: BaseException) -> Done:
        """The relay refused for rate: slow down; the message goes back, not counted."""
        started = getattr(self._local, "started", None)
        cut = self.pacer.refused(self.pacer.clock() if started is None else started)
        if cut is not None and cut.give_up:
            self._pause(now, exc)
            return self._untouched(claim, exc)
        if cut is not None:
            conns = self.relay.slow_down(now)
            log.warning(
                "relay %s says too fast (%s): pacing at %s, %d connection(s)%s",
                self.where,
                one_line(str(exc)),
                per_second(cut.rate),
                conns,
                f", next message in {cut.hold:.3g}s" if cut.hold else "",
            )
        return self._untouched(claim, exc, again=True, level=logging.DEBUG)

    def _crowded(self, now: float, exc: BaseException, others: int) -> None:
        limit = self.relay.crowd(now, others)
        log.warning(
            "relay %s refused a connection while %d were open (%s): at most %d "
            "connection(s) for %s; deliveries go on",
            self.where,
            others,
            one_line(str(exc)),
            limit,
            human(THROTTLE_PERIOD),
        )

    def _pause(self, now: float, exc: BaseException) -> None:
        """Record relay-level trouble: one error per outage, a warning per failed probe."""
        pause = self.relay.trouble(now)
        if pause is None:
            return  # already paused for this step
        self.trouble = one_line(str(exc))
        if pause.failures == 1:
            log.error(
                "relay %s unavailable: %s; deliveries paused for %s, then one "
                "message probes it (no message is failed for this)",
                self.where,
                one_line(str(exc)),
                human(pause.delay),
            )
        else:
            log.warning(
                "relay %s still unavailable (probe %d): %s; next probe in %s",
                self.where,
                pause.failures,
                one_line(str(exc)),
                human(pause.delay),
            )

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
    ) -> Done:
        attempt = claim.attempts + 1
        retry_at: float | None = None
        if verdict.deferred:
            # give_up_after counts from when the message became due: the
            # commit, or the later time it was scheduled for.
            retry_at = self.retry.retry_at(
                now, attempt, claim.due_since, spread=random.random(), quick=quick
            )
            if retry_at is None:
                verdict = verdict.expired(self.retry.give_up_after)
        u = _Unwritten(claim, verdict, retry_at, reply, error, attempt, why="")
        u.facts = self._facts(claim, verdict, reply, attempt)
        # None: the spool cannot take the outcome yet; the claim stays held.
        return _write(self._key, u, first=True) or Done(None)

    def _facts(
        self, claim: QueueClaim, verdict: Verdict, reply: Reply | None, attempt: int
    ) -> Attempt:
        began: float | None = getattr(self._local, "began", None)
        self._local.began = None
        took = None if began is None else time.monotonic() - began
        return attempt_facts(claim, verdict, reply, attempt, relay=self.where, seconds=took)

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
            with self._skip_lock:
                self._skip[claim.id] = until
            return Done(None)
        log.exception("%s; deferred until %s (attempt %d)", head, when(retry_at), attempt)
        return Done("deferred")

    # -- helpers -----------------------------------------------------------------------

    def _lost(self, id: str) -> Done:
        """What became of ``id`` when claiming it failed: quarantined, or taken."""
        if self._quarantined(id):
            return Done("quarantined", (MailQuarantined(id),))
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
