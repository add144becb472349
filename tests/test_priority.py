"""Priority classes: the rule that orders due mail, and how the Maildir spool keeps a class."""

from __future__ import annotations

import mailbox
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import transaction

from _relays import body, enqueue
from mailspool import QueuedMailDelivery
from mailspool.maildir.classes import name_priority
from mailspool.maildir.spool import Spool
from mailspool.memory import MemoryQueue
from mailspool.message import prepare
from mailspool.priority import (
    BULK_EVERY,
    PRIORITIES,
    RECENT_MAX,
    Priority,
    interleave,
    parse_priority,
    preferred,
)

URGENT, NORMAL, BULK = PRIORITIES


# --- the rule (no I/O) -----------------------------------------------------------------


def test_parse_priority_names_the_classes_when_wrong() -> None:
    assert parse_priority(None) is NORMAL
    assert parse_priority(" Urgent ") is URGENT
    assert parse_priority(Priority.BULK) is BULK
    with pytest.raises(ValueError, match=r"^priority 'high' is not one of urgent, normal, bulk$"):
        parse_priority("high")
    with pytest.raises(ValueError, match="is not one of"):
        parse_priority(3)  # type: ignore[arg-type]


def test_every_16_picks_give_12_to_urgent_3_to_normal_1_to_bulk() -> None:
    assert Counter(preferred(n) for n in range(BULK_EVERY * 10)) == {
        URGENT: 120,
        NORMAL: 30,
        BULK: 10,
    }


def listing(ids: list[str]) -> Iterator[str]:
    yield from list(ids)


def test_interleave_serves_the_higher_class_first_and_starves_none() -> None:
    urgent = [f"u{i}" for i in range(100)]
    normal = [f"n{i}" for i in range(100)]
    bulk = [f"b{i}" for i in range(100)]
    got = list(
        interleave(
            {
                URGENT: lambda: listing(urgent),
                NORMAL: lambda: listing(normal),
                BULK: lambda: listing(bulk),
            }
        )
    )
    assert sorted(got) == sorted(urgent + normal + bulk)  # each exactly once
    first = Counter(i[0] for i in got[:64])
    assert first == {"u": 48, "n": 12, "b": 4}
    assert got[:3] == ["u0", "u1", "u2"]


def test_a_class_alone_gets_every_pick_and_an_empty_class_gives_its_picks_away() -> None:
    bulk = [f"b{i}" for i in range(40)]
    normal = [f"n{i}" for i in range(10)]
    got = list(interleave({NORMAL: lambda: listing(normal), BULK: lambda: listing(bulk)}))
    assert got[:10] == normal  # normal before bulk while it lasts (bulk gets pick 15)
    assert got[10:] == bulk
    assert list(interleave({BULK: lambda: listing(bulk)})) == bulk


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.01  # every look at the clock takes a while
        return self.now


def test_urgent_mail_arriving_during_a_long_bulk_listing_is_found_before_it_ends() -> None:
    urgent: list[str] = []
    opened = Counter[str]()

    def urgent_listing() -> Iterator[str]:
        opened["urgent"] += 1
        yield from list(urgent)

    bulk = [f"b{i}" for i in range(10_000)]
    it = interleave({URGENT: urgent_listing, BULK: lambda: listing(bulk)}, clock=Clock())
    got = [next(it) for _ in range(100)]
    urgent.append("u0")  # committed while bulk is being sent
    got += [next(it) for _ in range(50)]
    assert "u0" in got[100:]
    # The urgent listing was looked at again while bulk was served, not once per pick.
    assert 1 < opened["urgent"] < 150
    rest = list(it)
    assert "u0" not in rest  # handed out once, though still listed (not yet claimed)
    assert sorted(got + rest) == sorted([*bulk, "u0"])


def test_the_memory_of_ids_handed_out_is_bounded() -> None:
    urgent = [f"u{i}" for i in range(RECENT_MAX * 3)]
    got = list(interleave({URGENT: lambda: listing(urgent)}))
    assert got == urgent


# --- the Maildir spool ---------------------------------------------------------------


def commit(spool: Spool, n: int, priority: Priority) -> list[str]:
    staged = [
        spool.stage(
            replace(prepare("a@example.org", ["b@example.org"], body(i)), priority=priority)
        )
        for i in range(n)
    ]
    spool.publish(staged)
    return [s.id for s in staged]


def test_the_class_is_in_the_name_and_ready_mail_in_its_own_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    [u] = commit(spool, 1, URGENT)
    [n] = commit(spool, 1, NORMAL)
    [b] = commit(spool, 1, BULK)
    assert u.endswith(",P=urgent") and b.endswith(",P=bulk") and "," not in n
    assert os.listdir(tmp_path / "spool" / "urgent") == [u]
    assert os.listdir(tmp_path / "spool" / "new") == [n]
    assert os.listdir(tmp_path / "spool" / "bulk") == [b]
    assert [name_priority(i).value for i in (u, n, b)] == ["urgent", "normal", "bulk"]
    assert {e.id: e.priority for e in spool.entries()} == {u: "urgent", n: "normal", b: "bulk"}
    assert spool.counts()["ready"] == 3 and spool.state(u) == "ready"
    assert next(iter(spool.due())) == u


def test_every_move_keeps_the_class(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    [u] = commit(spool, 1, URGENT)
    spool.hold(u)
    assert spool.state(u) == "held"
    spool.release(u)
    assert os.listdir(tmp_path / "spool" / "urgent") == [u]
    claim = spool.claim(u)
    assert claim is not None
    with claim:
        claim.defer(0.0, "451 later")
    spool.retry(u)
    assert os.listdir(tmp_path / "spool" / "urgent") == [u]
    claim = spool.claim(u)
    assert claim is not None
    with claim:
        claim.release()
    assert os.listdir(tmp_path / "spool" / "urgent") == [u]
    assert spool.get(u).priority == "urgent"


def test_deferred_mail_comes_back_in_its_class(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    [b] = commit(spool, 1, BULK)
    [u] = commit(spool, 1, URGENT)
    for id in (b, u):
        claim = spool.claim(id)
        assert claim is not None
        with claim:
            claim.defer(100.0, "451 later")
    commit(spool, 3, NORMAL)
    due = list(spool.due(now=200.0))
    assert due[0] == u and due[-1] == b


def test_a_spool_of_the_previous_release_drains_as_normal_mail(tmp_path: Path) -> None:
    """A spool of 0.1.0 has no urgent/ or bulk/ and names without a mark."""
    root = tmp_path / "spool"
    ids = enqueue(Spool(root), 3)
    spool = Spool(root, create=False)
    for d in ("urgent", "bulk"):  # as if the spool's release had never made them
        shutil.rmtree(root / d)
    assert [e.priority for e in spool.entries()] == ["normal"] * 3
    assert spool.counts() == dict.fromkeys(spool.counts(), 0) | {"ready": 3}
    assert spool.oldest() is not None and len(spool.oldest_entries(2)) == 2
    for id in list(spool.due()):
        claim = spool.claim(id)
        assert claim is not None
        with claim:
            claim.settle(sent=claim.envelope.recipients)
    assert spool.counts()["ready"] == 0 and len(ids) == 3


def test_mailbox_maildir_still_opens_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    commit(spool, 1, URGENT)
    commit(spool, 2, NORMAL)
    box = mailbox.Maildir(tmp_path / "spool", create=False)
    assert len(box) == 2  # new/ and cur/: the normal class's ready mail


# --- sending ------------------------------------------------------------------------------


def test_send_keeps_the_class_and_refuses_an_unknown_one_at_once(tmp_path: Path) -> None:
    queue = MemoryQueue("test")
    delivery = QueuedMailDelivery(queue)
    with transaction.manager:
        delivery.send("a@example.org", ["b@example.org"], body(1), priority="urgent")
        delivery.send("a@example.org", ["b@example.org"], body(2))
        with pytest.raises(ValueError, match="priority 'soon' is not one of"):
            delivery.send("a@example.org", ["b@example.org"], body(3), priority="soon")
    assert sorted(e.priority for e in queue.entries()) == ["normal", "urgent"]
