"""One pass over a spool directory: count its entries, keep its oldest names.

A spool of a million messages has a million entries in one directory, so
the operator's questions (how many, which are the oldest) must cost one
listing and next to nothing per entry.  Maildir names begin with the time
they were made (``SECONDS.M<microseconds>...``), so the oldest messages are
found from the names alone: the loop below does one string comparison per
entry against a bound (the second of the newest name kept so far), and
parses a name only when it may belong among the oldest.  Nothing but the
``limit`` names kept is held.  The directory is read with bytes names, so
the million that are only counted are never decoded (a third of the loop's
time); a name is decoded when it is kept.  The bound compares seconds as text, which
holds for names whose seconds have ten digits (every name made between 2001
and 2286); an older name with fewer digits may be missed.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Iterator

__all__ = ["name_time", "scan_dir"]

_DOT = ord(".")  # a name's first byte, for names that are not messages


def name_time(name: str) -> tuple[int, int] | None:
    """(seconds, microseconds) from a Maildir name ``SECONDS.M<us>...``.

    Names without the ``M<us>`` part (zope.sendmail's) give 0 microseconds;
    names not starting with a time give None.
    """
    head, _, rest = name.partition(".")
    if not head.isdigit():
        return None
    us = 0
    if rest[:1] == "M":
        digits = rest[1:8]
        n = len(digits) - len(digits.lstrip("0123456789"))
        us = int(digits[:n]) if n else 0
    return int(head), us


class _Oldest:
    """The ``limit`` oldest dated names seen, and up to ``limit`` undated ones."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.heap: list[tuple[int, int, str]] = []  # (-seconds, -us, name): [0] the newest
        self.undated: list[str] = []
        #: Names (bytes) compared below this may belong among the oldest: until
        #: ``limit`` are kept every name does (a name has at most 255 bytes);
        #: then those of a second no later than the newest kept ("." and "~"
        #: frame the rest of a name).
        self.bound = b"\xff" * 256

    def offer(self, raw: bytes) -> None:
        name = os.fsdecode(raw)
        t = name_time(name)
        if t is None:
            if len(self.undated) < self.limit:
                self.undated.append(name)
            return
        item = (-t[0], -t[1], name)
        if len(self.heap) < self.limit:
            heapq.heappush(self.heap, item)
        elif item > self.heap[0]:
            heapq.heapreplace(self.heap, item)
        if len(self.heap) == self.limit:
            self.bound = f"{-self.heap[0][0]}.~".encode()

    def names(self) -> list[str]:
        """Oldest first, the undated ones last."""
        dated = [name for _, _, name in sorted(self.heap, reverse=True)]
        return (dated + sorted(self.undated))[: self.limit]


def scan_dir(
    d: str, limit: int = 0, due_by: float | None = None, ready: list[int] | None = None
) -> tuple[int, list[str]]:
    """Count the entries of directory ``d`` and keep its ``limit`` oldest names.

    Args:
        d: the directory (a missing one is empty).
        limit: how many of the oldest names to keep (0: none).
        due_by: count only entries whose mtime is later than this; those
            due (mtime at or before it) are added to ``ready[0]`` instead
            (one ``stat`` per entry: for ``deferred/``).
        ready: where the due entries are counted.

    Returns:
        (the count, the oldest names, oldest first; names that do not
        begin with a time come last).
    """
    keep = _Oldest(limit) if limit else None
    try:
        with os.scandir(os.fsencode(d)) as it:
            if due_by is not None:
                n = _scan_deferred(it, keep, due_by, ready if ready is not None else [0])
            elif keep is None:
                n = _count(it)
            else:
                n = _scan_oldest(it, keep)
    except FileNotFoundError:
        return 0, []
    except OSError as exc:  # named as the caller named it, not in bytes
        raise OSError(exc.errno, exc.strerror, d) from exc
    return n, keep.names() if keep is not None else []


def _count(it: Iterator[os.DirEntry[bytes]]) -> int:
    """Count the entries but dot names."""
    n = 0
    for e in it:
        if e.name[0] != _DOT:
            n += 1
    return n


def _scan_oldest(it: Iterator[os.DirEntry[bytes]], keep: _Oldest) -> int:
    """Count and keep the oldest: the loop of a million entries, one comparison each."""
    n = 0
    bound = keep.bound
    for e in it:
        name = e.name
        if name < bound:  # dot names too: "." sorts before the digits
            if name[0] == _DOT:
                continue
            keep.offer(name)
            bound = keep.bound
        n += 1
    return n


def _scan_deferred(
    it: Iterator[os.DirEntry[bytes]], keep: _Oldest | None, due_by: float, ready: list[int]
) -> int:
    """Count the entries not due by ``due_by``; those due go to ``ready[0]``."""
    n = 0
    for e in it:
        if e.name[0] == _DOT:
            continue
        if keep is not None:
            keep.offer(e.name)
        try:
            if e.stat(follow_symlinks=False).st_mtime <= due_by:
                ready[0] += 1
                continue
        except OSError:
            continue
        n += 1
    return n
