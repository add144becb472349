"""Group commit of the spool's directory fsync: fewer fsyncs, never a commit told
"durable" by an fsync that began before its rename."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import transaction

from mailspool import QueuedMailDelivery
from mailspool.maildir import groupsync
from mailspool.maildir.groupsync import DirectorySync

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def test_concurrent_commits_share_directory_fsyncs_and_all_arrive(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    threads, each = 8, 25
    start = threading.Barrier(threads)
    ids: list[str] = []
    lock = threading.Lock()

    def commit() -> None:
        tm = transaction.TransactionManager()
        delivery = QueuedMailDelivery(spool, transaction_manager=tm)
        start.wait()
        for _ in range(each):
            with tm:
                mid = delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
            with lock:
                ids.append(mid)

    workers = [threading.Thread(target=commit) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(ids) == threads * each
    assert len(list((spool / "new").iterdir())) == threads * each
    group = groupsync._dirs[str(spool / "new") + "/"]
    assert group.commits >= threads * each
    assert group.fsyncs <= group.commits  # never more fsyncs than commits


def test_a_commit_waits_for_an_fsync_that_began_after_its_rename() -> None:
    group = DirectorySync()
    began = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    def slow_fsync() -> None:
        calls.append("fsync")
        if len(calls) == 1:
            began.set()
            assert release.wait(10)

    first = threading.Thread(target=group.sync, args=(slow_fsync,))
    first.start()
    assert began.wait(10)
    # A second rename registered while the first fsync runs: that fsync
    # may have begun before it reached the directory, so it must not count.
    done = threading.Event()

    def second() -> None:
        group.sync(slow_fsync)
        done.set()

    t = threading.Thread(target=second)
    t.start()
    assert not done.wait(0.2)
    release.set()
    first.join(10)
    t.join(10)
    assert done.is_set()
    assert calls == ["fsync", "fsync"]


def test_a_failed_fsync_fails_the_commits_it_was_to_cover_and_not_the_next() -> None:
    group = DirectorySync()

    def broken() -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError, match="Input/output"):
        group.sync(broken)
    ok: list[Any] = []
    group.sync(lambda: ok.append(1))
    assert ok == [1]
    assert (group.fsyncs, group.commits) == (2, 2)


def test_a_full_disk_at_the_directory_fsync_fails_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mock: no real file system fails exactly this fsync on demand.
    from mailspool.maildir.directory import SpoolDir

    def failing(self: Any, area: str) -> None:
        raise OSError(5, "Input/output error")

    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(tmp_path / "spool", transaction_manager=tm)
    monkeypatch.setattr(SpoolDir, "_fsync_dir", failing)
    with pytest.raises(OSError, match="Input/output"), tm:
        delivery.send("app@example.org", ["jane@example.org"], MESSAGE)
