"""The relay state file: several processors on one spool keep each their own word.

Real processes writing the file at once, real processors on one spool,
real relays (a token bucket, and a port where nothing listens).
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from pathlib import Path

import pytest

from _relays import enqueue
from _scripted_relays import TokenBucket
from conftest import RelayFactory
from mailspool import QueueProcessor, RetryPolicy, SMTPMailer, Spool
from mailspool.cli.main import main
from mailspool.processor import relayfile

WRITES = 200


def _writer(spool_path: str, name: str, start: multiprocessing.synchronize.Event) -> None:
    start.wait()
    key = relayfile.new_key()
    for n in range(1, WRITES + 1):
        state = {"relay": name, "pid": 0, "n": n, "written_at": time.time()}
        if not relayfile.write(spool_path, state, key=key):
            raise SystemExit(1)


def test_two_processes_writing_at_once_keep_both_entries(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    writers = [ctx.Process(target=_writer, args=(spool.path, name, start)) for name in "ab"]
    for w in writers:
        w.start()
    start.set()
    while any(w.is_alive() for w in writers):  # a reader never sees half a file
        entries = relayfile.read_all(spool.path)
        assert all(set(e) == {"relay", "pid", "n", "written_at"} for e in entries)
    for w in writers:
        w.join()
        assert w.exitcode == 0
    # Each one's last write is there: no writer overwrote the other's entry
    # with what it had read before the other wrote.
    final = {e["relay"]: e["n"] for e in relayfile.read_all(spool.path)}
    assert final == {"a": WRITES, "b": WRITES}
    assert not list(Path(spool.path).glob("*.tmp"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processors_on_one_spool_each_show_in_status(
    tmp_path: Path, smtp_relay: RelayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = Spool(tmp_path / "spool")
    relay = smtp_relay(TokenBucket(rate=40, burst=2, close=False))
    port = _closed_port()
    dead = SMTPMailer(host="127.0.0.1", port=port, tls="none", connect_timeout=2)
    retry = RetryPolicy(relay_first_delay=600, relay_max_delay=600)
    enqueue(spool, 1)
    now = time.time()
    with QueueProcessor(spool, dead, retry=retry, watch=False) as down:
        assert down.process_once(now).relay_paused  # its relay is gone: it says paused
    enqueue(spool, 40)
    with QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), watch=False) as paced:
        assert paced.process_once(now + 1).sent == 41
        assert paced.pacer.learned  # it says at what rate
    entries = relayfile.read_all(spool.path)
    assert [e["relay"] for e in entries] == [f"{relay.host}:{relay.port}", f"127.0.0.1:{port}"]
    assert entries[0]["rate"] is not None and entries[0]["paused_until"] is None
    assert entries[1]["paused_until"] == pytest.approx(now + 600)

    assert main(["status", "--queue", spool.path]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("  relay ")]
    assert len(lines) == 2
    assert "pacing at" in lines[0] and "paused until" in lines[1]
    assert main(["status", "--json", "--queue", spool.path]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["relay"] == entries[0]  # the latest word: the relay works now
    assert shown["relays"] == entries


def test_a_file_of_the_earlier_layout_is_one_entry_and_is_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    old = {"relay": "smtp.example.org:25", "pid": 7, "rate": 2.0, "written_at": time.time()}
    (Path(spool.path) / relayfile.FILE_NAME).write_text(json.dumps(old))
    assert relayfile.read(spool.path) == old
    new = {"relay": "smtp.example.org:25", "pid": 8, "rate": None, "written_at": time.time()}
    assert relayfile.write(spool.path, new, key="other")
    assert relayfile.read_all(spool.path) == [new, old]


def test_long_silent_processors_are_forgotten_unless_their_pause_runs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    now = time.time()
    old = now - relayfile.FORGET_AFTER - 1
    relayfile.write(spool.path, {"relay": "r", "written_at": old}, key="gone")
    relayfile.write(
        spool.path, {"relay": "r", "written_at": old, "paused_until": now + 60}, key="paused"
    )
    relayfile.write(spool.path, {"relay": "r", "written_at": now}, key="here")
    assert [e["written_at"] for e in relayfile.read_all(spool.path)] == [now, old]
    mode = (Path(spool.path) / relayfile.FILE_NAME).stat().st_mode & 0o777
    assert mode == 0o600  # like every file of the spool: its owner's only
