"""The operator's view of a spool: what is where, and repairs.

Listing never moves anything and never loads the whole queue: counts()
reads directory entries only, entries() streams one message at a time and
reads only the head of each file, state() costs one ``lstat`` per area.
Repairs (retry, hold, release, delete) take the message's lock, so a
message being sent is never moved under its sender, and each move is one
the lifecycle table allows (:func:`mailspool.lifecycle.next_area`).
:class:`mailspool.spool.Spool` inherits all of it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import replace

from mailspool.errors import MessageStateError, NoSuchMessage, SpoolCorrupt, SpoolError
from mailspool.maildir.classes import name_priority
from mailspool.maildir.directory import (
    LOCATE_ORDER,
    SpoolDir,
    check_id,
    errname,
    new_name,
    open_failure,
    read_all,
    unlink_quietly,
)
from mailspool.maildir.fileformat import (
    FAILED,
    PENDING,
    RecipientStatus,
    Record,
    decode_file,
    encode_file,
    head_size,
)
from mailspool.maildir.lifecycle import AREAS, STATES, next_area
from mailspool.maildir.locks import RFLAGS, close_held, lock_file
from mailspool.maildir.scan import name_time, scan_dir
from mailspool.queue import Census, OperatorMoves, State, age_order
from mailspool.queue import QueueEntry as SpoolEntry

__all__ = ["SpoolAdmin", "SpoolEntry"]


def _earlier(
    a: tuple[tuple[int, int] | None, str, str], b: tuple[tuple[int, int] | None, str, str]
) -> bool:
    """Whether name ``a`` was made before ``b`` (undated names last)."""
    return (a[0] is None, a[0] or (0, 0), a[1]) < (b[0] is None, b[0] or (0, 0), b[1])


_HEAD_READ = 16384  # bytes read to list a message; more when the envelope is longer


class SpoolAdmin(OperatorMoves, SpoolDir):
    """Listing, inspection and repair of a spool directory.

    :class:`mailspool.spool.Spool` inherits it; see there for the arguments.
    """

    # -- where a message is -------------------------------------------------------

    def _locate(self, id: str) -> str | None:
        check_id(id)
        for area in LOCATE_ORDER:
            try:
                os.lstat(self._path(area, id))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                raise self._error(f"look for {id}", exc) from exc
            return area
        return None

    def state(self, id: str) -> str | None:
        """The state of message ``id``, from directory entries only.

        One ``lstat`` per area until found; no file is opened or read, so it
        is cheap enough to ask after every failed claim (was it quarantined,
        or taken by someone else?).

        Args:
            id: a spool id.

        Returns:
            ``"ready"``, ``"in_flight"``, ``"deferred"``, ``"held"``,
            ``"failed"`` or ``"quarantined"``; None when no area holds it
            (sent and removed, or deleted).  When a crash left a stale copy
            in ``cur/`` besides a newer state, the newer state is returned.

        Raises:
            ValueError: ``id`` is not a valid name.
            SpoolError: an area cannot be searched (EACCES...).
        """
        area = self._locate(id)
        return None if area is None else STATES[area]

    # -- the operator's view ----------------------------------------------------------

    def counts(self, now: float | None = None) -> dict[str, int]:
        """How many messages each state holds, from directory entries only.

        Keys: ready, in_flight, deferred, held, failed, quarantined.  With
        ``now``, deferred messages already due are counted as ready (that
        needs one stat per deferred entry; without ``now`` no file is
        opened or stat'ed).
        """
        return dict(self.census(now, oldest=False).counts)

    def census(self, now: float | None = None, *, oldest: bool = True) -> Census:
        """:meth:`counts` and each state's oldest message, in one listing of each area.

        The oldest is the file whose name (Maildir's rule: it begins with
        the time it was made) is the earliest; that one file is read for its
        exact queued time.  So a spool of a million answers in one pass
        over its directories of one string comparison per entry, holding one
        name per state (see :mod:`mailspool.maildir.scan`).
        """
        out = dict.fromkeys(AREAS, 0)
        due = [0]
        first: dict[str, tuple[tuple[int, int] | None, str, str]] = {}
        for area, state in STATES.items():
            for d in self._area_dirs(area):
                n, names = scan_dir(d, int(oldest), now if area == "deferred" else None, due)
                out[state] += n
                for name in names:
                    seen = (name_time(name), name, area)
                    if state not in first or _earlier(seen, first[state]):
                        first[state] = seen
        out[State.READY] += due[0]
        when: dict[str, float | None] = dict.fromkeys(AREAS)
        for st, (t, name, area) in first.items():
            entry = self._entry(area, name, full=False)
            if entry is not None and entry.queued_at is not None:
                when[st] = entry.queued_at
            elif t is not None:
                when[st] = t[0] + t[1] / 1e6
        return Census(out, when)

    def oldest(
        self, states: tuple[str, ...] = ("ready", "in_flight", "deferred", "held")
    ) -> float | None:
        """When the oldest message still waiting was queued, or None.

        Read from the file names, which begin with the time they were made
        (Maildir's rule, which zope.sendmail and repoze.sendmail follow too):
        one directory listing per state and a single file read, so a queue
        of 100,000 is answered in a fraction of a second.  A name that does
        not start with a time is read to learn it.
        """
        best: tuple[tuple[int, int], str, str] | None = None
        unnamed: list[tuple[str, str]] = []
        for state in states:
            area = AREAS[state]
            for name in self._names(area):
                key = name_time(name)
                if key is None:
                    unnamed.append((area, name))
                elif best is None or key < best[0]:
                    best = (key, area, name)
        times: list[float] = []
        for area, name in unnamed + ([(best[1], best[2])] if best is not None else []):
            entry = self._entry(area, name, full=False)
            if entry is not None and entry.queued_at is not None:
                times.append(entry.queued_at)
        if best is not None and not times:
            times.append(best[0][0] + best[0][1] / 1e6)
        return min(times) if times else None

    def entries(self, state: str | None = None) -> Iterator[SpoolEntry]:
        """Stream one :class:`SpoolEntry` per message (all states, or one).

        Only the head of each file is read; nothing is moved, a damaged
        file is listed with what is wrong in ``last_error``.

        Raises:
            ValueError: ``state`` is not one of :data:`AREAS`.
        """
        if state is not None and state not in AREAS:
            raise ValueError(f"unknown state {state!r}; one of {sorted(AREAS)}")
        for area in [AREAS[state]] if state else list(STATES):
            for name in self._names(area):
                entry = self._entry(area, name, full=False)
                if entry is not None:
                    yield entry

    def oldest_entries(self, limit: int, state: str | None = None) -> list[SpoolEntry]:
        """The ``limit`` oldest messages (all states, or one), oldest first.

        Chosen by the time at the start of each file name (Maildir's rule:
        when the file was made, which is when the message was queued); so
        however large the spool, one listing of each area picks them (see
        :mod:`mailspool.maildir.scan`), at most ``limit`` names per
        directory are held, and only the heads of the chosen files are
        read.  Names that do not start with a time come last.

        Raises:
            ValueError: ``state`` is not one of :data:`AREAS`.
        """
        if state is not None and state not in AREAS:
            raise ValueError(f"unknown state {state!r}; one of {sorted(AREAS)}")
        chosen: list[tuple[tuple[int, int] | None, str, str]] = []
        for area in [AREAS[state]] if state else list(STATES):
            for d in self._area_dirs(area):
                chosen += [(name_time(n), n, area) for n in scan_dir(d, limit)[1]]
        chosen.sort(key=lambda k: (k[0] is None, k[0] or (0, 0), k[1]))
        found = [self._entry(area, name, full=False) for _, name, area in chosen[:limit]]
        return sorted([e for e in found if e is not None], key=age_order)

    def get(self, id: str) -> SpoolEntry:
        """Everything known about one message, its checksum verified.

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
            ValueError: ``id`` is not a valid name.
        """
        for _ in range(3):  # it may move between lookup and read
            area = self._locate(id)
            if area is None:
                break
            entry = self._entry(area, id, full=True)
            if entry is not None:
                return entry
        raise NoSuchMessage(id)

    def message(self, id: str) -> bytes:
        """The message ``id`` as it would be sent, without the envelope.

        Read like a claim reads (no symlink followed, no FIFO opened for
        long), but the checksum is not required: a quarantined file can be
        inspected.

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
            ValueError: ``id`` is not a valid name, or the file cannot be
                decoded.
            SpoolCorrupt: the file is not a regular file.
            SpoolIOError: the file cannot be read.
        """
        area = self._locate(id)
        if area is None:
            raise NoSuchMessage(id)
        path = self._path(area, id)
        try:
            fd = os.open(path, RFLAGS)
        except FileNotFoundError:
            raise NoSuchMessage(id) from None
        except OSError as exc:
            raise self._error(f"read {id}", exc) from exc
        try:
            st = os.fstat(fd)
            raw = read_all(fd, st.st_size) if stat.S_ISREG(st.st_mode) else None
        except OSError as exc:
            raise self._error(f"read {id}", exc) from exc
        finally:
            os.close(fd)
        if raw is None:
            raise SpoolCorrupt(path, "not a regular file")
        return decode_file(raw, verify=False, mtime=st.st_mtime)[1]

    def _entry(self, area: str, id: str, full: bool) -> SpoolEntry | None:
        path = self._path(area, id)
        state = STATES[area]
        error: str | None = None
        record: Record | None = None
        size = 0
        mtime = 0.0
        try:
            fd = os.open(path, RFLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            error = open_failure(exc)
        else:
            try:
                st = os.fstat(fd)
                size, mtime = st.st_size, st.st_mtime
                if not stat.S_ISREG(st.st_mode):
                    error = f"not a regular file (mode {st.st_mode:o})"
                else:
                    if full:
                        raw = read_all(fd, size)
                    else:
                        raw = os.pread(fd, _HEAD_READ, 0)
                        sizes = head_size(raw)
                        if sizes is not None:
                            need, size = sizes
                            if len(raw) < need <= st.st_size:  # many recipients
                                raw = os.pread(fd, need, 0)
                    record, data = decode_file(raw, verify=full, mtime=mtime)
                    if full:
                        size = len(data)
            except (OSError, ValueError) as exc:
                error = errname(exc) if isinstance(exc, OSError) else str(exc)
            finally:
                os.close(fd)
        if area == "quarantine":
            error = self._quarantine_reason(id) or error
        if record is None:
            return SpoolEntry(
                id, state, None, "", (), None, 0, None, size, error, False, name_priority(id).value
            )
        return SpoolEntry(
            id,
            state,
            record.message_id,
            record.sender,
            record.recipients,
            record.queued_at,
            record.attempts,
            mtime if area == "deferred" else None,
            size,
            error or record.last_error,
            record.legacy,
            name_priority(id).value,
        )

    def _admin(self, action: str, id: str) -> None:
        """Move one message as an operator asked, holding its lock."""
        for _ in range(3):  # it may move between lookup and lock
            area = self._locate(id)
            if area is None:
                break
            target = next_area(action, area)
            try:
                fd = lock_file(self._path(area, id))
            except FileNotFoundError:
                continue
            except BlockingIOError:
                raise MessageStateError(f"cannot {action} {id}: it is being sent") from None
            except OSError:
                fd = -1  # a symlink or unreadable entry: no lock to take
            if fd is None:
                continue
            try:
                self._move(action, area, target, id, fd)
            finally:
                if fd >= 0:
                    close_held(fd)
            return
        raise NoSuchMessage(id)

    def _move(self, action: str, area: str, target: str | None, id: str, fd: int) -> None:
        path = self._path(area, id)
        try:
            if area in ("failed", "deferred") and target == "new":
                self._retry_failed(area, id, fd)
            elif target is None:
                os.unlink(path)
                if area != "cur":
                    self._drop_stale_cur(id)
            else:
                os.rename(path, self._path(target, id))
                self._fsync_dir(target, id)
            if area == "quarantine":
                unlink_quietly(f"{self._dirs['quarantine']}.{id}.reason")
        except SpoolError:
            raise
        except OSError as exc:
            raise self._error(f"{action} {id}", exc) from exc
        except ValueError as exc:  # a failed/ file that is damaged
            raise SpoolCorrupt(path, f"cannot {action} {id}: {exc}") from exc

    def _drop_stale_cur(self, id: str) -> None:
        """After a delete: a copy a crash left in cur/ must not come back."""
        try:
            fd = lock_file(self._dirs["cur"] + id)
        except OSError:
            return  # none, or held by a live claim
        if fd is not None:
            try:
                os.unlink(self._dirs["cur"] + id)
            finally:
                close_held(fd)

    def _retry_failed(self, area: str, id: str, fd: int) -> None:
        """Back to new/, its failed recipients pending again (rewritten only if it has some)."""
        st = os.fstat(fd)
        record, data = decode_file(read_all(fd, st.st_size), mtime=st.st_mtime)
        if not any(r.status == FAILED for r in record.recipients):
            os.rename(self._path(area, id), self._path("new", id))
            self._fsync_dir("new", id)
            return
        record = replace(
            record,
            recipients=tuple(
                RecipientStatus(r.address, PENDING, r.code, r.text) if r.status == FAILED else r
                for r in record.recipients
            ),
        )
        head, data = encode_file(record, data)
        tmp = self._dirs["tmp"] + new_name()
        self._write(tmp, head, data, None, False)
        os.rename(tmp, self._path("new", id))
        self._fsync_dir("new", id)
        self._trash(self._path(area, id))

    def _quarantine_reason(self, id: str) -> str | None:
        try:
            fd = os.open(f"{self._dirs['quarantine']}.{id}.reason", RFLAGS)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None  # a FIFO or device planted there: never read it
            line = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        parts = line.split(" ", 2)
        return parts[2] if len(parts) == 3 else line
