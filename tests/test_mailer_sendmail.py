"""SendmailMailer, against a small fake sendmail program that records what it got."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from mailspool import SendmailMailer
from mailspool.errors import (
    InvalidAddress,
    InvalidMessage,
    PermanentError,
    RelayUnavailable,
    SMTPTimeout,
    TransientError,
)
from mailspool.interfaces import IMailer, ISendmailMailer
from mailspool.message import make_envelope

FAKE = """\
#!{python}
import json, pathlib, sys, time
here = pathlib.Path(__file__).parent
(here / "argv.json").write_text(json.dumps(sys.argv))
(here / "stdin").write_bytes(sys.stdin.buffer.read())
behaviour = here / "behaviour.json"
if behaviour.exists():
    b = json.loads(behaviour.read_text())
    time.sleep(b.get("sleep", 0))
    sys.stderr.write(b.get("stderr", ""))
    sys.exit(b.get("exit", 0))
"""


class FakeSendmail:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.path = directory / "sendmail"
        self.path.write_text(FAKE.format(python=sys.executable))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR)

    def behave(self, **behaviour: object) -> None:
        (self.dir / "behaviour.json").write_text(json.dumps(behaviour))

    @property
    def argv(self) -> list[str]:
        result: list[str] = json.loads((self.dir / "argv.json").read_text())
        return result

    @property
    def stdin(self) -> bytes:
        return (self.dir / "stdin").read_bytes()


@pytest.fixture
def fake(tmp_path: Path) -> FakeSendmail:
    return FakeSendmail(tmp_path)


def test_provides_the_interfaces(fake: FakeSendmail) -> None:
    mailer = SendmailMailer(fake.path)
    assert verifyObject(ISendmailMailer, mailer) and verifyObject(IMailer, mailer)


def test_pipes_the_message_with_the_envelope_on_the_command_line(fake: FakeSendmail) -> None:
    mailer = SendmailMailer(fake.path)
    result = mailer.send(
        "Sender <sender@example.org>",
        ["a@example.org", '"Doe, Jane" <jane@example.org>'],
        "Subject: hi\r\n\r\nline\n.\n.dot\r\nend",
    )
    assert result.accepted == ("a@example.org", "jane@example.org")
    assert dict(result.refused) == {} and result.reply is None
    assert fake.argv[1:] == [
        "-i",
        "-f",
        "sender@example.org",
        "--",
        "a@example.org",
        "jane@example.org",
    ]
    # Local programs get LF line endings; -i keeps lone dots as they are.
    assert fake.stdin == b"Subject: hi\n\nline\n.\n.dot\nend\n"


def test_addresses_that_look_like_options_stay_arguments(fake: FakeSendmail) -> None:
    SendmailMailer(fake.path, args=["-oi"]).send("-bs@example.org", ["-t@example.org"], b"x\r\n")
    assert fake.argv[1:] == ["-i", "-oi", "-f", "-bs@example.org", "--", "-t@example.org"]


@pytest.mark.parametrize(
    ("status", "kind", "transient"),
    [
        (75, TransientError, True),  # EX_TEMPFAIL
        (74, TransientError, True),  # EX_IOERR
        (67, PermanentError, False),  # EX_NOUSER
        (65, PermanentError, False),  # EX_DATAERR
        (69, RelayUnavailable, True),  # EX_UNAVAILABLE
        (1, TransientError, True),  # unknown: retry rather than lose
    ],
)
def test_exit_status_is_classified(
    fake: FakeSendmail, status: int, kind: type[Exception], transient: bool
) -> None:
    fake.behave(exit=status, stderr="queue file write error\n")
    with pytest.raises(kind) as info:
        SendmailMailer(fake.path).send("a@example.org", ["b@example.org"], b"x\r\n")
    assert info.value.transient is transient  # type: ignore[attr-defined]
    assert f"exit status {status}" in str(info.value)
    assert "queue file write error" in str(info.value)


def test_missing_binary_is_relay_unavailable(tmp_path: Path) -> None:
    mailer = SendmailMailer(tmp_path / "no-sendmail")
    with pytest.raises(RelayUnavailable, match="cannot run"):
        mailer.send("a@example.org", ["b@example.org"], b"x\r\n")
    with pytest.raises(RelayUnavailable, match="not an executable"):
        mailer.vote("a@example.org", ["b@example.org"], b"x\r\n")


def test_vote_validates_and_abort_does_nothing(fake: FakeSendmail) -> None:
    mailer = SendmailMailer(fake.path)
    mailer.vote("a@example.org", ["b@example.org"], b"x\r\n")
    with pytest.raises(InvalidAddress):
        mailer.vote("a@example.org", ["not an address"], b"x\r\n")
    mailer.abort()
    assert not (fake.dir / "argv.json").exists()  # nothing was run


def test_a_hanging_sendmail_is_killed(fake: FakeSendmail) -> None:
    fake.behave(sleep=10)
    with pytest.raises(SMTPTimeout, match="did not finish"):
        SendmailMailer(fake.path, timeout=0.5).send("a@example.org", ["b@example.org"], b"x\r\n")


def test_fast_path_checks_the_data_like_send(fake: FakeSendmail) -> None:
    mailer = SendmailMailer(fake.path)
    envelope = make_envelope("a@example.org", ["b@example.org"])
    with pytest.raises(InvalidMessage, match="998"):
        mailer.send_envelope(envelope, b"Subject: x\r\n\r\n" + b"y" * 2000 + b"\r\n")
    assert not (fake.dir / "argv.json").exists()  # never run with broken data
    mailer.send_envelope(envelope, b"Subject: x\r\n\r\nbare\nlf")
    assert fake.stdin == b"Subject: x\n\nbare\nlf\n"
