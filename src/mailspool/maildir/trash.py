"""The spool's ``trash/`` and the background thread that empties it.

Removing a file frees its blocks, and on some file systems that waits for
the disk: on ext4 mounted with online ``discard`` an unlink of a freshly
fsynced file takes about a millisecond, serialised in the kernel, against a
few microseconds for a rename.  Where that is so, the spool renames a
finished file into ``trash/`` (not a state: nothing there is ever listed or
sent) and a reaper thread, one per spool and process, unlinks it shortly
after.  Where unlinks are cheap (most file systems) the file is unlinked at
once: a reaper would only take turns with the sender threads at the
interpreter lock, one turn per file.  Which way is chosen per spool and
process by timing the unlinks (:func:`unlink_at_once`, :data:`SLOW_UNLINK`):
an unlink slower than that sends the files through ``trash/``, a reaper's
pass whose unlinks were all cheap brings them back.

What keeps this safe:

* Only finished files are ever renamed into ``trash/`` (every recipient
  accepted, or a copy superseded by a newer, durable state), so nothing
  the reaper removes is needed.  Names there are unique; a file still open
  (a claim's lock) stays readable through its descriptor.
* The reaper works through a descriptor of ``trash/`` opened with
  ``O_NOFOLLOW``, and unlinks names relative to it: a ``trash`` that was
  replaced by a symlink is refused, a symlink inside is removed (never its
  target), a directory inside is left alone.  Nothing outside ``trash/`` is
  touched.
* The thread is a daemon started on demand; it ends after
  :data:`IDLE_EXIT` idle seconds, and :func:`stop_reapers` (also run at
  interpreter exit) ends it between two unlinks.  Whatever is left in
  ``trash/`` is removed by the next reaper: ``Spool.sweep()`` starts one.
* After ``fork()`` the child has no reaper (threads do not survive a fork);
  its first finished file starts its own.  Two reapers on one ``trash/``
  (two processes) only race to unlink the same names, which is harmless.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = [
    "GATHER",
    "IDLE_EXIT",
    "SLOW_UNLINK",
    "purge",
    "reap_soon",
    "stop_reapers",
    "unlink_at_once",
]

#: Seconds without work after which a reaper thread ends.
IDLE_EXIT = 10.0
#: Unlinks slower than this (seconds), SLOW_IN_ROW times in a row, make
#: finished files go through ``trash/`` and the reaper.  A rename costs a
#: few microseconds, and each file the reaper removes costs the sender
#: threads a turn or two at the interpreter lock; an unlink with online
#: ``discard`` costs 0.6-1.5 ms, without it 5-40 us (and a timing may
#: include a wait for the interpreter lock: hence several in a row).
SLOW_UNLINK = 200e-6
SLOW_IN_ROW = 3
#: Seconds a woken reaper waits before its pass, so that one pass removes
#: the files of many messages: each wake-up costs the sender threads a turn
#: at the interpreter lock, and each pass a listing of ``trash/``.
GATHER = 0.01
#: A reaper's pass brings the unlinks at once back after this many files,
#: all removed faster than SLOW_UNLINK.
_FAST_PASS = 16

# trash/ path -> slow unlinks in a row seen in this process; SLOW_IN_ROW or
# more: slow, until a reaper's pass finds them cheap again.
_slow_in_row: dict[str, int] = {}


def unlink_at_once(trash: str) -> bool:
    """Whether a finished file of the spool whose ``trash/`` is ``trash`` is
    better unlinked at once than renamed into ``trash/``.

    No system call: the answer comes from the unlinks timed so far (see
    :func:`unlinked`); at first it is yes.
    """
    return _slow_in_row.get(trash, 0) < SLOW_IN_ROW


def unlinked(trash: str, seconds: float) -> None:
    """Tell how long unlinking one finished file of that spool took
    (with the close that freed its blocks)."""
    n = _slow_in_row.get(trash, 0)
    if n >= SLOW_IN_ROW:
        return  # slow already: only a reaper's pass says otherwise
    if seconds <= SLOW_UNLINK:
        _slow_in_row.pop(trash, None)
    else:
        _slow_in_row[trash] = n + 1


_DIRFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def purge(trash: str, stop: threading.Event | None = None) -> int:
    """Unlink every file in the directory ``trash`` (not recursively).

    Args:
        trash: the path of a spool's ``trash/``; refused if it is a symlink.
        stop: when set, return before the next unlink.

    Returns:
        How many names were removed.
    """
    try:
        # No trailing slash: it would make the kernel follow a symlink.
        fd = os.open(trash.rstrip(os.sep) or os.sep, _DIRFLAGS)
    except OSError:
        return 0  # gone, not a directory, or a symlink: not ours to clean
    done = 0
    slowest = 0.0
    unlink, clock = os.unlink, time.monotonic
    try:
        with os.scandir(fd) as it:
            for e in it:
                if stop is not None and stop.is_set():
                    break
                started = clock()
                try:
                    unlink(e.name, dir_fd=fd)
                except OSError:  # gone already, a directory...
                    continue
                slowest = max(slowest, clock() - started)
                done += 1
    except OSError:
        pass  # the listing failed: the next pass tries again
    finally:
        os.close(fd)
    if done >= _FAST_PASS and slowest <= SLOW_UNLINK:
        _slow_in_row.pop(trash, None)  # cheap again: finished files are unlinked at once
    return done


class _Reaper(threading.Thread):
    def __init__(self, key: tuple[int, str]) -> None:
        super().__init__(name=f"mailspool-reaper {key[1]}", daemon=True)
        self.key = key
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            if not self.wake.wait(IDLE_EXIT):
                with _lock:
                    if not self.wake.is_set():
                        if _reapers.get(self.key) is self:
                            del _reapers[self.key]
                        return
            if self.stopping.wait(GATHER):
                return
            self.wake.clear()
            purge(self.key[1], self.stopping)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()


_reapers: dict[tuple[int, str], _Reaper] = {}
_lock = threading.Lock()
# getpid() is a system call; reap_soon() runs once per finished message.
_pid = os.getpid()


def reap_soon(trash: str) -> None:
    """Have ``trash`` emptied soon by this process's reaper thread for it.

    Cheap (no system call while the thread is awake already); starts the
    thread when there is none.

    Args:
        trash: the path of a spool's ``trash/``.
    """
    key = (_pid, trash)
    reaper = _reapers.get(key)
    if reaper is not None and reaper.wake.is_set():
        return  # woken already (the common case while files come): no lock
    with _lock:
        reaper = _reapers.get(key)
        if reaper is None:
            reaper = _reapers[key] = _Reaper(key)
            reaper.start()
        elif reaper.wake.is_set():
            return  # woken already, not yet running its pass
        reaper.wake.set()


def stop_reapers(timeout: float | None = None) -> bool:
    """End this process's reaper threads after the unlink they are doing.

    Files left in ``trash/`` stay there until a later reaper (the next
    ``Spool.sweep()`` or finished message starts one).  Run at exit.

    Args:
        timeout: seconds to wait for the threads, in all (None: no limit).

    Returns:
        True when every thread has ended.
    """
    with _lock:
        reapers = list(_reapers.values())
        _reapers.clear()
    for r in reapers:
        r.stop()
    deadline = None if timeout is None else time.monotonic() + timeout
    for r in reapers:
        if r is not threading.current_thread():
            r.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(r.is_alive() for r in reapers)


def _after_fork_in_child() -> None:
    global _lock, _pid
    _pid = os.getpid()
    _lock = threading.Lock()  # another thread may have held it at the fork
    _reapers.clear()  # their threads do not exist in the child
