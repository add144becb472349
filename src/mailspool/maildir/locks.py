"""Who owns a spool file: an ``flock`` that dies with its holder.

A message belongs to whoever holds the exclusive ``flock`` on its open
file.  The kernel drops the lock when the last descriptor of that open file
goes away, so a crashed processor's messages are free again at once -- no
lock files, no timeouts.  Two details make that true in practice:

* A lock is checked against the name: after locking, the inode the path
  names must still be the one that was opened, or the lock is worthless
  (someone finished the message and a new file took its name).
* Locks belong to open file descriptions, which a child made by ``fork()``
  shares.  A forked child (``multiprocessing``, a pre-forking server) would
  keep its parent's claims locked after the parent died; so every
  descriptor that may carry a lock is registered here and closed in the
  child right after the fork (closing the child's copy leaves the parent's
  lock alone).  The descriptors are ``O_CLOEXEC`` for ``exec`` as well.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading

__all__ = [
    "LOCK",
    "RFLAGS",
    "close_held",
    "close_quietly",
    "lock_file",
    "lock_free",
    "open_held",
    "same_file",
]

#: How existing spool files are opened: never through a symlink (ELOOP), a
#: FIFO without blocking, never as a controlling terminal.
RFLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
#: An exclusive lock, refused at once when someone else holds it.
LOCK = fcntl.LOCK_EX | fcntl.LOCK_NB

_held: set[int] = set()
# Guards _held, _busy and _fork_waits; held by fork() (see _before_fork).
# The hot paths take the plain lock; only a waiting fork() uses the
# condition, and is notified only when it waits.
_held_lock = threading.Lock()
_idle = threading.Condition(_held_lock)
# How many opens and closes of held descriptors are under way.  Their system
# calls run outside the lock, so that threads do not queue behind one
# another's; fork() waits until none is, so that no descriptor is ever
# open in a child without being registered.
_busy = 0
# Whether a fork() waits for _busy to fall to zero.
_fork_waits = False


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring errors."""
    with contextlib.suppress(OSError):
        os.close(fd)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two stat results are of the same file."""
    return a.st_ino == b.st_ino and a.st_dev == b.st_dev


def open_held(path: str, flags: int = RFLAGS, mode: int = 0o600) -> int:
    """``os.open`` a file whose descriptor may carry an flock.

    The descriptor is closed in a child process after ``fork()`` (the lock
    stays with the parent), so a claim dies with the process that made it.
    Close it with :func:`close_held`.

    Raises:
        OSError: from ``open(2)``.
    """
    global _busy
    with _held_lock:
        _busy += 1  # no fork between the open and the registration
    fd = -1
    try:
        fd = os.open(path, flags, mode)
    finally:
        with _held_lock:
            if fd >= 0:
                _held.add(fd)
            _done()
    return fd


def _done() -> None:
    """End an open or close under way (call with ``_held_lock`` held)."""
    global _busy
    _busy -= 1
    if not _busy and _fork_waits:
        _idle.notify_all()


def close_held(fd: int) -> None:
    """Close a descriptor from :func:`open_held` (which drops its lock); never raises.

    A number that is not (or no longer) registered is left alone.
    """
    global _busy
    with _held_lock:
        if fd not in _held:
            return
        _held.discard(fd)
        _busy += 1  # no fork between the unregistration and the close
    try:
        close_quietly(fd)
    finally:
        with _held_lock:
            _done()


def lock_file(path: str) -> int | None:
    """Open and lock the file that ``path`` names.

    Returns:
        The locked descriptor (close it with :func:`close_held`), or None
        when the name is gone or now names another file.

    Raises:
        BlockingIOError: someone else holds the lock.
        OSError: the file cannot be opened (ELOOP for a symlink...).
    """
    fd = open_held(path)
    try:
        fcntl.flock(fd, LOCK)
        if same_file(os.fstat(fd), os.lstat(path)):
            return fd
    except FileNotFoundError:
        pass
    except BaseException:
        close_held(fd)
        raise
    close_held(fd)
    return None


def lock_free(path: str) -> bool:
    """Whether no live process holds the lock of the file ``path`` names.

    True also for an entry that cannot be opened (a symlink, EACCES): it is
    for a claim to find out and quarantine it.
    """
    try:
        fd = open_held(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, LOCK)
        return True
    except OSError:
        return False
    finally:
        close_held(fd)


def _before_fork() -> None:
    # Held across the fork: no open or close of a held descriptor starts,
    # and none is left half done (opened but not registered, unregistered
    # but not closed).
    global _fork_waits
    _held_lock.acquire()
    while _busy:
        _fork_waits = True
        _idle.wait()
    _fork_waits = False


def _after_fork_in_parent() -> None:
    _held_lock.release()


def _after_fork_in_child() -> None:
    for fd in _held:
        close_quietly(fd)  # the parent's locks stay the parent's
    _held.clear()
    _held_lock.release()
