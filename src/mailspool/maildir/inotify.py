"""What wakes a processor when mail arrives in a spool: inotify (Linux).

The standard library has no binding, so it is reached through ``ctypes``.
Any event just means "look now": what changed is read from the spool,
never from the event.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping

__all__ = ["IN_ATTRIB", "IN_CREATE", "IN_MOVED_TO", "Inotify", "spool_watches"]

log = logging.getLogger("mailspool.spool")

#: inotify event masks (``<sys/inotify.h>``).
IN_ATTRIB, IN_MOVED_TO, IN_CREATE = 0x4, 0x80, 0x100


def spool_watches(root: str) -> dict[str, int]:
    """The directories of a spool to watch, and for which events.

    ``new/`` (and ``urgent/``, ``bulk/``: ready mail of the other classes)
    gets mail by rename (a commit) or creation (another program);
    ``deferred/`` also by a changed mtime (``mailspool retry``).
    """
    ready = {os.path.join(root, d): IN_MOVED_TO | IN_CREATE for d in ("new", "urgent", "bulk")}
    return {**ready, os.path.join(root, "deferred"): IN_MOVED_TO | IN_CREATE | IN_ATTRIB}


class Inotify:
    """An inotify descriptor (Linux, through ctypes); any event means "look".

    The Maildir spool's :class:`~mailspool.queue.Waker`.
    """

    kind = "inotify"

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        """The descriptor to ``select()`` on."""
        return self.fd

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
