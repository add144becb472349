"""Clearing up after a crash: ``tmp/`` orphans and abandoned claims.

A writer that dies before it publishes leaves a file in ``tmp/``: never
committed, so never sent, and removed once it is older than
:data:`TMP_MAX_AGE`.  A processor that dies leaves its claims in ``cur/``
with their locks gone: :meth:`SpoolSweep.sweep` puts each back in ``new/``,
or in ``trash/`` when a newer state of it exists (a settle that crashed
half-way).  The processor sweeps when it starts and ``due()`` lists
abandoned claims first, so nothing waits for a sweep.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from mailspool.maildir import trash
from mailspool.maildir.directory import SpoolDir
from mailspool.maildir.lifecycle import next_area
from mailspool.maildir.locks import close_held, lock_file, lock_free

__all__ = ["TMP_MAX_AGE", "SpoolSweep"]

#: Files in ``tmp/`` unchanged for this long (seconds) are removed: sweep(),
#: and due() at most once an hour.
TMP_MAX_AGE = 36 * 3600.0


class SpoolSweep(SpoolDir):
    """The spool's sweep, for :class:`~mailspool.maildir.spool.Spool`."""

    def sweep(self, now: float | None = None, *, tmp_max_age: float = TMP_MAX_AGE) -> int:
        """Remove orphans in ``tmp/`` and put abandoned claims back in ``new/``.

        A ``tmp/`` file is an orphan when its ctime (last change, which no
        one can set back) is older than ``tmp_max_age`` seconds; it was never
        committed, so it is never sent.  A ``cur/`` file whose lock is free
        goes back to ``new/``, or to ``trash/`` when a newer state of it
        exists (a settle that crashed half-way).

        Also has ``trash/`` emptied in the background (see purge()).

        Returns:
            How many orphans were removed plus claims recovered.
        """
        now = time.time() if now is None else now
        if next(iter(self._names("trash")), None) is not None:
            trash.reap_soon(self._dirs["trash"])
        done = self._expire_tmp(now, tmp_max_age)
        target = next_area("recover", "cur") or "new"  # ready: the class's directory
        for id in list(self._abandoned()):
            path = self._dirs["cur"] + id
            try:
                fd = lock_file(path)
            except OSError:
                continue
            if fd is None:
                continue
            try:
                if self._superseded(id):
                    self._trash(path)
                else:
                    os.rename(path, self._path(target, id))
                done += 1
            except OSError:
                continue
            finally:
                close_held(fd)
        return done

    def _expire_tmp(self, now: float, max_age: float) -> int:
        done = 0
        try:
            it = os.scandir(self._dirs["tmp"])
        except FileNotFoundError:
            return 0
        with it:
            for e in it:
                try:
                    if e.stat(follow_symlinks=False).st_ctime < now - max_age:
                        os.unlink(e.path)
                        done += 1
                except FileNotFoundError:
                    continue
        return done

    def _abandoned(self) -> Iterator[str]:
        d = self._dirs["cur"]
        for name in self._names("cur"):
            if lock_free(d + name):
                yield name
