"""A message held for sending, and how its outcome is written back.

A :class:`Claim` owns the open, ``flock``-ed descriptor of a file in
``cur/``: as long as it is open no one else can claim the message, and when
the process dies the kernel drops the lock, so the message is due again at
once.  Settling follows :data:`mailspool.lifecycle.LIFECYCLE`: the new
state is written to a new file and made durable *before* the old file
leaves ``cur/``, so a crash at any point leaves either the old state or the
new one, whole (docs/spool.md, "The durability order").
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import TracebackType

from mailspool.errors import MessageStateError, SpoolError
from mailspool.maildir import trash
from mailspool.maildir.directory import SpoolDir, log, new_name, unlink_quietly
from mailspool.maildir.fileformat import Record, encode_file
from mailspool.maildir.lifecycle import OUTCOME_ACTION, all_sent, next_area, settle_record
from mailspool.maildir.locks import close_held
from mailspool.message import Envelope
from mailspool.queue import RecordFields

__all__ = ["Claim"]

#: This process's id, kept current by a fork hook: a claim checks that it
#: belongs to this process several times per message, and ``os.getpid()``
#: is a system call each time.
_this_process = os.getpid()


def _after_fork_in_child() -> None:
    global _this_process
    _this_process = os.getpid()


class Claim(RecordFields):
    """A message held for sending; settle it, or it goes back to ready.

    Use as a context manager: leaving the block without settle(), defer()
    or quarantine() releases the message untouched.  If the process dies,
    the kernel drops the lock and any processor can take the message again.
    A claim belongs to the process that made it: in a child made by
    ``fork()`` it holds nothing and cannot be settled.

    Attributes:
        id: the spool id.
        message_id: the Message-Id without angle brackets, if known.
        envelope: sender and the recipients still pending (only those).
        data: the message as it goes on the wire (CRLF line endings).
        attempts: delivery attempts so far.
        queued_at: when the message entered the spool.
        not_before: the time it was scheduled for, if later than that.
        due_since: the later of the two; ``give_up_after`` counts from it.
        legacy: read from a zope.sendmail / repoze.sendmail file.
        recipients: every recipient with its state.
        source: the area it was claimed from (new, deferred or cur).
    """

    __slots__ = ("_done", "_fd", "_pid", "_record", "_spool", "data", "envelope", "id", "source")

    def __init__(
        self, spool: SpoolDir, id: str, fd: int, record: Record, data: bytes, source: str
    ) -> None:
        self._spool = spool
        self._fd = fd
        self._pid = _this_process
        self._record = record
        self._done: str | None = None
        self.id = id
        self.data = data
        self.source = source
        self.envelope = Envelope(record.sender, record.pending)

    @property
    def held(self) -> bool:
        """True while this claim holds the message in this process: not yet
        settled, deferred, released or quarantined."""
        return self._done is None and self._pid == _this_process

    def __repr__(self) -> str:
        return f"<Claim {self.id} {self._done or 'held'}>"

    def __enter__(self) -> Claim:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._done is None and self._pid == _this_process:
            try:
                self.release()
            except SpoolError:
                if exc is None:
                    raise
                log.exception("spool %s: cannot release %s", self._spool.path, self.id)

    def __del__(self) -> None:
        if getattr(self, "_done", "x") is None and self._fd >= 0 and self._pid == _this_process:
            close_held(self._fd)  # the lock dies with it: due again at once

    def _start(self, action: str) -> str | None:
        if self._done is not None:
            raise MessageStateError(f"cannot {action} {self.id}: already {self._done}")
        if self._pid != _this_process:
            raise MessageStateError(f"cannot {action} {self.id}: claimed by process {self._pid}")
        return next_area(action, "cur")

    def _finish(self, outcome: str) -> None:
        self._done = outcome
        fd, self._fd = self._fd, -1
        close_held(fd)  # drops the lock

    def settle(
        self,
        *,
        sent: Iterable[str] = (),
        failed: Mapping[str, tuple[int | None, str]] | None = None,
        deferred: Mapping[str, tuple[int | None, str]] | None = None,
        retry_at: float | None = None,
        reply: tuple[int, str] | None = None,
    ) -> str:
        """Record one attempt's outcome per recipient.

        Args:
            sent: recipients the relay accepted; never sent to again.
            failed: recipient -> (code, text) of a permanent refusal.
            deferred: recipient -> (code, text) of a temporary one.
            retry_at: when to try the pending recipients again (default:
                now).  Pending recipients not named anywhere stay pending.
            reply: the relay's (code, text) after the data, e.g. ``(250,
                "2.0.0 Ok: queued as 4XyZ")``: kept with the sent recipients
                of a message that stays in the spool (its queue id there).

        Returns:
            ``"removed"`` (all accepted: the file is gone), ``"deferred"``
            (in ``deferred/`` until ``retry_at``) or ``"failed"`` (in
            ``failed/`` with each failed recipient's reply).

        Raises:
            ValueError: an address is not a pending recipient of this message.
            SpoolError: already settled, or the spool could not be written
                (then nothing changed and the claim is still held: leaving
                the ``with`` block releases it).
        """
        if self._done is not None:
            raise MessageStateError(f"cannot settle {self.id}: already {self._done}")
        sent = tuple(sent)  # read twice below
        if not failed and not deferred and all_sent(self._record, sent):
            # Every recipient accepted: no record to build, the file just goes.
            record, outcome = self._record, "removed"
        else:
            record, outcome = settle_record(self._record, sent, failed, deferred, reply)
        action = OUTCOME_ACTION[outcome]
        if outcome == "removed":
            self._start(action)
            path = self._spool._dirs["cur"] + self.id
            started = time.monotonic()
            try:
                # Not fsynced: a crash before the directory reaches the disk
                # is the one window in which a message is sent twice.
                unlinked = self._spool._trash(path)
            except OSError as exc:
                raise self._spool._error(f"remove {path}", exc) from exc
            self._finish(outcome)  # the last close: an unlinked file's blocks go now
            if unlinked:
                trash.unlinked(self._spool._dirs["trash"], time.monotonic() - started)
        elif outcome == "deferred":
            self._rewrite(action, record, time.time() if retry_at is None else retry_at)
        else:
            self._rewrite(action, record, None)
        return outcome

    def defer(self, retry_at: float, reason: str, *, count_attempt: bool = True) -> None:
        """Put the whole message back until ``retry_at``; no recipient changes.

        Args:
            retry_at: a ``time.time()`` value.
            reason: kept as the message's last error.
            count_attempt: add one to the attempts (False for trouble that
                was not the message's, e.g. the relay was down).

        Raises:
            SpoolError: already settled, or the spool could not be written.
        """
        record = replace(
            self._record,
            attempts=self._record.attempts + (1 if count_attempt else 0),
            last_error=reason,
        )
        self._rewrite("defer", record, retry_at)

    def _rewrite(self, action: str, record: Record, mtime: float | None) -> None:
        """Replace the claimed file by ``record`` in the action's area.

        Order: the new file is written, fsynced and locked in tmp/, renamed
        into its area, that directory fsynced; only then is the old file
        removed.  A crash before the rename leaves the old state (claimable
        at once); after it, the new state wins (a claim of the leftover
        cur/ file sees the newer one and drops it).
        """
        target = self._start(action)
        assert target is not None
        spool = self._spool
        head, data = encode_file(record, self.data)
        tmp = spool._dirs["tmp"] + new_name()
        try:
            fd = spool._write(tmp, head, data, mtime, True)
        except OSError as exc:
            raise spool._error(f"write {tmp}", exc) from exc
        try:
            os.rename(tmp, spool._path(target, self.id))
        except OSError as exc:
            close_held(fd)
            unlink_quietly(tmp)
            raise spool._error(f"move {self.id} to {target}/", exc) from exc
        # From here on the new state is the message: never release the old one.
        error: SpoolError | None = None
        try:
            spool._fsync_dir(target, self.id)
        except OSError as exc:
            error = spool._error(f"fsync {target}/", exc)
        with contextlib.suppress(OSError):
            spool._trash(spool._dirs["cur"] + self.id)
        close_held(fd)
        self._finish("deferred" if action == "defer" else "failed")
        if error is not None:
            raise error

    def release(self) -> None:
        """Give the message back untouched (ready at once, attempts unchanged).

        Raises:
            SpoolError: already settled, or the rename failed (the message
                then stays in cur/, where it is due again once unlocked).
        """
        target = self._start("release")
        assert target is not None
        spool = self._spool
        try:
            os.rename(spool._dirs["cur"] + self.id, spool._path(target, self.id))
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._finish("released")
            raise spool._error(f"release {self.id}", exc) from exc
        self._finish("released")

    def quarantine(self, reason: str) -> None:
        """Move the message to quarantine/ with ``reason``; it is never sent.

        Raises:
            SpoolError: already settled, or the rename failed.
        """
        self._start("quarantine")
        try:
            self._spool._quarantine("cur", self.id, reason)
        finally:
            self._finish("quarantined")
