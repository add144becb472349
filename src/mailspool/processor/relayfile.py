"""What a processor learned about its relay, in a small file in the spool.

(A queue that keeps it itself -- a database shared by processors on
several hosts, :class:`~mailspool.queue.RelayStateStore` -- is given it
instead: :func:`publish` and :func:`latest` choose.)

``mailspool status`` reads the spool, not the processor: so the processor
leaves there, after a pass that changed it, the rate it learned from the
relay's "too fast" replies, its connection limit and any relay pause (and why)
(``.relay-state.json`` at the top of the spool, written whole and renamed
into place, so a reader never sees half of it).  Several processors on one
spool each overwrite it: it tells the latest word of one of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

from mailspool.queue import QueueBackend, RelayStateStore

__all__ = ["FILE_NAME", "latest", "publish", "read", "write"]

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
    path = getattr(queue, "path", None)
    return isinstance(path, str) and write(path, state)


def latest(queue: QueueBackend) -> dict[str, Any] | None:
    """The state a processor last left for ``queue`` (see :func:`publish`), or None."""
    if isinstance(queue, RelayStateStore):
        return queue.relay_state()
    path = getattr(queue, "path", None)
    return read(path) if isinstance(path, str) else None
