"""A fast fill of a Maildir spool: what a million commits would leave, in a minute.

Each message is a file exactly as a commit writes it (mailspool's own name
and format, its class's ready directory), but without the fsyncs, which are
what makes a commit take a millisecond: a million real commits take a
quarter of an hour on the bench machine and say nothing more about the
queue that results.  ``os.sync()`` at the end writes everything out before
anything is measured.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from systems import make_messages

__all__ = ["fast_fill"]


def fast_fill(path: str, n: int, tag: str, priority: str = "normal") -> float:
    """Write ``n`` distinct ready messages of class ``priority`` into the spool at
    ``path`` (created); return the seconds it took."""
    from mailspool.maildir.classes import READY_AREA
    from mailspool.maildir.directory import new_name
    from mailspool.maildir.fileformat import encode_head
    from mailspool.maildir.spool import Spool
    from mailspool.message import prepare
    from mailspool.priority import parse_priority

    cls = parse_priority(priority)
    Spool(path)
    ready = os.path.join(path, READY_AREA[cls])
    t0 = time.perf_counter()
    chunk = 1000
    for start in range(0, n, chunk):
        for sender, rcpts, data in make_messages(min(chunk, n - start), tag, start=start):
            p = replace(prepare(sender, rcpts, data), priority=cls)
            now = time.time()
            head = encode_head(p.envelope.sender, p.envelope.recipients, p.message_id, now, p.data)
            fd = os.open(
                os.path.join(ready, new_name(cls)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
            )
            try:
                os.writev(fd, [head, p.data])
            finally:
                os.close(fd)
    os.sync()
    return time.perf_counter() - t0
