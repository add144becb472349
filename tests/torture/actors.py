"""The processes the torture run starts, kills and starts again.

``writer``: commits transactions through :class:`mailspool.QueuedMailDelivery`
in a loop (some aborted, some rolled back to a savepoint, some vetoed by a
second resource, some scheduled for later) and keeps a journal: a ``C``
line per message, appended and fsynced *after* ``commit()`` returned (a
message is committed, for the judge, only if its line is there), and an
``A`` line per message whose transaction did not commit (it must never be
sent).  Message-Ids and recipients carry a token naming the writer's slot
and incarnation, so the judge knows which process a message came from.

``processor``: a :class:`mailspool.QueueProcessor` in the foreground
(``run()``) with short retry delays and short SMTP timeouts; the harness
also runs the real ``mailspool run`` command, with the same settings given
as flags (:func:`cli_processor_argv`).

Run as ``python -m tests.torture.actors writer|processor ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import transaction

from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.processor.loop import RetryPolicy

from .relay import body_sum

__all__ = [
    "DOMAIN",
    "PROCESSOR_SETTINGS",
    "cli_processor_argv",
    "main",
    "make_message",
    "token_of",
]

#: The domain of every Message-Id a writer makes.
DOMAIN = "torture.test"
#: Timeouts and delays of the processors (seconds); the relay stalls longer.
PROCESSOR_SETTINGS: dict[str, float] = {
    "connect_timeout": 2.0,
    "timeout": 2.0,
    "data_timeout": 3.0,
    "interval": 0.5,
    "first_delay": 0.2,
    "max_delay": 1.5,
    "connections": 2,
}


def token_of(address_or_mid: str) -> str:
    """The message token in a Message-Id or recipient (``w0i3n17``)."""
    return address_or_mid.partition("@")[0].partition(".")[0]


def make_message(token: str, rng: random.Random) -> tuple[str, list[str], bytes]:
    """A message for ``token``: its Message-Id, recipients and bytes.

    One to three recipients; one in ten messages has a recipient the relay
    always refuses (``TOKEN.bounce@dest.test``).  The body has lines that
    start with a dot (dot-stuffing) and sometimes is large (several data
    blocks); ``X-Torture-Sum`` lets the relay check it arrived whole.
    """
    mid = f"{token}@{DOMAIN}"
    rcpts = [f"{token}.r{j}@dest.test" for j in range(rng.choice((1, 1, 1, 2, 2, 3)))]
    if rng.random() < 0.1:
        rcpts[-1] = f"{token}.bounce@dest.test"
    lines = []
    for i in range(rng.randint(1, 40)):
        text = "".join(rng.choice("abcdefghij .,;-") for _ in range(rng.randint(0, 90)))
        lines.append(("." if i % 7 == 3 else "") + text)
    if rng.random() < 0.01:
        lines += ["0123456789" * 9] * 3000  # 276 KB: more than one 256 KiB data block
    body = ("\r\n".join(lines) + "\r\n").encode("ascii")
    head = (
        f"From: Writer <writer@{DOMAIN}>\r\n"
        f"To: {', '.join(rcpts)}\r\n"
        f"Subject: torture {token}\r\n"
        f"Message-Id: <{mid}>\r\n"
        f"X-Torture-Sum: {body_sum(body)}\r\n\r\n"
    ).encode("ascii")
    return mid, rcpts, head + body


class _Veto:
    """A second resource in the transaction that refuses at vote, after mailspool."""

    def __init__(self, tm: Any) -> None:
        self.transaction_manager = tm

    def sortKey(self) -> str:
        return "~~torture-veto"  # after mailspool's "~mailspool.*": its files are staged

    def abort(self, txn: Any) -> None:
        pass

    tpc_begin = commit = tpc_finish = tpc_abort = abort

    def tpc_vote(self, txn: Any) -> None:
        raise RuntimeError("vetoed by the torture writer")


class _Criticals(logging.Handler):
    """Counts CRITICAL records of mailspool (a commit that could not finish)."""

    def __init__(self) -> None:
        super().__init__(logging.CRITICAL)
        self.count = 0
        self.committed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


#: What a writer prints once its SIGTERM handler is in place.
READY = b"torture writer ready"

_SCENARIOS = {"commit": 62, "many": 5, "later": 8, "rollback": 10, "abort": 7, "veto": 8}


def writer(args: argparse.Namespace) -> int:
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print(READY.decode(), flush=True)  # the harness may stop it from now on
    criticals = _Criticals()
    logging.getLogger("mailspool").addHandler(criticals)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    rng = random.Random(args.seed)
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(args.spool, transaction_manager=tm, msgid_domain=DOMAIN)
    journal = os.open(args.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    prefix = f"w{args.slot}i{args.incarnation}n"
    counter = 0

    def write(events: list[dict[str, Any]]) -> None:
        if events:
            os.write(journal, b"".join(json.dumps(e).encode() + b"\n" for e in events))
            os.fsync(journal)

    names = list(_SCENARIOS)
    weights = list(_SCENARIOS.values())
    while not stop:
        scenario = "commit" if args.power else rng.choices(names, weights)[0]
        count = {"many": rng.randint(4, 8), "commit": rng.randint(1, 3)}.get(scenario, 1)
        kept: list[tuple[str, list[str]]] = []
        dropped: list[tuple[str, str]] = []
        tm.begin()
        for _ in range(count):
            counter += 1
            mid, rcpts, data = make_message(f"{prefix}{counter}", rng)
            later = time.time() + rng.uniform(0.2, 2.0) if scenario == "later" else None
            delivery.send(f"writer@{DOMAIN}", rcpts, data, not_before=later)
            kept.append((mid, rcpts))
        if scenario == "rollback":
            savepoint = tm.savepoint()
            counter += 1
            mid, rcpts, data = make_message(f"{prefix}{counter}", rng)
            delivery.send(f"writer@{DOMAIN}", rcpts, data)
            savepoint.rollback()
            dropped.append((mid, "rolled back to a savepoint"))
        write(_finish(tm, scenario, kept, dropped, criticals))
        if args.pace > 0:
            time.sleep(rng.expovariate(1.0 / args.pace))
        elif args.power and not criticals.committed:
            time.sleep(0.01)  # the file system is gone: no need to spin
    return 0


def _finish(
    tm: Any,
    scenario: str,
    kept: list[tuple[str, list[str]]],
    dropped: list[tuple[str, str]],
    criticals: _Criticals,
) -> list[dict[str, Any]]:
    """End the transaction as ``scenario`` says; return the journal events."""
    criticals.count = 0
    criticals.committed = False
    if scenario == "abort":
        tm.abort()
        return [{"e": "A", "mid": m, "why": "transaction aborted"} for m, _ in kept]
    if scenario == "veto":
        tm.get().join(_Veto(tm))
    try:
        tm.commit()
    except Exception as exc:  # a full spool (ENOSPC), the veto, an I/O error
        tm.abort()
        why = f"commit raised {type(exc).__name__}: {exc}"[-300:]
        code = getattr(exc, "errno", None)
        return [{"e": "A", "mid": m, "why": why, "errno": code} for m, _ in kept + dropped]
    criticals.committed = True
    t = time.monotonic()
    events: list[dict[str, Any]] = [
        {"e": "C", "mid": m, "rcpts": r, "t": t, "crit": criticals.count} for m, r in kept
    ]
    return events + [{"e": "A", "mid": m, "why": why} for m, why in dropped]


#: The PostgreSQL writer's scenarios: as above, without a second resource.
_PG_SCENARIOS = {"commit": 67, "many": 5, "later": 8, "rollback": 10, "abort": 10}


def pg_writer(args: argparse.Namespace) -> int:
    """A writer of a PostgreSQL queue: the application's own transactions
    (``mailspool.postgres.enqueue`` on a psycopg connection, the outbox).

    Journal events as the spool writer's, plus ``U`` for a message whose
    COMMIT was sent but whose answer was lost with the connection (the
    database restarted): committed or not, nobody can tell; the judge
    accepts it delivered once or not at all.
    """
    import psycopg

    from mailspool.postgres.connect import parse_target

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print(READY.decode(), flush=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    target = parse_target(args.spool)
    rng = random.Random(args.seed)
    journal = os.open(args.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    tokens = (f"w{args.slot}i{args.incarnation}n{n}" for n in itertools.count(1))
    conn: Any = None
    while not stop:
        if conn is None or conn.closed or conn.broken:
            try:
                conn = psycopg.connect(target.conninfo, connect_timeout=5)
            except psycopg.Error:
                time.sleep(0.2)  # the database is down: the application waits too
                continue
        _journal(journal, _pg_transaction(conn, target.schema, rng, tokens))
        time.sleep(rng.expovariate(1.0 / args.pace) if args.pace > 0 else 0)
    return 0


def _pg_transaction(
    conn: Any, schema: str, rng: random.Random, tokens: Iterator[str]
) -> list[dict[str, Any]]:
    """One transaction of the application, as a scenario says; its journal events."""
    import psycopg

    from mailspool.postgres import enqueue

    scenario = rng.choices(list(_PG_SCENARIOS), list(_PG_SCENARIOS.values()))[0]
    count = {"many": rng.randint(4, 8), "commit": rng.randint(1, 3)}.get(scenario, 1)
    kept: list[tuple[str, list[str]]] = []
    events: list[dict[str, Any]] = []
    try:
        for _ in range(count):
            mid, rcpts, data = make_message(next(tokens), rng)
            later = time.time() + rng.uniform(0.2, 2.0) if scenario == "later" else None
            enqueue(conn, f"writer@{DOMAIN}", rcpts, data, not_before=later, schema=schema)
            kept.append((mid, rcpts))
        if scenario == "rollback":
            mid, rcpts, data = make_message(next(tokens), rng)
            with contextlib.suppress(_Rollback), conn.transaction():  # a savepoint
                enqueue(conn, f"writer@{DOMAIN}", rcpts, data, schema=schema)
                raise _Rollback
            events.append({"e": "A", "mid": mid, "why": "rolled back to a savepoint"})
    except psycopg.Error as exc:  # before COMMIT: nothing of it is committed
        with contextlib.suppress(psycopg.Error):
            conn.rollback()
        why = f"failed before commit: {type(exc).__name__}"
        return [{"e": "A", "mid": m, "why": why} for m, _ in kept] + events
    if scenario == "abort":
        conn.rollback()
        return events + [{"e": "A", "mid": m, "why": "transaction rolled back"} for m, _ in kept]
    try:
        conn.commit()
    except psycopg.Error as exc:
        why = f"commit raised {type(exc).__name__}: {exc}"[-300:]
        return events + [{"e": "U", "mid": m, "why": why} for m, _ in kept]
    t = time.monotonic()
    return [{"e": "C", "mid": m, "rcpts": r, "t": t, "crit": 0} for m, r in kept] + events


class _Rollback(Exception):
    """Rolls a savepoint back."""


def _journal(fd: int, events: list[dict[str, Any]]) -> None:
    if events:
        os.write(fd, b"".join(json.dumps(e).encode() + b"\n" for e in events))
        os.fsync(fd)


def _queue(where: str) -> Any:
    """A spool directory as it is; a PostgreSQL URL as a queue that waits for its database."""
    from mailspool.queue import is_postgres_url

    if not is_postgres_url(where):
        return where
    from mailspool.postgres import PostgresQueue

    return PostgresQueue(where, connect=False)


def processor(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    s = PROCESSOR_SETTINGS
    mailer = SMTPMailer(
        "127.0.0.1",
        args.port,
        tls="none",
        connect_timeout=s["connect_timeout"],
        timeout=s["timeout"],
        data_timeout=s["data_timeout"],
        local_hostname=args.label,
    )
    retry = RetryPolicy(
        first_delay=s["first_delay"],
        max_delay=s["max_delay"],
        give_up_after=30 * 86400.0,
        relay_first_delay=s["first_delay"],
        relay_max_delay=s["max_delay"],
    )
    qp = QueueProcessor(
        _queue(args.spool),
        mailer,
        connections=int(s["connections"]),
        interval=s["interval"],
        retry=retry,
    )
    qp.run()
    print("processor returned", flush=True)
    return 0


def cli_processor_argv(spool: str, port: int, label: str) -> list[str]:
    """``mailspool run`` with the torture settings (the relay pause keeps its default)."""
    s = PROCESSOR_SETTINGS
    return [
        sys.executable,
        "-m",
        "mailspool",
        "run",
        "--queue",
        spool,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tls",
        "none",
        "--local-hostname",
        label,
        "--connect-timeout",
        str(s["connect_timeout"]),
        "--timeout",
        str(s["timeout"]),
        "--data-timeout",
        str(s["data_timeout"]),
        "--connections",
        str(int(s["connections"])),
        "--interval",
        str(s["interval"]),
        "--first-delay",
        str(s["first_delay"]),
        "--max-delay",
        str(s["max_delay"]),
        "--give-up-after",
        "30d",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="torture run actors")
    sub = parser.add_subparsers(dest="role", required=True)
    w = sub.add_parser("writer")
    w.add_argument("--spool", required=True)
    w.add_argument("--journal", required=True)
    w.add_argument("--slot", type=int, required=True)
    w.add_argument("--incarnation", type=int, required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--pace", type=float, default=0.02, help="mean pause between transactions")
    w.add_argument("--power", action="store_true", help="plain commits as fast as possible")
    p = sub.add_parser("processor")
    p.add_argument("--spool", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--label", required=True)
    args = parser.parse_args(argv)
    if args.role == "processor":
        return processor(args)
    from mailspool.queue import is_postgres_url

    return pg_writer(args) if is_postgres_url(args.spool) else writer(args)


if __name__ == "__main__":
    sys.exit(main())
