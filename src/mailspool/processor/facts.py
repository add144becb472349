"""The address-free facts of one settled attempt, for events, logs and metrics.

The sender attaches them to each event of the attempt and to its log
record (:class:`~mailspool.events.Attempt`); what reads them
(:mod:`mailspool.processor.observe`, :mod:`mailspool.metrics`,
:mod:`mailspool.jsonlog`) never sees an address.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import zope.event

from mailspool.events import Attempt

if TYPE_CHECKING:
    from mailspool.processor.outcome import Verdict
    from mailspool.queue import QueueClaim
    from mailspool.smtp.result import Reply

__all__ = ["attempt_facts", "facts_read"]


def attempt_facts(
    claim: QueueClaim,
    verdict: Verdict,
    reply: Reply | None,
    attempt: int,
    *,
    relay: str,
    seconds: float | None,
) -> Attempt:
    """The address-free facts of one settled attempt (see :class:`~mailspool.events.Attempt`).

    The reply that decides the outcome is the relay's answer to the data
    when every recipient was accepted, else the first reason of the
    outcome (a deferred recipient's for a deferred message, a failed
    one's for a failed message).
    """
    if verdict.deferred:
        outcome, reasons = "deferred", verdict.deferred
    elif verdict.failed:
        outcome, reasons = "failed", verdict.failed
    else:
        outcome, reasons = "sent", {}
    code = reply.code if reply is not None else None
    if reasons:
        code = next(iter(reasons.values()))[0]
    reason = "no_reply" if code is None else f"{code // 100}xx"
    if outcome == "failed" and any(t.startswith("expired:") for _, t in reasons.values()):
        reason = "expired"
    rcpts = claim.envelope.recipients
    if len(rcpts) == 1:
        domains: tuple[str, ...] = (rcpts[0].rpartition("@")[2].lower(),)
    else:
        domains = tuple(sorted({a.rpartition("@")[2].lower() for a in rcpts}))
    return Attempt(
        claim.id,
        claim.message_id,
        domains,
        outcome,
        reason,
        code,
        relay,
        seconds,
        max(0.0, time.time() - claim.queued_at),
        attempt,
    )


def facts_read(verdict: Verdict, log: logging.Logger) -> bool:
    """Whether anything reads the facts of an attempt with ``verdict``: a
    subscriber to the events, or the attempt's log record on ``log`` (INFO
    when every recipient was sent, WARNING or ERROR otherwise)."""
    if zope.event.subscribers or verdict.deferred or verdict.failed:
        return True
    return log.isEnabledFor(logging.INFO)
