"""The on-disk queue: a Maildir that survives crashes and never sends twice.

Theory of operation
-------------------

The spool is a directory with one sub-directory ("area") per state.  A
message is one file; its state is the area it is in, and it changes state by
``rename(2)``, which is atomic.  ``tmp/``, ``new/`` and ``cur/`` follow the
Maildir rules, so ``mailbox.Maildir`` opens the spool and lists what is ready
or in flight; the other areas hold what the processor needs for retries and
failures.  Every allowed move is listed once, in
:data:`mailspool.lifecycle.LIFECYCLE`.

The work is split by concept:

* :mod:`mailspool.maildir.fileformat` -- the file format (envelope, checksum), pure;
* :mod:`mailspool.maildir.legacy` -- zope.sendmail and repoze.sendmail files, pure;
* :mod:`mailspool.maildir.lifecycle` -- the state table and the settling rule, pure;
* :mod:`mailspool.maildir.directory` -- the directory and its system calls (durable
  writes, locks, quarantine);
* :mod:`mailspool.maildir.claim` -- a message held for sending and its settling;
* :mod:`mailspool.maildir.trash` -- the thread that unlinks finished files;
* :mod:`mailspool.maildir.sweep` -- clearing up after a crash: ``tmp/``
  orphans, abandoned claims;
* this module -- :class:`Spool`, the operations: enqueue (stage, publish),
  processing (due, claim) and the operator's view (counts, entries,
  get, retry, hold, release, delete).  The names of the modules above that
  callers use are re-exported here.

Durability: a message is written to ``tmp/`` (``O_EXCL``, mode 0600,
fsync, checked close), renamed into ``new/`` and the directory fsynced once
per batch.  A claim is an ``flock`` on the open file plus a rename into
``cur/``; the kernel drops the lock when its holder dies, so another
processor can take an abandoned message at once.  docs/spool.md has the
details, byte by byte.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import random
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailspool.errors import SpoolError
from mailspool.maildir import process
from mailspool.maildir.admin import SpoolAdmin, SpoolEntry
from mailspool.maildir.claim import Claim
from mailspool.maildir.classes import READY_AREA, area_dir, name_priority
from mailspool.maildir.directory import (
    check_id,
    errname,
    log,
    new_name,
    open_failure,
    read_all,
    unlink_quietly,
)
from mailspool.maildir.fileformat import (
    FAILED,
    FORMAT_VERSION,
    RecipientStatus,
    Record,
    decode_file,
    encode_file,
    encode_head,
    quote_value,
    unquote_value,
)
from mailspool.maildir.inotify import Inotify, spool_watches
from mailspool.maildir.lifecycle import (
    AREAS,
    CLAIM_ORDER,
    LIFECYCLE,
    STATES,
    next_area,
    settle_record,
)
from mailspool.maildir.locks import LOCK, close_held, lock_free, open_held, same_file
from mailspool.maildir.sweep import TMP_MAX_AGE, SpoolSweep
from mailspool.message import Prepared
from mailspool.priority import PRIORITIES, Priority, interleave

__all__ = [
    "AREAS",
    "FORMAT_VERSION",
    "LIFECYCLE",
    "STATES",
    "TMP_MAX_AGE",
    "Claim",
    "RecipientStatus",
    "Record",
    "Spool",
    "SpoolEntry",
    "Staged",
    "decode_file",
    "encode_file",
    "next_area",
    "quote_value",
    "settle_record",
    "unquote_value",
]

#: ``due()`` hands out ``new/`` in batches of this many names, each begun at
#: a random place (see :func:`_rotated`).
ROTATE_BATCH = 1024


def _rotated(names: list[str]) -> list[str]:
    """``names`` begun at a random place, wrapping around.

    Directory listings come in the same order in every process, so several
    processors draining one spool would otherwise walk it in step, each
    losing every other claim to the next; begun at different places, they
    work on different messages until they meet.
    """
    if len(names) < 2:
        return names
    start = random.randrange(len(names))
    return names[start:] + names[:start]


#: How often (seconds) due() removes ``tmp/`` orphans by itself.
EXPIRE_EVERY = 3600.0

# open() and read() errors that are the file's fault: quarantine it.  Others
# (EMFILE, ENOMEM, ESTALE...) are the system's: the message stays.
_BAD_FILE = frozenset(
    {errno.EPERM, errno.EIO, errno.ENXIO, errno.EACCES, errno.EISDIR, errno.EINVAL, errno.ELOOP}
)


@dataclass(frozen=True)
class Staged:
    """A message written and fsynced in ``tmp/``, not yet visible."""

    id: str
    message_id: str
    area: str  # "new" or "deferred"
    tmp_path: str
    not_before: float | None = None


class Spool(SpoolSweep, SpoolAdmin):
    """A spool directory: durable enqueue, claims, per-recipient settling.

    Args:
        path: the spool root.
        create: create the root and its areas (mode 0700) when missing;
            with ``False`` a missing root or Maildir triple raises.

    Raises:
        SpoolError: the spool does not exist (``create=False``) or cannot be
            created.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        process.install()  # the fork and exit hooks, once per process
        super().__init__(path, create=create)
        self._next_expiry = 0.0  # time.monotonic() of due()'s next look at tmp/

    @property
    def location(self) -> str:
        """The spool directory (:class:`~mailspool.queue.QueueBackend`'s name for it)."""
        return self.path

    def claimed_elsewhere(self) -> bool:
        """True when ``cur/`` holds messages: claimed by some processor, or
        abandoned by one that died (then :meth:`due` lists them first)."""
        try:
            with os.scandir(self._dirs["cur"]) as it:
                return any(not e.name.startswith(".") for e in it)
        except OSError:
            return False

    def waker(self) -> Inotify | None:
        """An inotify watch on ``new/`` and ``deferred/``; None where there is none."""
        return Inotify.open(spool_watches(self.path))

    # -- enqueue -------------------------------------------------------------------

    def stage(self, prepared: Prepared, *, not_before: float | None = None) -> Staged:
        """Write a message durably into ``tmp/``, not yet visible.

        Args:
            prepared: the validated message (see :func:`mailspool.message.prepare`).
            not_before: a ``time.time()`` value; a later time makes
                publish() put the message in ``deferred/`` until then, and
                is kept in the file (``X-Mailspool-Not-Before``): the
                message's give-up time counts from it.

        Returns:
            The :class:`Staged` message to give to publish() or discard().

        Raises:
            SpoolError: the write, fsync or close failed (ENOSPC, EROFS,
                EACCES...); nothing is left behind.
        """
        staged, (tmp, head, data, mtime) = self._staging(prepared, not_before)
        try:
            self._write(tmp, head, data, mtime, False)
        except OSError as exc:
            raise self._error(f"write {tmp}", exc) from exc
        return staged

    def _staging(
        self, prepared: Prepared, not_before: float | None
    ) -> tuple[Staged, tuple[str, bytes, bytes, float | None]]:
        """The :class:`Staged` for a message, and its file: path, head, data, mtime."""
        name = new_name(prepared.priority)
        now = time.time()
        env = prepared.envelope
        data = prepared.data
        later = not_before is not None and not_before > now
        # A message scheduled for later keeps its time: give_up_after counts
        # from it, not from the commit (Record.due_since).
        when = not_before if later else None
        head = encode_head(env.sender, env.recipients, prepared.message_id, now, data, when)
        tmp = self._dirs["tmp"] + name
        staged = Staged(name, prepared.message_id, "deferred" if later else "new", tmp, not_before)
        return staged, (tmp, head, data, when)

    def stage_many(self, batch: Sequence[tuple[Prepared, float | None]]) -> list[Staged]:
        """:meth:`stage` for several messages (prepared, not_before) at once.

        The files are fsynced concurrently, which costs less per message
        than one stage() after another.

        Raises:
            SpoolError: as stage(), for the first message that failed;
                none of the batch is left behind.
        """
        if len(batch) < 2:
            return [self.stage(p, not_before=nb) for p, nb in batch]
        staged: list[Staged] = []
        files: list[tuple[str, bytes, bytes, float | None]] = []
        for prepared, not_before in batch:
            one, file = self._staging(prepared, not_before)
            staged.append(one)
            files.append(file)
        failure = self._write_many(files)
        if failure is not None:
            i, exc = failure
            raise self._error(f"write {files[i][0]}", exc) from exc
        return staged

    def publish(self, staged: Sequence[Staged]) -> None:
        """Make staged messages visible: rename into their area, fsync it once.

        Raises:
            SpoolError: a rename or directory fsync failed.  Messages renamed
                before the failure are visible; the others stay in ``tmp/``
                for discard().
        """
        touched: list[str] = []
        error: SpoolError | None = None
        for s in staged:
            area = area_dir(s.area, s.id)  # ready mail: its class's directory
            try:
                os.rename(s.tmp_path, self._dirs[area] + s.id)
            except OSError as exc:
                error = self._error(f"publish {s.tmp_path}", exc)
                break
            if area not in touched:
                touched.append(area)
        for area in touched:  # also after a failure: what was renamed is visible
            try:
                self._fsync_dir(area)
            except OSError as exc:
                error = error or self._error(f"fsync {self._dirs[area]}", exc)
        if error is not None:
            raise error

    def discard(self, staged: Sequence[Staged]) -> None:
        """Remove staged messages from ``tmp/``; never raises."""
        for s in staged:
            unlink_quietly(s.tmp_path)

    # -- processing ----------------------------------------------------------------

    def due(self, now: float | None = None) -> Iterator[str]:
        """Stream the ids of the messages that can be claimed now.

        Abandoned claims in ``cur/`` first (their holder died), then each
        class's ready mail (``urgent/``, ``new/``, ``bulk/``) followed by its
        ``deferred/`` entries whose time has come, the classes interleaved
        by the rule of :mod:`mailspool.priority`.  Nothing but a batch of
        :data:`ROTATE_BATCH` names per class is held in memory; no order
        within a class is promised.  An id may turn out to be taken by the
        time it is claimed: claim() then returns None.  At most once an hour
        (real time, whatever ``now``) it first removes ``tmp/`` orphans
        older than :data:`TMP_MAX_AGE`, so a processor that runs for months
        keeps ``tmp/`` clean.
        """
        now = time.time() if now is None else now
        if time.monotonic() >= self._next_expiry:
            self._expire_tmp_hourly()
        yield from self._due_in("cur", now)
        yield from interleave({p: functools.partial(self._due_class, p, now) for p in PRIORITIES})

    def _due_class(self, priority: Priority, now: float) -> Iterator[str]:
        """One class's due ids: its ready directory, then its deferred mail due by ``now``."""
        yield from self._due_in(READY_AREA[priority], now)
        yield from self._due_in("deferred", now, priority)

    def _expire_tmp_hourly(self) -> None:
        self._next_expiry = time.monotonic() + EXPIRE_EVERY
        try:
            self._expire_tmp(time.time(), TMP_MAX_AGE)
        except OSError as exc:
            log.warning("spool %s: cannot clean tmp/: %s", self.path, errname(exc))

    def _due_in(self, area: str, now: float, priority: Priority | None = None) -> Iterator[str]:
        """The claimable names of one directory (see :meth:`due`); in
        ``deferred/``, of ``priority``'s class only."""
        d = self._dirs[area]
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            return
        with it:
            batch: list[str] = []
            for e in it:
                name = e.name
                if name[0] == ".":
                    continue
                if area == "cur":
                    if lock_free(d + name):
                        yield name
                elif area != "deferred":
                    batch.append(name)
                    if len(batch) == ROTATE_BATCH:
                        yield from _rotated(batch)
                        batch = []
                elif priority is None or name_priority(name) is priority:
                    try:
                        mtime = e.stat(follow_symlinks=False).st_mtime
                    except OSError:
                        continue
                    if mtime <= now:
                        yield name
            yield from _rotated(batch)

    def next_due(self) -> float | None:
        """The earliest time a deferred message is due, or None."""
        best: float | None = None
        try:
            it = os.scandir(self._dirs["deferred"])
        except FileNotFoundError:
            return None
        with it:
            for e in it:
                if e.name[0] == ".":
                    continue
                try:
                    t = e.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if best is None or t < best:
                    best = t
        return best

    def claim(self, id: str) -> Claim | None:
        """Take a message for sending: no one else can hold it until settled.

        Returns:
            A :class:`Claim`, or None when the message is held by someone
            else, is gone (already sent), or was corrupt (then it is moved
            to ``quarantine/`` with the reason, and logged once; state()
            tells which).

        Raises:
            ValueError: ``id`` is not a valid name.
            SpoolError: the spool itself failed (e.g. too many open files).
        """
        check_id(id)
        for area in CLAIM_ORDER:
            path = self._path(area, id)
            try:
                fd = open_held(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in _BAD_FILE:
                    self._quarantine(area, id, open_failure(exc))
                    return None
                raise self._error(f"open {path}", exc) from exc
            claim: Claim | None = None
            try:
                claim = self._claim_fd(area, id, path, fd)
            except SpoolError:
                raise
            except OSError as exc:
                raise self._error(f"claim {area}/{id}", exc) from exc
            finally:
                if claim is None:  # the Claim owns the fd (and its lock) from here on
                    close_held(fd)
            return claim
        return None

    def _claim_fd(self, area: str, id: str, path: str, fd: int) -> Claim | None:
        """Lock, check and take the file open on ``fd``; the caller closes
        ``fd`` unless a Claim is returned."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            self._quarantine(area, id, f"not a regular file (mode {st.st_mode:o})")
            return None
        try:
            fcntl.flock(fd, LOCK)
        except BlockingIOError:
            return None
        try:
            if not same_file(os.lstat(path), st):
                return None  # the name now holds another file
        except FileNotFoundError:
            return None  # finished and removed by someone else
        if area == "cur" and self._superseded(id):
            self._trash(path)  # left by a settle that crashed after publishing
            return None
        decoded = self._decode_claimed(area, id, fd, st)
        if decoded is None:
            return None
        record, data = decoded
        if not record.pending:  # nothing left to send (written by hand?)
            if any(r.status == FAILED for r in record.recipients):
                os.rename(path, self._dirs["failed"] + id)
            else:
                self._trash(path)
            return None
        if area != "cur" and not self._move_to_cur(id, path):
            return None
        return Claim(self, id, fd, record, data, area)

    def _decode_claimed(
        self, area: str, id: str, fd: int, st: os.stat_result
    ) -> tuple[Record, bytes] | None:
        """Read and decode the locked file; None when it had to be quarantined."""
        try:
            raw = read_all(fd, st.st_size)
            return decode_file(raw, mtime=st.st_mtime)
        except OSError as exc:
            if exc.errno not in _BAD_FILE:
                raise
            self._quarantine(area, id, errname(exc))
        except ValueError as exc:
            self._quarantine(area, id, str(exc))
        return None

    def _move_to_cur(self, id: str, path: str) -> bool:
        """Rename the claimed file into ``cur/``; False when that must wait or it is gone."""
        stale = self._lock_stale_cur(id)
        if stale is None:
            return False  # a stale copy is being cleaned up: next time
        try:
            os.rename(path, self._dirs["cur"] + id)
        except FileNotFoundError:
            return False
        finally:
            if stale >= 0:
                close_held(stale)  # the stale copy is gone, replaced by ours
        return True


if TYPE_CHECKING:  # the seam's promise, checked by mypy
    from mailspool.queue import QueueBackend, QueueClaim

    def _conforms(spool: Spool, claim: Claim) -> tuple[QueueBackend, QueueClaim]:
        return spool, claim
