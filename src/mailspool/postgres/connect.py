"""Where the queue's database is, how to log in, and the connections a queue keeps.

A queue is named by a URL, ``postgresql://user@host:port/dbname``, with
one parameter of mailspool's own, ``?schema=NAME`` (default ``mailspool``),
taken out before the rest goes to libpq.  The password never needs to be
in the URL (where ``ps`` and logs would show it): libpq reads
``PGPASSWORD`` and ``~/.pgpass`` itself, and mailspool reads the file named
by ``MAILSPOOL_DB_PASSWORD_FILE``.  :func:`display_name` is the URL without
any password, the only form ever logged or printed.

:class:`ConnectionPool` keeps the idle connections of one queue: each
claim holds one for its transaction (see :mod:`mailspool.postgres.claim`),
and gives it back when settled.
"""

from __future__ import annotations

import os
import select
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo as _conninfo

from mailspool.errors import QueueUnavailable, SpoolIOError
from mailspool.postgres.schema import DEFAULT_SCHEMA, check_schema_name
from mailspool.queue import is_postgres_url

__all__ = [
    "PASSWORD_FILE_ENV",
    "ConnectionPool",
    "Target",
    "display_name",
    "is_postgres_url",
    "parse_target",
    "unavailable",
    "usable",
]

#: The environment variable naming a file that holds the database password.
PASSWORD_FILE_ENV = "MAILSPOOL_DB_PASSWORD_FILE"


@dataclass(frozen=True)
class Target:
    """A queue's database: the libpq connection string, the schema, the password,
    and how long sent rows are kept (``keep_sent_days`` in the URL, in seconds)."""

    conninfo: str
    schema: str
    password: str | None = None
    keep_sent: float | None = None

    def connect(self, *, autocommit: bool) -> psycopg.Connection[Any]:
        """A new connection (``application_name`` mailspool and a
        ``connect_timeout`` of :data:`CONNECT_TIMEOUT` seconds unless set).

        Raises:
            QueueUnavailable: no server answers there, or it is starting up,
                shutting down or full (see :func:`unavailable`): try later.
            SpoolError: the server refuses this login or database.
        """
        kwargs: dict[str, Any] = {"autocommit": autocommit}
        params = _conninfo.conninfo_to_dict(self.conninfo)
        if "application_name" not in params:
            kwargs["application_name"] = "mailspool"
        if "connect_timeout" not in params and "PGCONNECT_TIMEOUT" not in os.environ:
            kwargs["connect_timeout"] = CONNECT_TIMEOUT
        if self.password is not None and "password" not in params:
            kwargs["password"] = self.password
        try:
            return psycopg.Connection.connect(self.conninfo, **kwargs)
        except psycopg.Error as exc:
            cls = QueueUnavailable if unavailable(self, exc) else SpoolIOError
            raise cls(f"queue {display_name(self)}: cannot connect: {_one_line(exc)}") from exc


#: Seconds a connection attempt may take unless the URL says (``connect_timeout``).
CONNECT_TIMEOUT = 10

# What a server says when it cannot take a session for now (it does not say
# so with an SQLSTATE at login; the PQping below covers the other languages).
_BUSY = ("too many clients", "connection slots are reserved", "starting up", "shutting down")


def unavailable(target: Target, exc: BaseException) -> bool:
    """Whether a failed connection attempt means "not now" rather than "never".

    libpq gives no SQLSTATE for a failed login, so the server is asked with
    ``PQping`` (what ``pg_isready`` uses): no answer, or a server starting
    up, shutting down or recovering, is for now; a server that answers and
    still refused the session refused *us* (a login, a role, a database),
    which waiting does not mend -- unless it said it is full.
    """
    if any(phrase in str(exc) for phrase in _BUSY):
        return True
    params = _conninfo.conninfo_to_dict(target.conninfo)
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT))
    try:
        ping = psycopg.pq.PGconn.ping(_conninfo.make_conninfo("", **params).encode())
    except (psycopg.Error, ValueError):
        return True
    return ping in (psycopg.pq.Ping.REJECT, psycopg.pq.Ping.NO_RESPONSE)


def usable(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle connection can still be used, without a round trip.

    An idle connection has nothing to read.  When the server ends the
    session (a restart, ``pg_terminate_backend``) it says so and closes the
    socket, which makes it readable: such a connection is given up before a
    statement is lost on it.  A host that vanished says nothing; the next
    statement fails then, and the one after it reconnects.
    """
    if conn.closed or conn.broken:
        return False
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return not readable


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def parse_target(dsn: str, *, schema: str | None = None) -> Target:
    """The :class:`Target` named by a URL or a libpq ``key=value`` string.

    Args:
        dsn: ``postgresql://...`` (``?schema=NAME`` and ``keep_sent_days=N``
            allowed: mailspool's own, not passed to libpq) or ``host=...
            dbname=...``.
        schema: the schema, overriding the URL's.

    Raises:
        ValueError: the string is not a connection string, the schema is
            not a plain name, ``keep_sent_days`` not a number of days, or
            the password file cannot be read.
    """
    ours: dict[str, str] = {}
    if is_postgres_url(dsn):
        parts = urllib.parse.urlsplit(dsn)
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        kept = [(k, v) for k, v in query if k not in _OURS]
        ours = {k: v for k, v in query if k in _OURS}
        dsn = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))
    try:
        _conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ValueError(f"queue: not a PostgreSQL connection string: {_one_line(exc)}") from None
    name = check_schema_name(schema or ours.get("schema") or DEFAULT_SCHEMA)
    return Target(dsn, name, _password_from_file(), _days(ours.get("keep_sent_days")))


#: The URL parameters that are mailspool's, not libpq's.
_OURS = frozenset({"schema", "keep_sent_days"})


def _days(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        days = float(value)
    except ValueError:
        days = -1.0
    if not days >= 0 or days == float("inf"):
        raise ValueError(f"keep_sent_days: must be a number of days, got {value!r}")
    return days * 86400.0


def _password_from_file() -> str | None:
    path = os.environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"{PASSWORD_FILE_ENV}: cannot read {path}: {exc.strerror}") from None


def display_name(target: Target) -> str:
    """The queue's URL for logs and output: never a password."""
    params = _conninfo.conninfo_to_dict(target.conninfo)
    params.pop("password", None)
    user = params.get("user")
    host = params.get("host") or ""
    if ":" in str(host) and not str(host).startswith("/"):
        host = f"[{host}]"
    port = params.get("port")
    where = f"{host}:{port}" if port else str(host)
    netloc = f"{urllib.parse.quote(str(user))}@{where}" if user else where
    dbname = urllib.parse.quote(str(params.get("dbname") or ""))
    name = f"postgresql://{netloc}/{dbname}?schema={target.schema}"
    if target.keep_sent is not None:
        name += f"&keep_sent_days={target.keep_sent / 86400:g}"
    return name


#: Connections a child made by fork() inherited from its parent.
_inherited: list[psycopg.Connection[Any]] = []


class ConnectionPool:
    """Idle connections of one queue, in transaction mode, reused by claims.

    Args:
        target: where to connect.
        max_idle: connections kept open when idle; more are closed when
            given back, so an idle processor holds few.
    """

    def __init__(self, target: Target, *, max_idle: int = 2) -> None:
        self.target = target
        self.max_idle = max_idle
        self._idle: list[tuple[psycopg.Connection[Any], float]] = []  # (conn, since)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self) -> psycopg.Connection[Any]:
        """An idle connection, or a new one (no transaction open yet).

        Raises:
            SpoolError: a new connection cannot be made.
        """
        with self._lock:
            self._check_fork()
            while self._idle:
                conn, _ = self._idle.pop()
                if usable(conn):
                    return conn
                conn.close()
        return self.target.connect(autocommit=False)

    def put(self, conn: psycopg.Connection[Any]) -> None:
        """Give a connection back; a broken or busy one is closed instead."""
        idle = psycopg.pq.TransactionStatus.IDLE
        if conn.closed or conn.broken or conn.info.transaction_status != idle:
            conn.close()
            return
        with self._lock:
            if os.getpid() == self._pid and len(self._idle) < self.max_idle:
                self._idle.append((conn, time.monotonic()))
                return
        conn.close()

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            # The parent's connections are not ours to use, nor to close (a
            # close would end the parent's sessions): keep them, untouched.
            _inherited.extend(conn for conn, _ in self._idle)
            self._idle = []
            self._pid = os.getpid()

    def prune(self, max_idle_time: float) -> None:
        """Close the connections idle for longer than ``max_idle_time`` seconds."""
        limit = time.monotonic() - max_idle_time
        with self._lock:
            self._check_fork()
            old = [conn for conn, since in self._idle if since < limit]
            self._idle = [(conn, since) for conn, since in self._idle if since >= limit]
        for conn in old:
            conn.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()
