"""The operator's view of a PostgreSQL queue, and the connection it is read through.

Listing never changes anything: counts() is one ``GROUP BY`` on the
indexed state column, entries() streams the rows in batches without their
message bytes, state() reads one row.  "In flight" comes from ``pg_locks``
(the advisory lock each claim takes), so it costs no write.  Repairs
(retry, hold, release, delete) lock the row with ``FOR UPDATE NOWAIT``: a
message being sent is never moved under its sender, and each move is one
the lifecycle table allows (:func:`mailspool.maildir.lifecycle.next_area`).
:class:`mailspool.postgres.queue.PostgresQueue` inherits all of it.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg

from mailspool.errors import (
    MessageStateError,
    NoSuchMessage,
    QueueUnavailable,
    SpoolError,
    SpoolIOError,
)
from mailspool.maildir.directory import check_id
from mailspool.maildir.lifecycle import AREAS, STATES, next_area
from mailspool.postgres.connect import (
    ConnectionPool,
    Target,
    display_name,
    parse_target,
    usable,
)
from mailspool.postgres.rows import ENTRY_COLUMNS, encode_recipients, entry_from_row
from mailspool.postgres.schema import (
    SCHEMA_VERSION,
    SchemaError,
    apply_migrations,
    current_version,
    quote_ident,
)
from mailspool.queue import (
    FAILED,
    PENDING,
    Census,
    OperatorMoves,
    QueueEntry,
    RecipientStatus,
    age_order,
)

__all__ = ["PostgresAdmin"]

#: The states the operator sees (a row's column, or in flight).
_VISIBLE = ("ready", "deferred", "held", "failed", "quarantined")
_BATCH = 500


class PostgresAdmin(OperatorMoves):
    """Connection, schema check, listing and repair of a PostgreSQL queue.

    :class:`mailspool.postgres.queue.PostgresQueue` inherits it; see there
    for the arguments.
    """

    def __init__(
        self,
        dsn: str | Target,
        *,
        schema: str | None = None,
        create: bool = False,
        keep_sent: float | None = None,
        max_idle: int = 2,
        connect: bool = True,
    ) -> None:
        self.target = dsn if isinstance(dsn, Target) else parse_target(dsn, schema=schema)
        self.schema = self.target.schema
        self._location = display_name(self.target)
        self.table = f"{quote_ident(self.schema)}.message"
        self._relay_table = f"{quote_ident(self.schema)}.relay_state"
        self.channel = f"mailspool.{self.schema}"
        self.keep_sent = self.target.keep_sent if keep_sent is None else keep_sent
        self.lock_sql = "SELECT pg_try_advisory_xact_lock(%s, %s)"
        #: The seq of every row claimed now (a parameter: :attr:`lock_class_oid`).
        self.locked_sql = (
            "SELECT objid::int8 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::int8 = %s AND objsubid = 2 AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pool = ConnectionPool(self.target, max_idle=max_idle)
        self._create = create
        self._opened = False  # the schema was found current (see _open)
        self.lock_class_oid = 0
        self.lock_class = 0
        if connect:
            with self._main():
                pass

    def _open(self, conn: psycopg.Connection[Any]) -> None:
        """Check the schema (creating it when asked) and learn the table's oid, once.

        Raises:
            SpoolError: no schema, or one of another version.
        """
        version = current_version(conn, self.schema)
        if version is None and self._create:
            apply_migrations(conn, self.schema, create=True)
        elif version is None:
            raise SpoolError(f"queue {self.location}: no queue there (run 'mailspool db init')")
        elif version > SCHEMA_VERSION:
            raise SpoolError(
                f"queue {self.location}: schema version {version} is newer than this "
                f"mailspool knows ({SCHEMA_VERSION}); upgrade mailspool"
            )
        elif version < SCHEMA_VERSION:
            raise SpoolError(
                f"queue {self.location}: schema version {version}, this mailspool needs "
                f"{SCHEMA_VERSION} (run 'mailspool db upgrade')"
            )
        oid = conn.execute("SELECT %s::regclass::oid::int8", (self.table,)).fetchone()
        assert oid is not None
        self.lock_class_oid = oid[0]
        # pg_try_advisory_xact_lock(int4, int4): the oid as a signed 32-bit key.
        self.lock_class = oid[0] - (1 << 32) if oid[0] >= (1 << 31) else oid[0]
        self._opened = True

    def opened(self) -> None:
        """Make sure the queue was opened: connected once and its schema checked.

        Raises:
            QueueUnavailable: the database cannot be reached now.
            SpoolError: it refuses the login, or has no (current) schema.
        """
        if not self._opened:
            with self._main():
                pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.location}>"

    @property
    def location(self) -> str:
        """The queue's URL, without any password (there is no ``path``: no
        directory holds this queue)."""
        return self._location

    # -- the queue's own connection ------------------------------------------------

    def why(self, exc: BaseException) -> str:
        """The text of a database error, on one line."""
        text = " ".join(str(exc).split())
        return text or type(exc).__name__

    @contextlib.contextmanager
    def _main(self) -> Iterator[psycopg.Connection[Any]]:
        """The queue's autocommit connection (made again when broken), one user at a time.

        Raises:
            SpoolError: the database cannot be reached or the statement failed.
        """
        with self._lock:
            conn = self._conn
            if conn is None or not usable(conn):
                if conn is not None:
                    conn.close()
                    self._conn = None
                conn = self._connect()
            try:
                if not self._opened:
                    self._open(conn)
                yield conn
            except SchemaError as exc:
                raise SpoolError(f"queue {self.location}: {exc}") from exc
            except psycopg.Error as exc:
                if not conn.broken:
                    raise SpoolIOError(f"queue {self.location}: {self.why(exc)}") from exc
                self._conn = None
                raise QueueUnavailable(
                    f"queue {self.location}: lost the connection: {self.why(exc)}"
                ) from exc

    def _connect(self) -> psycopg.Connection[Any]:
        """The queue's own connection, made again; once the queue was opened,
        any failure to connect is taken for an outage (the login worked before)."""
        try:
            conn = self._conn = self.target.connect(autocommit=True)
        except QueueUnavailable:
            raise
        except SpoolError as exc:
            if not self._opened:
                raise
            raise QueueUnavailable(str(exc)) from exc
        return conn

    def _get(self) -> psycopg.Connection[Any]:
        """A connection of the pool for a claim; a failure to connect is an outage."""
        try:
            return self._pool.get()
        except QueueUnavailable:
            raise
        except SpoolError as exc:  # the queue's own login worked: not a refusal
            raise QueueUnavailable(str(exc)) from exc

    def close(self) -> None:
        """Close the queue's connections (claims keep theirs until they end)."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        self._pool.close()

    def _locked(self, conn: psycopg.Connection[Any]) -> list[int]:
        """The rows claimed now (their advisory locks, see :mod:`.claim`)."""
        rows = conn.execute(self.locked_sql, (self.lock_class_oid,)).fetchall()
        return [r[0] for r in rows]

    # -- where a message is --------------------------------------------------------

    def state(self, id: str) -> str | None:
        """The state of message ``id``; None when sent (or deleted).

        Returns:
            ``"ready"``, ``"in_flight"``, ``"deferred"``, ``"held"``,
            ``"failed"`` or ``"quarantined"``.

        Raises:
            ValueError: ``id`` is not a valid id.
            SpoolError: the database failed.
        """
        check_id(id)
        with self._main() as conn:
            row = conn.execute(
                f"SELECT seq, state FROM {self.table} WHERE id = %s", (id,)
            ).fetchone()
            if row is None or row[1] in ("staged", "sent"):
                return None
            if row[1] in ("ready", "deferred") and row[0] in self._locked(conn):
                return "in_flight"
            return str(row[1])

    # -- the operator's view ---------------------------------------------------------

    def counts(self, now: float | None = None) -> dict[str, int]:
        """How many messages each state holds (keys as the Maildir spool's).

        With ``now``, deferred messages already due are counted as ready.
        """
        out = dict.fromkeys(AREAS, 0)
        with self._main() as conn:
            rows = conn.execute(
                f"SELECT state, count(*), count(*) FILTER (WHERE state = 'deferred' "
                f"AND due_at <= to_timestamp(%s)) FROM {self.table} GROUP BY state",
                (now,),
            ).fetchall()
            locked = self._locked(conn)
            flying = []
            if locked:
                flying = conn.execute(
                    f"SELECT state, count(*), count(*) FILTER (WHERE state = 'deferred' "
                    f"AND due_at <= to_timestamp(%s)) FROM {self.table} "
                    "WHERE seq = ANY(%s) AND state IN ('ready', 'deferred') GROUP BY state",
                    (now, locked),
                ).fetchall()
        for state, n, due in rows:
            if state in out:
                out[state] += n - due
                out["ready"] += due
        for state, n, due in flying:
            out[state] -= n - due
            out["ready"] -= due
            out["in_flight"] += n
        return out

    def oldest(
        self, states: tuple[str, ...] = ("ready", "in_flight", "deferred", "held")
    ) -> float | None:
        """When the oldest message still waiting was queued, or None."""
        wanted = {s for s in states if s in _VISIBLE}
        if "in_flight" in states:
            wanted |= {"ready", "deferred"}
        best: float | None = None
        with self._main() as conn:
            for state in sorted(wanted):  # one index probe each
                row = conn.execute(
                    f"SELECT extract(epoch FROM min(queued_at))::float8 FROM {self.table} "
                    "WHERE state = %s",
                    (state,),
                ).fetchone()
                if row and row[0] is not None and (best is None or row[0] < best):
                    best = row[0]
        return best

    def census(self, now: float | None = None) -> Census:
        """:meth:`counts` and the oldest message of each state (an index probe each)."""
        return Census(self.counts(now), {s: self.oldest((s,)) for s in AREAS})

    def entries(self, state: str | None = None) -> Iterator[QueueEntry]:
        """Stream one :class:`QueueEntry` per message (all states, or one).

        Raises:
            ValueError: ``state`` is not a state.
        """
        if state is not None and state not in AREAS:
            raise ValueError(f"unknown state {state!r}; one of {sorted(AREAS)}")
        for one in [state] if state else list(STATES.values()):
            yield from self._entries(one)

    def _entries(self, state: str) -> Iterator[QueueEntry]:
        after = 0
        while True:
            with self._main() as conn:
                locked = self._locked(conn)
                param: object
                if state == "in_flight":
                    where, param = "state IN ('ready', 'deferred') AND seq = ANY(%s)", locked
                else:
                    where, param = "state = %s", state
                rows = conn.execute(
                    f"SELECT {ENTRY_COLUMNS} FROM {self.table} WHERE {where} AND seq > %s "
                    f"ORDER BY seq LIMIT {_BATCH}",
                    (param, after),
                ).fetchall()
            flying = set(locked)
            for row in rows:
                in_flight = row[0] in flying and row[2] in ("ready", "deferred")
                if in_flight == (state == "in_flight"):
                    yield entry_from_row(row, in_flight)
            if len(rows) < _BATCH:
                return
            after = rows[-1][0]

    def oldest_entries(self, limit: int, state: str | None = None) -> list[QueueEntry]:
        """The ``limit`` oldest messages (of one state, or all), oldest first.

        At most ``limit`` rows and the claimed ones are read, by the
        ``(state, queued_at)`` index; in flight, the claimed rows only.

        Raises:
            ValueError: ``state`` is not a state.
        """
        if state is not None and state not in AREAS:
            raise ValueError(f"unknown state {state!r}; one of {sorted(AREAS)}")
        if state == "in_flight":
            return heapq.nsmallest(limit, self._entries(state), key=age_order)
        states = [state] if state else [s for s in STATES.values() if s != "in_flight"]
        rows = []
        with self._main() as conn:
            locked = self._locked(conn)
            for one in states:  # an index scan each, by (state, queued_at)
                rows += conn.execute(
                    f"SELECT {ENTRY_COLUMNS} FROM {self.table} WHERE state = %s "
                    "ORDER BY queued_at LIMIT %s",
                    (one, limit + len(locked)),
                ).fetchall()
        flying = set(locked)
        out: list[QueueEntry] = []
        for row in rows:
            in_flight = row[0] in flying and row[2] in ("ready", "deferred")
            if in_flight and state is not None:
                continue
            out.append(entry_from_row(row, in_flight))
        return sorted(out, key=age_order)[:limit]

    def get(self, id: str) -> QueueEntry:
        """Everything known about one message.

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
            ValueError: ``id`` is not a valid id.
        """
        check_id(id)
        with self._main() as conn:
            row = conn.execute(
                f"SELECT {ENTRY_COLUMNS} FROM {self.table} WHERE id = %s "
                "AND state NOT IN ('staged', 'sent')",
                (id,),
            ).fetchone()
            locked = self._locked(conn) if row is not None else []
        if row is None:
            raise NoSuchMessage(id)
        return entry_from_row(row, row[0] in locked and row[2] in ("ready", "deferred"))

    def message(self, id: str) -> bytes:
        """The message ``id`` as it would be sent, without the envelope.

        Raises:
            NoSuchMessage: no such message (a ``KeyError``).
        """
        check_id(id)
        with self._main() as conn:
            row = conn.execute(
                f"SELECT data FROM {self.table} WHERE id = %s AND state NOT IN ('staged', 'sent')",
                (id,),
            ).fetchone()
        if row is None:
            raise NoSuchMessage(id)
        return bytes(row[0])

    # -- what the processors learned about the relay ------------------------------------

    def relay_state(self) -> dict[str, Any] | None:
        """What a processor last wrote about its relay (any host), or None.

        Raises:
            SpoolError: the database failed.
        """
        with self._main() as conn:
            row = conn.execute(
                f"SELECT state FROM {self._relay_table} ORDER BY written_at DESC LIMIT 1"
            ).fetchone()
        return row[0] if row is not None and isinstance(row[0], dict) else None

    def set_relay_state(self, state: dict[str, Any]) -> bool:
        """Replace the row of ``state["relay"]`` (the host is added); False when
        the database cannot take it (the processor tries again after its next pass)."""
        state = {**state, "host": state.get("host") or socket.gethostname()}
        try:
            with self._main() as conn:
                conn.execute(
                    f"INSERT INTO {self._relay_table} (relay, state) "
                    "VALUES (%s, CAST(%s AS jsonb)) ON CONFLICT (relay) "
                    "DO UPDATE SET state = EXCLUDED.state, written_at = now()",
                    (str(state.get("relay")), json.dumps(state)),
                )
        except SpoolError:
            return False
        return True

    # -- repairs -------------------------------------------------------------------

    def _admin(self, action: str, id: str) -> None:
        """Move one message as an operator asked, holding its row lock."""
        check_id(id)
        with self._main() as conn, conn.transaction():
            try:
                row = conn.execute(
                    f"SELECT seq, state, recipients FROM {self.table} WHERE id = %s "
                    "AND state NOT IN ('staged', 'sent') FOR UPDATE NOWAIT",
                    (id,),
                ).fetchone()
            except psycopg.errors.LockNotAvailable:
                next_area(action, "cur")  # "cannot hold a message that is in_flight"
                raise MessageStateError(f"cannot {action} {id}: it is being sent") from None
            if row is None:
                raise NoSuchMessage(id)
            seq, state, recipients = row
            target = next_area(action, AREAS[state])
            if target is None:
                conn.execute(f"DELETE FROM {self.table} WHERE seq = %s", (seq,))
                return
            new_state = STATES[target]
            params: tuple[Any, ...] = (new_state, seq)
            sql = f"UPDATE {self.table} SET state = %s"
            if new_state == "ready":
                sql += ", due_at = now()"
            if state == "failed" and new_state == "ready":
                again = [
                    RecipientStatus(a, PENDING, c, t)
                    if s == FAILED
                    else RecipientStatus(a, s, c, t)
                    for a, s, c, t in recipients
                ]
                sql += ", recipients = CAST(%s AS jsonb)"
                params = (new_state, encode_recipients(again), seq)
            conn.execute(sql + " WHERE seq = %s", params)
            if new_state == "ready":
                conn.execute("SELECT pg_notify(%s, '')", (self.channel,))
