"""Group commit: one directory fsync covers every rename made before it began.

A commit that queued mail returns only once its message is durable: the
file was fsynced, renamed into ``new/``, and ``new/`` itself fsynced (the
rename is only on disk when its directory is).  When many threads commit at
once, each would fsync the same directory in turn, and a commit would wait
behind every other's.  Databases solve this with group commit, and so does
the spool: a thread that has renamed its file asks :func:`sync` for the
directory; if no fsync of it is running, it runs one for itself and for
every rename registered before that fsync began; if one is running, it
waits for it and, unless that fsync began before its rename, for the next
one, which it or another waiting thread runs for all of them at once.

The rule that keeps it correct: a commit is told "durable" only by an
fsync that *began* after its rename was registered.  An fsync that fails
fails every commit it was to cover (never retried: the kernel may have
dropped the dirty state), and a later success does not cover them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["DirectorySync", "forget", "sync"]


class DirectorySync:
    """The group commit of one directory (see the module's documentation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._registered = 0  # renames registered so far
        self._synced = 0  # every rename up to this one is durable
        self._running = False
        self._failed: list[tuple[int, int, OSError]] = []  # (first, last, error)
        #: How many fsyncs ran, and how many commits they covered (for the bench).
        self.fsyncs = 0
        self.commits = 0

    def sync(self, fsync: Callable[[], None]) -> None:
        """Return once an fsync that began after this call's rename has succeeded.

        Args:
            fsync: fsyncs the directory; raises OSError on failure.

        Raises:
            OSError: the fsync meant to cover this rename failed.
        """
        with self._cond:
            self._registered += 1
            mine = self._registered
            self.commits += 1
            while True:
                self._check_failed(mine)
                if self._synced >= mine:
                    return
                if not self._running:
                    self._run(fsync)
                else:
                    self._cond.wait()

    def _check_failed(self, mine: int) -> None:
        for first, last, error in self._failed:
            if first <= mine <= last:
                raise error

    def _run(self, fsync: Callable[[], None]) -> None:
        """Run one fsync for every rename registered so far (the lock is held)."""
        first, last = self._synced + 1, self._registered
        self._running = True
        self._cond.release()
        error: OSError | None = None
        try:
            fsync()
        except OSError as exc:
            error = exc
        finally:
            self._cond.acquire()
            self._running = False
            self.fsyncs += 1
            if error is None:
                self._synced = last
            else:
                # Those it was to cover are failed; the ones after may still
                # be made durable by a later fsync.
                self._failed.append((first, last, error))
                self._synced = last
            self._cond.notify_all()


_lock = threading.Lock()
_dirs: dict[str, DirectorySync] = {}


def sync(path: str, fsync: Callable[[], None]) -> None:
    """Make this thread's rename into directory ``path`` durable, with others at once."""
    group = _dirs.get(path)
    if group is None:
        with _lock:
            group = _dirs.setdefault(path, DirectorySync())
    group.sync(fsync)


def forget() -> None:
    """In a child made by ``fork()``: another thread may have held a lock."""
    global _lock
    _lock = threading.Lock()
    _dirs.clear()
