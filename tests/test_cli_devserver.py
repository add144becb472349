"""The development SMTP sink: as a class, with our own mailer, and as `mailspool devserver`."""

from __future__ import annotations

import io
import mailbox
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailspool.devserver import DevServer
from mailspool.smtp.mailer import SMTPMailer

SCRIPT = str(Path(sys.executable).parent / "mailspool")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_sink_accepts_stores_and_unstuffs(tmp_path: Path) -> None:
    echo = io.StringIO()
    with DevServer(port=0, maildir=tmp_path / "md", echo=echo) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            code, features = client.ehlo("client.test")
            assert code == 250
            for ext in (b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"SIZE"):
                assert ext in features
            client.login("anyone", "anything")
            refused = client.sendmail(
                "app@example.com",
                ["jane@example.org", "bob@example.org"],
                b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n",
            )
            assert refused == {}
            assert client.rset() == (250, b"2.0.0 OK")
            assert client.docmd("RCPT TO:<x@example.org>")[0] == 503
        assert sink.wait_for(1, 5)
        (got,) = sink.received
    assert got.sender == "app@example.com"
    assert got.recipients == ("jane@example.org", "bob@example.org")
    assert got.data == b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\nend\r\n"
    assert got.subject == "dots"
    # The Maildir is a real one, readable by the standard library.
    (stored,) = mailbox.Maildir(tmp_path / "md", create=False)
    assert stored["Subject"] == "dots"
    assert stored.get_all("Delivered-To") == ["jane@example.org", "bob@example.org"]
    assert stored["Return-Path"] == "<app@example.com>"
    assert got.path is not None and Path(got.path).parent == tmp_path / "md" / "new"
    assert "from <app@example.com> to jane@example.org, bob@example.org: 'dots'" in echo.getvalue()
    assert "anything" not in echo.getvalue()


def test_our_mailer_delivers_to_it() -> None:
    with DevServer(port=0) as sink:
        mailer = SMTPMailer("127.0.0.1", sink.port, tls="none", timeout=5)
        result = mailer.send(
            "app@example.com", ["jäne@example.org"], "Subject: ünïcode\r\n\r\nhé\r\n"
        )
        assert result.accepted == ("jäne@example.org",)
        assert sink.wait_for(1, 5)
        assert sink.received[0].recipients == ("jäne@example.org",)
        assert sink.received[0].subject == "ünïcode"


def test_devserver_command_prints_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [SCRIPT, "devserver", "--port", str(port), "--maildir", str(tmp_path / "md")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        banner = proc.stderr.readline()
        assert f"devserver listening on 127.0.0.1:{port}" in banner
        with smtplib.SMTP("127.0.0.1", port, timeout=5) as client:
            client.sendmail("a@example.com", ["b@example.org"], b"Subject: cli\r\n\r\nx\r\n")
        line = proc.stdout.readline()
        assert "from <a@example.com> to b@example.org: 'cli'" in line
        assert str(tmp_path / "md" / "new") in line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "stopped after 1 message(s)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(mailbox.Maildir(tmp_path / "md", create=False)) == 1


def test_devserver_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from mailspool.cli.main import main

    with DevServer(port=0) as sink:
        code = main(["devserver", "--port", str(sink.port)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith(f"mailspool: devserver: cannot listen on 127.0.0.1:{sink.port}: ")
    assert err.count("\n") == 1


def test_sink_refuses_what_is_too_big_and_keeps_long_lines_whole() -> None:
    long_line = b"." + b"x" * 5000 + b".y"  # longer than a read; dots inside stay
    with DevServer(port=0, max_size=20_000) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=5) as client:
            client.ehlo("client.test")
            client.sendmail(
                "a@example.com", ["b@example.org"], b"S: 1\r\n\r\n" + long_line + b"\r\n"
            )
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail("a@example.com", ["b@example.org"], b"S: 2\r\n\r\n" + b"y" * 30_000)
            assert info.value.smtp_code == 552
        assert sink.wait_for(1, 5)
    (got,) = sink.received
    assert got.data == b"S: 1\r\n\r\n" + long_line + b"\r\n"
    assert sink.count == 1


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_devserver_port_out_of_range_is_a_settings_error(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    from mailspool.cli.main import main

    code = main(["devserver", "--port", port])
    assert code == 2
    assert capsys.readouterr().err == (
        f"mailspool: port: must be between 0 and 65535, got {port} (from --port)\n"
    )


@pytest.mark.parametrize("file", ["", "new"])
def test_devserver_refuses_a_maildir_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], file: str
) -> None:
    from mailspool.cli.main import main

    box = tmp_path / "box"
    if file:
        box.mkdir()
    (box / file).write_text("not a directory\n")
    code = main(["devserver", "--port", "0", "--maildir", str(box)])
    assert code == 2
    assert capsys.readouterr().err == (
        f"mailspool: maildir: cannot store messages in {box / file}: not a directory\n"
    )
    with pytest.raises(NotADirectoryError):
        DevServer(port=0, maildir=box)
