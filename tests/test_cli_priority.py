"""The command and priority: ``send --priority``, the class in ``list`` and ``show``, and
``list --limit`` reading only what it shows."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

from _relays import enqueue
from mailspool.cli.main import main
from mailspool.maildir import admin
from mailspool.maildir.spool import Spool
from mailspool.priority import Priority

MESSAGE = b"From: app@example.org\nTo: jane@example.org\nSubject: reset\n\nbody\n"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSPOOL_QUEUE", "MAILSPOOL_CONFIG", "MAILSPOOL_PASSWORD", "MAILSPOOL_HOST"):
        monkeypatch.delenv(name, raising=False)


def send(monkeypatch: pytest.MonkeyPatch, queue: Path, *argv: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(MESSAGE)))
    return main(["send", "-t", *argv, "--queue", str(queue)])


def test_send_priority_is_kept_and_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    assert send(monkeypatch, queue, "--priority", "urgent") == 0
    assert send(monkeypatch, queue) == 0
    capsys.readouterr()
    assert main(["list", "--queue", str(queue), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(e["priority"] for e in listed) == ["normal", "urgent"]
    urgent = next(e["id"] for e in listed if e["priority"] == "urgent")
    assert main(["list", "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert "CLASS" in out.splitlines()[0]
    assert any(line.startswith(urgent) and " urgent " in line for line in out.splitlines())
    assert main(["show", urgent, "--queue", str(queue)]) == 0
    assert "priority:     urgent" in capsys.readouterr().out


def test_send_with_an_unknown_priority_says_so_in_one_line_and_queues_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    assert send(monkeypatch, queue, "--priority", "asap") == 2
    err = capsys.readouterr().err
    assert (
        err == "mailspool: send: --priority: priority 'asap' is not one of urgent, normal, bulk\n"
    )
    assert not queue.exists() or list(Spool(queue).entries()) == []


def test_list_limit_reads_only_the_heads_it_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    spool = Spool(queue)
    enqueue(spool, 120, priority=Priority.BULK)
    enqueue(spool, 60)
    oldest = sorted(spool.entries(), key=lambda e: (e.queued_at, e.id))[:5]
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        admin.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1]
    )
    capsys.readouterr()
    assert main(["list", "--queue", str(queue), "--limit", "5", "--json"]) == 0
    monkeypatch.undo()
    listed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in listed] == [e.id for e in oldest]
    assert len([p for p in opened if os.path.basename(p) in {e.id for e in oldest}]) == 5
    assert len(opened) <= 5 + 2  # the five heads (and perhaps the relay file), not 180


def test_list_limit_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Spool(tmp_path / "spool")
    assert main(["list", "--queue", str(tmp_path / "spool"), "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert "--limit" in err and "Traceback" not in err


def test_status_reads_one_file_per_state_however_many_are_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    spool = Spool(queue)
    enqueue(spool, 150)
    enqueue(spool, 50, priority=Priority.BULK)
    ids = [e.id for e in spool.entries()]
    for id in ids[:3]:
        spool.hold(id)
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        admin.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1]
    )
    census = spool.census()
    assert census.counts["ready"] == 197 and census.counts["held"] == 3
    assert len(opened) == 2  # the oldest ready file and the oldest held one
    assert census.oldest_of() == min(e.queued_at for e in spool.entries() if e.queued_at)
    opened.clear()
    capsys.readouterr()
    assert main(["status", "--queue", str(queue), "--json"]) == 0
    monkeypatch.undo()
    out = json.loads(capsys.readouterr().out)
    assert out["ready"] == 197 and out["held"] == 3 and out["total"] == 200
    assert len([p for p in opened if os.path.basename(p) in ids]) == 2
