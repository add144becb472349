"""What a processor learned about its relay, in a small file in the spool.

``mailspool status`` reads the spool, not the processor: so the processor
leaves there, after a pass that changed it, the rate it learned from the
relay's "too fast" replies, its connection limit and any relay pause (and why)
(``.relay-state.json`` at the top of the spool, written whole and renamed
into place, so a reader never sees half of it).  Several processors on one
spool each overwrite it: it tells the latest word of one of them.

A queue that keeps it itself -- a database shared by processors on
several hosts, :class:`~mailspool.queue.RelayStateStore` -- is given it
instead: :func:`publish` and :func:`latest` choose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailspool.queue import InDirectory, QueueBackend, RelayStateStore

if TYPE_CHECKING:
    from mailspool.processor.pacing import Pacer
    from mailspool.processor.sender import Sender

__all__ = ["FILE_NAME", "Publisher", "latest", "publish", "read", "write"]

log = logging.getLogger("mailspool.processor")

#: The file's name, at the top of the spool directory.
FILE_NAME = ".relay-state.json"


def write(spool_path: str, state: dict[str, Any]) -> bool:
    """Replace the file with ``state``; False (logged) when it cannot be written."""
    path = os.path.join(spool_path, FILE_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("spool %s: cannot write %s: %s", spool_path, FILE_NAME, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


def read(spool_path: str) -> dict[str, Any] | None:
    """The state last written, or None when there is none (or it is unreadable)."""
    try:
        with open(os.path.join(spool_path, FILE_NAME), encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def publish(queue: QueueBackend, state: dict[str, Any]) -> bool:
    """Leave ``state`` where ``status`` reads it: in the queue when it keeps it,
    else in the spool directory's file; False when it could not (or nowhere)."""
    if isinstance(queue, RelayStateStore):
        return queue.set_relay_state(state)
    return isinstance(queue, InDirectory) and write(queue.path, state)


def latest(queue: QueueBackend) -> dict[str, Any] | None:
    """The state a processor last left for ``queue`` (see :func:`publish`), or None."""
    if isinstance(queue, RelayStateStore):
        return queue.relay_state()
    return read(queue.path) if isinstance(queue, InDirectory) else None


class Publisher:
    """Writes what a processor learned about its relay, when it changed.

    Nothing is written while all is well (no rate learned, no pause), nor
    for a small step of the learned rate; a Maildir spool keeps it in its
    file, a queue that keeps it itself in the queue (:func:`publish`),
    other queues nowhere.

    Args:
        spool: the processor's queue.
        sender: its sender: where the relay is, the relay's pause and
            parallelism, the failure that paused it last.
        pacer: the sending rate it learned.
        rate_limit: the configured limit.
        clock: the ``time.time``-like clock.
    """

    def __init__(
        self,
        spool: QueueBackend,
        sender: Sender,
        pacer: Pacer,
        *,
        rate_limit: float | None,
        clock: Callable[[], float],
    ) -> None:
        self._spool = spool
        self._sender = sender
        self._relay = sender.relay
        self._pacer = pacer
        self._rate_limit = rate_limit
        self._clock = clock
        self._published: dict[str, Any] | None = None  # the last relay state written

    def __call__(self, now: float) -> None:
        """Write the state at ``now`` if it is worth a write."""
        paused = self._relay.paused(now)
        state: dict[str, Any] = {
            "relay": self._sender.where,
            "pid": os.getpid(),
            "rate": self._pacer.rate if self._pacer.learned else None,
            "rate_limit": self._rate_limit,
            "connections": self._relay.parallelism(now),
            "paused_until": self._relay.paused_until if paused else None,
            "reason": self._sender.trouble if paused else None,
        }
        prev = self._published
        if prev is None:
            if state["rate"] is None and not paused:
                return  # nothing learned, nothing to tell
        elif state == prev:
            return
        elif state["rate"] is not None and prev["rate"] is not None:
            small = abs(state["rate"] - prev["rate"]) < 0.05 * prev["rate"]
            if small and {**state, "rate": 0} == {**prev, "rate": 0}:
                return  # a small step of the rate: not worth a write
        if publish(self._spool, {**state, "written_at": self._clock()}):
            self._published = state
