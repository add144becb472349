"""``mailspool check``: thresholds and exit codes for health checks and monitoring.

Real spools in tmp_path, a real aiosmtpd relay for ``--relay``.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import Relay
from mailspool.cli.main import main
from mailspool.maildir.fileformat import decode_file, encode_file
from mailspool.maildir.spool import Spool
from test_cli import enqueue, fail


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSPOOL_QUEUE", "MAILSPOOL_CONFIG", "MAILSPOOL_PASSWORD", "MAILSPOOL_HOST"):
        monkeypatch.delenv(name, raising=False)


def check(capsys: pytest.CaptureFixture[str], queue: Path, *argv: str) -> tuple[int, str]:
    code = main(["check", "--queue", str(queue), *argv])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


def test_a_healthy_queue_is_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue = tmp_path / "spool"
    enqueue(queue, "fresh")
    code, out = check(capsys, queue)
    assert code == 0
    assert out.startswith(f"mailspool check {queue}: OK: 1 ready, 0 in flight, ")
    assert out.count("\n") == 1


def test_failed_and_quarantined_messages_are_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    ids = enqueue(queue, "a", "b")
    spool = Spool(queue)
    fail(spool, ids[0])
    code, out = check(capsys, queue)
    assert code == 1
    assert "PROBLEM: 1 failed (at most 0 allowed) -- " in out
    assert check(capsys, queue, "--max-failed", "1")[0] == 0

    (queue / "new" / "1.M1P1Q1R00000000.planted").symlink_to(tmp_path)
    assert spool.claim("1.M1P1Q1R00000000.planted") is None  # quarantined
    capsys.readouterr()  # its log line
    code, out = check(capsys, queue, "--max-failed", "1", "--json")
    assert code == 1
    got = json.loads(out)
    assert got["ok"] is False
    assert got["problems"] == ["1 quarantined (at most 0 allowed)"]
    assert (got["failed"], got["quarantined"], got["ready"]) == (1, 1, 1)


def test_a_ready_message_waiting_too_long_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    (id,) = enqueue(queue, "old")
    path = queue / "new" / id
    record, data = decode_file(path.read_bytes())
    head, data = encode_file(replace(record, queued_at=time.time() - 7200), data)
    path.write_bytes(head + data)
    code, out = check(capsys, queue)
    assert code == 1
    assert "the oldest ready message has waited 2h 0m (at most 1h 0m allowed)" in out
    assert check(capsys, queue, "--max-age", "3h")[0] == 0


def test_relay_probe(relay: Relay, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue = tmp_path / "spool"
    Spool(queue, create=True)
    where = ["--host", relay.host, "--port", str(relay.port), "--tls", "none"]
    code, out = check(capsys, queue, "--relay", *where)
    assert code == 0 and out.rstrip().endswith("; relay ok")
    assert relay.connections == 1

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out = check(capsys, queue, "--relay", "--host", "127.0.0.1", "--port", str(port))
    assert code == 1
    assert f"PROBLEM: the relay cannot be used: cannot connect to 127.0.0.1:{port}" in out


def test_check_usage_and_queue_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--queue", str(tmp_path / "missing")]) == 3
    assert capsys.readouterr().err == f"mailspool: queue {tmp_path / 'missing'}: not found\n"
    Spool(tmp_path / "spool", create=True)
    assert main(["check", "--queue", str(tmp_path / "spool"), "--max-age", "soon"]) == 2
    assert capsys.readouterr().err.startswith("mailspool: --max-age: not a duration: 'soon'")
    assert main(["check", "--queue", str(tmp_path / "spool"), "--max-failed", "-1"]) == 2
    assert "--max-failed" in capsys.readouterr().err


def test_a_relay_paused_by_a_processor_is_a_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailspool.processor import relayfile

    queue = tmp_path / "spool"
    Spool(queue, create=True)
    relayfile.write(str(queue), {"relay": "smtp.example.org:587", "paused_until": 1.0})
    assert check(capsys, queue)[0] == 0  # a pause that is over
    until = time.time() + 600
    relayfile.write(str(queue), {"relay": "smtp.example.org:587", "paused_until": until})
    code, out = check(capsys, queue)
    assert code == 1
    assert "PROBLEM: the relay is paused until " in out
    assert check(capsys, queue, "--ignore-relay-pause")[0] == 0
    code, out = check(capsys, queue, "--json")
    assert json.loads(out)["relay_paused_until"] == until
