"""The delivering verbs (send, drain, run, demo) against a real aiosmtpd relay.

Most tests run the installed ``mailspool`` script in a subprocess, as an
operator or systemd would; a few call main(argv) where only the outcome
matters.  The relay comes from the ``smtp_relay`` fixture in conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from _relays import PerRecipient, SlowData
from conftest import Relay, RelayFactory
from mailspool.cli.main import main
from mailspool.maildir.spool import Spool

SCRIPT = str(Path(sys.executable).parent / "mailspool")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSPOOL_")}
    env.update(extra)
    return env


def relay_env(relay: Relay, queue: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        MAILSPOOL_QUEUE=str(queue),
        MAILSPOOL_HOST=relay.host,
        MAILSPOOL_PORT=str(relay.port),
        MAILSPOOL_TLS=relay.tls or "none",
        MAILSPOOL_TIMEOUT="5",
        MAILSPOOL_CONNECT_TIMEOUT="5",
        MAILSPOOL_DATA_TIMEOUT="10",
        **extra,
    )


def mailspool(
    *argv: str, env: dict[str, str], stdin: bytes = b"", timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *argv],
        input=stdin.decode(),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def send(queue: Path, *to: str, subject: str = "hello", env: dict[str, str] | None = None) -> None:
    data = f"From: app@example.com\nSubject: {subject}\n\nhi there\n".encode()
    proc = mailspool("send", "--queue", str(queue), *to, env=env or clean_env(), stdin=data)
    assert proc.returncode == 0, proc.stderr


def interrupt_once_arrived(
    argv: list[str], env: dict[str, str], slow: SlowData, sig: int = signal.SIGINT
) -> tuple[int, str, str]:
    """Run the script, send ``sig`` once a message reached the relay; (code, out, err)."""
    proc = subprocess.Popen(
        [SCRIPT, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert slow.started.wait(15), "nothing reached the relay"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def status(queue: Path) -> dict[str, Any]:
    proc = mailspool("status", "--json", "--queue", str(queue), env=clean_env())
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_installed_script_and_module() -> None:
    assert os.access(SCRIPT, os.X_OK)
    proc = subprocess.run(
        [sys.executable, "-m", "mailspool", "status", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("Usage: mailspool status")


def test_send_drain_relay_received(relay: Relay, tmp_path: Path) -> None:
    queue = tmp_path / "spool"
    send(queue, "jane@example.org", "bob@example.org", subject="from the shell")
    assert status(queue)["ready"] == 1

    proc = mailspool("drain", env=relay_env(relay, queue))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"drained {queue}: 1 sent, 0 deferred, 0 failed, 0 quarantined\n"
    (got,) = relay.messages
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["jane@example.org", "bob@example.org"]
    assert b"Subject: from the shell" in got.content
    counts = status(queue)
    assert counts["total"] == 0 and counts["oldest_age"] is None


def test_drain_pipelines_unless_told_not_to(relay: Relay, tmp_path: Path) -> None:
    queue = tmp_path / "spool"
    send(queue, "jane@example.org", "bob@example.org")
    proc = mailspool("drain", env=relay_env(relay, queue))
    assert proc.returncode == 0, proc.stderr
    assert relay.pipelined == ["MAIL", "RCPT", "RCPT"]

    relay.pipelined.clear()
    send(queue, "jane@example.org", "bob@example.org")
    proc = mailspool("drain", "--no-pipelining", env=relay_env(relay, queue))
    assert proc.returncode == 0, proc.stderr
    send(queue, "jane@example.org")
    proc = mailspool("drain", env=relay_env(relay, queue, MAILSPOOL_PIPELINING="false"))
    assert proc.returncode == 0, proc.stderr
    assert relay.pipelined == []
    assert len(relay.messages) == 3


def test_failed_message_then_retry(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    handler = PerRecipient({"gone@example.org": "550 5.1.1 no such user"})
    relay = smtp_relay(handler)
    queue = tmp_path / "spool"
    send(queue, "gone@example.org")
    env = relay_env(relay, queue)

    proc = mailspool("drain", env=env)
    assert proc.returncode == 1
    assert proc.stdout.endswith(": 0 sent, 0 deferred, 1 failed, 0 quarantined\n")
    assert status(queue)["failed"] == 1
    assert relay.messages == []
    proc = mailspool("list", "--state", "failed", "--json", env=env)
    (entry,) = json.loads(proc.stdout)
    assert entry["recipients"][0]["code"] == 550

    handler.replies.clear()  # the mailbox exists now
    proc = mailspool("retry", entry["id"], env=env)
    assert proc.returncode == 0 and proc.stdout == f"{entry['id']}: ready\n"
    assert status(queue)["ready"] == 1

    proc = mailspool("drain", env=env)
    assert proc.returncode == 0, proc.stderr
    assert [m.rcpt_tos for m in relay.messages] == [["gone@example.org"]]
    assert status(queue)["total"] == 0


def test_deferred_message_makes_drain_exit_1(
    smtp_relay: RelayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = smtp_relay(PerRecipient({"full@example.org": "452 4.2.2 mailbox full"}))
    queue = tmp_path / "spool"
    send(queue, "full@example.org", "ok@example.org")
    argv = ["--queue", str(queue), "--host", relay.host, "--port", str(relay.port)]
    code = main(["drain", *argv, "--tls", "none", "--first-delay", "10m"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.endswith(
        ": 0 sent, 1 deferred, 0 failed, 0 quarantined; 1 of the deferred and failed "
        "went to some of their recipients (partly delivered)\n"
    )  # ok@example.org got it
    assert [m.rcpt_tos for m in relay.messages] == [["ok@example.org"]]
    assert main(["status", "--json", "--queue", str(queue)]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["deferred"] == 1
    assert 500 < st["next_retry_in"] <= 660  # 10 minutes, plus up to 10 % of jitter
    # The accepted recipient is never sent again.
    (entry,) = Spool(queue).entries()
    assert {r.address: r.status for r in entry.recipients} == {
        "full@example.org": "pending",
        "ok@example.org": "sent",
    }


def test_relay_down_fails_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    queue = tmp_path / "spool"
    send(queue, "jane@example.org")
    code = main(
        [
            "run",
            "--once",
            "--queue",
            str(queue),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tls",
            "none",
            "--connect-timeout",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "the relay was unavailable" in out
    assert Spool(queue).counts()["ready"] == 1  # untouched, not failed


def test_run_once(relay: Relay, tmp_path: Path) -> None:
    queue = tmp_path / "spool"
    send(queue, "a@example.org")
    send(queue, "b@example.org")
    proc = mailspool("run", "--once", env=relay_env(relay, queue))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "2 sent, 0 deferred, 0 failed, 0 quarantined\n"
    assert len(relay.messages) == 2


def test_run_needs_an_existing_spool_unless_create(relay: Relay, tmp_path: Path) -> None:
    queue = tmp_path / "later"
    proc = mailspool("run", "--once", env=relay_env(relay, queue))
    assert proc.returncode == 3
    assert proc.stderr == f"mailspool: queue {queue}: not found\n"
    proc = mailspool("run", "--once", "--create", env=relay_env(relay, queue))
    assert proc.returncode == 0, proc.stderr
    assert (queue / "new").is_dir() and (queue.stat().st_mode & 0o777) == 0o700


@pytest.mark.slow
def test_sigterm_during_run_finishes_the_message_in_flight(
    smtp_relay: RelayFactory, tmp_path: Path
) -> None:
    slow = SlowData(1.5)
    relay = smtp_relay(slow, auth=True, auth_require_tls=False)
    queue = tmp_path / "spool"
    password = relay.password
    assert password is not None
    pwfile = tmp_path / "pw"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    env = relay_env(
        relay, queue, MAILSPOOL_USERNAME=relay.username or "", MAILSPOOL_ALLOW_PLAINTEXT_AUTH="true"
    )
    send(queue, "jane@example.org", subject="in flight")

    proc = subprocess.Popen(
        [SCRIPT, "run", "-vv", "--password-file", str(pwfile)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert slow.started.wait(15), "the message never reached the relay"
        # What `ps` shows of the running daemon: never the password.
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            cmdline = f.read()
        assert password.encode() not in cmdline
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    # It waited for the relay's reply to the final dot instead of dropping it.
    assert time.monotonic() - started > 0.5
    assert "stopped on SIGTERM" in err
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]
    assert relay.auth_attempts and relay.auth_attempts[0][1] == relay.username
    st = status(queue)
    assert st["total"] == 0, st  # settled as sent: not in flight, not deferred
    assert password not in out and password not in err


def test_password_from_environment_never_printed(smtp_relay: RelayFactory, tmp_path: Path) -> None:
    relay = smtp_relay(tls="starttls", auth=True)
    password = relay.password
    assert password is not None and relay.ca_file is not None
    queue = tmp_path / "spool"
    send(queue, "jane@example.org")
    env = relay_env(
        relay,
        queue,
        MAILSPOOL_USERNAME=relay.username or "",
        MAILSPOOL_PASSWORD=password,
        MAILSPOOL_CA_FILE=relay.ca_file,
    )
    proc = mailspool("drain", "-vv", env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(relay.messages) == 1
    assert password not in proc.stdout and password not in proc.stderr
    # A wrong password: the error names the problem, never the password.
    env["MAILSPOOL_PASSWORD"] = "wrong-" + password
    send(queue, "jane@example.org")
    proc = mailspool("drain", "-vv", env=env)
    assert proc.returncode == 1
    assert "relay was unavailable" in proc.stdout
    assert password not in proc.stdout + proc.stderr


def test_demo_shows_what_arrived_where(tmp_path: Path) -> None:
    proc = mailspool("demo", "--dir", str(tmp_path / "demo"), env=clean_env())
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "after commit:  3 message(s) ready" in out
    assert "before commit: 0 message(s)" in out
    assert "3 sent, 0 deferred, 0 failed, 0 quarantined" in out
    assert out.count("stored in relay-maildir/new/") == 3
    assert "The aborted message reached the relay 0 time(s)." in out
    # The files are really there, and the spool is empty.
    assert len(list((tmp_path / "demo" / "relay-maildir" / "new").iterdir())) == 3
    assert Spool(tmp_path / "demo" / "spool").counts() == dict.fromkeys(
        ("ready", "in_flight", "deferred", "held", "failed", "quarantined"), 0
    )


def test_demo_in_a_temporary_directory_cleans_up(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    base = out.splitlines()[0].removeprefix("mailspool demo in ")
    assert not os.path.exists(base)
    assert "use --keep" in out


@pytest.mark.slow
def test_ctrl_c_during_drain_finishes_the_message_in_flight(
    smtp_relay: RelayFactory, tmp_path: Path
) -> None:
    slow = SlowData(1.0)
    relay = smtp_relay(slow)
    queue = tmp_path / "spool"
    for n in range(3):
        send(queue, f"user{n}@example.org")
    code, out, err = interrupt_once_arrived(
        ["drain", "--connections", "1"], relay_env(relay, queue), slow
    )
    assert code == 130, err
    assert out == f"stopped {queue}: 1 sent, 0 deferred, 0 failed, 0 quarantined\n"
    assert err.endswith("mailspool: interrupted; the messages in flight were finished\n")
    assert len(relay.messages) == 1
    st = status(queue)
    assert (st["ready"], st["in_flight"], st["total"]) == (2, 0, 2)


@pytest.mark.slow
def test_ctrl_c_during_run_once_finishes_the_message_in_flight(
    smtp_relay: RelayFactory, tmp_path: Path
) -> None:
    slow = SlowData(1.0)
    relay = smtp_relay(slow)
    queue = tmp_path / "spool"
    send(queue, "jane@example.org")
    code, out, err = interrupt_once_arrived(["run", "--once"], relay_env(relay, queue), slow)
    assert code == 130, err
    assert out == "stopped: 1 sent, 0 deferred, 0 failed, 0 quarantined\n"
    assert err.endswith("mailspool: interrupted; the messages in flight were finished\n")
    assert "Traceback" not in err
    assert [m.rcpt_tos for m in relay.messages] == [["jane@example.org"]]
    assert status(queue)["total"] == 0  # settled as sent: it will not go twice


def test_relay_down_during_drain_fails_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    queue = tmp_path / "spool"
    send(queue, "jane@example.org")
    send(queue, "bob@example.org")
    argv = ["--queue", str(queue), "--host", "127.0.0.1", "--port", str(port), "--tls", "none"]
    code = main(["drain", *argv, "--relay-first-delay", "1h", "--relay-max-delay", "2h"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == (
        f"drained {queue}: 0 sent, 0 deferred, 0 failed, 0 quarantined; "
        "the relay was unavailable (its messages stay queued)\n"
    )
    assert "Traceback" not in err
    counts = Spool(queue).counts()
    assert (counts["ready"], counts["failed"], counts["deferred"]) == (2, 0, 0)
    assert all(e.attempts == 0 for e in Spool(queue).entries())


_CLOSED_PIPE = """
import io, sys
from mailspool.cli.main import main

class Head(io.StringIO):
    # What `| head -N` becomes for the writer once head has exited.
    lines = 0
    def write(self, text):
        self.lines += text.count("\\n")
        if self.lines >= int(sys.argv[2]):
            raise BrokenPipeError(32, "Broken pipe")
        return len(text)

sys.stdout = Head()
sys.exit(main(["demo", "--dir", sys.argv[1]]))
"""


@pytest.mark.parametrize("lines", [3, 7, 9, 13])
def test_demo_into_a_closed_pipe_is_no_unfinished_transaction(tmp_path: Path, lines: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CLOSED_PIPE, str(tmp_path / "demo"), str(lines)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert "never ended" not in proc.stderr
    assert proc.stderr == ""
    assert proc.returncode == 1


def test_drain_ticks_every_second_and_its_timeout_bounds_the_greeting(tmp_path: Path) -> None:
    import socket

    queue = tmp_path / "spool"
    send(queue, "jane@example.org")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel completes the handshake; nobody greets
        port = listener.getsockname()[1]
        env = clean_env(
            MAILSPOOL_QUEUE=str(queue),
            MAILSPOOL_HOST="127.0.0.1",
            MAILSPOOL_PORT=str(port),
            MAILSPOOL_TLS="none",
            MAILSPOOL_CONNECT_TIMEOUT="60s",  # not what bounds the wait
        )
        proc = mailspool("drain", "--timeout", "3s", env=env, timeout=40)
    assert proc.returncode == 1
    assert f"no greeting from 127.0.0.1:{port} within 3 s" in proc.stderr
    # Nothing finished during those 3 seconds, and the progress line came all the same.
    assert "0/1 messages handled" in proc.stderr.splitlines()
    assert status(queue)["ready"] == 1


def test_a_server_that_is_not_smtp_is_named_for_what_it_said(tmp_path: Path) -> None:
    import socket
    import threading

    queue = tmp_path / "spool"
    send(queue, "jane@example.org")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def ssh() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"SSH-2.0-OpenSSH_8.9\r\n")
                conn.recv(100)  # until the client hangs up

        server = threading.Thread(target=ssh, daemon=True)
        server.start()
        env = clean_env(MAILSPOOL_QUEUE=str(queue), MAILSPOOL_TLS="none")
        proc = mailspool("drain", "--host", "127.0.0.1", "--port", str(port), env=env)
        server.join(10)
    assert proc.returncode == 1
    assert (
        f"127.0.0.1:{port} did not speak SMTP: it greeted with 'SSH-2.0-OpenSSH_8.9', "
        f"not a 220 reply; is {port} the relay's SMTP port?"
    ) in proc.stderr
    assert "-1 2.0-OpenSSH" not in proc.stderr
