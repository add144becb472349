"""The durability order of a commit, alone and with many committing at once.

docs/spool.md, "The durability order": a message's file is fsynced before
it is renamed into ``new/``, and a commit returns only after an fsync of
``new/`` that *began after* that rename has succeeded.  These tests record
the real system calls (a spy that calls the real ``os.fsync`` and
``os.rename`` and notes when each began and ended on the system-wide
monotonic clock) and check that order for every commit: one thread, many
threads, several processes.  They assert order and counts, never time.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import transaction

from _helpers_spool import run_child
from mailspool import QueuedMailDelivery
from mailspool.maildir.spool import Spool

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fsynced descriptor"
)

BODY = b"y" * 76 + b"\r\n"

#: The spy, also run inside child processes: every fsync and rename of the
#: process, with the monotonic time before and after the real call.
SPY = r"""
import os, threading, time

class Trace:
    def __init__(self):
        self.lock = threading.Lock()
        self.events = []  # (kind, path, target, began_ns, ended_ns)
        self._fsync, self._rename = os.fsync, os.rename

    def fsync(self, fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        began = time.monotonic_ns()
        self._fsync(fd)
        self._note("fsync", path, "", began)

    def rename(self, src, dst, **kw):
        began = time.monotonic_ns()
        self._rename(src, dst, **kw)
        self._note("rename", os.fspath(src), os.fspath(dst), began)

    def _note(self, kind, path, target, began):
        ended = time.monotonic_ns()
        with self.lock:
            self.events.append((kind, path, target, began, ended))

    def install(self):
        os.fsync, os.rename = self.fsync, self.rename
"""


def _spy() -> Any:
    scope: dict[str, Any] = {}
    exec(SPY, scope)  # the same source the children run
    return scope["Trace"]()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    trace = _spy()
    monkeypatch.setattr(os, "fsync", trace.fsync)
    monkeypatch.setattr(os, "rename", trace.rename)
    yield trace


def _message(tag: str, i: int) -> bytes:
    return b"Message-Id: <%s.%d@example.org>\r\nSubject: %d\r\n\r\n" % (tag.encode(), i, i) + (
        BODY * 26
    )


def _file_names(spool: Path, state: str) -> dict[str, str]:
    """message id -> spool file name, for what is in the area of ``state``."""
    return {e.message_id or "": e.id for e in Spool(spool, create=False).entries(state)}


def check_order(
    spool: Path,
    events: list[tuple[str, str, str, int, int]],
    returned: dict[str, int],
    area: str = "new",
) -> None:
    """Assert the durability order for every commit in ``returned``.

    ``returned`` maps a message id to the monotonic time its commit
    returned.  For each: its file was fsynced in ``tmp/`` before the rename
    into ``area`` (``new/``, or ``deferred/`` for a later time) began, and
    an fsync of that directory that began after the rename ended finished
    before the commit returned.
    """
    names = _file_names(spool, "ready" if area == "new" else "deferred")
    new_dir = os.path.realpath(spool / area)
    tmp_dir = os.path.realpath(spool / "tmp")
    file_synced: dict[str, int] = {}  # name -> end of its fsync in tmp/
    renamed: dict[str, tuple[int, int]] = {}  # name -> (began, ended)
    dir_syncs: list[tuple[int, int]] = []
    for kind, path, target, began, ended in events:
        if kind == "fsync" and os.path.dirname(path) == tmp_dir:
            file_synced[os.path.basename(path)] = ended
        elif kind == "fsync" and path == new_dir:
            dir_syncs.append((began, ended))
        elif kind == "rename" and os.path.dirname(os.path.realpath(target)) == new_dir:
            renamed[os.path.basename(target)] = (began, ended)
    assert sorted(names) == sorted(returned), f"every commit that returned is in {area}/, no other"
    for message_id, done in returned.items():
        name = names[message_id]
        assert name in file_synced, f"{name} was never fsynced in tmp/"
        r_began, r_ended = renamed[name]
        assert file_synced[name] <= r_began, f"{name} renamed before its fsync ended"
        covering = [e for b, e in dir_syncs if b >= r_ended and e <= done]
        assert covering, f"{name}: the commit returned without an fsync of {area}/ after its rename"


def _commit_many(
    spool: Path, tag: str, count: int, start: Callable[[], None] = lambda: None
) -> dict[str, int]:
    """Commit ``count`` messages, one per transaction; message id -> return time."""
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool, transaction_manager=tm)
    start()
    returned = {}
    for i in range(count):
        with tm:
            mid = delivery.send("app@example.org", ["jane@example.org"], _message(tag, i))
        returned[mid] = time.monotonic_ns()
    return returned


def test_one_commit_fsyncs_file_then_renames_then_fsyncs_new(tmp_path: Path, spy: Any) -> None:
    spool = tmp_path / "spool"
    returned = _commit_many(spool, "one", 3)
    check_order(spool, spy.events, returned)
    # One commit, one message: exactly one fsync of the file and one of new/.
    kinds = [(k, os.path.basename(p)) for k, p, _, _, _ in spy.events if k == "fsync"]
    assert len([k for k in kinds if k == ("fsync", "new")]) == 3


def test_a_transaction_of_several_messages_is_ordered_too(tmp_path: Path, spy: Any) -> None:
    spool = tmp_path / "spool"
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool, transaction_manager=tm)
    with tm:
        ids = [
            delivery.send("a@example.org", ["b@example.org"], _message("t", i)) for i in range(20)
        ]
    returned = dict.fromkeys(ids, time.monotonic_ns())
    check_order(spool, spy.events, returned)


def test_a_message_for_later_is_ordered_in_deferred(tmp_path: Path, spy: Any) -> None:
    spool = tmp_path / "spool"
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool, transaction_manager=tm)
    returned = {}
    for i in range(3):
        with tm:
            mid = delivery.send(
                "a@example.org", ["b@example.org"], _message("d", i), not_before=time.time() + 3600
            )
        returned[mid] = time.monotonic_ns()
    check_order(spool, spy.events, returned, "deferred")
    assert os.listdir(spool / "new") == []


@pytest.mark.parametrize("threads", [4, 16])
def test_threads_committing_at_once_keep_the_order_and_lose_nothing(
    tmp_path: Path, spy: Any, threads: int
) -> None:
    spool = tmp_path / "spool"
    QueuedMailDelivery(spool)  # created before the race
    each = 25
    barrier = threading.Barrier(threads)
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            results.append(_commit_many(spool, f"t{n}", each, barrier.wait))
        except BaseException as exc:  # reported below, with the thread's error
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    returned = {k: v for r in results for k, v in r.items()}
    assert len(returned) == threads * each
    check_order(spool, spy.events, returned)
    sp = Spool(spool, create=False)
    assert sp.counts()["ready"] == threads * each
    assert os.listdir(spool / "tmp") == []
    for id in list(sp.due()):  # every file whole: its CRC checks
        claim = sp.claim(id)
        assert claim is not None
        claim.release()


# A child process: commits COUNT messages from THREADS threads under the spy,
# then writes its trace and the return time of every commit as JSON.
COMMITTER = (
    SPY
    + r"""
import json, sys
import transaction
from mailspool import QueuedMailDelivery

spool, tag, count, threads, out, go = json.loads(sys.argv[1]), *map(json.loads, sys.argv[2:])
trace = Trace()
trace.install()
body = b"y" * 76 + b"\r\n"
returned = {}
lock = threading.Lock()
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)

def work(t):
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool, transaction_manager=tm)
    for i in range(count):
        data = b"Message-Id: <%s.%d.%d@example.org>\r\nSubject: x\r\n\r\n" % (
            tag.encode(), t, i) + body * 26
        with tm:
            mid = delivery.send("app@example.org", ["jane@example.org"], data)
        with lock:
            returned[mid] = time.monotonic_ns()

ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
with open(out, "w") as f:
    json.dump({"events": trace.events, "returned": returned}, f)
"""
)


@pytest.mark.slow
def test_processes_committing_at_once_keep_the_order_and_lose_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    QueuedMailDelivery(spool)
    go = tmp_path / "go"
    outs = [tmp_path / f"out{i}.json" for i in range(4)]
    procs = [
        run_child(COMMITTER, str(spool), f"p{i}", 20, 2, str(o), str(go))
        for i, o in enumerate(outs)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    events: list[tuple[str, str, str, int, int]] = []
    returned: dict[str, int] = {}
    for o in outs:
        got = json.loads(o.read_text())
        events += [tuple(e) for e in got["events"]]  # type: ignore[misc]
        returned.update(got["returned"])
    assert len(returned) == 4 * 2 * 20
    check_order(spool, events, returned)


# A child that commits from 4 threads until it is killed, printing the
# message id of each commit as soon as the commit returned.
ENDLESS = r"""
import json, sys, threading
import transaction
from mailspool import QueuedMailDelivery

spool = json.loads(sys.argv[1])
body = b"z" * 76 + b"\r\n"
out = threading.Lock()

def work(t):
    tm = transaction.TransactionManager()
    delivery = QueuedMailDelivery(spool, transaction_manager=tm)
    i = 0
    while True:
        i += 1
        data = b"Message-Id: <k%d.%d@example.org>\r\nSubject: x\r\n\r\n" % (t, i) + body * 26
        with tm:
            mid = delivery.send("app@example.org", ["jane@example.org"], data)
        with out:
            sys.stdout.write(mid + "\n")
            sys.stdout.flush()

for t in range(4):
    threading.Thread(target=work, args=(t,)).start()
"""


@pytest.mark.slow
@pytest.mark.parametrize("after", [1, 7, 40])
def test_sigkill_during_concurrent_commits_keeps_every_returned_commit(
    tmp_path: Path, after: int
) -> None:
    spool = tmp_path / "spool"
    QueuedMailDelivery(spool)
    child = run_child(ENDLESS, str(spool))
    assert child.stdout is not None
    reported = []
    for _ in range(after):  # killed at whatever step the other threads are in
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else ""
        reported.append(line.strip())
    child.kill()
    rest, _ = child.communicate(timeout=60)
    reported += rest.split()  # printed before the kill, read after it
    sp = Spool(spool)
    sp.sweep(tmp_max_age=0)  # a processor's start: half-written tmp/ files go
    found = {}
    for id in list(sp.due()):
        claim = sp.claim(id)
        assert claim is not None, f"{id} is not whole"
        found[claim.message_id] = id
        claim.release()
    assert set(reported) <= set(found), "a commit that returned was lost"
    # Beyond those, at most the one commit each thread had in flight.
    assert len(found) <= len(reported) + 4
    assert sp.counts()["quarantined"] == 0, "nothing half-written in new/"
    assert os.listdir(spool / "tmp") == []
