"""The queue verbs say what they mean, and the delivering verbs' exit codes tell it all.

Real spools in tmp_path, a real aiosmtpd relay (``smtp_relay`` in
conftest.py), the command through main(argv).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from _relays import PerRecipient
from conftest import Relay, RelayFactory
from mailspool.cli.main import main
from mailspool.maildir.fileformat import decode_file, encode_file
from mailspool.maildir.spool import Spool
from test_cli import enqueue


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MAILSPOOL_QUEUE", "MAILSPOOL_CONFIG", "MAILSPOOL_PASSWORD", "MAILSPOOL_HOST"):
        monkeypatch.delenv(name, raising=False)


def relay_argv(relay: Relay, queue: Path) -> list[str]:
    where = ["--host", relay.host, "--port", str(relay.port), "--tls", "none"]
    return ["--queue", str(queue), *where, "--timeout", "5"]


def plant_symlink(queue: Path, tmp_path: Path) -> str:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not for the relay\n")
    name = "1.M1P1Q1R00000000.planted"
    os.symlink(target, queue / "new" / name)
    return name


@pytest.mark.parametrize("verb", [["drain"], ["run", "--once"]])
def test_a_quarantined_message_makes_drain_and_run_once_exit_1(
    relay: Relay,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    verb: list[str],
) -> None:
    queue = tmp_path / "spool"
    enqueue(queue, "good")
    plant_symlink(queue, tmp_path)
    code = main([*verb, *relay_argv(relay, queue)])
    out = capsys.readouterr().out
    assert out.endswith("1 sent, 0 deferred, 0 failed, 1 quarantined\n")
    assert code == 1
    assert len(relay.messages) == 1


def test_a_symlink_in_the_spool_is_called_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    enqueue(queue, "good")
    name = plant_symlink(queue, tmp_path)
    assert main(["list", "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert "it is a symbolic link, which the spool never follows or sends" in out
    assert "Too many levels" not in out
    assert Spool(queue).claim(name) is None  # quarantined, with the same words
    assert main(["show", name, "--queue", str(queue)]) == 0
    out = capsys.readouterr().out
    assert "state:        quarantined" in out and "it is a symbolic link" in out


def test_retry_makes_the_failed_recipients_of_a_deferred_message_pending(
    smtp_relay: RelayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = PerRecipient(
        {"gone@example.org": "550 5.1.1 no such user", "full@example.org": "452 4.2.2 full"}
    )
    relay = smtp_relay(handler)
    queue = tmp_path / "spool"
    (id,) = enqueue(queue, "x", to=("gone@example.org", "full@example.org", "ok@example.org"))
    assert main(["drain", *relay_argv(relay, queue)]) == 1
    entry = Spool(queue).get(id)
    assert entry.state == "deferred"
    assert [r.status for r in entry.recipients] == ["failed", "pending", "sent"]

    assert main(["retry", id, "--queue", str(queue)]) == 0
    assert capsys.readouterr().out.endswith(f"{id}: ready\n")
    entry = Spool(queue).get(id)
    assert entry.state == "ready"
    assert [r.status for r in entry.recipients] == ["pending", "pending", "sent"]

    handler.replies.clear()
    assert main(["drain", *relay_argv(relay, queue)]) == 0
    assert [m.rcpt_tos for m in relay.messages] == [
        ["ok@example.org"],
        ["gone@example.org", "full@example.org"],
    ]


def test_release_of_a_message_that_is_not_held_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue = tmp_path / "spool"
    (id,) = enqueue(queue, "x")
    assert main(["release", id, "--queue", str(queue)]) == 1
    assert capsys.readouterr().err == (
        f"mailspool: {id}: not held (it is ready): nothing to release\n"
    )


def test_list_is_oldest_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    queue = tmp_path / "spool"
    ids = enqueue(queue, "first", "second", "third")
    Spool(queue).hold(ids[2])  # another state: listed by age all the same
    for n, id in enumerate(ids):  # the order of the names is the reverse of their age
        path = queue / ("hold" if n == 2 else "new") / id
        record, data = decode_file(path.read_bytes())
        head, data = encode_file(replace(record, queued_at=1.7e9 + 100 * (2 - n)), data)
        path.write_bytes(head + data)
    assert main(["list", "--queue", str(queue), "--json"]) == 0
    listed = [e["id"] for e in json.loads(capsys.readouterr().out)]
    assert listed == [ids[2], ids[1], ids[0]]
    assert main(["list", "--queue", str(queue)]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert lines == [ids[2], ids[1], ids[0]]


def test_an_unwritten_outcome_is_not_blamed_on_a_full_disk() -> None:
    # The spool may refuse an outcome for any reason (EACCES as well as
    # ENOSPC); the log line says which, with the path: the summary must not guess.
    from mailspool import Summary
    from mailspool.cli.common import summary_code, summary_line

    summary = Summary(unwritten=1)
    assert "full" not in summary_line(summary)
    assert "the log above says why" in summary_line(summary)
    assert summary_code(summary) == 1
