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

from collections.abc import Mapping
from types import MappingProxyType

from mailspool.errors import MessageStateError
from mailspool.queue import State, all_sent, settle_record

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
STATES: Mapping[str, State] = MappingProxyType(
    {
        "new": State.READY,
        "cur": State.IN_FLIGHT,
        "deferred": State.DEFERRED,
        "hold": State.HELD,
        "failed": State.FAILED,
        "quarantine": State.QUARANTINED,
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
        MessageStateError: naming the state and the action when the move is not allowed.
        KeyError: ``action`` is not in the table.
    """
    sources, target = LIFECYCLE[action]
    if area not in sources:
        state = STATES.get(area, area)
        if action == "unhold":  # what `mailspool release` asks: say it in its words
            raise MessageStateError(f"not held (it is {state}): nothing to release")
        raise MessageStateError(f"cannot {action} a message that is {state}")
    return target
