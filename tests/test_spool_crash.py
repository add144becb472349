"""Several processes on one spool, and processes killed with SIGKILL."""

from __future__ import annotations

import collections
import random
import signal
import time
from pathlib import Path

import pytest

from _helpers_spool import fill_spool, names, run_child
from _relays import wait_for
from mailspool.maildir.spool import Spool

# A processor in a child process: claims whatever is due, records each id
# it claimed, marks it sent; stops when nothing is left.
WORKER = r"""
import json, os, sys, time
from mailspool.maildir.spool import Spool
sp = Spool(json.loads(sys.argv[1]), create=False)
go, out = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
claimed = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for mid in sp.due():
        c = sp.claim(mid)
        if c is not None:
            claimed.append(c.id)
            time.sleep(0.0002)  # the relay's turn
            c.settle(sent=c.envelope.recipients)
    n = sp.counts()
    if n["ready"] == 0 and n["in_flight"] == 0:
        break
with open(out, "w") as f:
    f.write("\n".join(claimed))
"""

# Claims one message, says so, then waits to be killed.
HOLDER = r"""
import json, sys, time
from mailspool.maildir.spool import Spool
sp = Spool(json.loads(sys.argv[1]), create=False)
c = sp.claim(json.loads(sys.argv[2]))
print("claimed" if c is not None else "none", flush=True)
time.sleep(60)
"""

# Enqueues messages of varied sizes forever (until killed).
WRITER = r"""
import json, sys
from mailspool.maildir.spool import Spool
from mailspool.message import prepare
sp = Spool(json.loads(sys.argv[1]))
i = 0
while True:
    i += 1
    body = b"".join(b"message %d line %d\r\n" % (i, n) for n in range(1 + (i * 7919) % 9000))
    data = b"Subject: %d\r\n\r\n" % i + body
    sp.publish([sp.stage(prepare("s@example.org", ["r@example.org"], data))])
"""


@pytest.mark.slow
def test_processes_claim_every_message_exactly_once(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    ids = fill_spool(sp, 600)
    go = tmp_path / "go"
    outs = [tmp_path / f"out{i}" for i in range(4)]
    procs = [run_child(WORKER, sp.path, str(go), str(o)) for o in outs]
    for p in procs:  # all at the starting line
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    claimed = [line for o in outs for line in o.read_text().split("\n") if line]
    counts = collections.Counter(claimed)
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    shares = [len(o.read_text().split()) for o in outs]
    print(f"claims per process: {shares}")
    assert sum(1 for n in shares if n) >= 2  # they really raced
    assert sp.counts()["ready"] == 0 and names(Path(sp.path), "cur") == []


def test_a_killed_holder_releases_its_claim_at_once(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    mid, other = fill_spool(sp, 2)
    child = run_child(HOLDER, sp.path, mid)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "claimed"
        assert sp.claim(mid) is None  # held by the live child
        assert list(sp.due()) == [other]
        assert names(Path(sp.path), "cur") == [mid]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert mid in set(sp.due())  # abandoned: due again, no waiting
    c = sp.claim(mid)
    assert c is not None
    assert c.attempts == 0 and c.envelope.recipients == ("a@example.org",)
    assert c.settle(sent=c.envelope.recipients) == "removed"


@pytest.mark.slow
def test_writer_killed_at_random_points_leaves_only_whole_messages(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    rng = random.Random(1234)
    for round_ in range(8):
        child = run_child(WRITER, str(spool_dir))
        # Once it is writing (start-up time varies with the load), kill it
        # at a random point.
        assert wait_for(lambda r=round_: len(names(spool_dir, "new")) > r, timeout=60)
        time.sleep(rng.uniform(0.0, 0.15))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    sp = Spool(spool_dir, create=False)
    visible = names(spool_dir, "new")
    assert len(visible) >= 8
    leftovers = names(spool_dir, "tmp")
    print(f"{len(visible)} messages published, {len(leftovers)} left half-written in tmp/")
    due = set(sp.due())
    assert due == set(visible) and not (due & set(leftovers))
    for mid in visible:
        assert sp.get(mid).last_error is None  # checksum verified
        c = sp.claim(mid)
        assert c is not None, mid
        n = int(c.data.split(b"\r\n", 1)[0].split(b": ")[1])
        lines = c.data.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[:-1]
        assert len(lines) == 1 + (n * 7919) % 9000  # complete, never half
        c.settle(sent=c.envelope.recipients)
    assert sp.counts()["quarantined"] == 0
    sp.sweep(time.time() + 37 * 3600)
    assert names(spool_dir, "tmp") == []


# A claimed message is settled (a sent, b deferred, c failed) by a child that
# dies by SIGKILL at one step of the rewrite.
SETTLER = r"""
import json, os, signal, sys
import mailspool.maildir.spool as m
sp = m.Spool(json.loads(sys.argv[1]), create=False)
step = json.loads(sys.argv[2])
c = sp.claim(json.loads(sys.argv[3]))
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
if step == "write":
    m.os.writev = die
elif step == "rename":
    m.os.rename = die
elif step == "fsync-dir":
    m.Spool._fsync_dir = die
elif step == "trash-old":
    m.Spool._trash = die
c.settle(sent=["a@example.org"], deferred={"b@example.org": (451, "later")},
         failed={"c@example.org": (550, "unknown")}, retry_at=0)
print("finished", flush=True)
"""


@pytest.mark.parametrize("step", ["write", "rename", "fsync-dir", "trash-old", "none"])
def test_settle_killed_at_each_step_loses_nothing(tmp_path: Path, step: str) -> None:
    sp = Spool(tmp_path / "spool")
    to = ("a@example.org", "b@example.org", "c@example.org")
    (mid,) = fill_spool(sp, 1, to=to)
    child = run_child(SETTLER, sp.path, step, mid)
    _, err = child.communicate(timeout=30)
    assert (child.returncode == -signal.SIGKILL) == (step != "none"), err
    # Whatever the step, the message is there, once, claimable now.
    assert wait_for(lambda: mid in set(sp.due()))
    c = sp.claim(mid)
    assert c is not None
    if step in ("write", "rename"):
        # Died before the new state was published: the old one, whole.
        assert c.envelope.recipients == to and c.attempts == 0
    else:
        # The new state is published: a stays sent, c stays failed.
        assert c.envelope.recipients == ("b@example.org",) and c.attempts == 1
    assert c.settle(sent=c.envelope.recipients) in ("removed", "failed")
    left = {area: names(Path(sp.path), area) for area in ("new", "cur", "deferred")}
    assert left == {"new": [], "cur": [], "deferred": []}, left
    sp.sweep(time.time() + 37 * 3600)  # a tmp/ file the child left is an orphan
    assert names(Path(sp.path), "tmp") == []
