"""The command with a PostgreSQL queue: ``db init|upgrade|import`` and every verb.

``--queue postgresql://...`` is recognised wherever a spool path is; the
password never comes from the URL.
"""

# ruff: noqa: E402, F811  (psycopg is checked first; the fixtures from _pg are parameters)

from __future__ import annotations

import io
import json
import socket
import sys
import time
from pathlib import Path

import pytest
import transaction

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (mailspool[postgres])")

from _pg import pg_database, pg_url, queue, sql  # noqa: F401
from _relays import Switchable
from _relays import enqueue as spool_enqueue
from conftest import Relay, RelayFactory
from mailspool import QueuedMailDelivery
from mailspool.cli.main import main
from mailspool.maildir.spool import Spool
from mailspool.postgres import PostgresQueue

A = "jane@example.org"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSPOOL_QUEUE", "MAILSPOOL_CONFIG", "MAILSPOOL_DB_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def put(queue: PostgresQueue, n: int, to: tuple[str, ...] = (A,)) -> list[str]:
    delivery = QueuedMailDelivery(queue)
    with transaction.manager:
        for i in range(n):
            delivery.send("app@example.org", list(to), f"Subject: m{i}\r\n\r\nhi\r\n")
    return [e.id for e in queue.entries()]


def test_db_init_then_upgrade_then_every_verb(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status", "--queue", pg_url)
    assert code == 3 and "db init" in err and err.count("\n") == 1
    code, out, err = run(capsys, "db", "init", "--queue", pg_url)
    assert code == 0 and "applied migration 1" in out, err
    code, out, err = run(capsys, "db", "upgrade", "--queue", pg_url)
    assert code == 0 and "is current" in out

    queue = PostgresQueue(pg_url)
    a, b = put(queue, 2)
    code, out, _ = run(capsys, "status", "--json", "--queue", pg_url)
    status = json.loads(out)
    assert code == 0 and status["ready"] == 2 and status["total"] == 2
    assert status["queue"] == queue.location
    code, out, _ = run(capsys, "list", "--queue", pg_url)
    assert code == 0 and a in out and b in out and "2 messages" in out
    code, out, _ = run(capsys, "show", a, "--queue", pg_url)
    assert code == 0 and "Subject: m0" in out and "state:        ready" in out
    assert run(capsys, "hold", a, "--queue", pg_url)[0] == 0
    assert queue.state(a) == "held"
    assert run(capsys, "release", a, "--queue", pg_url)[0] == 0
    assert queue.state(a) == "ready"
    assert run(capsys, "delete", b, "--queue", pg_url)[0] == 0
    assert queue.state(b) is None
    code, _, err = run(capsys, "retry", a, "--queue", pg_url)
    assert code == 1 and "cannot retry a message that is ready" in err
    queue.close()


def test_db_upgrade_applies_what_is_missing_and_needs_a_schema(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "db", "upgrade", "--queue", pg_url)
    assert code == 3 and "not initialised (run 'mailspool db init')" in err
    schema = pg_url.rsplit("=", 1)[1]
    # A schema made by a mailspool that knew no migration yet: version 0.
    sql(pg_url, f'CREATE SCHEMA "{schema}"')
    sql(pg_url, f'CREATE TABLE "{schema}".schema_version (version integer NOT NULL)')
    code, _, err = run(capsys, "status", "--queue", pg_url)
    assert code == 3 and "schema version 0" in err and "db upgrade" in err
    code, out, _ = run(capsys, "db", "upgrade", "--queue", pg_url)
    assert code == 0 and "applied migration 1" in out
    assert run(capsys, "status", "--queue", pg_url)[0] == 0


def test_send_and_drain_through_the_command(
    queue: PostgresQueue,
    pg_url: str,
    relay: Relay,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)
    data = b"From: app@example.org\nSubject: cli\n\nhello\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, _, err = run(capsys, "send", "--queue", pg_url, A)
    assert code == 0, err
    assert queue.counts()["ready"] == 1
    code, out, err = run(
        capsys,
        "drain",
        "--queue",
        pg_url,
        "--host",
        relay.host,
        "--port",
        str(relay.port),
        "--tls",
        "none",
    )
    assert code == 0, err
    assert "1 sent" in out and [m.rcpt_tos for m in relay.messages] == [[A]]
    assert sum(queue.counts().values()) == 0
    assert list(tmp_path.iterdir()) == []  # no stats directory named after the URL


def test_a_password_in_the_url_is_refused_and_never_echoed(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_database.replace("postgres@", "postgres:hunter2@")
    for argv in (["status", "--queue", url], ["db", "init", "--queue", url]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and "PGPASSWORD" in err and "hunter2" not in out + err


def test_the_password_file_is_used(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("any-password\n")  # the test server trusts: it must merely be accepted
    monkeypatch.setenv("MAILSPOOL_DB_PASSWORD_FILE", str(secret))
    assert run(capsys, "db", "init", "--queue", pg_url)[0] == 0
    monkeypatch.setenv("MAILSPOOL_DB_PASSWORD_FILE", str(tmp_path / "missing"))
    code, _, err = run(capsys, "status", "--queue", pg_url)
    assert code == 2 and "MAILSPOOL_DB_PASSWORD_FILE" in err and "missing" in err


def test_bad_queue_urls_are_one_line(pg_database: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "status", "--queue", pg_database + "?schema=x;y")
    assert code == 2 and "not a plain name" in err and err.count("\n") == 1
    code, _, err = run(capsys, "status", "--queue", "postgresql://postgres@127.0.0.1:1/x")
    assert code == 3 and "cannot connect" in err and err.count("\n") == 1
    code, _, err = run(capsys, "db", "init", "--queue", "/var/spool/x")
    assert code == 2 and "postgresql:// URL" in err


def test_db_import_moves_every_message_once_keeping_its_state(
    queue: PostgresQueue, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    spool_enqueue(spool, 5, to=["a@example.org", "b@example.org"])
    ids = [e.id for e in spool.entries()]
    later = time.time() + 600
    with spool.claim(ids[0]) as c:
        c.settle(sent=["a@example.org"], deferred={"b@example.org": (451, "later")}, retry_at=later)
    with spool.claim(ids[1]) as c:
        c.settle(failed={"a@example.org": (550, "no"), "b@example.org": (550, "no")})
    spool.hold(ids[2])
    busy = spool.claim(ids[3])  # a processor is sending it: it stays
    before = {e.id: e for e in spool.entries()}
    data = spool.message(ids[4])

    code, out, err = run(capsys, "db", "import", str(tmp_path / "spool"), "--queue", pg_url)
    assert code == 1 and "imported 4 message(s)" in out and "1 left" in out
    assert f"{ids[3]}: left in the spool: being sent" in err
    assert [e.id for e in spool.entries()] == [ids[3]]
    for id in (ids[0], ids[1], ids[2], ids[4]):
        got, was = queue.get(id), before[id]
        assert (got.state, got.recipients, got.attempts, got.message_id, got.queued_at) == (
            was.state,
            was.recipients,
            was.attempts,
            was.message_id,
            pytest.approx(was.queued_at, abs=1e-5),
        )
    assert queue.get(ids[0]).next_attempt == pytest.approx(later, abs=0.01)
    assert queue.message(ids[4]) == data

    busy.release()
    code, out, err = run(capsys, "db", "import", str(tmp_path / "spool"), "--queue", pg_url)
    assert code == 0 and "imported 1 message(s)" in out and err == ""
    assert list(spool.entries()) == [] and queue.counts()["ready"] == 2


def test_an_import_run_again_after_a_crash_neither_loses_nor_doubles(
    queue: PostgresQueue, tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    spool_enqueue(spool, 3)
    ids = sorted(e.id for e in spool.entries())
    first = ids[0]
    path = tmp_path / "spool" / "new" / first
    copy = path.read_bytes()
    assert run(capsys, "db", "import", str(tmp_path / "spool"), "--queue", pg_url)[0] == 0
    # What a crash after the commit and before the file's removal leaves:
    # the message both in the table and in the spool.
    path.write_bytes(copy)
    path.chmod(0o600)
    code, out, _ = run(capsys, "db", "import", str(tmp_path / "spool"), "--queue", pg_url)
    assert code == 0 and "imported 0 message(s)" in out and "1 were there already" in out
    assert list(spool.entries()) == []
    assert sorted(e.id for e in queue.entries()) == ids  # each once


def test_status_shows_the_relay_pause_a_processor_on_another_host_wrote(
    queue: PostgresQueue, pg_url: str, smtp_relay: RelayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailspool import QueueProcessor, SMTPMailer

    code, out, err = run(capsys, "status", "--json", "--queue", pg_url)
    assert code == 0 and json.loads(out)["relay"] is None  # nothing written yet
    relay = smtp_relay(Switchable())  # out of service: 421 to EHLO
    (id,) = put(queue, 1)
    p = QueueProcessor(queue, SMTPMailer(**relay.mailer_kwargs()), watch=False)
    assert p.process_once().relay_paused
    p.stop()
    elsewhere = PostgresQueue(pg_url)  # what any host reading the table sees
    state = elsewhere.relay_state()
    elsewhere.close()
    assert state is not None and state["relay"] == f"{relay.host}:{relay.port}"
    assert state["paused_until"] > time.time() and "421" in state["reason"]
    assert state["host"] == socket.gethostname()
    code, out, err = run(capsys, "status", "--queue", pg_url)
    assert code == 0, err
    assert f"waiting: relay {relay.host}:{relay.port} is paused until" in out
    assert f"on {socket.gethostname()}" in out and "421" in out
    code, out, err = run(capsys, "status", "--json", "--queue", pg_url)
    assert json.loads(out)["relay"]["paused_until"] == state["paused_until"]
    code, out, err = run(capsys, "list", "--queue", pg_url)
    assert id in out and "relay-wait" in out
