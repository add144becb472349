"""QueuedMailDelivery with a real transaction manager and a real spool."""

from __future__ import annotations

import mailbox
import os
import time
from pathlib import Path
from typing import Any

import pytest
import transaction
import zope.event
from zope.interface.verify import verifyObject

from _fs import fill, remount_readonly, tmpfs
from mailspool import QueuedMailDelivery, Spool
from mailspool.errors import InvalidAddress, InvalidMessage, SpoolError
from mailspool.events import MailQueued
from mailspool.interfaces import IQueuedMailDelivery

MSG = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nhello\r\n"


@pytest.fixture
def tm() -> transaction.TransactionManager:
    return transaction.TransactionManager()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def ready_ids(spool_dir: Path) -> list[str | None]:
    return sorted(e.message_id for e in Spool(spool_dir).entries("ready"))  # type: ignore[type-var]


def files_in(spool_dir: Path, area: str) -> list[str]:
    d = spool_dir / area
    return sorted(os.listdir(d)) if d.exists() else []


def test_provides_the_classic_interface(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    assert verifyObject(IQueuedMailDelivery, d)
    assert d.queuePath == str(spool_dir)


def test_commit_writes_the_message_and_returns_its_id(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    tm.begin()
    mid = d.send("a@example.org", ["b@example.org"], MSG)
    assert files_in(spool_dir, "new") == []  # nothing visible before commit
    tm.commit()
    assert ready_ids(spool_dir) == [mid]
    assert files_in(spool_dir, "tmp") == []
    # A standard Maildir reader sees it, with our Message-Id.
    md = mailbox.Maildir(str(spool_dir), create=False)
    msgs = list(md)
    assert len(msgs) == 1
    assert msgs[0]["Message-Id"] == f"<{mid}>"
    assert msgs[0]["Subject"] == "hi"


def test_abort_leaves_nothing(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    tm.begin()
    d.send("a@example.org", ["b@example.org"], MSG)
    tm.abort()
    assert files_in(spool_dir, "new") == []
    assert files_in(spool_dir, "tmp") == []


def test_keeps_a_given_message_id(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    tm.begin()
    mid = d.send("a@example.org", "b@example.org", b"Message-ID: <abc.1@example.org>\r\n\r\nx")
    tm.commit()
    assert mid == "abc.1@example.org"
    assert ready_ids(spool_dir) == ["abc.1@example.org"]


@pytest.mark.parametrize(
    ("fromaddr", "toaddrs", "bad"),
    [
        ("a@example.org", ["b@example.org", "evil@x.org\r\nBcc: all@x.org"], "evil@x.org"),
        ("not an address", ["b@example.org"], "not an address"),
        ("a@example.org", [], "[]"),
    ],
)
def test_bad_address_raises_at_send_and_joins_nothing(
    spool_dir: Path, tm: Any, fromaddr: str, toaddrs: list[str], bad: str
) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    txn = tm.begin()
    with pytest.raises(InvalidAddress) as info:
        d.send(fromaddr, toaddrs, MSG)
    assert bad in str(info.value)
    with pytest.raises(KeyError):
        txn.data(d)
    tm.commit()
    assert files_in(spool_dir, "new") == []


def test_malformed_message_id_raises_at_send(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    tm.begin()
    with pytest.raises(InvalidMessage, match="Message-Id"):
        d.send("a@example.org", ["b@example.org"], b"Message-Id: no-brackets\r\n\r\nx")
    tm.abort()


def test_savepoints_roll_back_exactly_the_later_messages(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    txn = tm.begin()
    a = d.send("a@example.org", ["b@example.org"], MSG)
    sp1 = txn.savepoint()
    b = d.send("a@example.org", ["b@example.org"], MSG)
    sp2 = txn.savepoint()
    c = d.send("a@example.org", ["b@example.org"], MSG)
    d.send("a@example.org", ["b@example.org"], MSG)
    sp2.rollback()
    e = d.send("a@example.org", ["b@example.org"], MSG)
    sp3 = txn.savepoint()
    d.send("a@example.org", ["b@example.org"], MSG)
    sp3.rollback()
    tm.commit()
    assert ready_ids(spool_dir) == sorted([a, b, e])
    assert c not in ready_ids(spool_dir)
    del sp1


def test_rollback_to_first_savepoint_drops_all_after_it(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    txn = tm.begin()
    a = d.send("a@example.org", ["b@example.org"], MSG)
    sp1 = txn.savepoint()
    d.send("a@example.org", ["b@example.org"], MSG)
    txn.savepoint()
    d.send("a@example.org", ["b@example.org"], MSG)
    sp1.rollback()
    tm.commit()
    assert ready_ids(spool_dir) == [a]


def test_many_messages_in_one_transaction(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    tm.begin()
    ids = [d.send("a@example.org", [f"r{i}@example.org"], MSG) for i in range(50)]
    tm.commit()
    assert ready_ids(spool_dir) == sorted(ids)
    assert len(set(ids)) == 50


class FailingVote:
    """A second resource in the same transaction that vetoes the commit."""

    def __init__(self, tm: Any, key: str) -> None:
        self.transaction_manager = tm
        self.key = key
        self.aborted = False

    def sortKey(self) -> str:
        return self.key

    def abort(self, txn: Any) -> None:
        self.aborted = True

    def tpc_begin(self, txn: Any) -> None:
        pass

    def commit(self, txn: Any) -> None:
        pass

    def tpc_vote(self, txn: Any) -> None:
        raise RuntimeError("database says no")

    def tpc_finish(self, txn: Any) -> None:
        raise AssertionError("must not be reached")

    def tpc_abort(self, txn: Any) -> None:
        self.aborted = True


@pytest.mark.parametrize("key", ["0-before", "~~~-after"])
def test_a_failing_second_resource_leaves_no_mail(spool_dir: Path, tm: Any, key: str) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    txn = tm.begin()
    d.send("a@example.org", ["b@example.org"], MSG)
    other = FailingVote(tm, key)
    txn.join(other)
    with pytest.raises(RuntimeError, match="database says no"):
        tm.commit()
    tm.abort()
    assert other.aborted
    assert files_in(spool_dir, "new") == []
    assert files_in(spool_dir, "tmp") == []


def test_full_disk_aborts_the_commit_cleanly(tmp_path: Path, tm: Any) -> None:
    with tmpfs(tmp_path / "small", size="256k") as mnt:
        spool_dir = mnt / "spool"
        d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
        fill(mnt)
        tm.begin()
        d.send("a@example.org", ["b@example.org"], MSG + b"0123456789\r\n" * 2000)
        with pytest.raises(SpoolError) as info:
            tm.commit()
        tm.abort()
        assert "space" in str(info.value).lower()
        assert files_in(spool_dir, "new") == []
        assert files_in(spool_dir, "tmp") == []
        # Once there is room again, the next transaction goes through.
        os.unlink(mnt / "filler")
        tm.begin()
        mid = d.send("a@example.org", ["b@example.org"], MSG)
        tm.commit()
        assert ready_ids(spool_dir) == [mid]


def test_read_only_spool_aborts_the_commit_cleanly(tmp_path: Path, tm: Any) -> None:
    with tmpfs(tmp_path / "ro", size="1m") as mnt:
        spool_dir = mnt / "spool"
        d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
        remount_readonly(mnt)
        tm.begin()
        d.send("a@example.org", ["b@example.org"], MSG)
        with pytest.raises(SpoolError) as info:
            tm.commit()
        tm.abort()
        assert "read-only" in str(info.value).lower()
        assert files_in(spool_dir, "new") == []


def test_send_later_keeps_the_message_until_then(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    later = time.time() + 3600
    tm.begin()
    mid = d.send("a@example.org", ["b@example.org"], MSG, not_before=later)
    tm.commit()
    spool = Spool(spool_dir)
    assert list(spool.due()) == []
    assert [e.message_id for e in spool.entries("deferred")] == [mid]
    assert len(list(spool.due(now=later + 1))) == 1


def test_queued_event_fires_after_commit_only(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
    seen: list[tuple[str | None, list[str]]] = []

    def subscriber(event: object) -> None:
        if isinstance(event, MailQueued):
            # The file is already visible when the event arrives.
            seen.append((event.message_id, ready_ids(spool_dir)))  # type: ignore[arg-type]

    zope.event.subscribers.append(subscriber)
    try:
        tm.begin()
        d.send("a@example.org", ["b@example.org"], MSG)
        tm.abort()
        assert seen == []
        tm.begin()
        mid = d.send("a@example.org", ["b@example.org"], MSG)
        assert seen == []
        tm.commit()
    finally:
        zope.event.subscribers.remove(subscriber)
    assert seen == [(mid, [mid])]


def test_a_subscriber_can_commit_its_own_transaction(spool_dir: Path) -> None:
    # The thread's default manager, as applications use it.
    d = QueuedMailDelivery(spool_dir)
    followups: list[str] = []

    def subscriber(event: object) -> None:
        if isinstance(event, MailQueued) and not followups:
            with transaction.manager:
                followups.append(d.send("a@example.org", ["audit@example.org"], MSG))

    zope.event.subscribers.append(subscriber)
    try:
        transaction.begin()
        first = d.send("a@example.org", ["b@example.org"], MSG)
        transaction.commit()
    finally:
        zope.event.subscribers.remove(subscriber)
    assert len(followups) == 1
    assert ready_ids(spool_dir) == sorted([first, followups[0]])
    # The thread's manager is usable afterwards.
    transaction.begin()
    third = d.send("a@example.org", ["c@example.org"], MSG)
    transaction.commit()
    assert third in ready_ids(spool_dir)


def test_a_failing_subscriber_does_not_fail_the_commit(spool_dir: Path, tm: Any) -> None:
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm)

    def subscriber(event: object) -> None:
        raise RuntimeError("subscriber bug")

    zope.event.subscribers.append(subscriber)
    try:
        tm.begin()
        mid = d.send("a@example.org", ["b@example.org"], MSG)
        tm.commit()
    finally:
        zope.event.subscribers.remove(subscriber)
    assert ready_ids(spool_dir) == [mid]


def test_on_commit_wakes_a_listener(spool_dir: Path, tm: Any) -> None:
    calls: list[int] = []
    d = QueuedMailDelivery(spool_dir, transaction_manager=tm, on_commit=lambda: calls.append(1))
    tm.begin()
    d.send("a@example.org", ["b@example.org"], MSG)
    tm.abort()
    assert calls == []
    tm.begin()
    d.send("a@example.org", ["b@example.org"], MSG)
    tm.commit()
    assert calls == [1]


def test_spool_permissions_whatever_the_umask(tmp_path: Path, tm: Any) -> None:
    old = os.umask(0)
    try:
        spool_dir = tmp_path / "spool"
        d = QueuedMailDelivery(spool_dir, transaction_manager=tm)
        tm.begin()
        d.send("a@example.org", ["b@example.org"], MSG)
        tm.commit()
    finally:
        os.umask(old)
    assert (spool_dir.stat().st_mode & 0o777) == 0o700
    for area in ("tmp", "new", "cur"):
        assert ((spool_dir / area).stat().st_mode & 0o777) == 0o700
    (name,) = files_in(spool_dir, "new")
    assert ((spool_dir / "new" / name).stat().st_mode & 0o777) == 0o600
