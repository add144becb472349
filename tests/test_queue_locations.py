"""A queue named by a string: a directory is a spool, a URL is never a directory.

``QueuedMailDelivery``, ``QueueProcessor`` and every other place that takes
a queue's location go through :func:`mailspool.backends.open_queue`: a
``postgresql://`` URL opens the PostgreSQL queue (on a real server, see
``_pg.py``), or says psycopg is missing; another scheme is refused; only a
path becomes a spool directory.
"""

# ruff: noqa: F811  (the fixtures from _pg are parameters)

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import transaction

from _pg import pg_database, pg_url, queue  # noqa: F401
from _relays import message_id
from conftest import Relay
from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer, Summary
from mailspool.backends import open_queue
from mailspool.maildir.spool import Spool
from mailspool.memory import MemoryQueue
from mailspool.queue import InDirectory

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


def test_a_path_is_a_spool_and_a_backend_is_itself(tmp_path: Path) -> None:
    spool = open_queue(tmp_path / "spool")
    assert isinstance(spool, Spool) and (tmp_path / "spool" / "new").is_dir()
    assert isinstance(spool, InDirectory) and spool.path == str(tmp_path / "spool")
    memory = MemoryQueue()
    assert open_queue(memory) is memory and not isinstance(memory, InDirectory)


@pytest.mark.usefixtures("queue")  # the schema, as `mailspool db init` makes it
def test_a_delivery_given_a_postgres_url_queues_in_the_database(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailspool.postgres import PostgresQueue

    monkeypatch.chdir(tmp_path)
    delivery = QueuedMailDelivery(pg_url)
    assert isinstance(delivery.spool, PostgresQueue)
    assert not isinstance(delivery.spool, InDirectory)  # no relay state file, no stats dir
    with transaction.manager:
        mid = delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
    (entry,) = delivery.spool.entries()
    assert entry.state == "ready" and mid in entry.message_id
    assert os.listdir(tmp_path) == []  # no directory named like the URL
    delivery.spool.close()


@pytest.mark.usefixtures("queue")
def test_a_processor_given_a_postgres_url_drains_the_database(
    pg_url: str, relay: Relay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailspool.postgres import PostgresQueue

    monkeypatch.chdir(tmp_path)
    app = PostgresQueue(pg_url)
    with transaction.manager:
        mid = QueuedMailDelivery(app).send("app@example.org", ["jane@example.org"], MESSAGE)
    app.close()
    with QueueProcessor(pg_url, SMTPMailer(**relay.mailer_kwargs()), watch=False) as p:
        assert isinstance(p.spool, PostgresQueue)
        assert p.drain() == Summary(sent=1)
    assert [message_id(m.content) for m in relay.messages] == [mid]
    assert os.listdir(tmp_path) == []


def test_a_postgres_url_without_its_schema_is_refused_not_created(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailspool.errors import SpoolError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpoolError, match=r"no queue there \(run 'mailspool db init'\)"):
        QueuedMailDelivery(pg_url)
    assert os.listdir(tmp_path) == []


def test_a_postgres_url_without_psycopg_says_what_to_install(tmp_path: Path) -> None:
    # psycopg is installed here: a child process that cannot import it.
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from mailspool import QueuedMailDelivery, QueueProcessor\n"
        "for make in (QueuedMailDelivery, lambda q: QueueProcessor(q, None)):\n"
        "    try:\n"
        "        make('postgresql://mail:secret@db.example.org/app')\n"
        "    except ImportError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    line = "ImportError a PostgreSQL queue needs psycopg: pip install 'mailspool[postgres]'\n"
    assert out.stdout == line * 2, out.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", ["redis://:secret@cache/0", "sqlite:///tmp/q.db", "file://x"])
def test_a_url_of_another_scheme_is_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    scheme = url.partition("://")[0]
    with pytest.raises(ValueError, match="not a spool directory or a postgresql:// URL") as info:
        QueuedMailDelivery(url)
    assert str(info.value).startswith(f"queue {scheme}://...:")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="not a spool directory"):
        QueueProcessor(url, None)
    assert os.listdir(tmp_path) == []


def test_the_command_refuses_a_url_of_another_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailspool.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MESSAGE)))
    for argv in (["status"], ["send", "jane@example.org"]):
        assert main([*argv, "--queue", "redis://:secret@cache/0"]) == 2
        out, err = capsys.readouterr()
        assert (out, err) == (
            "",
            "mailspool: queue redis://...: not a spool directory or a postgresql:// URL\n",
        )
    assert os.listdir(tmp_path) == []
