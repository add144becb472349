"""Which queue backend a location names: a spool directory, or a PostgreSQL URL.

The one place that names the backends.  The seam (:mod:`mailspool.queue`)
names none of them, so that every backend can import it; the processor and
the deliveries take a location or a backend and call :func:`open_queue`.
A string that looks like a URL never becomes a directory: a
``postgresql://`` URL opens the PostgreSQL backend (or says that psycopg is
missing), any other scheme is refused.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from mailspool.queue import is_postgres_url

if TYPE_CHECKING:
    from mailspool.queue import QueueBackend

__all__ = ["open_queue", "url_scheme"]

# scheme "://" (RFC 3986 3.1): what no spool directory is named like.
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def open_queue(
    where: str | os.PathLike[str] | QueueBackend, *, create: bool = True
) -> QueueBackend:
    """The backend for ``where``: a backend as it is, a URL's database, a directory's spool.

    Args:
        where: a :class:`~mailspool.queue.QueueBackend`; a ``postgresql://``
            URL (:class:`~mailspool.postgres.queue.PostgresQueue`, whose
            schema ``mailspool db init`` made); or the path of a spool
            directory (:class:`~mailspool.maildir.spool.Spool`).
        create: for a path, create the spool when it is missing (a
            PostgreSQL queue is never created here).

    Raises:
        ImportError: a PostgreSQL URL, and psycopg is not installed.
        ValueError: a URL of another scheme, or a malformed PostgreSQL URL.
        SpoolError: the spool does not exist (``create=False``) or cannot be
            created; the database cannot be reached or has no queue.
    """
    if not isinstance(where, (str, os.PathLike)):
        return where
    location = os.fspath(where)
    if is_postgres_url(location):
        return _postgres(location)
    scheme = url_scheme(location)
    if scheme is not None:  # the scheme only: the rest may hold a password
        raise ValueError(f"queue {scheme}://...: not a spool directory or a postgresql:// URL")
    from mailspool.maildir.spool import Spool  # the default backend

    return Spool(location, create=create)


def url_scheme(location: str) -> str | None:
    """The scheme of a location written as a URL (``scheme://...``), else None."""
    url = _URL.match(location)
    return url.group(1) if url else None


def _postgres(url: str) -> QueueBackend:
    try:
        from mailspool.postgres.queue import PostgresQueue
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("psycopg"):
            raise
        raise ImportError(
            "a PostgreSQL queue needs psycopg: pip install 'mailspool[postgres]'", name=exc.name
        ) from exc
    return PostgresQueue(url)
