"""What an operator sees of a running processor: JSON log lines and ``status --watch``.

The installed script runs in a subprocess against a real aiosmtpd relay,
as it would under systemd or over SSH.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from _relays import PerRecipient, enqueue, wait_for
from conftest import RELAY_PASSWORD, RelayFactory
from mailspool import Spool
from mailspool.jsonlog import KEYS, scrub
from test_cli_run import SCRIPT, clean_env, mailspool, relay_env

GOOD = "jane@example.org"
BAD = "nobody@example.net"


def json_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line one object


def test_run_once_logs_one_json_object_per_event(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    relay = smtp_relay(PerRecipient({BAD: "550 5.1.1 no such user"}), tls="starttls", auth=True)
    queue = tmp_path / "spool"
    enqueue(Spool(queue), 2, to=[GOOD])
    enqueue(Spool(queue), 1, to=[BAD])
    env = relay_env(
        relay,
        queue,
        MAILSPOOL_USERNAME=relay.username or "",
        MAILSPOOL_PASSWORD=RELAY_PASSWORD,
        MAILSPOOL_CA_FILE=relay.ca_file or "",
    )
    proc = mailspool("run", "--once", "--log-format", "json", env=env)
    assert proc.returncode == 1, proc.stderr  # one failed
    records = json_lines(proc.stderr)
    attempts = [r for r in records if "outcome" in r]
    assert len(attempts) == 3  # one per attempt, and each a line of its own
    for r in records:
        assert {"time", "level", "logger", "message"} <= set(r)
        assert str(r["time"]).endswith("Z")
    for r in attempts:
        assert set(KEYS) <= set(r)
        assert r["relay"] == f"127.0.0.1:{relay.port}"
        assert r["attempt"] == 1
        assert isinstance(r["duration"], float) and r["duration"] >= 0
    sent = [r for r in attempts if r["outcome"] == "sent"]
    failed = [r for r in attempts if r["outcome"] == "failed"]
    assert len(sent) == 2 and len(failed) == 1
    assert {r["level"] for r in sent} == {"INFO"}
    assert sent[0]["domains"] == ["example.org"] and sent[0]["code"] == 250
    assert failed[0]["domains"] == ["example.net"]
    assert failed[0]["code"] == 550 and failed[0]["reason"] == "5xx"
    ids = Spool(queue).entries()  # the failed one stays, under its queue id
    assert [r["queue_id"] for r in failed] == [e.id for e in ids]
    assert len({r["message_id"] for r in attempts}) == 3
    assert GOOD not in proc.stderr and BAD not in proc.stderr
    assert "*@example.org" in proc.stderr
    assert RELAY_PASSWORD not in proc.stderr
    assert len(relay.messages) == 2


def test_log_addresses_shows_them(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    relay = smtp_relay()
    queue = tmp_path / "spool"
    enqueue(Spool(queue), 1, to=[GOOD])
    proc = mailspool(
        "--log-format", "json", "run", "--once", "--log-addresses", env=relay_env(relay, queue)
    )
    assert proc.returncode == 0, proc.stderr
    (attempt,) = [r for r in json_lines(proc.stderr) if "outcome" in r]
    assert GOOD in str(attempt["message"])


def test_text_format_is_unchanged(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    relay = smtp_relay()
    queue = tmp_path / "spool"
    enqueue(Spool(queue), 1, to=[GOOD])
    proc = mailspool("run", "--once", env=relay_env(relay, queue))
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr.lstrip().startswith("{")
    assert f"sent to {GOOD}" in proc.stderr


def test_a_bad_log_format_is_a_usage_error(tmp_path: Path) -> None:
    proc = mailspool("status", "--log-format", "xml", "--queue", str(tmp_path), env=clean_env())
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "xml" in proc.stderr


def test_scrub_keeps_domains_only() -> None:
    text = 'mail 1 <abc.1@host.example> from a.b+c@x.org: sent to "q"@y.org, z@[127.0.0.1]'
    assert scrub(text) == "mail 1 <*@host.example> from *@x.org: sent to *@y.org, *@[127.0.0.1]"


def _read_lines(proc: subprocess.Popen[str], n: int, deadline: float) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    while len(lines) < n and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return lines


def test_watch_prints_plain_lines_and_rates_and_stops_on_ctrl_c(
    smtp_relay: RelayFactory, tmp_path: Path
) -> None:
    relay = smtp_relay()
    queue = tmp_path / "spool"
    spool = Spool(queue)
    watcher = subprocess.Popen(
        [SCRIPT, "status", "--watch", "--queue", str(queue)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runner = None
    try:
        (first,) = _read_lines(watcher, 1, time.monotonic() + 20)
        assert "ready=0" in first and "no processor running" in first
        assert "sent -/min" in first
        runner = subprocess.Popen(
            [SCRIPT, "run"], env=relay_env(relay, queue), stderr=subprocess.PIPE, text=True
        )
        enqueue(spool, 3, to=[GOOD])
        assert wait_for(lambda: len(relay.messages) == 3, 20)
        deadline = time.monotonic() + 20
        lines: list[str] = []
        while time.monotonic() < deadline and not any(
            f"127.0.0.1:{relay.port} ok" in x and "sent 0/min" not in x for x in lines
        ):
            lines += _read_lines(watcher, 1, deadline)
        last = lines[-1]
        assert f"relay: 127.0.0.1:{relay.port} ok" in last
        assert "sent 0/min" not in last and "ready=0" in last
    finally:
        if runner is not None:
            runner.send_signal(signal.SIGTERM)
            runner.communicate(timeout=20)
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=20)
    assert watcher.returncode == 0
    assert err == ""
    assert runner is not None and runner.returncode == 0
    assert list((queue / "stats").iterdir()) == []  # the processor took its file away


def test_watch_on_a_terminal_redraws_and_exits_0(tmp_path: Path) -> None:
    queue = tmp_path / "spool"
    enqueue(Spool(queue), 2)
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(
        [SCRIPT, "status", "--watch", "--queue", str(queue)],
        env=clean_env(TERM="xterm"),
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
    )
    os.close(child_fd)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while out.count(b"\x1b[2J") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select([main_fd], [], [], 1)
            if ready:
                out += os.read(main_fd, 4096)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        while select.select([main_fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(main_fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main_fd)
    text = out.decode()
    assert text.count("\x1b[2J") >= 2  # redrawn in place, once a second
    assert "ready" in text and "2" in text and "Ctrl-C" in text
    assert "Traceback" not in text and "interrupted" not in text
