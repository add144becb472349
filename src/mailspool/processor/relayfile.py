"""What the processors learned about their relay, in a small file in the spool.

``mailspool status`` reads the spool, not the processors: so each processor
leaves there, after a pass that changed it, the rate it learned from the
relay's "too fast" replies, its connection limit and any relay pause (and
why).  The file is ``.relay-state.json`` at the top of the spool: one entry
per processor, under a key of its own (host, process id and a number per
processor object), so that several processors on one spool do not
overwrite each other's word.

A writer takes an exclusive ``flock`` on ``.relay-state.lock`` (a file of
its own: the state file is replaced by each write, and a lock on a replaced
file locks nothing), reads the entries, replaces its own, drops those of
processors silent for :data:`FORGET_AFTER` whose pause is over, writes the
whole to a temporary file and renames it into place; a reader takes no
lock and never sees half a file.  :func:`read` gives the latest word (the
entry written last), which is what the queue verbs show as *the* relay's
state; :func:`read_all` every processor's.  :class:`Publisher` is the
processor's side: it writes when what it would say changed.

A file of the earlier layout (one processor's state, not keyed) reads as
that processor's entry.

A queue that keeps it itself -- a database shared by processors on
several hosts, :class:`~mailspool.queue.RelayStateStore` -- is given it
instead (the latest word per relay): :func:`publish`, :func:`latest` and
:func:`everyone` choose.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mailspool.queue import InDirectory, QueueBackend, RelayStateStore

if TYPE_CHECKING:
    from mailspool.processor.pacing import Pacer
    from mailspool.processor.sender import Sender

__all__ = [
    "FILE_NAME",
    "FORGET_AFTER",
    "LOCK_NAME",
    "Publisher",
    "everyone",
    "latest",
    "new_key",
    "publish",
    "read",
    "read_all",
    "write",
]

log = logging.getLogger("mailspool.processor")

#: The file's name, at the top of the spool directory.
FILE_NAME = ".relay-state.json"
#: The lock the writers take, next to it.
LOCK_NAME = ".relay-state.lock"
#: The entry of a processor that wrote nothing for this long (seconds, by
#: the clock of the one writing now) is dropped, unless its pause still runs.
FORGET_AFTER = 86400.0
#: At most this many entries are kept (the latest ones).
MAX_ENTRIES = 64

_ENTRIES = "processors"  # the key holding the entries
_serial = itertools.count(1)
_serial_lock = threading.Lock()


def new_key() -> str:
    """A key no other processor has: this host, this process, a number."""
    with _serial_lock:
        n = next(_serial)
    return f"{socket.gethostname()}:{os.getpid()}:{n}"


def write(spool_path: str, state: dict[str, Any], *, key: str | None = None) -> bool:
    """Replace this processor's entry with ``state``; False (logged) when it cannot.

    Args:
        spool_path: the spool directory.
        state: what the processor says (``written_at``, a ``time.time()``
            value, orders the entries).
        key: the processor's key (:func:`new_key`); default this host and
            ``state["pid"]`` (or this process).
    """
    if key is None:
        key = f"{socket.gethostname()}:{state.get('pid', os.getpid())}"
    path = os.path.join(spool_path, FILE_NAME)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        lock = os.open(os.path.join(spool_path, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.debug("spool %s: cannot open %s: %s", spool_path, LOCK_NAME, exc)
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = _entries(_load(path))
        entries[key] = state
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as f:
            json.dump({_ENTRIES: _prune(entries, _stamp(state))}, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("spool %s: cannot write %s: %s", spool_path, FILE_NAME, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    finally:
        os.close(lock)  # and the lock with it
    return True


def read_all(spool_path: str) -> list[dict[str, Any]]:
    """Every processor's entry, the latest written first (empty: none, or unreadable)."""
    entries = _entries(_load(os.path.join(spool_path, FILE_NAME)))
    return sorted(entries.values(), key=_stamp, reverse=True)


def read(spool_path: str) -> dict[str, Any] | None:
    """The entry written last, or None when there is none (or it is unreadable)."""
    entries = read_all(spool_path)
    return entries[0] if entries else None


def _load(path: str) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _entries(data: object) -> dict[str, dict[str, Any]]:
    """The entries of what was read, by key; an earlier single state as one entry."""
    if not isinstance(data, dict):
        return {}
    entries = data.get(_ENTRIES)
    if isinstance(entries, dict):
        return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, dict)}
    if "relay" in data:  # the earlier layout: one processor's state
        return {f"{socket.gethostname()}:{data.get('pid')}": data}
    return {}


def _stamp(state: dict[str, Any]) -> float:
    t = state.get("written_at")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0


def _prune(entries: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
    """Drop the entries of processors long silent (unless paused still); keep the latest."""

    def live(state: dict[str, Any]) -> bool:
        until = state.get("paused_until")
        paused = isinstance(until, (int, float)) and until > now
        return paused or now - _stamp(state) < FORGET_AFTER

    kept = sorted(
        ((k, v) for k, v in entries.items() if live(v)), key=lambda kv: _stamp(kv[1]), reverse=True
    )
    return dict(kept[:MAX_ENTRIES])


def publish(queue: QueueBackend, state: dict[str, Any], *, key: str | None = None) -> bool:
    """Leave ``state`` where ``status`` reads it: in the queue when it keeps it,
    else in the spool directory's file (as the entry ``key``, see :func:`write`);
    False when it could not (or nowhere)."""
    if isinstance(queue, RelayStateStore):
        return queue.set_relay_state(state)
    return isinstance(queue, InDirectory) and write(queue.path, state, key=key)


def latest(queue: QueueBackend) -> dict[str, Any] | None:
    """The state a processor last left for ``queue`` (see :func:`publish`), or None."""
    if isinstance(queue, RelayStateStore):
        return queue.relay_state()
    return read(queue.path) if isinstance(queue, InDirectory) else None


def everyone(queue: QueueBackend) -> list[dict[str, Any]]:
    """What each processor left for ``queue``, the latest first (a queue that
    keeps it itself: its latest word); empty when none did."""
    if isinstance(queue, RelayStateStore):
        state = queue.relay_state()
        return [state] if state is not None else []
    return read_all(queue.path) if isinstance(queue, InDirectory) else []


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
        self._key = new_key()  # this processor's entry in the file

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
        written = {**state, "written_at": self._clock()}
        if publish(self._spool, written, key=self._key):
            self._published = state
