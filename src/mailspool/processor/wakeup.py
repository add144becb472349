"""Where the processor's loop sleeps, and what wakes it.

An idle processor must use no CPU and still see new mail within
milliseconds.  So between passes it blocks in ``select()`` on two things:

* a socket pair: :meth:`Waiter.wake` writes one byte to it.  The delivery
  calls it after a commit in the same process, and the signal handlers
  call it (a non-blocking ``send`` is safe there: no lock, no logging);
* an inotify descriptor (Linux, reached through ``ctypes``; the standard
  library has no binding) on the spool's ``new/`` and ``deferred/``, which
  sees commits made by any process.

The caller gives the longest sleep: the time until the next deferred
message is due, or its polling ``interval``, which is the safety net and
the only way to see new mail where inotify is missing (other systems, some
network file systems, a watch limit reached).  Any event just means "look
now": what changed is read from the spool, never from the event.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import selectors
import socket
import sys
from collections.abc import Mapping

__all__ = ["IN_ATTRIB", "IN_CREATE", "IN_MOVED_TO", "Inotify", "Waiter", "spool_watches"]

# The processor's logger: operators configure one name for all of its parts.
log = logging.getLogger("mailspool.processor")

#: inotify event masks (``<sys/inotify.h>``).
IN_ATTRIB, IN_MOVED_TO, IN_CREATE = 0x4, 0x80, 0x100


def spool_watches(root: str) -> dict[str, int]:
    """The directories of a spool to watch, and for which events.

    ``new/`` gets mail by rename (a commit) or creation (another program);
    ``deferred/`` also by a changed mtime (``mailspool retry``).
    """
    return {
        os.path.join(root, "new"): IN_MOVED_TO | IN_CREATE,
        os.path.join(root, "deferred"): IN_MOVED_TO | IN_CREATE | IN_ATTRIB,
    }


class Inotify:
    """An inotify descriptor (Linux, through ctypes); any event means "look"."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls, watches: Mapping[str, int]) -> Inotify | None:
        """Watch each path for its event mask.

        Returns:
            The watcher, or None where inotify is unavailable or a path
            cannot be watched (then the caller polls).
        """
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            init1 = libc.inotify_init1
            add_watch = libc.inotify_add_watch
        except (OSError, AttributeError):
            return None
        init1.argtypes, init1.restype = [ctypes.c_int], ctypes.c_int
        add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        add_watch.restype = ctypes.c_int
        fd = init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.debug("inotify unavailable: %s", os.strerror(ctypes.get_errno()))
            return None
        for path, mask in watches.items():
            if add_watch(fd, os.fsencode(path), mask) < 0:
                log.debug("cannot watch %s: %s", path, os.strerror(ctypes.get_errno()))
                os.close(fd)
                return None
        return cls(fd)

    def drain(self) -> None:
        """Read and forget every pending event."""
        try:
            while os.read(self.fd, 65536):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self) -> None:
        """Close the descriptor (and with it every watch)."""
        os.close(self.fd)


class Waiter:
    """Sleeps until woken, a watched directory changes, or a timeout.

    Args:
        watches: paths and inotify masks (see :func:`spool_watches`);
            ``None`` or empty: wake-ups and timeouts only.
    """

    def __init__(self, watches: Mapping[str, int] | None) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._r, selectors.EVENT_READ)
        self.inotify = Inotify.open(watches) if watches else None
        if self.inotify is not None:
            self._selector.register(self.inotify.fd, selectors.EVENT_READ)

    def wake(self) -> None:
        """Make the current or next wait return; safe in a signal handler."""
        with contextlib.suppress(OSError):  # full (already woken) or closed
            self._w.send(b"\0")

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds; True when something woke us."""
        return bool(self._selector.select(max(0.0, timeout)))

    def consume(self) -> None:
        """Forget what woke us; called before each pass, so nothing is missed."""
        try:
            while self._r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        if self.inotify is not None:
            self.inotify.drain()

    def close(self) -> None:
        """Release the sockets, the selector and the inotify descriptor."""
        self._selector.close()
        self._r.close()
        self._w.close()
        if self.inotify is not None:
            self.inotify.close()
