"""The spool's ``trash/`` and the background thread that empties it.

Removing a file frees its blocks, and on some file systems that waits for
the disk: on ext4 mounted with online ``discard`` an unlink of a freshly
fsynced file takes about a millisecond, serialised in the kernel, against a
few microseconds for a rename.  So the spool renames a finished file into
``trash/`` (not a state: nothing there is ever listed or sent) and a
reaper thread, one per spool and process, unlinks it shortly after.

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

import atexit
import contextlib
import os
import threading
import time

__all__ = ["IDLE_EXIT", "purge", "reap_soon", "stop_reapers"]

#: Seconds without work after which a reaper thread ends.
IDLE_EXIT = 10.0

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
    try:
        with os.scandir(fd) as it:
            for e in it:
                if stop is not None and stop.is_set():
                    break
                with contextlib.suppress(OSError):  # gone already, a directory...
                    os.unlink(e.name, dir_fd=fd)
                    done += 1
    except OSError:
        pass  # the listing failed: the next pass tries again
    finally:
        os.close(fd)
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
            if self.stopping.is_set():
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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(stop_reapers, 1.0)
