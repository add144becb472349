"""Messages a processor leaves alone until a time: those it could not even defer.

When writing a message's deferral fails (the queue refuses the write), the
message stays where it was, due; without a note it would be taken again at
once, failing the same way in a loop.  The sender notes it here with the
time its retry would have been, and the dispatcher skips it until then.
Shared by the sender threads and the dispatcher; reading an empty table
takes no lock, as that is the case for every id listed in a healthy pass.
"""

from __future__ import annotations

import threading

__all__ = ["Skips"]


class Skips:
    """Ids to skip, each until a time of the processor's clock."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, id: str, until: float) -> None:
        """Skip ``id`` until ``until``."""
        with self._lock:
            self._until[id] = until

    def skipped(self, id: str, now: float) -> bool:
        """True for a message noted here, until its time (then it is forgotten)."""
        if not self._until:  # the common case, once per id listed: no lock
            return False
        with self._lock:
            until = self._until.get(id)
            if until is None:
                return False
            if now < until:
                return True
            del self._until[id]
            return False

    def next_unskip(self, now: float) -> float | None:
        """The earliest time a skipped message is due again, if any (forgets past ones)."""
        with self._lock:
            self._until = {id: t for id, t in self._until.items() if t > now}
            return min(self._until.values(), default=None)
