"""Outcomes the spool could not take yet: kept claimed, written again until it does.

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

A database queue's claim does not survive its session: while the database
is down the outcome waits the same way (:class:`~mailspool.errors.QueueUnavailable`),
and if another processor took the message meanwhile, the claim is lost
(:class:`~mailspool.errors.ClaimLost`): the outcome is not recorded, and the
log line says who may get the message twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from mailspool.errors import ClaimLost, QueueUnavailable
from mailspool.events import Attempt
from mailspool.processor.outcome import Done, Verdict, one_line, report
from mailspool.queue import QueueClaim
from mailspool.smtp.mailer import Reply

__all__ = ["WAITING", "Unwritten", "hook_exit", "last_chance", "write", "write_again"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")

#: Gives a claim back: ``let_go(claim, failing=True)`` (see the sender).
LetGo = Callable[..., None]


@dataclass
class Unwritten:
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
        self._spools: dict[str, dict[str, Unwritten]] = {}

    def add(self, key: str, u: Unwritten) -> None:
        with self._lock:
            self._spools.setdefault(key, {})[u.claim.id] = u

    def count(self, key: str) -> int:
        # One read of a dict's size: no lock needed (asked twice per message).
        return len(self._spools.get(key, ()))

    def take(self, key: str | None = None) -> list[tuple[str, Unwritten]]:
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

    def put_back(self, u: Unwritten) -> None:
        with self._lock:
            u.busy = False

    def drop(self, key: str, u: Unwritten) -> None:
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


#: Every outcome waiting to be written in this process, by spool.
WAITING = _Waiting()


def _outcome(verdict: Verdict) -> str:
    if verdict.deferred:
        return "deferred"
    return "failed" if verdict.failed else "removed"


def write(key: str, u: Unwritten, *, first: bool) -> Done | None:
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
        WAITING.drop(key, u)
        accepted = ", ".join(v.sent)
        log.error(
            "%s; but this outcome is not recorded: %s%s",
            told.line,
            one_line(str(exc)),
            f"; {accepted} may get it a second time" if accepted else "",
        )
        return None
    except OSError as exc:  # SpoolIOError, QueueUnavailable: OSErrors
        if claim.held:
            _not_taken(key, u, exc, told.line, first=first)
            return None
        # The new state was renamed into place; only syncing its
        # directory failed.  It is the message now: tell it as settled.
        log.error("mail %s: outcome written, but not synced to disk: %s", claim.id, exc)
        outcome = _outcome(v)
    for event in told.events:
        event.attempt = u.facts
    extra = {"attempt": u.facts}
    if first:
        log.log(told.level, "%s", told, extra=extra)  # the line is made only if it is logged
    else:
        WAITING.drop(key, u)
        log.log(
            told.level,
            "%s (written to the spool now, after %d failed write(s))",
            told.line,
            u.failures,
            extra=extra,
        )
    outcome = {"removed": "sent"}.get(outcome, outcome)
    return Done(outcome, told.events, partly=bool(v.sent) and outcome != "sent")


def _not_taken(key: str, u: Unwritten, exc: OSError, line: str, *, first: bool) -> None:
    """The spool refused ``u``'s outcome: keep it waiting (said once, the first time)."""
    u.why = one_line(exc.strerror or str(exc))
    if not first:
        u.failures += 1
        WAITING.put_back(u)
        return
    WAITING.add(key, u)
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


def write_again(key: str, let_go: LetGo) -> list[Done]:
    """Try again to write the outcomes of spool ``key`` that wait.

    Returns:
        What became of those now written (their events not dispatched).
    """
    done: list[Done] = []
    for k, u in WAITING.take(key):
        try:
            d = write(k, u, first=False)
        except Exception:  # a bug, not a full disk: give the message back
            log.exception("mail %s: cannot write its outcome; released", u.claim.id)
            WAITING.drop(k, u)
            let_go(u.claim, failing=True)
            continue
        if d is not None:
            done.append(d)
    return done


def last_chance(key: str, let_go: LetGo) -> list[Done]:
    """Before a processor stops: write what waits for spool ``key``, once more.

    A message whose outcome still cannot be written is released when
    the relay accepted none of its recipients (nothing is sent twice);
    otherwise it stays claimed, for a later processor of this spool in
    this process or the try at exit, and an error names the recipients
    that get it again if the process ends first.

    Returns:
        What became of those now written (their events not dispatched).
    """
    done = write_again(key, let_go)
    for k, u in WAITING.take(key):
        claim = u.claim
        if not u.verdict.sent:
            WAITING.drop(k, u)
            let_go(claim, failing=True)
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
        WAITING.put_back(u)
    return done


def _write_before_exit() -> None:
    """At interpreter exit, the last try for the outcomes still waiting."""
    for key, u in WAITING.take():
        try:
            if write(key, u, first=False) is not None:
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


def hook_exit() -> None:
    """The exit and fork hooks, registered once, when the first sender is made."""
    global _hooked
    if _hooked:
        return
    with _hook_lock:
        if not _hooked:
            atexit.register(_write_before_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=WAITING.forget)
            _hooked = True
