"""``mailspool send``: addresses from the headers and the arguments arrive as written.

Non-ASCII addresses are UTF-8 and go out with SMTPUTF8; bytes that are not
UTF-8 are refused with one line naming where they are, never turned into
replacement characters.  A bad item of an address list is named whole.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from conftest import Relay
from mailspool.cli.main import main
from mailspool.maildir.spool import Spool


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSPOOL_QUEUE", "MAILSPOOL_CONFIG", "MAILSPOOL_PASSWORD", "MAILSPOOL_HOST"):
        monkeypatch.delenv(name, raising=False)


def send(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    queue: Path,
    data: bytes,
    *argv: str,
) -> tuple[int, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code = main(["send", *argv, "--queue", str(queue)])
    return code, capsys.readouterr().err


def test_utf8_addresses_from_headers_arrive_exactly(
    relay: Relay,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue = tmp_path / "spool"
    data = (
        "From: Rémi <rémi@example.org>\n"
        "To: jörg@example.org\n"
        'Cc: "Doe, Jane" <jane@example.org> (the boss), 用户@例子.广告\n'
        "Subject: x\n\nbody\n"
    ).encode()
    code, err = send(monkeypatch, capsys, queue, data, "-t")
    assert code == 0, err
    (entry,) = Spool(queue).entries()
    assert entry.sender == "rémi@example.org"
    assert [r.address for r in entry.recipients] == [
        "jörg@example.org",
        "jane@example.org",
        "用户@例子.广告",
    ]
    where = ["--host", relay.host, "--port", str(relay.port), "--tls", "none"]
    code = main(["drain", "--queue", str(queue), *where, "--timeout", "5"])
    assert code == 0, capsys.readouterr().err
    (got,) = relay.messages
    assert got.smtp_utf8
    assert got.mail_from == "rémi@example.org"
    assert got.rcpt_tos == ["jörg@example.org", "jane@example.org", "用户@例子.广告"]
    assert "\ufffd" not in got.mail_from + "".join(got.rcpt_tos)


@pytest.mark.parametrize("header", ["To", "Cc", "Bcc", "From"])
def test_latin1_address_header_is_refused_naming_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    header: str,
) -> None:
    queue = tmp_path / "spool"
    to = b"" if header == "To" else b"To: ok@example.org\n"
    data = to + header.encode() + b": j\xf6rg@example.org\nSubject: x\n\nbody\n"
    code, err = send(monkeypatch, capsys, queue, data, "-t")
    assert code == 1
    assert err == (
        f"mailspool: send: the {header} header is not valid UTF-8 "
        "('j\\xf6rg@example.org'); write its addresses in UTF-8\n"
    )
    assert not queue.exists() or not list(Spool(queue).entries())


@pytest.mark.parametrize("where", ["-f", "recipient"])
def test_address_argument_that_is_not_utf8_is_one_clean_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    queue = tmp_path / "spool"
    latin1 = b"j\xf6rg@example.org".decode("utf-8", "surrogateescape")  # as sys.argv holds it
    argv = ["-f", latin1, "ok@example.org"] if where == "-f" else [latin1]
    code, err = send(monkeypatch, capsys, queue, b"Subject: x\n\nbody\n", *argv)
    assert code == 1
    assert err == (
        f"mailspool: send: {where}: invalid address 'j\\xf6rg@example.org': not valid UTF-8\n"
    )


@pytest.mark.parametrize(
    ("to", "text"),
    [
        (
            "good@example.org, not an address",
            "To: invalid address 'not an address': no '@' and domain",
        ),
        ("a@b@c", "To: invalid address 'a@b@c': it has two '@'"),
        ("friends: a@example.org, x y@example.org;", "invalid address 'x y@example.org'"),
    ],
)
def test_a_bad_item_of_an_address_list_is_named_whole(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    to: str,
    text: str,
) -> None:
    queue = tmp_path / "spool"
    data = f"To: {to}\nSubject: x\n\nbody\n".encode()
    code, err = send(monkeypatch, capsys, queue, data, "-t")
    assert code == 1
    assert err.startswith("mailspool: send: ") and err.count("\n") == 1
    assert text in err


def test_groups_and_folded_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    data = (
        b"To: undisclosed-recipients:;\n"
        b"Cc: team: a@example.org,\n  b@example.org;, <c@[192.0.2.1]>\n"
        b"Subject: x\n\nbody\n"
    )
    code, err = send(monkeypatch, capsys, queue, data, "-t")
    assert code == 0, err
    (entry,) = Spool(queue).entries()
    assert [r.address for r in entry.recipients] == [
        "a@example.org",
        "b@example.org",
        "c@[192.0.2.1]",
    ]
