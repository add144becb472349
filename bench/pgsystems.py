"""The PostgreSQL side of the bench: one Django application, three mail queues.

The application is the same in every trial: Django on a scratch PostgreSQL
database, an ``orders`` table of its own, and ``EmailMessage.send()``
inside ``transaction.atomic()``.  Only ``EMAIL_BACKEND`` changes:

* ``mailspool (PostgreSQL)``: mailspool's Django backend with a
  ``postgresql://`` queue: the row is inserted in the application's own
  transaction (the outbox);
* ``mailspool (Maildir)``: the same backend with a spool directory: the
  message is written (fsync) by an ``on_commit`` callback;
* ``django-mailer``: its ``mailer.backend.DbBackend``, a row in its own
  table in the same transaction; ``mailer.engine.send_all()`` delivers it
  (as ``manage.py send_mail`` does), through Django's SMTP backend.

So every system queues the same ``EmailMessage`` objects and the relay
gets the same messages.  The scratch database (``mailspool_bench_<pid>``)
is created by :class:`Scratch` and dropped at the end of the run.
django-mailer is never a dependency: :func:`find_django_mailer` installs it
with pip only when the run was given ``--install-django-mailer``.

Everything but :class:`Scratch` and :func:`find_django_mailer` runs in the
child process of one trial.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from systems import SENDER, make_messages

__all__ = [
    "DJANGO_MAILER",
    "MAILDIR",
    "PG",
    "Scratch",
    "configure",
    "django_messages",
    "find_django_mailer",
    "make_drainer",
    "pending",
    "truncate",
]

PG = "mailspool (PostgreSQL)"
MAILDIR = "mailspool (Maildir)"
DJANGO_MAILER = "django-mailer"
BASELINE = "the application's INSERT alone"
#: The server the scratch database is made on (a user allowed to create databases).
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = "mailspool"
#: The application's own table, written in every transaction.
APP_TABLE = "bench_orders"


def find_django_mailer(install: bool) -> str | None:
    """django-mailer's version, installing it with pip when asked; None when missing."""
    from importlib import metadata

    try:
        return metadata.version("django-mailer")
    except metadata.PackageNotFoundError:
        if not install:
            return None
    print("installing django-mailer with pip (a peer of the bench only) ...")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "django-mailer"], check=False)
    importlib.invalidate_caches()
    try:
        return metadata.version("django-mailer")
    except metadata.PackageNotFoundError:
        return None


class Scratch:
    """A database of the bench's own on the server, created and dropped.

    Args:
        server: a libpq URL of a database on the server, as a user allowed
            to create databases.
    """

    def __init__(self, server: str) -> None:
        self.server = server
        self.name = f"mailspool_bench_{os.getpid()}"
        parts = urllib.parse.urlsplit(server)
        self.url = urllib.parse.urlunsplit(parts._replace(path=f"/{self.name}"))
        self.params: dict[str, Any] = {
            "NAME": self.name,
            "USER": urllib.parse.unquote(parts.username or "") or os.environ.get("PGUSER", ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }

    def create(self) -> None:
        import psycopg

        with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{self.name}"')
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(
                f"CREATE TABLE {APP_TABLE} (id bigint GENERATED ALWAYS AS IDENTITY "
                "PRIMARY KEY, customer text NOT NULL, total numeric(10, 2) NOT NULL, "
                "created timestamptz NOT NULL DEFAULT now())"
            )
        from mailspool.postgres import PostgresQueue

        PostgresQueue(self.url, schema=SCHEMA, create=True).close()

    def drop(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.server, autocommit=True, connect_timeout=5) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except psycopg.Error as exc:
            print(f"  could not drop the scratch database {self.name}: {exc}")

    def queue_url(self) -> str:
        return f"{self.url}?schema={SCHEMA}"


# --- in the trial's process ----------------------------------------------------


def configure(
    db: dict[str, Any],
    *,
    backend: str | None,
    spool: str = "",
    queue_url: str = "",
    relay_port: int = 0,
    file_lock: bool = True,
    tmp: str = "",
) -> None:
    """Set Django up for ``backend`` (a system's name, or None for no mail)."""
    import django
    from django.conf import settings

    apps = ["mailspool.integrations.django"]
    if importlib.util.find_spec("mailer") is not None:
        apps.append("mailer")
    email_backend = {
        PG: "mailspool.integrations.django.EmailBackend",
        MAILDIR: "mailspool.integrations.django.EmailBackend",
        DJANGO_MAILER: "mailer.backend.DbBackend",
        None: "django.core.mail.backends.dummy.EmailBackend",
    }[backend]
    settings.configure(
        DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **db}},
        INSTALLED_APPS=apps,
        USE_TZ=True,
        EMAIL_BACKEND=email_backend,
        MAILSPOOL_QUEUE_PATH=queue_url if backend == PG else spool,
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=relay_port,
        MAILER_EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        MAILER_USE_FILE_LOCK=file_lock,
        MAILER_LOCK_PATH=os.path.join(tmp or os.getcwd(), "django-mailer-send_mail"),
        LOGGING_CONFIG=None,
    )
    django.setup()


def migrate_django_mailer(db: dict[str, Any]) -> None:
    """Create django-mailer's tables in the scratch database (a trial of its own)."""
    configure(db, backend=None)
    from django.core.management import call_command

    call_command("migrate", "mailer", verbosity=0)


def django_messages(n: int, tag: str) -> list[Any]:
    """``n`` Django ``EmailMessage`` objects: the bench's messages, header for header."""
    from django.core.mail import EmailMessage

    out = []
    for _, rcpts, data in make_messages(n, tag):
        head, _, body = data.decode("ascii").partition("\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.split("\r\n"))
        out.append(
            EmailMessage(
                subject=headers["Subject"],
                body=body.replace("\r\n", "\n"),
                from_email=f"Bench Sender <{SENDER}>",
                to=rcpts,
                headers={"Message-ID": headers["Message-Id"], "Date": headers["Date"]},
            )
        )
    return out


def app_transaction(message: Any | None, n: int) -> None:
    """The application's unit of work: its INSERT, and with it (or not) one mail."""
    from django.db import connection, transaction

    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(
                f"INSERT INTO {APP_TABLE} (customer, total) VALUES (%s, %s)",
                (f"customer {n}", n % 1000),
            )
        if message is not None:
            message.send()


def enqueue_batch(messages: list[Any], per_tx: int) -> None:
    """Queue ``messages``, ``per_tx`` per transaction, through the configured backend."""
    from django.core.mail import get_connection
    from django.db import transaction

    backend = get_connection()
    for start in range(0, len(messages), per_tx):
        with transaction.atomic():
            backend.send_messages(messages[start : start + per_tx])


def truncate(url: str) -> None:
    """Empty the queues' and the application's tables (each trial starts alike)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        tables = [f"{SCHEMA}.message", APP_TABLE]
        for name in ("mailer_message", "mailer_messagelog"):
            if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0]:  # type: ignore[index]
                tables.append(name)
        conn.execute(f"TRUNCATE {', '.join(tables)}")
        conn.execute("VACUUM ANALYZE")


def pending(system: str, url: str, spool: str) -> int:
    """Messages still queued by ``system``."""
    if system == MAILDIR:
        from systems import MAILSPOOL
        from systems import pending as spool_pending

        return spool_pending(MAILSPOOL, spool)
    import psycopg

    sql = {
        PG: f"SELECT count(*) FROM {SCHEMA}.message WHERE state <> 'sent'",
        DJANGO_MAILER: "SELECT count(*) FROM mailer_message",
    }[system]
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def make_drainer(
    system: str,
    *,
    db: dict[str, Any],
    queue_url: str,
    spool: str,
    relay_port: int,
    connections: int,
    file_lock: bool,
    tmp: str,
) -> Callable[[], None]:
    """Set up one processor in this process; returns the call that drains the queue once."""
    if system == DJANGO_MAILER:
        configure(db, backend=None, relay_port=relay_port, file_lock=file_lock, tmp=tmp)
        from mailer.engine import send_all

        return send_all  # type: ignore[no-any-return]
    from mailspool import SMTPMailer
    from mailspool.processor.loop import QueueProcessor

    where: Any = spool
    if system == PG:
        from mailspool.postgres import PostgresQueue

        where = PostgresQueue(queue_url)
    processor = QueueProcessor(
        where, SMTPMailer("127.0.0.1", relay_port, tls="none"), connections=connections
    )

    def drain() -> None:
        processor.drain()

    return drain


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def monotonic_ms(t0: float) -> float:
    return (time.monotonic() - t0) * 1000
