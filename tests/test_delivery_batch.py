"""stage_many: concurrent fsyncs, and a failure leaves nothing behind."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import transaction

from _fs import tmpfs
from mailspool import QueuedMailDelivery, Spool
from mailspool.errors import SpoolError


def _send(tm: transaction.TransactionManager, d: QueuedMailDelivery, n: int) -> None:
    tm.begin()
    for i in range(n):
        d.send("a@example.org", [f"r{i}@example.org"], f"Subject: {i}\r\n\r\nbody\r\n")


def test_a_batch_is_queued_whole(tmp_path: Path) -> None:
    tm = transaction.TransactionManager()
    d = QueuedMailDelivery(tmp_path / "spool", transaction_manager=tm)
    _send(tm, d, 40)
    later = time.time() + 3600
    mid = d.send(
        "a@example.org", ["b@example.org"], "Subject: later\r\n\r\nx\r\n", not_before=later
    )
    tm.commit()
    assert len(os.listdir(tmp_path / "spool" / "new")) == 40
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    assert [e.message_id for e in Spool(tmp_path / "spool").entries("deferred")] == [mid]


def test_a_full_disk_in_the_middle_of_a_batch_leaves_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="256k") as mnt:
        tm = transaction.TransactionManager()
        d = QueuedMailDelivery(mnt / "spool", transaction_manager=tm)
        tm.begin()
        for i in range(40):  # about 480 kB: the disk fills up part way
            d.send(
                "a@example.org",
                [f"r{i}@example.org"],
                b"Subject: x\r\n\r\n" + (b"y" * 78 + b"\r\n") * 150,
            )
        with pytest.raises(SpoolError) as info:
            tm.commit()
        tm.abort()
        assert info.value.errno == errno.ENOSPC
        assert os.listdir(mnt / "spool" / "tmp") == []
        assert os.listdir(mnt / "spool" / "new") == []


@pytest.mark.parametrize("bad", [0, 17, 39])
def test_a_failed_fsync_in_a_batch_removes_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: int
) -> None:
    tm = transaction.TransactionManager()
    d = QueuedMailDelivery(tmp_path / "spool", transaction_manager=tm)
    _send(tm, d, 40)
    tmp_dir = str(tmp_path / "spool" / "tmp")
    tmp_names: list[str] = []
    real_open, real_fsync = os.open, os.fsync

    def opener(path: str, *a: int) -> int:  # notes the order the files are made in
        if os.path.dirname(path) == tmp_dir:
            tmp_names.append(os.path.basename(path))
        return real_open(path, *a)

    def fsync(fd: int) -> None:  # the fault: one file's fsync reports EIO
        if os.readlink(f"/proc/self/fd/{fd}") == os.path.join(tmp_dir, tmp_names[bad]):
            raise OSError(errno.EIO, "injected")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", opener)
    with pytest.raises(SpoolError) as info:
        tm.commit()
    assert info.value.errno == errno.EIO
    assert len(tmp_names) == 40
    assert tmp_names[bad] in str(info.value)
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    assert os.listdir(tmp_path / "spool" / "new") == []


def test_a_batch_is_queued_when_no_thread_can_be_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tm = transaction.TransactionManager()
    d = QueuedMailDelivery(tmp_path / "spool", transaction_manager=tm)
    _send(tm, d, 40)

    def start(self: threading.Thread) -> None:  # the fault: as at interpreter exit
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", start)
    tm.commit()
    assert len(os.listdir(tmp_path / "spool" / "new")) == 40
    assert os.listdir(tmp_path / "spool" / "tmp") == []
