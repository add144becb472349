"""The message lifecycle, written once: which state may become which (no I/O).

A message's state is the spool area (directory) its file is in, and it
changes state by ``rename(2)``.  :data:`LIFECYCLE` lists every allowed move
as ``action -> (the areas it may start from, the area it ends in)``; the
spool asks :func:`next_area` before each move, so a move that the table
does not allow fails with an error naming the state and the action.
:func:`settle_record` is the other state rule: from one attempt's outcome
per recipient, whether the message is finished, deferred or failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType

from mailspool.errors import SpoolError
from mailspool.maildir.fileformat import FAILED, PENDING, SENT, RecipientStatus, Record

__all__ = [
    "AREAS",
    "CLAIM_ORDER",
    "LIFECYCLE",
    "NEWER_THAN_CUR",
    "OUTCOME_ACTION",
    "STATES",
    "all_sent",
    "next_area",
    "settle_record",
]

#: Area (directory) -> the state it stands for.  ``tmp/`` (being written)
#: and ``trash/`` (finished, being unlinked) are not states: nothing there
#: is ever listed or sent.
STATES: Mapping[str, str] = MappingProxyType(
    {
        "new": "ready",
        "cur": "in_flight",
        "deferred": "deferred",
        "hold": "held",
        "failed": "failed",
        "quarantine": "quarantined",
    }
)
#: State -> area.
AREAS: Mapping[str, str] = MappingProxyType({v: k for k, v in STATES.items()})

_ALL = frozenset(STATES)
#: The whole message lifecycle, in one place: action -> (the areas it may
#: start from, the area it ends in; None when the file is removed).
LIFECYCLE: Mapping[str, tuple[frozenset[str], str | None]] = MappingProxyType(
    {
        "publish": (frozenset({"tmp"}), "new"),  # committed, due now
        "schedule": (frozenset({"tmp"}), "deferred"),  # committed, send later
        "claim": (frozenset({"new", "deferred", "cur"}), "cur"),  # cur: abandoned only
        "release": (frozenset({"cur"}), "new"),  # claimed, untouched
        "remove": (frozenset({"cur"}), None),  # every recipient accepted
        "defer": (frozenset({"cur"}), "deferred"),  # some recipient still pending
        "fail": (frozenset({"cur"}), "failed"),  # none pending, some failed
        "quarantine": (_ALL - {"quarantine"}, "quarantine"),
        "retry": (frozenset({"deferred", "failed", "quarantine"}), "new"),
        "hold": (frozenset({"new", "deferred"}), "hold"),
        "unhold": (frozenset({"hold"}), "new"),
        "delete": (_ALL, None),  # cur/: only when abandoned
        "recover": (frozenset({"cur"}), "new"),  # sweep(): abandoned claim
        "expire": (frozenset({"tmp"}), None),  # sweep(): orphan of a crash
    }
)

#: Where claim() looks for a message, in this order (the sources of "claim").
CLAIM_ORDER = ("new", "deferred", "cur")

#: The areas where a newer state of a claimed message can be while a copy
#: of it is still in ``cur/``: the targets of defer, fail and release, and
#: where an operator may have moved those since.  Such a ``cur/`` copy is
#: the leftover of a settle that crashed half-way and is dropped, never sent.
NEWER_THAN_CUR = ("deferred", "failed", "new", "hold")

#: settle_record()'s outcome -> the lifecycle action that carries it out.
OUTCOME_ACTION: Mapping[str, str] = MappingProxyType(
    {"removed": "remove", "deferred": "defer", "failed": "fail"}
)


def next_area(action: str, area: str) -> str | None:
    """Where ``action`` takes a message that is in ``area``.

    Args:
        action: a key of :data:`LIFECYCLE`.
        area: the area the message is in now.

    Returns:
        The area it moves to; None when the file is removed.

    Raises:
        SpoolError: naming the state and the action when the move is not allowed.
        KeyError: ``action`` is not in the table.
    """
    sources, target = LIFECYCLE[action]
    if area not in sources:
        state = STATES.get(area, area)
        raise SpoolError(f"cannot {action} a message that is {state}")
    return target


def all_sent(record: Record, sent: Iterable[str]) -> bool:
    """Whether ``sent`` leaves nothing pending and nothing failed.

    The common case of a settle: :func:`settle_record` would return
    ``"removed"``, and the file goes to the trash without a new record
    being built.

    Args:
        record: the message's record before the attempt.
        sent: recipients the relay accepted (and no other outcome given).

    Returns:
        True when ``sent`` names exactly the pending recipients and no
        recipient failed before.
    """
    pending = set()
    for r in record.recipients:
        if r.status == PENDING:
            pending.add(r.address)
        elif r.status == FAILED:
            return False
    return pending == set(sent)


def settle_record(
    record: Record,
    sent: Iterable[str] = (),
    failed: Mapping[str, tuple[int | None, str]] | None = None,
    deferred: Mapping[str, tuple[int | None, str]] | None = None,
) -> tuple[Record, str]:
    """Apply one attempt's per-recipient outcome; return (record, outcome).

    Outcome ``"removed"`` when every recipient was accepted, ``"deferred"``
    when some recipient is still pending (including pending recipients not
    named at all), ``"failed"`` when none is pending and some failed.  Sent
    recipients stay sent forever; the attempt count goes up by one.

    Args:
        record: the message's record before the attempt.
        sent: recipients the relay accepted.
        failed: recipient -> (code, text) of a permanent refusal.
        deferred: recipient -> (code, text) of a temporary one.

    Returns:
        The new record and the outcome (a key of :data:`OUTCOME_ACTION`).

    Raises:
        ValueError: an address is not a pending recipient, or is given twice.
    """
    failed = failed or {}
    deferred = deferred or {}
    sent_set = set(sent)
    pending = set(record.pending)
    named = [*sent_set, *failed, *deferred]
    if len(named) != len(set(named)):
        raise ValueError("a recipient is given more than one outcome")
    unknown = set(named) - pending
    if unknown:
        raise ValueError(f"not pending recipients of this message: {sorted(unknown)!r}")
    out: list[RecipientStatus] = []
    for r in record.recipients:
        a = r.address
        if r.status != PENDING:
            out.append(r)
        elif a in sent_set:
            out.append(RecipientStatus(a, SENT))
        elif a in failed:
            out.append(RecipientStatus(a, FAILED, *failed[a]))
        elif a in deferred:
            out.append(RecipientStatus(a, PENDING, *deferred[a]))
        else:
            out.append(r)
    if any(r.status == PENDING for r in out):
        outcome, why = "deferred", next(iter(deferred.values()), None)
    elif any(r.status == FAILED for r in out):
        outcome, why = "failed", next(iter(failed.values()), None)
    else:
        outcome, why = "removed", None
    last_error = record.last_error
    if why is not None:
        last_error = why[1] if why[0] is None else f"{why[0]} {why[1]}"
    new = replace(
        record, recipients=tuple(out), attempts=record.attempts + 1, last_error=last_error
    )
    return new, outcome
