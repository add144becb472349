"""The ``mailspool`` command's inspection, repair and ``send`` verbs, through main(argv).

Queues are real spools in tmp_path, filled by a real QueuedMailDelivery and
moved to deferred/failed by real claims, as the processor would.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import pytest
import transaction

from mailspool.cli.main import build_parser, main
from mailspool.delivery import QueuedMailDelivery
from mailspool.maildir.spool import Spool

VERBS = (
    "run",
    "drain",
    "status",
    "check",
    "list",
    "show",
    "retry",
    "delete",
    "hold",
    "release",
    "send",
    "config",
    "devserver",
    "demo",
)


def message(subject: str, to: str = "jane@example.org") -> bytes:
    return (
        f"From: app@example.com\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nBody of {subject}.\r\n"
    ).encode()


def enqueue(path: Path, *subjects: str, to: Sequence[str] = ("jane@example.org",)) -> list[str]:
    """Commit one message per subject; returns their spool ids."""
    manager = transaction.TransactionManager()
    delivery = QueuedMailDelivery(path, transaction_manager=manager)
    with manager:
        mids = [delivery.send("app@example.com", list(to), message(s)) for s in subjects]
    by_mid = {e.message_id: e.id for e in Spool(path).entries()}
    return [by_mid[m] for m in mids]


def fail(spool: Spool, id: str, code: int = 550, text: str = "5.1.1 no such user") -> None:
    claim = spool.claim(id)
    assert claim is not None
    with claim:
        claim.settle(failed={r: (code, text) for r in claim.envelope.recipients})


def defer(spool: Spool, id: str, retry_at: float) -> None:
    claim = spool.claim(id)
    assert claim is not None
    with claim:
        claim.settle(
            deferred={r: (451, "4.3.0 try later") for r in claim.envelope.recipients},
            retry_at=retry_at,
        )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSPOOL_QUEUE", "MAILSPOOL_CONFIG", "MAILSPOOL_PASSWORD", "MAILSPOOL_HOST"):
        monkeypatch.delenv(name, raising=False)


def test_status_json_counts_every_state(queue: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = enqueue(queue, "r1", "r2", "d", "f", "h")
    spool = Spool(queue)
    retry_at = time.time() + 600
    defer(spool, ids[2], retry_at)
    fail(spool, ids[3])
    spool.hold(ids[4])

    code, out, err = run(capsys, "status", "--json", "--queue", str(queue))
    assert code == 0, err
    status = json.loads(out)
    counts = {
        k: status[k] for k in ("ready", "in_flight", "deferred", "held", "failed", "quarantined")
    }
    assert counts == {
        "ready": 2,
        "in_flight": 0,
        "deferred": 1,
        "held": 1,
        "failed": 1,
        "quarantined": 0,
    }
    assert all(type(v) is int for v in counts.values())
    assert status["total"] == 5
    assert status["next_retry_at"] == pytest.approx(retry_at, abs=1)
    assert 500 < status["next_retry_in"] <= 600
    assert 0 <= status["oldest_age"] < 60


def test_status_text_and_queue_from_environment(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue(queue, "one")
    monkeypatch.setenv("MAILSPOOL_QUEUE", str(queue))
    code, out, err = run(capsys, "status")
    assert code == 0, err
    assert "ready" in out and "oldest waiting message" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("ready"))
    assert line.split()[-1] == "1"


def test_list_text_json_and_state_filter(queue: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = enqueue(queue, "a", "b")
    spool = Spool(queue)
    fail(spool, ids[1])

    code, out, _ = run(capsys, "list", "--queue", str(queue))
    assert code == 0
    assert ids[0] in out and ids[1] in out
    assert "550 5.1.1 no such user" in out or "no such user" in out
    assert out.rstrip().endswith("2 messages")

    code, out, _ = run(capsys, "list", "--queue", str(queue), "--state", "failed", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [e["id"] for e in listed] == [ids[1]]
    assert listed[0]["recipients"] == [
        {
            "address": "jane@example.org",
            "status": "failed",
            "code": 550,
            "text": "5.1.1 no such user",
        }
    ]

    code, _, err = run(capsys, "list", "--queue", str(queue), "--state", "lost")
    assert code == 2
    assert err.count("\n") == 1 and "--state" in err


def test_show_headers_not_body_unless_asked(
    queue: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (id,) = enqueue(queue, "Hello there")
    code, out, _ = run(capsys, "show", id, "--queue", str(queue))
    assert code == 0
    assert "Subject: Hello there" in out
    assert "jane@example.org  pending" in out
    assert "Body of Hello there" not in out

    code, out, _ = run(capsys, "show", id, "--body", "--queue", str(queue))
    assert "Body of Hello there." in out

    code, out, _ = run(capsys, "show", id, "--json", "--queue", str(queue))
    shown = json.loads(out)
    assert shown["id"] == id and shown["sender"] == "app@example.com"
    assert ["Subject", "Hello there"] in shown["headers"]
    assert "message" not in shown


def test_show_never_follows_a_planted_symlink(
    queue: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (id,) = enqueue(queue, "planted")
    secret = tmp_path / "secret.txt"
    # Readable as a message (a zope.sendmail queue file), so only the refusal
    # to follow the link keeps it out of the output.
    secret.write_bytes(
        b"X-Zope-From: x@example.org\r\nX-Zope-To: y@example.org\r\n"
        b"Subject: top secret\r\n\r\nthe secret body\r\n"
    )
    ready = queue / "new" / id
    ready.unlink()
    ready.symlink_to(secret)
    spool = Spool(queue)
    assert spool.claim(id) is None  # set aside, as the processor would
    assert spool.state(id) == "quarantined"

    code, out, err = run(capsys, "show", id, "--body", "--queue", str(queue))
    assert code == 1  # the envelope is shown, the body cannot be
    assert "quarantined" in out
    assert "cannot be read" in err
    assert "secret" not in err
    assert "secret" not in out

    code, out, _ = run(capsys, "show", id, "--body", "--json", "--queue", str(queue))
    assert json.loads(out)["message"] is None
    assert "secret" not in out
    assert code == 0  # JSON says null for a body that cannot be read


def test_show_unknown_id(queue: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enqueue(queue, "x")
    code, out, err = run(capsys, "show", "1234.nope.host", "--queue", str(queue))
    assert code == 1
    assert out == ""
    assert err == "mailspool: 1234.nope.host: not in the queue\n"


def test_retry_failed_and_all(queue: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = enqueue(queue, "a", "b", "c")
    spool = Spool(queue)
    fail(spool, ids[0])
    fail(spool, ids[1])
    defer(spool, ids[2], time.time() + 3600)

    code, out, _ = run(capsys, "retry", ids[0], "--queue", str(queue))
    assert code == 0 and out == f"{ids[0]}: ready\n"
    assert spool.get(ids[0]).state == "ready"
    assert spool.get(ids[0]).recipients[0].status == "pending"

    code, out, _ = run(capsys, "retry", "--all", "--queue", str(queue))
    assert code == 0
    assert spool.counts()["ready"] == 3

    code, out, _ = run(capsys, "retry", "--all", "--queue", str(queue))
    assert code == 0 and out == "nothing to retry\n"

    code, _, err = run(capsys, "retry", "--queue", str(queue))
    assert code == 2 and "IDs or --all" in err


def test_hold_release_delete(queue: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = enqueue(queue, "a", "b")
    spool = Spool(queue)

    assert run(capsys, "hold", ids[0], "--queue", str(queue))[0] == 0
    assert spool.get(ids[0]).state == "held"
    assert list(spool.due()) == [ids[1]]

    assert run(capsys, "release", ids[0], "--queue", str(queue))[0] == 0
    assert spool.get(ids[0]).state == "ready"

    code, out, err = run(capsys, "delete", ids[0], "nope.1.x", "--queue", str(queue))
    assert code == 1  # one of the two was not there
    assert out == f"{ids[0]}: deleted\n"
    assert err == "mailspool: nope.1.x: not in the queue\n"
    assert [e.id for e in spool.entries()] == [ids[1]]

    fail(spool, ids[1])
    code, _, err = run(capsys, "release", ids[1], "--queue", str(queue))
    assert code == 1 and err.startswith(f"mailspool: {ids[1]}: ") and err.count("\n") == 1


def set_stdin(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_send_with_t_reads_recipients_and_drops_bcc(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = (
        b"From: Cron <cron@example.com>\n"
        b'To: "Doe, Jane" <jane@example.org>, bob@example.org\n'
        b"Bcc: secret@example.org\n"
        b"Subject: nightly\n"
        b"\n"
        b"all good\n.\nstill the body\n"
    )
    set_stdin(monkeypatch, data)
    code, out, err = run(capsys, "send", "-t", "-i", "extra@example.org", "--queue", str(queue))
    assert code == 0, err
    assert out == ""  # quiet, like sendmail (cron mails whatever is printed)
    (entry,) = Spool(queue).entries()
    assert entry.sender == "cron@example.com"
    assert {r.address for r in entry.recipients} == {
        "extra@example.org",
        "jane@example.org",
        "bob@example.org",
        "secret@example.org",
    }
    code, out, _ = run(capsys, "show", entry.id, "--body", "--queue", str(queue))
    assert "Bcc" not in out and "secret@example.org" not in out.split("headers:")[1]
    assert "all good\n.\nstill the body" in out
    assert "Message-Id: <" in out  # completed by the delivery


def test_send_sender_flag_and_missing_from(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_stdin(monkeypatch, b"Subject: no from\r\n\r\nhi\r\n")
    code, _, err = run(
        capsys, "send", "-f", "bounces@example.com", "jane@example.org", "--queue", str(queue)
    )
    assert code == 0, err
    (entry,) = Spool(queue).entries()
    assert entry.sender == "bounces@example.com"
    code, out, _ = run(capsys, "show", entry.id, "--queue", str(queue))
    assert "From: bounces@example.com" in out


@pytest.mark.parametrize(
    ("argv", "stdin", "code", "text"),
    [
        (["send"], b"Subject: x\n\nhi\n", 2, "no recipients"),
        (["send", "jane@example.org"], b"", 1, "no message on standard input"),
        (["send", "not an address"], b"Subject: x\n\nhi\n", 1, "invalid address"),
        (["send", "-f", "a@b\r\nBcc: x@y", "j@example.org"], b"S: x\n\nhi\n", 1, "injection"),
    ],
)
def test_send_refusals_are_one_line(
    queue: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    stdin: bytes,
    code: int,
    text: str,
) -> None:
    set_stdin(monkeypatch, stdin)
    got, _, err = run(capsys, *argv, "--queue", str(queue))
    assert got == code
    assert err.startswith("mailspool: ") and err.count("\n") == 1 and text in err
    assert not queue.exists() or not list(Spool(queue).entries())


def test_queue_not_found_is_3_and_no_queue_is_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "status", "--queue", str(tmp_path / "missing"))
    assert code == 3
    assert err == f"mailspool: queue {tmp_path / 'missing'}: not found\n"
    assert not (tmp_path / "missing").exists()  # never created by looking at it

    code, _, err = run(capsys, "list")
    assert code == 2 and err.startswith("mailspool: queue: no queue given")

    (tmp_path / "plain").mkdir()
    code, _, err = run(capsys, "status", "--queue", str(tmp_path / "plain"))
    assert code == 3 and "is not a spool" in err


def test_bad_setting_is_exit_2_one_line_before_touching_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = tmp_path / "spool"
    code, out, err = run(capsys, "drain", "--queue", str(queue), "--port", "smtp")
    assert (code, out) == (2, "")
    assert err == "mailspool: port: not an integer: 'smtp' (from --port)\n"
    monkeypatch.setenv("MAILSPOOL_CONNECTIONS", "-3")
    code, _, err = run(capsys, "run", "--once", "--queue", str(queue))
    assert code == 2
    assert err == "mailspool: connections: must be at least 1 (from MAILSPOOL_CONNECTIONS)\n"
    assert not queue.exists()


def test_group_options_work_before_the_verb(
    queue: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    enqueue(queue, "x")
    code, out, _ = run(capsys, "--queue", str(queue), "status", "--json")
    assert code == 0 and json.loads(out)["ready"] == 1
    conf = tmp_path / "m.toml"
    conf.write_text(f'queue = "{queue}"\n')
    code, out, _ = run(capsys, "--config", str(conf), "status", "--json")
    assert code == 0 and json.loads(out)["ready"] == 1


def test_world_readable_config_with_password_is_refused(
    queue: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    enqueue(queue, "x")
    conf = tmp_path / "m.toml"
    conf.write_text(f'queue = "{queue}"\n[relay]\nusername = "app"\npassword = "hunter2"\n')
    conf.chmod(0o644)
    code, out, err = run(capsys, "drain", "--config", str(conf))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "readable by group or others" in err
    assert "hunter2" not in err
    assert Spool(queue).counts()["ready"] == 1


def test_usage_errors_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys)
    assert code == 2 and "Commands:" in err

    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and err.count("\n") == 1 and "frobnicate" in err

    code, _, err = run(capsys, "status", "--bogus")
    assert code == 2 and err.count("\n") == 1 and "--bogus" in err and "status --help" in err

    code, _, err = run(capsys, "run", "--password", "x")
    assert code == 2 and "--password" in err

    group = build_parser()
    with click.Context(group) as ctx:
        listed = group.list_commands(ctx)
        assert set(VERBS) <= set(listed)
        for name in listed:  # each verb listed is found, under its own name
            command = group.get_command(ctx, name)
            assert command is not None and command.name == name
    for verb in VERBS:
        code, out, _ = run(capsys, verb, "--help")
        assert code == 0
        assert out.startswith(f"Usage: mailspool {verb}")
        # A real description, not only the option list.
        assert len(out.split("Options:")[0].strip().splitlines()) >= 3, verb
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "Exit codes" in out


def test_unexpected_error_is_one_line(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue(queue, "x")

    def broken(self: Spool, now: float | None = None) -> dict[str, int]:
        raise RuntimeError("disk on fire\nsecond line")

    # A fault no real part produces on demand: a bug inside the library.
    monkeypatch.setattr(Spool, "census", broken)
    code, out, err = run(capsys, "status", "--queue", str(queue))
    assert code == 1 and out == ""
    assert err == (
        "mailspool: unexpected error: RuntimeError: disk on fire second line "
        "(run with -vv for details)\n"
    )


def test_queue_that_is_a_file_is_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "afile"
    path.write_text("not a spool")
    for argv in (["status"], ["list"], ["run", "--once", "--create"], ["drain"]):
        code, out, err = run(capsys, *argv, "--queue", str(path))
        assert (code, out) == (3, ""), argv
        assert err == f"mailspool: queue {path}: not a directory\n", argv
    assert path.read_text() == "not a spool"


def test_unreadable_area_is_one_line_exit_3(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    enqueue(queue, "x")
    real_scandir = os.scandir
    area = str(queue / "deferred")

    def scandir(path: Any = ".") -> Any:
        if os.fsdecode(path).rstrip("/") == area:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    # EACCES on a directory: a fault root (as tests often run) cannot meet for
    # real; test_unreadable_queue_is_exit_3 meets it for real as another user.
    monkeypatch.setattr(os, "scandir", scandir)
    for argv in (["status"], ["status", "--json"], ["list"], ["retry", "--all"], ["drain"]):
        code, _, err = run(capsys, *argv, "--queue", str(queue))
        assert code == 3, argv
        assert err == f"mailspool: queue {queue}: cannot read: {area}/: Permission denied\n", argv


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every directory")
def test_unreadable_queue_is_exit_3(queue: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enqueue(queue, "x")
    (queue / "new").chmod(0)
    try:
        code, _, err = run(capsys, "status", "--queue", str(queue))
        assert code == 3 and err.count("\n") == 1 and "ermission denied" in err
        code, _, err = run(capsys, "list", "--queue", str(queue))
        assert code == 3 and err.count("\n") == 1
    finally:
        (queue / "new").chmod(0o700)
    queue.chmod(0)
    try:
        code, _, err = run(capsys, "status", "--queue", str(queue))
        assert code == 3 and err == f"mailspool: queue {queue}: permission denied\n"
    finally:
        queue.chmod(0o700)


def test_send_accepts_sendmail_o_options(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sendmail -oi -t` is what many scripts call.
    set_stdin(monkeypatch, b"From: cron@example.com\nTo: ops@example.org\nSubject: s\n\n.\nx\n")
    code, out, err = run(capsys, "send", "-oi", "-t", "--queue", str(queue))
    assert (code, out) == (0, ""), err
    (entry,) = Spool(queue).entries()
    assert [r.address for r in entry.recipients] == ["ops@example.org"]


def test_cli_modules_never_import_cli() -> None:
    # DESIGN.md: no module imports `cli`; the verbs are registered by it.
    # The frameworks' commands (integrations/) stand beside it, not below:
    # they run the processor with the command's settings.
    import ast

    src = Path(__file__).resolve().parent.parent / "src" / "mailspool"
    for path in src.rglob("*.py"):
        if path.parent.name == "cli" or path.name == "__main__.py":  # __main__ calls cli
            continue
        if "integrations" in path.relative_to(src).parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n == "mailspool.cli" or n.startswith("mailspool.cli.") for n in names), (
                path.name
            )


def test_send_reports_mail_it_could_not_queue(
    queue: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A transaction's last phase may only log such a failure; `send` must
    # say it in its exit code, and leave nothing behind in tmp/.
    enqueue(queue, "first")
    new = queue / "new"
    for f in new.iterdir():
        f.unlink()
    new.rmdir()
    new.write_text("")  # a file where new/ should be: the rename into it fails
    set_stdin(monkeypatch, b"Subject: lost?\n\nhi\n")
    code, out, err = run(capsys, "send", "jane@example.org", "--queue", str(queue))
    assert (code, out) == (1, "")
    assert err.startswith("mailspool: send: not queued: ") and err.count("\n") == 1
    assert "Traceback" not in err
    assert list((queue / "tmp").iterdir()) == []


def test_logged_errors_stay_one_line_unless_vv() -> None:
    import logging

    from mailspool.cli.common import OneLineFormatter

    try:
        raise ValueError("bad\nthing")
    except ValueError:
        info = sys.exc_info()
    record = logging.LogRecord(
        "mailspool.processor", logging.ERROR, __file__, 1, "mail %s: oops", ("x",), info
    )
    line = OneLineFormatter().format(record)
    assert line.endswith(" ERROR mailspool.processor: mail x: oops (ValueError: bad thing)")
    assert "\n" not in line
    assert record.exc_info is info  # other handlers still see the exception
    full = OneLineFormatter(tracebacks=True).format(record)
    assert "Traceback (most recent call last)" in full and full.endswith("ValueError: bad\nthing")


def test_status_imports_no_delivery_modules(tmp_path: Path) -> None:
    """`status` and `list` load only their own verbs' module, not the processor's
    or the SMTP modules `run` needs, and compile no address pattern: what a
    million-message queue's `status` must not spend its second on."""
    Spool(str(tmp_path / "q"))
    code = (
        "import sys; from mailspool.cli.main import main; "
        f"main(['--queue', {str(tmp_path / 'q')!r}, 'status']); "
        f"main(['--queue', {str(tmp_path / 'q')!r}, 'list', '--limit', '5']); "
        "seen = ('mailspool.', 'smtplib', 'email.p');"
        "print(sorted(m for m in sys.modules if m.startswith(seen)));"
        "print(sys.modules['mailspool.address']._pattern.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    *_, modules, compiled = done.stdout.strip().splitlines()
    loaded = set(eval(modules))  # a list of names
    assert compiled == "0"  # no address was parsed, so no address pattern compiled
    assert "mailspool.cli.queue_verbs" in loaded
    for module in (
        "mailspool.cli.delivery_verbs",
        "mailspool.cli.dev_verbs",
        "mailspool.cli.db_verbs",
        "mailspool.smtp.mailer",
        "mailspool.processor.loop",
        "smtplib",
        "email.parser",
    ):
        assert module not in loaded, module
