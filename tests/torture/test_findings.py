"""What the torture run found, each reduced to a deterministic test.

Each test states the behaviour docs/guarantees.md promises and failed on
the code the run found the defect in (findings 1 to 3 there); all three are
fixed, and these are their regression tests.  A defect found later gets its
test here first, marked ``xfail(strict=True)`` until it is fixed.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import transaction

from _fs import tmpfs
from _relays import FillDiskThenAccept, message_id
from conftest import Relay, RelayFactory
from mailspool import QueuedMailDelivery, QueueProcessor, SMTPMailer
from mailspool.errors import SpoolError
from mailspool.maildir.spool import Spool
from mailspool.processor.loop import RetryPolicy

QUICK = RetryPolicy(first_delay=60, max_delay=60, relay_first_delay=10, relay_max_delay=10)
SENDER = "app@example.org"
MESSAGE = b"Subject: finding\r\nFrom: app@example.org\r\n\r\nbody\r\n"


def processor(spool: Spool, relay: Relay) -> QueueProcessor:
    mailer = SMTPMailer(**relay.mailer_kwargs())
    return QueueProcessor(spool, mailer, connections=1, retry=QUICK, watch=False)


def commit(spool: Spool, to: list[str]) -> str:
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool.path, transaction_manager=tm)
    tm.begin()
    mid = delivery.send(SENDER, to, MESSAGE)
    tm.commit()
    return mid


class GreylistOneThenRefuseData:
    """450 at RCPT for ``grey`` (the first time), 554 for the data of the others."""

    def __init__(self, grey: str) -> None:
        self.grey = grey
        self.seen = False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address == self.grey and not self.seen:
            self.seen = True
            return "450 4.2.0 greylisted"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "554 5.6.0 content refused"


def test_data_refusal_fails_only_the_recipients_it_answered_for(
    tmp_path: Path, smtp_relay: RelayFactory
) -> None:
    relay = smtp_relay(GreylistOneThenRefuseData("later@example.org"))
    spool = Spool(tmp_path / "spool")
    commit(spool, ["now@example.org", "later@example.org"])
    with processor(spool, relay) as p:
        p.process_once()
    (entry,) = list(spool.entries())
    status = {r.address: (r.status, r.code) for r in entry.recipients}
    assert status["now@example.org"] == ("failed", 554)
    # The 554 answered for the recipients accepted at RCPT only; the one
    # greylisted there was never part of that transaction (finding 1).
    assert status["later@example.org"] == ("pending", 450)
    assert entry.state == "deferred"


def test_failed_directory_fsync_is_not_a_successful_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool")

    def broken(self: Spool, area: str) -> None:
        # What ext4 answers once the disk is gone (a mock: no real part
        # fails a directory fsync on demand between two system calls).
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(Spool, "_fsync_dir", broken)
    caplog.set_level(logging.CRITICAL, logger="mailspool")
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool.path, transaction_manager=tm)
    tm.begin()
    delivery.send(SENDER, ["jane@example.org"], MESSAGE)
    # The message is not known to be on disk: the caller must not be told
    # that it was committed (finding 2 of the torture run).
    with pytest.raises(SpoolError, match="EIO"):
        tm.commit()
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


def test_outcome_written_to_a_full_spool_does_not_resend_accepted_recipients(
    tmp_path: Path, smtp_relay: RelayFactory
) -> None:
    with tmpfs(tmp_path / "disk", size="1m") as disk:
        spool = Spool(disk / "spool")
        handler = FillDiskThenAccept(disk)
        relay = smtp_relay(handler)
        commit(spool, ["now@example.org", "later@example.org"])
        with processor(spool, relay) as p:
            p.process_once()  # now: 250; later: 450; the deferral cannot be written
        with contextlib.suppress(FileNotFoundError):
            (disk / "filler").unlink()
        with processor(spool, relay) as p:
            p.process_once(now=2e9)  # far later: everything due
        # Finding 3: the claim was released unchanged and "now" sent again.
        got = collections.Counter(r for m in relay.messages for r in m.rcpt_tos)
        assert got["later@example.org"] == 1
        assert len({message_id(m.content) for m in relay.messages}) == 1
        assert got["now@example.org"] == 1  # accepted once: never sent again
