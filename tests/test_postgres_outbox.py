"""Mail queued in the application's own transaction: it commits or rolls back with it.

The doors, each with a real database: a psycopg connection the
application passes, a SQLAlchemy session joined to the ``transaction``
package by zope.sqlalchemy, Django's connection in an atomic block, and the
two-phase enqueue that ``QueuedMailDelivery`` drives (stage at vote, publish
at the end of the commit).  In each, a rollback leaves no row and a commit makes the message
due at once, and the commit (only the commit) wakes a listening processor.
"""

# ruff: noqa: E402, F811  (psycopg is checked first; the fixtures from _pg are parameters)

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import transaction

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (mailspool[postgres])")

from _pg import pg_database, pg_url, queue, sql  # noqa: F401
from conftest import Relay
from mailspool import QueuedMailDelivery
from mailspool.errors import InvalidAddress
from mailspool.postgres import OutboxDelivery, PostgresQueue
from mailspool.postgres.connect import parse_target

A = "a@example.org"
MSG = b"Subject: order 42\r\n\r\nThank you.\r\n"


@pytest.fixture
def app_conn(pg_url: str, queue: PostgresQueue) -> Iterator[psycopg.Connection[Any]]:
    """The application's own connection, with a table of its own data."""
    with psycopg.connect(parse_target(pg_url).conninfo) as conn:
        conn.execute("CREATE TEMP TABLE orders (n int)")
        conn.commit()
        yield conn


def test_psycopg_rollback_leaves_no_row_and_commit_is_due_at_once(
    queue: PostgresQueue, app_conn: psycopg.Connection[Any]
) -> None:
    app_conn.execute("INSERT INTO orders VALUES (41)")
    queue.enqueue(app_conn, "shop@example.org", [A], MSG)
    assert list(queue.due()) == []  # not committed: no one sees it
    app_conn.rollback()
    assert list(queue.due()) == [] and queue.counts()["ready"] == 0

    with queue.listener() as listener:
        app_conn.execute("INSERT INTO orders VALUES (42)")
        mid = queue.enqueue(app_conn, "shop@example.org", [A], MSG)
        assert not listener.wait(0.05)  # nothing before the commit
        app_conn.commit()
        assert listener.wait(10)  # the commit notifies
    (id,) = list(queue.due())
    entry = queue.get(id)
    assert entry.message_id == mid and entry.state == "ready" and entry.sender == "shop@example.org"
    assert queue.message(id).endswith(b"Thank you.\r\n")
    assert app_conn.execute("SELECT n FROM orders").fetchall() == [(42,)]


def test_bad_input_raises_before_anything_is_written(
    queue: PostgresQueue, app_conn: psycopg.Connection[Any]
) -> None:
    with pytest.raises(InvalidAddress):
        queue.enqueue(app_conn, "shop@example.org", ["not an address"], MSG)
    app_conn.commit()
    assert sum(queue.counts().values()) == 0


def test_not_before_in_the_application_transaction(
    queue: PostgresQueue, app_conn: psycopg.Connection[Any]
) -> None:
    when = time.time() + 3600
    OutboxDelivery(lambda: app_conn, schema=queue.schema).send(
        "shop@example.org", A, MSG, not_before=when
    )
    app_conn.commit()
    (entry,) = queue.entries()
    assert entry.state == "deferred" and entry.next_attempt == pytest.approx(when, abs=0.01)


def test_sqlalchemy_session_joined_by_zope_sqlalchemy(queue: PostgresQueue, pg_url: str) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    orm = pytest.importorskip("sqlalchemy.orm")
    zope_sqlalchemy = pytest.importorskip("zope.sqlalchemy")
    url = parse_target(pg_url).conninfo.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = sqlalchemy.create_engine(url)
    schema = queue.schema
    sql(pg_url, f'CREATE TABLE "{schema}".orders (n int)')
    Session = orm.scoped_session(orm.sessionmaker(bind=engine))
    zope_sqlalchemy.register(Session)
    delivery = OutboxDelivery(Session, schema=schema)
    tm = transaction.manager
    try:
        tm.begin()
        Session().execute(sqlalchemy.text(f'INSERT INTO "{schema}".orders VALUES (1)'))
        delivery.send("shop@example.org", [A], MSG)
        tm.abort()  # the application's transaction fails: nothing of it stays
        assert sql(pg_url, f'SELECT count(*) FROM "{schema}".orders') == [(0,)]
        assert list(queue.due()) == []

        with queue.listener() as listener:
            with tm:
                Session().execute(sqlalchemy.text(f'INSERT INTO "{schema}".orders VALUES (2)'))
                mid = delivery.send("shop@example.org", [A], MSG)
            assert listener.wait(10)
        assert sql(pg_url, f'SELECT n FROM "{schema}".orders') == [(2,)]
        (entry,) = queue.entries()
        assert entry.message_id == mid and entry.state == "ready"
    finally:
        Session.remove()
        engine.dispose()


def test_queued_mail_delivery_two_phase_on_the_queue(queue: PostgresQueue) -> None:
    """QueuedMailDelivery stages at vote and publishes at the end of the commit."""
    delivery = QueuedMailDelivery(queue)
    assert delivery.queuePath == queue.location
    with transaction.manager as txn:
        delivery.send("shop@example.org", [A], MSG)
        txn.abort()
    assert sum(queue.counts().values()) == 0
    assert sql_count(queue) == 0  # nothing staged either
    with queue.listener() as listener:
        with transaction.manager:
            mids = [delivery.send("shop@example.org", [A], MSG) for _ in range(3)]
        assert listener.wait(10)
    assert sorted(e.message_id or "" for e in queue.entries("ready")) == sorted(mids)
    assert sql_count(queue) == 3


def sql_count(queue: PostgresQueue) -> int:
    with queue._main() as conn:
        row = conn.execute(f"SELECT count(*) FROM {queue.table}").fetchone()
    assert row is not None
    return int(row[0])


def test_the_listener_comes_back_after_losing_its_connection(
    queue: PostgresQueue, app_conn: psycopg.Connection[Any], pg_url: str
) -> None:
    with queue.listener() as listener:
        pids = sql(
            pg_url,
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND query LIKE 'LISTEN %%' AND pid <> pg_backend_pid()",
        )
        assert pids, "no listening session"
        for (pid,) in pids:
            sql(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
        # Back after the reconnect delay, it wakes the loop (what was sent
        # meanwhile is lost), then hears the next commit again.
        assert listener.wait(10)
        assert listener.ready(10)
        queue.enqueue(app_conn, "shop@example.org", [A], MSG)
        app_conn.commit()
        assert listener.wait(10)


DJANGO_APP = """
import json, sys
import django
from django.conf import settings

url = json.loads(sys.argv[1])
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **url}},
    USE_TZ=True,
)
django.setup()
from django.db import connection, transaction
from mailspool.postgres import OutboxDelivery

delivery = OutboxDelivery(lambda: connection, schema=sys.argv[2])
try:
    with transaction.atomic():
        delivery.send("shop@example.org", ["a@example.org"], b"Subject: no\\r\\n\\r\\nx\\r\\n")
        raise RuntimeError("the view failed")
except RuntimeError:
    pass
with transaction.atomic():
    print(delivery.send("shop@example.org", ["a@example.org"], b"Subject: yes\\r\\n\\r\\nx\\r\\n"))
"""


def test_django_connection_in_an_atomic_block(queue: PostgresQueue, pg_url: str) -> None:
    # In a process of its own: Django's settings are configured once per process.
    pytest.importorskip("django", reason="Django is not installed")
    params = psycopg.conninfo.conninfo_to_dict(parse_target(pg_url).conninfo)
    django_db = {
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "HOST": params.get("host", ""),
        "PORT": str(params.get("port", "")),
    }
    out = subprocess.run(
        [sys.executable, "-c", DJANGO_APP, json.dumps(django_db), queue.schema],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (entry,) = queue.entries()  # the rolled-back block left no row
    assert entry.message_id == out.strip() and entry.state == "ready"
    assert b"Subject: yes" in queue.message(entry.id)


DJANGO_BACKEND = """
import json, sys
import django
from django.conf import settings

url = json.loads(sys.argv[1])
settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **url}},
    EMAIL_BACKEND="mailspool.integrations.django.EmailBackend",
    MAILSPOOL_QUEUE_PATH=sys.argv[2],
    INSTALLED_APPS=["mailspool.integrations.django"],
    MAILSPOOL_RELAY=json.loads(sys.argv[3]),
    USE_TZ=True,
)
django.setup()
from django.core.mail import send_mail
from django.db import transaction

try:
    with transaction.atomic():
        send_mail("no", "x", "shop@example.org", ["a@example.org"])
        raise RuntimeError("the view failed")
except RuntimeError:
    pass
with transaction.atomic():
    assert send_mail("yes", "x", "shop@example.org", ["a@example.org"]) == 1
assert send_mail("autocommit", "x", "shop@example.org", ["b@example.org"]) == 1

from django.core.management import call_command

call_command("mailspool_run", "--once")
"""


def test_django_email_backend_with_the_postgres_queue(
    queue: PostgresQueue, pg_url: str, relay: Relay
) -> None:
    pytest.importorskip("django", reason="Django is not installed")
    params = psycopg.conninfo.conninfo_to_dict(parse_target(pg_url).conninfo)
    django_db = {
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "HOST": params.get("host", ""),
        "PORT": str(params.get("port", "")),
    }
    settings = {"host": relay.host, "port": relay.port, "tls": "none"}
    argv = [DJANGO_BACKEND, json.dumps(django_db), pg_url, json.dumps(settings)]
    subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True, check=True)
    # Queued in the views' transactions (the rolled-back one: no row), then
    # delivered by manage.py mailspool_run --once from the PostgreSQL queue.
    subjects = sorted(
        next(line for line in m.content.splitlines() if line.startswith(b"Subject:"))
        for m in relay.messages
    )
    assert subjects == [b"Subject: autocommit", b"Subject: yes"]
    assert sum(queue.counts().values()) == 0


DJANGO_FAILURES = """
import json, sys
import django
from django.conf import settings

settings.configure(
    DATABASES={"default": {"ENGINE": "django.db.backends.postgresql", **json.loads(sys.argv[1])}},
    INSTALLED_APPS=["mailspool.integrations.django"],
    USE_TZ=True,
)
django.setup()
from django.core.mail import EmailMessage, get_connection
from django.db import DatabaseError, connection, transaction
from django.db.transaction import TransactionManagementError

good, missing = sys.argv[2], sys.argv[3]  # a queue, and a schema never created
connection.force_debug_cursor = True  # every statement in connection.queries
out = {}

def mail(queue, fail_silently):
    backend = get_connection(
        "mailspool.integrations.django.EmailBackend",
        fail_silently=fail_silently,
        queue_path=queue,
    )
    return backend.send_messages([EmailMessage("s", "x", "shop@example.org", ["a@example.org"])])

def savepoints():
    return sum("SAVEPOINT" in q["sql"].upper() for q in connection.queries)

with connection.cursor() as cur:
    cur.execute("CREATE TEMP TABLE orders (n int)")

connection.queries_log.clear()
with transaction.atomic():
    out["sent"] = mail(good, False)
out["savepoints_sent"] = savepoints()

connection.queries_log.clear()
with transaction.atomic():
    with connection.cursor() as cur:
        cur.execute("INSERT INTO orders VALUES (1)")
    out["silent"] = mail(missing, True)
    with connection.cursor() as cur:
        cur.execute("INSERT INTO orders VALUES (2)")
out["savepoints_silent"] = savepoints()

try:
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (3)")
        try:
            mail(missing, False)
        except DatabaseError:
            out["raised"] = True
        with connection.cursor() as cur:
            cur.execute("INSERT INTO orders VALUES (4)")
except TransactionManagementError:
    out["spoiled"] = True
with connection.cursor() as cur:
    cur.execute("SELECT n FROM orders ORDER BY n")
    out["orders"] = [n for (n,) in cur.fetchall()]
print(json.dumps(out))
"""


def test_django_backend_failures_with_and_without_fail_silently(
    queue: PostgresQueue, pg_url: str
) -> None:
    # Without fail_silently the insert joins the transaction itself (no
    # savepoint: two round trips fewer) and a failure spoils the block, as
    # a failed Model.save() does; with it, a savepoint keeps the block going.
    pytest.importorskip("django", reason="Django is not installed")
    params = psycopg.conninfo.conninfo_to_dict(parse_target(pg_url).conninfo)
    django_db = {
        "NAME": params["dbname"],
        "USER": params.get("user", ""),
        "HOST": params.get("host", ""),
        "PORT": str(params.get("port", "")),
    }
    missing = pg_url.split("?")[0] + "?schema=never_created"
    argv = [DJANGO_FAILURES, json.dumps(django_db), pg_url, missing]
    done = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["sent"] == 1 and out["savepoints_sent"] == 0
    assert out["silent"] == 0 and out["savepoints_silent"] >= 1
    assert out["raised"] and out["spoiled"]
    assert out["orders"] == [1, 2]  # the silent failure kept its block; the other rolled back
    assert queue.counts()["ready"] == 1
