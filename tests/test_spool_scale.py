"""A spool of 100,000 messages: listing is fast and memory stays flat; speed."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from _helpers_spool import fill_spool, message
from mailspool.maildir import spool as spool_mod
from mailspool.maildir.spool import Spool

N = 100_000


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spool]:
    """100,000 ready messages (hard links to one spool file: quick to make)."""
    sp = Spool(tmp_path_factory.mktemp("big") / "spool")
    sources = fill_spool(sp, 2)  # a file takes at most 65,000 links on ext4
    new = Path(sp.path) / "new"
    for i in range(N - 2):
        src = f"{new}/{sources[i % 2]}"
        os.link(src, f"{new}/{1_700_000_000 + i}.M{i}P1Q{i}R00000000.big")
    yield sp


@pytest.mark.slow
def test_counts_of_100k_opens_no_file(big: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = os.open
    monkeypatch.setattr(
        spool_mod.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1]
    )
    counts = big.counts()
    monkeypatch.undo()
    assert counts["ready"] == N and opened == []


@pytest.mark.slow
def test_due_and_entries_stream_in_flat_memory(big: Spool) -> None:
    tracemalloc.start()
    try:
        n = sum(1 for _ in big.due())
        _, peak_due = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        it = big.entries("ready")
        m = 0
        size = 0
        for e in it:
            m += 1
            size += e.size
            if m == 20_000:
                break
        _, peak_entries = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == N
    assert m == 20_000 and size == 20_000 * len(message(0).data)
    # Names of 100,000 messages alone would be ~10 MB: nothing like that is held.
    assert peak_due < 1_000_000, peak_due
    assert peak_entries < 1_000_000, peak_entries


@pytest.mark.slow
def test_entries_of_100k_lists_every_one(big: Spool) -> None:
    n = sum(1 for _ in big.entries())
    assert n == N


@pytest.mark.slow
def test_claim_and_settle_empty_a_queue_of_3000(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    fill_spool(sp, 3000, to=("a@example.org", "b@example.org"))
    n = 0
    for mid in sp.due():
        c = sp.claim(mid)
        assert c is not None
        assert c.settle(sent=c.envelope.recipients) == "removed"
        n += 1
    assert n == 3000
    assert list(sp.due()) == []
    assert sp.counts()["ready"] == 0


@pytest.mark.slow
def test_due_lists_each_message_once_beginning_at_a_random_place(big: Spool) -> None:
    # Several processors on one spool get the same directory order; each
    # listing begins its batches at a random place so that they do not walk
    # the queue in step (each would lose every other claim to the next).
    first = list(big.due())
    second = list(big.due())
    assert len(first) == len(set(first)) == N
    assert set(first) == set(second)
    assert first[: spool_mod.ROTATE_BATCH] != second[: spool_mod.ROTATE_BATCH]
    # Each batch is the listing's batch, rotated: the same names in a ring.
    assert set(first[: spool_mod.ROTATE_BATCH]) == set(second[: spool_mod.ROTATE_BATCH])
