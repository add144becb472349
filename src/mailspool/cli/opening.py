"""How every verb opens the queue: a spool directory or a ``postgresql://`` URL.

Each way it can fail is one line and an exit code (:func:`~mailspool.cli.common.fail`):
no queue given or a malformed URL is a usage error (2); a queue that is
missing, unreadable or unreachable is exit code 3.  The processor the
delivering verbs run is built here too, since it starts by opening the queue.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mailspool.backends import url_scheme
from mailspool.cli.common import EXIT_NO_QUEUE, EXIT_OK, EXIT_USAGE, fail, reason, stop_on_signals
from mailspool.errors import SpoolError
from mailspool.queue import is_postgres_url

if TYPE_CHECKING:
    from mailspool.cli.settings import Settings
    from mailspool.postgres.connect import Target
    from mailspool.postgres.queue import PostgresQueue
    from mailspool.processor.loop import QueueProcessor
    from mailspool.queue import QueueBackend

__all__ = ["make_processor", "open_postgres", "open_spool", "postgres_target", "reading"]


def open_spool(settings: Settings, *, create: bool = False, wait: bool = False) -> QueueBackend:
    """The queue named by the settings: a spool directory, or a ``postgresql://`` URL.

    Args:
        settings: where ``queue`` is.
        create: make a spool when missing; otherwise a missing spool is an
            error (a PostgreSQL queue is made by ``mailspool db init`` only).
        wait: a PostgreSQL queue whose database is down is waited for
            (``mailspool run``), not an error.

    Raises:
        CommandError: no queue given, or a URL of another scheme than
            ``postgresql`` (exit code 2); not found, not a directory,
            unreadable or not creatable (exit code 3).
    """
    from mailspool.maildir.spool import Spool

    path = settings.queue
    if not path:
        fail(
            "queue: no queue given; use --queue PATH, MAILSPOOL_QUEUE or queue = ... "
            "in the config file",
            EXIT_USAGE,
        )
    if is_postgres_url(path):
        return open_postgres(path, wait=wait)
    scheme = url_scheme(path)
    if scheme is not None:  # never a directory named like a URL
        fail(f"queue {scheme}://...: not a spool directory or a postgresql:// URL", EXIT_USAGE)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"queue {path}: not a directory", EXIT_NO_QUEUE)
    if not create:
        if not os.path.isdir(path):
            fail(f"queue {path}: not found", EXIT_NO_QUEUE)
        if not os.access(path, os.R_OK | os.X_OK):
            fail(f"queue {path}: permission denied", EXIT_NO_QUEUE)
    try:
        return Spool(path, create=create)
    except SpoolError as exc:
        fail(f"queue {path}: {reason(exc)}", EXIT_NO_QUEUE)
    except OSError as exc:
        fail(f"queue {path}: {exc.strerror or exc}", EXIT_NO_QUEUE)


def postgres_target(url: str) -> Target:
    """The database named by ``url``, or one line saying what is wrong (exit code 2)."""
    try:
        from mailspool.postgres.connect import parse_target
    except ImportError:
        fail(
            "queue: a PostgreSQL queue needs psycopg: pip install 'mailspool[postgres]'",
            EXIT_USAGE,
        )
    from psycopg import conninfo

    try:
        target = parse_target(url)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    if "password" in conninfo.conninfo_to_dict(target.conninfo):
        fail(
            "queue: no password in the URL (ps and logs would show it); use PGPASSWORD, "
            "~/.pgpass or MAILSPOOL_DB_PASSWORD_FILE",
            EXIT_USAGE,
        )
    return target


def open_postgres(url: str, *, wait: bool = False) -> PostgresQueue:
    """The PostgreSQL queue at ``url``, for any verb.

    Args:
        url: the queue's URL.
        wait: while the database cannot be reached, wait for it (logging
            one line when the wait begins, one when it ends) instead of
            exit code 3; SIGTERM or SIGINT ends the wait (exit code 0).
            ``mailspool run`` waits: a service started before its database
            must not give up.

    Raises:
        CommandError: psycopg missing, a malformed URL or a password in it
            (exit code 2); the database unreachable (unless ``wait``),
            refusing the login, or without the schema (exit code 3).
    """
    target = postgres_target(url)
    from mailspool.postgres.queue import PostgresQueue

    queue = PostgresQueue(target, connect=False)
    try:
        if wait:
            _wait_for(queue)
        else:
            queue.opened()
    except SpoolError as exc:
        queue.close()
        fail(reason(exc), EXIT_NO_QUEUE)
    return queue


def _wait_for(queue: PostgresQueue) -> None:
    """Open ``queue``, waiting as long as its database cannot be reached.

    Raises:
        SpoolError: the database answers and refuses (a login, no schema).
        CommandError: a signal ended the wait (exit code 0: nothing was done).
    """
    from mailspool.errors import QueueUnavailable
    from mailspool.processor.outage import Outage

    outage = Outage(queue.location)
    with stop_on_signals() as stopped:
        while True:
            mark = outage.mark()
            try:
                queue.opened()
            except QueueUnavailable as exc:
                outage.failed(exc)
                if stopped.wait(outage.left()):
                    queue.close()
                    fail("stopped while waiting for the queue's database", EXIT_OK)
                continue
            outage.worked(mark)
            return


@contextlib.contextmanager
def reading(spool: QueueBackend) -> Iterator[None]:
    """Turn a failure to read the spool's directories into exit code 3.

    An area that cannot be listed (permissions, a file where a directory
    should be) is a broken queue, not a bug: one line naming the queue.
    """
    try:
        yield
    except (SpoolError, OSError) as exc:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else reason(exc)
        where = getattr(exc, "filename", None)
        detail = f"{where}: {text}" if isinstance(where, str) and where else text
        fail(f"queue {spool.location}: cannot read: {detail}", EXIT_NO_QUEUE)


def make_processor(
    settings: Settings, *, create: bool = False, wait: bool = False
) -> QueueProcessor:
    """A :class:`~mailspool.processor.QueueProcessor` with an SMTP mailer, as set.

    The mailer and the retry policy are built first, so that a setting they
    refuse stops the command before the spool is opened (or created).

    Args:
        settings: the relay, processor and retry settings, and the queue.
        create: create the spool when missing (see :func:`open_spool`).
        wait: wait for a queue whose database is down (see :func:`open_spool`).

    Raises:
        CommandError: the mailer or the processor refuses a setting (exit
            code 2), or the spool cannot be opened (see :func:`open_spool`).
    """
    from mailspool.processor.loop import QueueProcessor, RetryPolicy
    from mailspool.smtp.mailer import SMTPMailer

    try:
        mailer = SMTPMailer(**settings.mailer_options())
        retry = RetryPolicy(**settings.retry_options())
    except ValueError as exc:
        fail(f"relay: {exc}", EXIT_USAGE)
    spool = open_spool(settings, create=create, wait=wait)
    try:
        return QueueProcessor(spool, mailer, retry=retry, **settings.processor_options())
    except ValueError as exc:
        fail(f"processor: {exc}", EXIT_USAGE)
