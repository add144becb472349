"""How the spool makes a new file durable: created, filled, fsynced, closed.

Every file is created with ``O_EXCL|O_NOFOLLOW`` (:data:`WFLAGS`), mode
0600 whatever the umask (checked with ``fstat`` on the open file), written
completely, fsynced and closed with the close checked.  A failed fsync or
close is a failed write, never retried (the kernel may have dropped the
data): the file is removed and the error raised.  A batch is written first
and then fsynced by a few threads at once, since a journaling file system
commits them together and a disk works on several writes at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Sequence

from mailspool.maildir.locks import LOCK, close_held, close_quietly, open_held

__all__ = ["WFLAGS", "unlink_quietly", "write_file", "write_files"]

WFLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it exists, ignoring errors."""
    with contextlib.suppress(OSError):
        os.unlink(path)


#: write_files fsyncs at least this many files per thread, with at most
#: this many threads: a small batch gains nothing from threads but pays
#: for starting them.
_FSYNC_BATCH = 8
_FSYNC_THREADS = 4


def _fill(fd: int, head: bytes, data: bytes, mtime: float | None) -> None:
    """Write ``head + data`` into the new file ``fd``, mode 0600."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
        os.fchmod(fd, 0o600)  # the umask took owner bits (or is odd)
    total = len(head) + len(data)
    n = os.writev(fd, (head, data))
    if n != total:
        rest = memoryview(head + data)[n:]
        while rest:
            k = os.write(fd, rest)
            if k <= 0:
                raise OSError(errno.EIO, "short write")
            rest = rest[k:]
    if mtime is not None:
        os.utime(fd, (mtime, mtime))


def _fsync_all(fds: list[int], errors: list[OSError | None]) -> None:
    """fsync every fd, a few at once; errors[i] gets fds[i]'s failure."""

    def work(start: int, step: int) -> None:
        for i in range(start, len(fds), step):
            try:
                os.fsync(fds[i])
            except OSError as exc:
                errors[i] = exc

    step = max(1, min(_FSYNC_THREADS, len(fds) // _FSYNC_BATCH))
    threads: list[threading.Thread] = []
    try:
        for k in range(1, step):
            t = threading.Thread(target=work, args=(k, step), name="mailspool-fsync")
            try:
                t.start()
            except RuntimeError:  # no thread to be had (at exit): this one does the rest
                for rest in range(k, step):
                    work(rest, step)
                break
            threads.append(t)
        work(0, step)
    finally:
        for t in threads:
            t.join()


def _abandon(fds: list[int], paths: list[str]) -> None:
    """Close ``fds`` and remove ``paths``, quietly: a failed batch leaves nothing."""
    for fd in fds:
        close_quietly(fd)
    for path in paths:
        unlink_quietly(path)


def write_file(path: str, head: bytes, data: bytes, mtime: float | None, lock: bool) -> int:
    """Create ``path`` and make ``head + data`` durable in it.

    Returns the still-open, locked fd when ``lock`` is true (close it
    with close_held()), else -1.  On any failure the file is removed and
    the OSError re-raised: a failed fsync or close is never retried (the
    kernel may have dropped the data).
    """
    fd = open_held(path, WFLAGS) if lock else os.open(path, WFLAGS, 0o600)
    try:
        if lock:
            fcntl.flock(fd, LOCK)
        _fill(fd, head, data, mtime)
        os.fsync(fd)
        if lock:
            return fd
    except BaseException:
        if lock:
            close_held(fd)
        else:
            close_quietly(fd)
        unlink_quietly(path)
        raise
    try:
        os.close(fd)
    except OSError:
        unlink_quietly(path)
        raise
    return -1


def write_files(
    files: Sequence[tuple[str, bytes, bytes, float | None]],
) -> tuple[int, OSError] | None:
    """:func:`write_file` for several new files (path, head, data, mtime).

    All are written first, then fsynced by a few threads at once (a
    journaling file system commits them together, and a disk works on
    several writes at once), then closed with each close checked.
    Threads live only for this call: nothing is left to break across a
    fork.

    Returns:
        None when every file is durable; else the index in ``files`` of
        the first one that failed and its error, after every file of
        the batch was closed and removed (a failed fsync or close is
        never retried).
    """
    fds: list[int] = []
    errors: list[OSError | None] = [None] * len(files)
    try:
        for i, (path, head, data, mtime) in enumerate(files):
            try:
                fd = os.open(path, WFLAGS, 0o600)
            except OSError as exc:  # not ours to remove (EEXIST...)
                errors[i] = exc
                break
            fds.append(fd)
            try:
                _fill(fd, head, data, mtime)
            except OSError as exc:
                errors[i] = exc
                break
        else:
            _fsync_all(fds, errors)
    except BaseException:
        _abandon(fds, [f[0] for f in files[: len(fds)]])
        raise
    made = [f[0] for f in files[: len(fds)]]
    failed = next((i for i, e in enumerate(errors) if e is not None), None)
    if failed is None:
        for i, fd in enumerate(fds):
            try:
                os.close(fd)
            except OSError as exc:
                errors[i] = exc
        failed = next((i for i, e in enumerate(errors) if e is not None), None)
        if failed is None:
            return None
        fds = []  # closed, if with an error
    _abandon(fds, made)
    err = errors[failed]
    assert err is not None
    return failed, err
