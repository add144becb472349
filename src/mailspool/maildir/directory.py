"""The spool directory and its system calls: where files are, how they are
written durably, locked, moved to ``trash/`` or ``quarantine/``.

:class:`SpoolDir` is the I/O edge that :class:`mailspool.spool.Spool` (the
operations) and :class:`mailspool.claim.Claim` (a message held for
sending) are built on.  The rules it keeps:

* Every file is created with ``O_EXCL|O_NOFOLLOW`` under a unique Maildir
  name, mode 0600 whatever the umask (checked with ``fstat`` on the open
  file, so a umask changed later cannot weaken it), written completely,
  fsynced and closed with the close checked.  A failed fsync or close is a
  failed write, never retried (:mod:`mailspool.maildir.durable`).
* Existing files are opened ``O_NOFOLLOW|O_NONBLOCK``: a planted symlink
  fails (ELOOP) and a FIFO opens without blocking; callers check that
  what they opened is a regular file.
* A message belongs to whoever holds the ``flock`` on its file
  (:mod:`mailspool.maildir.locks`).  A name is moved or removed only by the holder
  of the lock on the file it names, and a claim that renames a file onto
  ``cur/ID`` first locks a stale file there: so no two processes ever move
  the same name at once, and a stale copy is never confused with a live
  claim.
* Finished files go to ``trash/`` through a descriptor of it opened with
  ``O_NOFOLLOW``, so they never land anywhere else (:mod:`mailspool.maildir.trash`).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

from mailspool.errors import SpoolError, SpoolIOError
from mailspool.maildir import trash
from mailspool.maildir.classes import MARKS, READY_AREA, READY_DIRS, area_dir
from mailspool.maildir.durable import WFLAGS, unlink_quietly, write_file, write_files
from mailspool.maildir.lifecycle import NEWER_THAN_CUR
from mailspool.maildir.locks import (
    close_quietly,
    lock_file,
)
from mailspool.message import host_name
from mailspool.priority import PRIORITIES, Priority

__all__ = [
    "DFLAGS",
    "LOCATE_ORDER",
    "WFLAGS",
    "SpoolDir",
    "check_id",
    "errname",
    "log",
    "new_name",
    "open_failure",
    "read_all",
    "unlink_quietly",
]

# One logger for the whole spool, whichever module of it speaks: operators
# filter on "mailspool.maildir.spool" (docs/operations.md).
log = logging.getLogger("mailspool.spool")

DFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC

#: Every area, in the order a message is looked for: newer states before a
#: ``cur/`` copy that a crash may have left behind.
LOCATE_ORDER = ("new", "deferred", "hold", "failed", "quarantine", "cur")
_AREAS = ("tmp", "new", "cur", "deferred", "hold", "failed", "quarantine", "trash", *READY_DIRS)

# --- names --------------------------------------------------------------------

_seq = itertools.count(1)
_pid = os.getpid()
_host = host_name().split(".")[0]  # Maildir names end in the first label


def host_label() -> str:
    """The host part of the names :func:`new_name` makes."""
    return _host


def new_name(priority: Priority = Priority.NORMAL) -> str:
    """A Maildir unique name: time, microseconds, pid, counter, random, host,
    and the mark of a class other than normal (``,P=urgent``, ``,P=bulk``)."""
    us = time.time_ns() // 1000
    return (
        f"{us // 1_000_000}.M{us % 1_000_000}P{_pid}Q{next(_seq)}"
        f"R{random.getrandbits(32):08x}.{_host}{MARKS.get(priority, '')}"
    )


def check_id(id: str) -> None:
    """Refuse what cannot be a spool id (a path, a dot-file, empty).

    Raises:
        ValueError: ``id`` is not a valid name.
    """
    if not isinstance(id, str) or not id or id[0] == "." or "/" in id or "\0" in id:
        raise ValueError(f"not a spool message id: {id!r}")


def _after_fork_in_child() -> None:
    global _pid, _seq
    _pid = os.getpid()  # names made in the child are the child's
    _seq = itertools.count(1)


# --- small helpers ------------------------------------------------------------------


def errname(exc: OSError) -> str:
    """``No space left on device (ENOSPC)`` for an OSError."""
    code = exc.errno or 0
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def open_failure(exc: OSError) -> str:
    """Why a spool file could not be opened, in the words a person needs.

    A symbolic link is refused by ``O_NOFOLLOW`` with ELOOP, whose own text
    ("Too many levels of symbolic links") says nothing useful here.
    """
    if exc.errno == errno.ELOOP:
        return (
            "it is a symbolic link, which the spool never follows or sends "
            "(the queue processor moves it to quarantine/; `mailspool delete` removes it)"
        )
    return f"cannot open: {errname(exc)}"


def read_all(fd: int, size: int) -> bytes:
    """Read ``size`` bytes from ``fd`` (fewer only at the end of the file)."""
    data = os.read(fd, size) if size else b""
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        chunk = os.read(fd, size - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


# --- the directory ----------------------------------------------------------------------


class _LastQuarantined(threading.local):
    """Per thread: the id it set aside in quarantine last."""

    id: str | None = None


class SpoolDir:
    """A spool directory's areas and the system calls on them.

    Args:
        path: the spool root.
        create: create the root and its areas (mode 0700) when missing;
            with ``False`` a missing root or Maildir triple raises.

    Raises:
        SpoolError: the spool does not exist (``create=False``) or cannot be
            created.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = os.fspath(path)
        root = os.path.abspath(self.path)  # immune to a later chdir()
        self._dirs = {a: os.path.join(root, a) + os.sep for a in _AREAS}
        self._last_quarantined = _LastQuarantined()
        made = self._make_root(root) if create and not os.path.isdir(root) else []
        made += self._make_areas(root, create)
        for d in dict.fromkeys(made):  # new directory entries must survive a power cut
            try:
                self._fsync_path(d)
            except OSError as exc:
                raise SpoolIOError(exc.errno, f"cannot fsync {d}: {errname(exc)}") from exc
        # Finished files are renamed relative to this descriptor, so they land
        # in the real trash/ even if the name is later replaced by a symlink.
        self._trash_fd = -1
        with contextlib.suppress(OSError):  # none (read-only legacy queue), or a symlink
            self._trash_fd = os.open(self._dirs["trash"][:-1], DFLAGS | os.O_NOFOLLOW)
            weakref.finalize(self, close_quietly, self._trash_fd)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def _make_root(self, root: str) -> list[str]:
        """Create the spool's root and its missing parents; the directories to fsync."""
        made: list[str] = []
        parent = os.path.dirname(root)
        p = parent
        while not os.path.isdir(p) and os.path.dirname(p) != p:
            p = os.path.dirname(p)
            made.append(p)  # its new entry must be synced too
        # Missing parents are private too (0700 whatever the umask):
        # whoever can write in one could swap in a spool of their own.
        missing = []
        q = parent
        while not os.path.isdir(q) and os.path.dirname(q) != q:
            missing.append(q)
            q = os.path.dirname(q)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
                os.chmod(d, 0o700)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SpoolIOError(exc.errno, f"cannot create {d}: {errname(exc)}") from exc
        if self._mkdir(root):
            made.append(parent)
        return made

    def _make_areas(self, root: str, create: bool) -> list[str]:
        """Create the missing areas; the directories to fsync (the root, if any was made)."""
        made: list[str] = []
        for area in _AREAS:
            d = self._dirs[area][:-1]
            if os.path.isdir(d):
                continue
            if not create and area in ("tmp", "new", "cur"):
                raise SpoolIOError(errno.ENOENT, f"{self.path} is not a spool: {d} missing")
            try:
                if self._mkdir(d):
                    made.append(root)
            except SpoolError:
                if create:
                    raise
                # A read-only legacy queue opened for listing: fine.
        return made

    def _mkdir(self, path: str) -> bool:
        """Create ``path`` with mode 0700; False when it existed already."""
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return False
        except OSError as exc:
            raise SpoolIOError(exc.errno, f"cannot create spool {path}: {errname(exc)}") from exc
        os.chmod(path, 0o700)  # whatever the umask
        return True

    def _error(self, what: str, exc: OSError) -> SpoolIOError:
        err = SpoolIOError(exc.errno, f"spool {self.path}: cannot {what}: {errname(exc)}")
        err.__cause__ = exc
        return err

    # -- writing -----------------------------------------------------------------

    def _write(self, path: str, head: bytes, data: bytes, mtime: float | None, lock: bool) -> int:
        """Make a new file durable (:func:`mailspool.maildir.durable.write_file`)."""
        return write_file(path, head, data, mtime, lock)

    def _write_many(
        self, files: Sequence[tuple[str, bytes, bytes, float | None]]
    ) -> tuple[int, OSError] | None:
        """Make new files durable (:func:`mailspool.maildir.durable.write_files`)."""
        return write_files(files)

    def _fsync_path(self, path: str) -> None:
        fd = os.open(path, DFLAGS)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fsync_dir(self, area: str, id: str = "") -> None:
        """fsync the directory of ``area`` (of ``id``'s class, for ready mail)."""
        self._fsync_path(self._dirs[area_dir(area, id)])

    def _path(self, area: str, id: str) -> str:
        """Where message ``id`` is when it is in ``area`` (a lifecycle area)."""
        return self._dirs[area_dir(area, id)] + id

    def _area_dirs(self, area: str) -> tuple[str, ...]:
        """The directories of a lifecycle area: ready mail has one per class."""
        if area == "new":
            return tuple(self._dirs[READY_AREA[p]] for p in PRIORITIES)
        return (self._dirs[area],)

    # -- locks ---------------------------------------------------------------------

    def _lock_stale_cur(self, id: str) -> int | None:
        """Before a claim renames a file onto ``cur/ID``: lock what is there.

        Returns:
            -1 when ``cur/ID`` is absent (or not a lockable file); the
            locked descriptor of a stale copy (close it after the rename);
            None when someone holds it: do not claim now.
        """
        path = self._dirs["cur"] + id
        if not os.access(path, os.F_OK, follow_symlinks=False):
            return -1  # the usual case, told without the cost of an exception
        try:
            fd = lock_file(path)
        except BlockingIOError:
            return None
        except FileNotFoundError:
            return -1
        except OSError:
            return -1  # a planted symlink or FIFO: the rename replaces it
        return fd

    def _superseded(self, id: str) -> bool:
        """Whether a newer state of a ``cur/`` message exists elsewhere."""
        return any(os.path.lexists(self._path(a, id)) for a in NEWER_THAN_CUR)

    def _names(self, area: str) -> Iterator[str]:
        for d in self._area_dirs(area):
            try:
                it = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with it:
                for e in it:
                    if e.name[0] != ".":
                        yield e.name

    # -- trash and quarantine -------------------------------------------------------

    def _trash(self, path: str) -> bool:
        """Take a finished file out of the spool now.

        It is unlinked at once where unlinks are cheap, otherwise renamed
        into ``trash/`` and unlinked later by the reaper (:mod:`mailspool.maildir.trash`).

        Call it only for a file whose lock you hold (or that is not a
        message any more).

        Returns:
            True when it was unlinked at once.  Its blocks are freed when
            the last descriptor of it is closed: time that close too and
            tell :func:`mailspool.trash.unlinked`.

        Raises:
            OSError: the file could be neither moved nor removed.
        """
        where = self._dirs["trash"]
        if trash.unlink_at_once(where):
            try:
                os.unlink(path)
            except FileNotFoundError:
                return False  # gone already
            except OSError:
                pass  # e.g. EBUSY: try the rename
            else:
                return True
        try:
            if self._trash_fd < 0:
                raise FileNotFoundError(errno.ENOENT, "no trash/")
            os.rename(path, new_name(), dst_dir_fd=self._trash_fd)
        except OSError:
            with contextlib.suppress(FileNotFoundError):  # gone already
                os.unlink(path)  # no usable trash/: the slow way
            return False
        trash.reap_soon(where)
        return False

    def purge(self) -> int:
        """Unlink everything in ``trash/`` now (the reaper does it anyway).

        Returns:
            How many files were removed.
        """
        return trash.purge(self._dirs["trash"])

    def quarantined_last(self, id: str) -> bool:
        """Whether the last message this thread set aside in quarantine was ``id``.

        Tells why a claim by this thread came back empty without a system
        call: set aside, or (otherwise) taken or finished by someone else.
        """
        return self._last_quarantined.id == id

    def _quarantine(self, area: str, id: str, reason: str) -> bool:
        """Move ``area/id`` to quarantine/ with its reason; log once.

        Returns:
            False when the file was gone (someone else moved it first).

        Raises:
            SpoolError: the rename failed.
        """
        target = id
        while os.path.lexists(self._dirs["quarantine"] + target):
            target = f"{id}.{random.getrandbits(32):08x}"
        try:
            os.rename(self._path(area, id), self._dirs["quarantine"] + target)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._error(f"quarantine {area}/{id}", exc) from exc
        log.warning("spool %s: %s/%s quarantined: %s", self.path, area, id, reason)
        self._last_quarantined.id = id
        # Written aside and renamed into place: a file planted under the
        # reason's name (a FIFO, a hard link to a message) is replaced, never
        # opened or truncated.
        tmp = self._dirs["tmp"] + new_name()
        line = f"{time.time():.0f} {area} {reason}\n".encode("utf-8", "replace")
        try:
            self._write(tmp, line, b"", None, False)
            os.rename(tmp, f"{self._dirs['quarantine']}.{target}.reason")
        except OSError as exc:
            unlink_quietly(tmp)
            log.warning("spool %s: cannot record why %s was quarantined: %s", self.path, id, exc)
        return True
