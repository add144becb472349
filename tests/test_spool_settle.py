"""Settling a claim when every recipient was accepted: the file just goes.

``Claim.settle`` takes a short cut for that common case (no new record is
built); these tests pin down that the short cut is taken only when
``settle_record`` would say ``"removed"`` as well.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _relays import enqueue
from mailspool.maildir.fileformat import FAILED, SENT, RecipientStatus, Record
from mailspool.maildir.lifecycle import all_sent, settle_record
from mailspool.maildir.spool import Spool

A, B, C = "a@example.org", "b@example.org", "c@example.org"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def record(*recipients: RecipientStatus) -> Record:
    return Record("s@example.org", recipients, 1.0)


@pytest.mark.parametrize(
    ("rec", "sent"),
    [
        (record(RecipientStatus(A), RecipientStatus(B)), [A, B]),
        (record(RecipientStatus(A), RecipientStatus(B)), [A]),
        (record(RecipientStatus(A, SENT), RecipientStatus(B)), [B]),
        (record(RecipientStatus(A, FAILED, 550, "no"), RecipientStatus(B)), [B]),
        (record(RecipientStatus(A)), [A, A]),
        (record(RecipientStatus(A)), []),
    ],
)
def test_all_sent_agrees_with_settle_record(rec: Record, sent: list[str]) -> None:
    assert all_sent(rec, sent) == (settle_record(rec, sent)[1] == "removed")


def test_all_sent_is_false_for_an_address_that_is_not_pending() -> None:
    assert not all_sent(record(RecipientStatus(A)), [A, B])
    assert not all_sent(record(RecipientStatus(A, SENT), RecipientStatus(B)), [A, B])


def test_settling_everything_sent_removes_the_file(spool: Spool) -> None:
    enqueue(spool, 1, to=[A, B])
    (entry,) = spool.entries()
    claim = spool.claim(entry.id)
    assert claim is not None
    # Any iterable will do, a generator too (it is read more than once inside).
    assert claim.settle(sent=(a for a in (B, A))) == "removed"
    assert not claim.held
    assert sum(spool.counts().values()) == 0


def test_the_rest_sent_after_one_failed_is_failed_not_removed(spool: Spool) -> None:
    enqueue(spool, 1, to=[A, B, C])
    (entry,) = spool.entries()
    claim = spool.claim(entry.id)
    assert claim is not None
    outcome = claim.settle(failed={A: (550, "no such user")}, deferred={B: (451, "later")})
    assert outcome == "deferred"
    # Claimed again as the processor would once it is due (a retry by an
    # operator would make A pending again).
    claim = spool.claim(entry.id)
    assert claim is not None and claim.envelope.recipients == (B, C)
    assert claim.settle(sent=[B, C]) == "failed"
    failed = spool.get(entry.id)
    assert failed.state == "failed" and failed.attempts == 2
    assert [(r.address, r.status, r.code) for r in failed.recipients] == [
        (A, "failed", 550),
        (B, "sent", None),
        (C, "sent", None),
    ]


def test_an_unknown_address_is_still_refused(spool: Spool) -> None:
    enqueue(spool, 1, to=[A])
    (entry,) = spool.entries()
    claim = spool.claim(entry.id)
    assert claim is not None
    with pytest.raises(ValueError, match="not pending"):
        claim.settle(sent=[A, B])
    assert claim.held  # nothing changed
    claim.release()
    assert spool.counts()["ready"] == 1
