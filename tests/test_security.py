"""Security checks: the password, the spool's permissions, planted files, header injection.

Each test attacks one promise of docs/guarantees.md ("Security") with real
parts: an aiosmtpd relay with STARTTLS and AUTH, real spools, the installed
``mailspool`` command in a child process, a umask of 000.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
import transaction

from _relays import message_id, wait_for
from conftest import RELAY_PASSWORD, RELAY_USER, Relay, RelayFactory
from mailspool import DirectMailDelivery, QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.errors import AuthenticationError, InvalidAddress, InvalidMessage
from mailspool.maildir.spool import RecipientStatus, Record, Spool, encode_file
from mailspool.processor.loop import RetryPolicy

SENDER = "app@example.org"
BODY = b"Subject: security\r\nFrom: app@example.org\r\n\r\nnothing secret here\r\n"
QUICK = RetryPolicy(first_delay=60, max_delay=60, relay_first_delay=10, relay_max_delay=10)
WRONG_PASSWORD = "Wr0ng-but-St1ll-Secret"
SCRIPT = str(Path(sys.executable).parent / "mailspool")


def secret_forms(password: str) -> list[str]:
    """The password as it could leak: plain, and as AUTH PLAIN / LOGIN send it."""
    plain = base64.b64encode(f"\0{RELAY_USER}\0{password}".encode()).decode()
    return [password, plain, base64.b64encode(password.encode()).decode()]


def assert_no_secret(text: str, *passwords: str) -> None:
    for password in passwords:
        for form in secret_forms(password):
            assert form not in text, f"{form!r} leaked"


def exception_text(exc: BaseException) -> str:
    """Everything an exception shows: str, repr, args, attributes, the whole chain."""
    parts = traceback.format_exception(type(exc), exc, exc.__traceback__)
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen), repr(seen.args), repr(vars(seen))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """What mailspool (and smtplib, the standard library) logged; not the test relay."""
    records = [r for r in caplog.records if not r.name.startswith("mail.log")]
    return "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r} {caplog.handler.format(r)}" for r in records
    )


def commit(spool_path: str | Path, to: list[str], message: bytes = BODY) -> str:
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool_path, transaction_manager=tm)
    tm.begin()
    mid = delivery.send(SENDER, to, message)
    tm.commit()
    return mid


def auth_mailer(relay: Relay, password: str) -> SMTPMailer:
    return SMTPMailer(**relay.mailer_kwargs(password=password))


def spool_bytes(root: Path) -> bytes:
    """Every file under the spool, every area (tmp, trash and dot-files too)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out.append(path.read_bytes())
    return b"\n".join(out)


# --- the password ---------------------------------------------------------------------


class RefuseSome:
    """550 for ``bad@``, 450 for ``later@``: the spool then keeps reply texts."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address.startswith("bad@"):
            return "550 5.1.1 no such user"
        if address.startswith("later@"):
            return "450 4.2.0 greylisted"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"


def test_password_never_in_logs_exceptions_or_spool_files(
    tmp_path: Path,
    smtp_relay: RelayFactory,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    relay = smtp_relay(RefuseSome(), tls="starttls", auth=True)
    spool = Spool(tmp_path / "spool")
    caplog.set_level("DEBUG")
    # A full send with AUTH, through the spool and the processor; the spool
    # then holds a sent, a failed and a deferred recipient with their replies.
    commit(spool.path, ["ok@example.org", "bad@example.org", "later@example.org"])
    with QueueProcessor(spool, auth_mailer(relay, RELAY_PASSWORD), retry=QUICK) as p:
        assert p.process_once().deferred == 1
    assert len(relay.messages) == 1 and relay.auth_attempts == [("PLAIN", RELAY_USER)]
    # The same with a wrong password: refused, the relay paused, nothing failed.
    commit(spool.path, ["ok@example.org"])
    with QueueProcessor(spool, auth_mailer(relay, WRONG_PASSWORD), retry=QUICK) as p:
        assert p.process_once(now=time.time() + 3600).relay_paused
    # And the error a direct send raises.
    with pytest.raises(AuthenticationError) as info:
        auth_mailer(relay, WRONG_PASSWORD).send(SENDER, ["ok@example.org"], BODY)
    assert len(relay.auth_attempts) == 3
    out, err = capfd.readouterr()
    assert "535" in exception_text(info.value)  # the error says what went wrong...
    for text in (log_text(caplog), exception_text(info.value), out, err):
        assert_no_secret(text, RELAY_PASSWORD, WRONG_PASSWORD)  # ...never with what
    assert "authentication" in log_text(caplog).lower()
    files = spool_bytes(Path(spool.path))
    assert b"550 5.1.1" in files or b"550%205.1.1" in files  # the replies are kept there
    assert_no_secret(files.decode("latin-1"), RELAY_PASSWORD, WRONG_PASSWORD)


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
@pytest.mark.parametrize("password", [RELAY_PASSWORD, WRONG_PASSWORD])
def test_password_never_in_the_command_line_or_output_of_mailspool_run(
    tmp_path: Path, smtp_relay: RelayFactory, password: str
) -> None:
    relay = smtp_relay(tls="starttls", auth=True)
    assert relay.ca_file is not None
    queue = tmp_path / "spool"
    commit(queue, ["jane@example.org"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILSPOOL_")}
    env.update(
        MAILSPOOL_QUEUE=str(queue),
        MAILSPOOL_HOST=relay.host,
        MAILSPOOL_PORT=str(relay.port),
        MAILSPOOL_TLS="starttls",
        MAILSPOOL_CA_FILE=relay.ca_file,
        MAILSPOOL_USERNAME=RELAY_USER,
        MAILSPOOL_PASSWORD=password,
        MAILSPOOL_TIMEOUT="5",
    )
    with running([SCRIPT, "run", "-vv"], env) as proc:
        assert wait_for(lambda: bool(relay.auth_attempts), timeout=20), "no AUTH attempt"
        if password == RELAY_PASSWORD:
            assert wait_for(lambda: len(relay.messages) == 1, timeout=20)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        title = Path(f"/proc/{proc.pid}/comm").read_bytes()
        environ = os.stat(f"/proc/{proc.pid}/environ")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert b"run" in cmdline  # it is the right process...
    assert_no_secret(cmdline.decode(errors="replace"), password)  # ...without the password
    assert_no_secret(title.decode(errors="replace"), password)
    # The environment, where the password is, is readable by its owner only.
    assert environ.st_mode & 0o077 == 0
    if password == RELAY_PASSWORD:
        assert "DEBUG" in err  # -vv logged everything it logs...
    else:
        assert "535" in err  # the refusal was reported...
    assert_no_secret(out + err, password)  # ...never the password


# --- the spool's permissions ------------------------------------------------------------


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_spool_is_private_with_umask_000_after_every_rewrite(
    tmp_path: Path, smtp_relay: RelayFactory, umask_000: None
) -> None:
    relay = smtp_relay(RefuseSome())
    spool = Spool(tmp_path / "spool")
    root = Path(spool.path)
    commit(root, ["ok@example.org"])  # sent: removed
    commit(root, ["ok@example.org", "later@example.org"])  # rewritten into deferred/
    commit(root, ["bad@example.org"])  # rewritten into failed/
    held = commit(root, ["ok@example.org"])
    (entry,) = [e for e in spool.entries("ready") if e.message_id == held]
    spool.hold(entry.id)
    corrupt = os.open(root / "new" / "1.corrupt.host", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(corrupt, b"X-Mailspool: 1 5 5 00000000\r\ngarbage")
    os.close(corrupt)  # quarantined with a .reason file mailspool writes
    with QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), retry=QUICK) as p:
        s = p.process_once()
    assert (s.sent, s.deferred, s.failed, s.quarantined) == (1, 1, 1, 1)
    # A failed message retried by the operator is rewritten once more.
    (failed,) = list(spool.entries("failed"))
    spool.retry(failed.id)
    seen = {"dirs": 0, "files": 0}
    for dirpath, _dirs, files in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        seen["dirs"] += 1
        for name in files:
            try:
                mode = stat.S_IMODE(os.lstat(Path(dirpath) / name).st_mode)
            except FileNotFoundError:  # trash/ is emptied in the background
                continue
            assert mode == 0o600, f"{dirpath}/{name}: {mode:o}"
            seen["files"] += 1
    areas = {p.name for p in root.iterdir() if any(p.iterdir())}
    assert {"new", "deferred", "hold", "quarantine"} <= areas
    assert seen["dirs"] >= 9 and seen["files"] >= 5


def test_missing_parents_of_a_new_spool_are_not_world_writable(
    tmp_path: Path, umask_000: None
) -> None:
    Spool(tmp_path / "var" / "mail" / "spool")
    for parent in (tmp_path / "var", tmp_path / "var" / "mail"):
        # Whoever can write here can move the spool away and put their own in its place.
        assert stat.S_IMODE(os.stat(parent).st_mode) & 0o022 == 0, parent


# --- planted files ----------------------------------------------------------------------


def plant(kind: str, where: Path, tmp_path: Path) -> Path:
    """Put a symlink or a FIFO at ``where``; return what a follower would read."""
    target = tmp_path / "target"
    if kind == "symlink-to-a-spool-file":
        # A valid spool file, to a recipient of the attacker's choice.
        head, data = encode_file(
            Record("evil@example.net", (RecipientStatus("victim@example.net"),), 1.0),
            b"Subject: planted\r\nMessage-Id: <planted@example.net>\r\n\r\nPLANTED\r\n",
        )
        target.write_bytes(head + data)
        os.symlink(target, where)
    elif kind == "symlink-to-a-secret":
        target.write_bytes(b"root:SECRET-HASH:0:0\n")
        os.symlink(target, where)
    elif kind == "dangling-symlink":
        os.symlink(tmp_path / "nowhere", where)
    elif kind == "symlink-to-a-directory":
        target.mkdir()
        os.symlink(target, where)
    else:
        os.mkfifo(where, 0o600)
    return target


@pytest.mark.parametrize("area", ["new", "cur", "deferred"])
@pytest.mark.parametrize(
    "kind",
    [
        "symlink-to-a-spool-file",
        "symlink-to-a-secret",
        "dangling-symlink",
        "symlink-to-a-directory",
        "fifo",
    ],
)
def test_planted_symlink_or_fifo_is_quarantined_never_followed_never_hangs(
    tmp_path: Path, relay: Relay, area: str, kind: str
) -> None:
    spool = Spool(tmp_path / "spool")
    good = commit(spool.path, ["jane@example.org"])
    name = "1700000000.M1P1Q1R00000000.planted"
    where = Path(spool.path) / area / name
    target = plant(kind, where, tmp_path)
    before = target.read_bytes() if target.is_file() else None
    result: list[Any] = []
    with QueueProcessor(spool, SMTPMailer(**relay.mailer_kwargs()), retry=QUICK) as p:
        worker = threading.Thread(target=lambda: result.append(p.process_once()), daemon=True)
        worker.start()
        worker.join(15)
        assert not worker.is_alive(), f"the processor hung on a {kind} in {area}/"
    (summary,) = result
    assert summary.sent == 1 and summary.quarantined == 1
    # The good message went out, alone; the planted entry was set aside as it is.
    assert [message_id(m.content) for m in relay.messages] == [good]
    assert not any(b"PLANTED" in m.content or b"SECRET" in m.content for m in relay.messages)
    moved = Path(spool.path) / "quarantine" / name
    assert not os.path.lexists(where)
    if kind == "fifo":
        assert stat.S_ISFIFO(os.lstat(moved).st_mode)
    else:
        assert os.path.islink(moved)
    if before is not None:
        assert target.read_bytes() == before  # not followed, not rewritten
    (entry,) = list(spool.entries("quarantined"))
    assert entry.last_error  # with the reason, for the operator
    assert spool.counts()["quarantined"] == 1


# --- header injection -------------------------------------------------------------------

INJECTIONS = [
    "\r\nBcc: victim@evil.example",
    "\nBcc: victim@evil.example",
    "\rBcc: victim@evil.example",
    "\r\nRCPT TO:<victim@evil.example>",
    "\0",
]


def _message_with_id(value: str) -> Message:
    msg = Message()
    msg["Subject"] = "injection"
    msg["Message-Id"] = value
    msg.set_payload("body\n")
    return msg


def arguments(position: str, bad: str) -> tuple[str, Any, Any]:
    """send()'s (fromaddr, toaddrs, message) with ``bad`` injected at ``position``."""
    good_to = ["a@example.org", "b@example.org", "c@example.org"]
    if position == "fromaddr":
        return f"app@example.org{bad}", good_to, BODY
    if position == "display name of fromaddr":
        return f'"App{bad}" <app@example.org>', good_to, BODY
    if position.startswith("toaddrs["):
        i = int(position[8:-1])
        to = list(good_to)
        to[i] = f"{to[i]}{bad}"
        return SENDER, to, BODY
    if position == "display name of a toaddr":
        return SENDER, ["a@example.org", f"Victim{bad} <b@example.org>"], BODY
    if position == "toaddrs as one string":
        return SENDER, f"a@example.org{bad}", BODY
    assert position == "Message-Id of the message"
    return SENDER, good_to, _message_with_id(f"<id@example.org>{bad}")


POSITIONS = [
    "fromaddr",
    "display name of fromaddr",
    "toaddrs[0]",
    "toaddrs[1]",
    "toaddrs[2]",
    "display name of a toaddr",
    "toaddrs as one string",
    "Message-Id of the message",
]


@pytest.mark.parametrize("bad", INJECTIONS, ids=["crlf", "lf", "cr", "smtp", "nul"])
@pytest.mark.parametrize("position", POSITIONS)
def test_header_injection_is_refused_at_send_by_every_delivery(
    tmp_path: Path, relay: Relay, position: str, bad: str
) -> None:
    fromaddr, toaddrs, message = arguments(position, bad)
    tm = transaction.TransactionManager()
    spool = Spool(tmp_path / "spool")
    mailer = SMTPMailer(**relay.mailer_kwargs())
    queued = QueuedMailDelivery(spool.path, transaction_manager=tm)
    direct = DirectMailDelivery(mailer, transaction_manager=tm)
    tm.begin()
    for send in (queued.send, direct.send, mailer.send):
        with pytest.raises((InvalidAddress, InvalidMessage)):
            send(fromaddr, toaddrs, message)
    # Nothing joined: the transaction commits without a trace of it...
    tm.commit()
    assert sum(spool.counts().values()) == 0
    assert not any((Path(spool.path) / "tmp").iterdir())
    assert relay.messages == [] and "MAIL" not in relay.commands
    # ...and the same arguments without the injection go through.
    fromaddr, toaddrs, message = arguments(position, "")
    tm.begin()
    queued.send(fromaddr, toaddrs, message)
    tm.commit()
    assert spool.counts()["ready"] == 1


@pytest.mark.parametrize(
    "fromaddr, to",
    [
        ("app@example.org> NOTIFY=NEVER", "a@example.org"),
        ("app@example.org", "a@example.org> NOTIFY=NEVER"),
        ("app@example.org", "a@example.org ORCPT=rfc822;x@evil.example"),
        ("app@example.org SIZE=1", "a@example.org"),
        ("<app@example.org> BODY=8BITMIME", "a@example.org"),
    ],
)
def test_smtp_parameters_cannot_be_smuggled_through_an_address(
    relay: Relay, fromaddr: str, to: str
) -> None:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    with pytest.raises(InvalidAddress):
        mailer.send(fromaddr, [to], BODY)
    assert relay.commands == []  # refused before connecting


@pytest.mark.parametrize(
    "header, value",
    [
        ("Subject", "Hello\r\n\r\nInjected text where the body should start"),
        ("Subject", "Hello\nInjected line"),
        ("To", "a@example.org\r\nnot a header field"),
        ("Message-Id", "<id@example.org>\r\nRCPT TO:<victim@evil.example>"),
    ],
)
def test_a_line_break_in_a_header_value_of_a_message_object_is_refused(
    tmp_path: Path, header: str, value: str
) -> None:
    # Finding 5 of the torture run's checks (fixed): the text after the break
    # became a line of its own in the header block, or the start of the body.
    msg = Message()
    msg["X-Test"] = "header injection"
    msg[header] = value
    msg.set_payload("the real body\n")
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(tmp_path / "spool", transaction_manager=tm)
    tm.begin()
    with pytest.raises(InvalidMessage):
        delivery.send(SENDER, ["a@example.org"], msg)
