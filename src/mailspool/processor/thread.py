"""``QueueProcessorThread``: zope.sendmail's name and calls, mailspool's processor.

Code written for zope.sendmail starts its queue processor like this::

    thread = QueueProcessorThread()
    thread.setMailer(mailer)
    thread.setQueuePath("/var/spool/app-mail")
    thread.start()

The same lines work with ``from mailspool import QueueProcessorThread``.
Behind them runs a :class:`~mailspool.QueueProcessor` (in a daemon thread,
as before), with what that brings: retries with backoff instead of trying
every message again every few seconds, failed mail set aside with its
reason, several processes on one spool without sending anything twice.
The queue it reads may still hold zope.sendmail's or repoze.sendmail's
files: they are delivered as they are.

What does not carry over: ``setMaildir`` (a zope.sendmail ``Maildir``
object; give the path to :meth:`QueueProcessorThread.setQueuePath`) and
subclassing the thread to replace its internals.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mailspool.processor.loop import QueueProcessor
from mailspool.smtp.seams import Mailer

__all__ = ["QueueProcessorThread"]

log = logging.getLogger(__name__)


class QueueProcessorThread:
    """A queue processor with zope.sendmail's thread interface.

    Args:
        interval: seconds between looks at the queue when nothing wakes the
            processor earlier (new mail committed in this process, inotify).
        mailer: the mailer (or call :meth:`setMailer`).
        queue_path: the queue directory (or call :meth:`setQueuePath`).
        processor_options: further keyword arguments for
            :class:`~mailspool.QueueProcessor` (``connections``, ``retry``,
            ``rate_limit``...).
    """

    def __init__(
        self,
        interval: float = 3.0,
        *,
        mailer: Mailer | None = None,
        queue_path: str | os.PathLike[str] | None = None,
        **processor_options: Any,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be greater than 0, got {interval!r}")
        self.interval = float(interval)
        self.mailer = mailer
        self.queue_path = os.fspath(queue_path) if queue_path is not None else None
        self.name = "mailspool.QueueProcessorThread"
        self.daemon = True
        self._options = processor_options
        self._processor: QueueProcessor | None = None

    def __repr__(self) -> str:
        return f"<QueueProcessorThread {self.queue_path!r} -> {self.mailer!r}>"

    def setMailer(self, mailer: Mailer) -> None:  # the classic name
        """Deliver through ``mailer`` (before :meth:`start`)."""
        self.mailer = mailer

    def setQueuePath(self, path: str | os.PathLike[str]) -> None:  # the classic name
        """Deliver what the queue directory ``path`` holds (before :meth:`start`)."""
        self.queue_path = os.fspath(path)

    @property
    def processor(self) -> QueueProcessor:
        """The :class:`~mailspool.QueueProcessor` doing the work (made on first use).

        Raises:
            RuntimeError: no mailer or no queue path was given.
        """
        if self._processor is None:
            if self.mailer is None or self.queue_path is None:
                missing = "a mailer (setMailer)" if self.mailer is None else "a queue path"
                raise RuntimeError(f"the queue processor thread needs {missing} first")
            self._processor = QueueProcessor(
                self.queue_path, self.mailer, interval=self.interval, **self._options
            )
        return self._processor

    def start(self) -> None:
        """Start delivering in a background daemon thread.

        Raises:
            RuntimeError: no mailer or queue path, or already running.
        """
        self.processor.start()
        log.info("queue processor started for %s", self.queue_path)

    def run(self, forever: bool = True) -> None:
        """Deliver in the calling thread: until :meth:`stop` (or a signal),
        or, with ``forever=False``, until nothing is due, as zope.sendmail's
        ``run(forever=False)`` does."""
        if forever:
            self.processor.run()
            return
        with self.processor as processor:
            processor.drain()

    def wake(self) -> None:
        """Look at the queue now (pass it as ``QueuedMailDelivery(on_commit=...)``)."""
        if self._processor is not None:
            self._processor.wake()

    def stop(self, timeout: float | None = None) -> None:
        """Stop: nothing new is started, messages in flight are settled."""
        if self._processor is not None:
            self._processor.stop(timeout)

    def is_alive(self) -> bool:
        """Whether the background thread is running."""
        thread = self._processor._thread if self._processor is not None else None
        return thread is not None and thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the background thread to end (after :meth:`stop`)."""
        thread = self._processor._thread if self._processor is not None else None
        if thread is not None:
            thread.join(timeout)
