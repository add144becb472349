"""The spool under hostile or unlucky conditions: planted files, a umask
changed late, forks, the trash reaper, leftovers of crashes, cheap state()."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from _helpers_spool import (
    fill_disk,
    fill_spool,
    message,
    names,
    run_child,
    small_fs,
)
from _relays import wait_for
from mailspool.errors import SpoolError
from mailspool.maildir import spool as spool_mod
from mailspool.maildir import trash
from mailspool.maildir.lifecycle import CLAIM_ORDER, LIFECYCLE, NEWER_THAN_CUR, STATES
from mailspool.maildir.spool import Spool

THREE = ("a@example.org", "b@example.org", "c@example.org")


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def root(sp: Spool) -> Path:
    return Path(sp.path)


def crash_after_defer(sp: Spool) -> str:
    """A message whose settle died between publishing deferred/ID and
    removing cur/ID: the newer state in deferred/ (a sent, b and c pending),
    the older one left in cur/."""
    (mid,) = fill_spool(sp, 1, to=THREE)
    old = (root(sp) / "new" / mid).read_bytes()
    c = sp.claim(mid)
    assert c is not None
    c.settle(sent=[THREE[0]], deferred={a: (451, "later") for a in THREE[1:]}, retry_at=0)
    (root(sp) / "cur" / mid).write_bytes(old)
    return mid


def in_thread(fn: Callable[[], object]) -> object:
    """Run ``fn`` in a thread and return what it returned or raised; fail
    if it hangs (a FIFO opened for good)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the spool hung on a planted file"
    return out[0]


# --- state() -------------------------------------------------------------------


def test_state_reads_directory_entries_only(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = fill_spool(sp, 4)
    sp.hold(ids[1])
    bad = root(sp) / "new" / ids[2]
    bad.write_bytes(b"X-Mailspool: garbage\r\n")
    assert sp.claim(ids[2]) is None  # quarantined: state() says so
    held = sp.claim(ids[3])
    assert held is not None
    opened: list[object] = []
    real_open = os.open
    monkeypatch.setattr(
        spool_mod.os, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1]
    )
    got = [sp.state(i) for i in ids]
    gone = sp.state("1.M1P1Q1R00000000.nohost")
    monkeypatch.undo()
    assert got == ["ready", "held", "quarantined", "in_flight"] and gone is None
    assert opened == []  # no file opened, let alone read
    held.settle(sent=held.envelope.recipients)
    assert sp.state(ids[3]) is None  # sent and removed
    with pytest.raises(ValueError):
        sp.state("../new/x")


def test_state_prefers_the_newer_copy_a_crash_left(sp: Spool) -> None:
    mid = crash_after_defer(sp)
    assert sp.state(mid) == "deferred"
    assert sp.get(mid).recipients[0].status == "sent"


# --- permissions ------------------------------------------------------------------


def test_files_stay_0600_when_the_umask_changes_after_opening(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")  # opened under the test's usual umask
    old = os.umask(0o777)  # then an application sets a harsh one
    try:
        (mid,) = fill_spool(sp, 1, to=THREE)
        mode_new = stat.S_IMODE(os.stat(root(sp) / "new" / mid).st_mode)
        c = sp.claim(mid)
        assert c is not None
        c.settle(sent=[THREE[0]], deferred={a: (451, "x") for a in THREE[1:]}, retry_at=0)
        mode_deferred = stat.S_IMODE(os.stat(root(sp) / "deferred" / mid).st_mode)
        (bad,) = fill_spool(sp, 1)
        (root(sp) / "new" / bad).write_bytes(b"damaged")
        assert sp.claim(bad) is None
        reason = root(sp) / "quarantine" / f".{bad}.reason"
        mode_reason = stat.S_IMODE(os.stat(reason).st_mode)
    finally:
        os.umask(old)
    assert (mode_new, mode_deferred, mode_reason) == (0o600, 0o600, 0o600)


def test_creating_a_spool_makes_its_directories_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(spool_mod.os, "fsync", fsync)  # a spy: every call goes through
    root_of = tmp_path / "parent" / "spool"
    Spool(root_of)
    first = list(synced)
    Spool(tmp_path / "parent" / "spool")  # already there: nothing to sync
    monkeypatch.undo()
    # The new entries: "parent" in tmp_path, "spool" in parent, the areas in spool.
    assert sorted(first) == sorted(str(p) for p in (tmp_path, tmp_path / "parent", root_of))
    assert synced == first


# --- planted files ----------------------------------------------------------------


def test_reason_planted_as_symlink_neither_leaks_nor_is_written_through(
    sp: Spool, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"1 new the password is hunter2\n")
    (mid,) = fill_spool(sp, 1)
    (root(sp) / "new" / mid).write_bytes(b"X-Mailspool: 1 5 5 00000000\r\ndamaged")
    os.symlink(secret, root(sp) / "quarantine" / f".{mid}.reason")
    assert sp.claim(mid) is None
    assert secret.read_bytes() == b"1 new the password is hunter2\n"
    assert not os.path.islink(root(sp) / "quarantine" / f".{mid}.reason")
    assert "truncated" in (sp.get(mid).last_error or "")
    # A link planted next to a message already in quarantine is not read.
    (root(sp) / "quarantine" / "1.planted.host").write_bytes(b"junk")
    os.symlink(secret, root(sp) / "quarantine" / ".1.planted.host.reason")
    assert "hunter2" not in (sp.get("1.planted.host").last_error or "")


def test_reason_planted_as_hard_link_to_a_message_truncates_nothing(sp: Spool) -> None:
    victim, bad = fill_spool(sp, 2)
    before = (root(sp) / "new" / victim).read_bytes()
    os.link(root(sp) / "new" / victim, root(sp) / "quarantine" / f".{bad}.reason")
    (root(sp) / "new" / bad).write_bytes(b"damaged")
    assert sp.claim(bad) is None
    assert (root(sp) / "new" / victim).read_bytes() == before
    c = sp.claim(victim)
    assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"


def test_reason_planted_as_fifo_hangs_nothing(sp: Spool) -> None:
    (mid,) = fill_spool(sp, 1)
    (root(sp) / "new" / mid).write_bytes(b"damaged")
    os.mkfifo(root(sp) / "quarantine" / f".{mid}.reason")
    assert in_thread(lambda: sp.claim(mid)) is None  # writing the reason
    assert sp.state(mid) == "quarantined"
    (root(sp) / "quarantine" / "1.q.host").write_bytes(b"junk")
    os.mkfifo(root(sp) / "quarantine" / ".1.q.host.reason")
    entry = in_thread(lambda: sp.get("1.q.host"))  # reading a reason
    assert getattr(entry, "state", None) == "quarantined"


def test_message_reads_safely_for_inspection(sp: Spool, tmp_path: Path) -> None:
    p = message(0)
    staged = sp.stage(p)
    sp.publish([staged])
    assert sp.message(staged.id) == p.data
    os.mkfifo(root(sp) / "new" / "1.fifo.host")
    error = in_thread(lambda: sp.message("1.fifo.host"))
    assert isinstance(error, SpoolError) and "not a regular file" in str(error)
    (tmp_path / "secret").write_bytes(b"X-Zope-From: a@x.org\nX-Zope-To: b@x.org\nsecret\n")
    os.symlink(tmp_path / "secret", root(sp) / "new" / "1.link.host")
    with pytest.raises(SpoolError, match="ELOOP"):
        sp.message("1.link.host")
    with pytest.raises(KeyError):
        sp.message("1.M1P1Q1R00000000.nohost")


def test_a_lying_length_in_a_listed_file_is_not_allocated(sp: Spool) -> None:
    (root(sp) / "new" / "1.liar.host").write_bytes(
        b"X-Mailspool: 1 999999999999 5 00000000\r\nX-Mailspool-From: a\r\n"
    )
    (entry,) = list(sp.entries())
    assert entry.id == "1.liar.host" and "truncated" in (entry.last_error or "")


def test_a_system_error_while_reading_keeps_the_message(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = message(0)
    staged = sp.stage(p)
    sp.publish([staged])
    mid = staged.id

    def no_memory(fd: int, n: int) -> bytes:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(spool_mod.os, "read", no_memory)  # the fault on demand
    with pytest.raises(SpoolError, match="ENOMEM"):
        sp.claim(mid)
    monkeypatch.undo()
    assert sp.state(mid) == "ready" and sp.counts()["quarantined"] == 0
    c = sp.claim(mid)
    assert c is not None and c.data == p.data
    c.release()


# --- leftovers of a crashed settle -----------------------------------------------------


def test_a_claim_never_replaces_a_stale_copy_someone_is_cleaning(sp: Spool) -> None:
    mid = crash_after_defer(sp)
    # Another processor has locked the stale cur/ copy to drop it.
    fd = os.open(root(sp) / "cur" / mid, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert sp.claim(mid) is None  # not now: the name is being handled
        assert (root(sp) / "deferred" / mid).exists()
    finally:
        os.close(fd)
    c = sp.claim(mid)  # the newer state, replacing the stale copy
    assert c is not None and c.source == "deferred"
    assert c.envelope.recipients == THREE[1:] and c.attempts == 1
    assert names(root(sp), "cur") == [mid]
    assert c.settle(sent=THREE[1:]) == "removed"
    assert sp.state(mid) is None and list(sp.due()) == []


def test_a_settle_the_full_disk_refused_keeps_the_claim_for_a_retry(tmp_path: Path) -> None:
    """The seam a processor needs so that accepted recipients are not sent
    again when the outcome cannot be written: the claim stays held, and the
    same settle succeeds once there is room."""
    with small_fs(tmp_path / "fs", "1m") as fs:
        sp = Spool(fs / "spool")
        (mid,) = fill_spool(sp, 1, to=THREE)
        c = sp.claim(mid)
        assert c is not None
        filler = fill_disk(fs)
        later: dict[str, tuple[int | None, str]] = {a: (451, "later") for a in THREE[1:]}
        with pytest.raises(SpoolError, match="ENOSPC"):
            c.settle(sent=THREE[:1], deferred=later, retry_at=0)
        assert sp.state(mid) == "in_flight" and sp.claim(mid) is None  # still ours
        assert names(fs / "spool", "tmp") == []  # nothing half-written left
        filler.unlink()
        assert c.settle(sent=THREE[:1], deferred=later, retry_at=0) == "deferred"
        assert [r.status for r in sp.get(mid).recipients] == ["sent", "pending", "pending"]
        assert names(fs / "spool", "cur") == []


def test_delete_also_removes_a_stale_copy(sp: Spool) -> None:
    mid = crash_after_defer(sp)
    sp.delete(mid)
    assert sp.state(mid) is None
    assert list(sp.due(time.time() + 10**6)) == []  # the old state does not come back


def test_lifecycle_constants_agree_with_the_table() -> None:
    assert set(CLAIM_ORDER) == LIFECYCLE["claim"][0]
    assert set(NEWER_THAN_CUR) <= set(STATES) - {"cur", "quarantine"}
    for action in ("defer", "fail", "release"):
        assert LIFECYCLE[action][1] in NEWER_THAN_CUR


# --- tmp/ orphans --------------------------------------------------------------------


def test_due_removes_old_tmp_orphans_itself_at_most_hourly(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ready,) = fill_spool(sp, 1)
    sp.stage(message(1))  # a writer that died before publish
    monkeypatch.setattr(spool_mod, "TMP_MAX_AGE", 0.0)  # every tmp/ file counts as old
    time.sleep(0.01)  # a ctime strictly in the past
    assert list(sp.due()) == [ready]
    assert names(root(sp), "tmp") == []
    second = sp.stage(message(2))
    assert list(sp.due()) == [ready]  # not again within the hour
    assert names(root(sp), "tmp") == [second.id]


# --- claims and fork -----------------------------------------------------------------

FORK_HOLDER = r"""
import json, os, sys, time
from mailspool.errors import SpoolError
from mailspool.maildir.spool import Spool
sp = Spool(json.loads(sys.argv[1]), create=False)
c = sp.claim(json.loads(sys.argv[2]))
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # a child that outlives its parent (a pre-forked worker, say)
    try:
        c.release()
        answer = b"released"
    except SpoolError:
        answer = b"refused"
    os.write(w, answer)
    time.sleep(300)
    os._exit(0)
os.close(w)
print(pid, os.read(r, 100).decode(), "none" if c is None else "claimed", flush=True)
time.sleep(300)
"""


def test_a_forked_child_neither_keeps_nor_uses_its_parents_claim(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    (mid,) = fill_spool(sp, 1)
    child = run_child(FORK_HOLDER, sp.path, mid)
    assert child.stdout is not None
    pid, answer, claimed = child.stdout.readline().split()
    try:
        assert (answer, claimed) == ("refused", "claimed")
        assert sp.claim(mid) is None  # the holder lives
        child.kill()
        child.wait(30)
        # The holder died; its forked child lives on and must not keep the lock.
        assert wait_for(lambda: mid in set(sp.due()))
        c = sp.claim(mid)
        assert c is not None and c.attempts == 0
        c.release()
    finally:
        child.kill()
        child.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
        child.stdout.close()
        assert child.stderr is not None
        child.stderr.close()


FORK_REAPER = r"""
import json, os, sys, time
from mailspool.maildir import trash
from mailspool.message import prepare
from mailspool.maildir.spool import Spool
trash.SLOW_UNLINK = 0.0  # every unlink counts as slow: files go through the reaper
sp = Spool(json.loads(sys.argv[1]), create=False)
trash_dir = os.path.join(sp.path, "trash")
def batch(n, tag):
    staged = [sp.stage(prepare("s@example.org", ["r@example.org"],
                               b"Subject: %s %d\r\n\r\nx\r\n" % (tag, i))) for i in range(n)]
    sp.publish(staged)
    return [s.id for s in staged]
def send(ids):
    for i in ids:
        c = sp.claim(i)
        assert c.settle(sent=c.envelope.recipients) == "removed"
def emptied():
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not os.listdir(trash_dir):
            return True
        time.sleep(0.01)
    return False
send(batch(300, b"before"))  # the reaper is at work now
pid = os.fork()
if pid == 0:
    send(batch(100, b"child"))
    os._exit(0 if emptied() else 3)
send(batch(100, b"after"))
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), emptied(), flush=True)
"""


@pytest.mark.slow
def test_a_fork_while_the_reaper_runs_is_harmless(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    keep = fill_spool(sp, 30)  # ready messages no one settles: must survive
    child = run_child(FORK_REAPER, sp.path)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out.split() == ["0", "True"], err  # both processes reaped their trash
    assert names(root(sp), "new") == sorted(keep)
    assert names(root(sp), "cur") == [] and names(root(sp), "trash") == []
    assert sp.counts()["ready"] == 30


# --- the trash reaper ----------------------------------------------------------------


def test_reaper_never_deletes_outside_trash(sp: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep")
    (root(sp) / "trash").rmdir()
    os.symlink(outside, root(sp) / "trash")  # trash/ replaced by a symlink
    assert sp.purge() == 0
    assert trash.purge(str(root(sp) / "trash") + os.sep) == 0  # a trailing slash too
    assert (outside / "precious").read_bytes() == b"keep"
    os.unlink(root(sp) / "trash")
    (root(sp) / "trash").mkdir()
    os.symlink(outside / "precious", root(sp) / "trash" / "link")
    (root(sp) / "trash" / "sub").mkdir()
    (root(sp) / "trash" / "sub" / "inner").write_bytes(b"x")
    (root(sp) / "trash" / "done").write_bytes(b"x")
    assert sp.purge() == 2  # the link itself and the file; not the directory
    assert (outside / "precious").read_bytes() == b"keep"
    assert os.listdir(root(sp) / "trash") == ["sub"]
    assert (root(sp) / "trash" / "sub" / "inner").exists()


def test_finished_files_never_leave_the_spool_through_a_swapped_trash(
    sp: Spool, tmp_path: Path
) -> None:
    ids = fill_spool(sp, 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(root(sp) / "trash", root(sp) / "old-trash")
    os.symlink("new", root(sp) / "trash")  # finished mail into new/ would go out again
    c = sp.claim(ids[0])
    assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"
    assert names(root(sp), "new") == [ids[1]]  # only the message still to send
    assert sp.state(ids[0]) is None
    os.unlink(root(sp) / "trash")
    os.symlink(elsewhere, root(sp) / "trash")  # ...or out of the spool
    c = sp.claim(ids[1])
    assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"
    assert list(elsewhere.iterdir()) == [] and sp.counts()["ready"] == 0


def test_reaper_only_ever_gets_finished_files(sp: Spool) -> None:
    ids = fill_spool(sp, 6, to=THREE)
    for i, mid in enumerate(ids):
        c = sp.claim(mid)
        assert c is not None
        if i % 3 == 0:
            c.settle(sent=THREE)
        elif i % 3 == 1:
            c.settle(sent=THREE[:1], deferred={a: (451, "x") for a in THREE[1:]})
        else:
            c.settle(sent=THREE[:2], failed={THREE[2]: (550, "no")})
    sp.purge()  # everything in trash/ gone at once, whatever the reaper did
    assert sp.counts()["deferred"] == 2 and sp.counts()["failed"] == 2
    for mid in ids[1::3]:
        c = sp.claim(mid)
        assert c is not None and c.envelope.recipients == THREE[1:]
        c.release()
    for mid in ids[2::3]:
        assert sp.get(mid).recipients[2].code == 550


def reapers_of(sp: Spool) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.endswith(str(root(sp) / "trash") + os.sep)]


def test_reaper_stops_cleanly_and_starts_again(sp: Spool) -> None:
    for i in range(5):
        (root(sp) / "trash" / f"left.{i}").write_bytes(b"x")
    sp.sweep()
    assert wait_for(lambda: not os.listdir(root(sp) / "trash"))
    assert trash.stop_reapers(timeout=30)
    assert reapers_of(sp) == []
    (mid,) = fill_spool(sp, 1)
    c = sp.claim(mid)
    assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"
    assert wait_for(lambda: not os.listdir(root(sp) / "trash"))  # a new reaper did it
    # Asked to stop, a pass ends before its next unlink.
    (root(sp) / "trash" / "x").write_bytes(b"x")
    stop = threading.Event()
    stop.set()
    assert trash.purge(str(root(sp) / "trash"), stop) == 0
    assert os.listdir(root(sp) / "trash") == ["x"]


def test_cheap_unlinks_remove_finished_files_at_once(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trash, "SLOW_UNLINK", 10.0)  # every unlink counts as cheap
    ids = fill_spool(sp, 3)
    for id in ids:
        c = sp.claim(id)
        assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"
        assert names(root(sp), "trash") == []  # not even for a moment
    assert names(root(sp), "cur") == [] and sp.counts()["ready"] == 0
    trash_dir = str(root(sp) / "trash") + os.sep
    assert trash.unlink_at_once(trash_dir)
    assert not any(key[1] == trash_dir for key in trash._reapers)  # no reaper needed


def test_slow_unlinks_go_through_trash_until_a_reaper_finds_them_cheap(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    trash_dir = str(root(sp) / "trash") + os.sep
    monkeypatch.setattr(trash, "SLOW_UNLINK", 0.0)  # every unlink counts as slow
    ids = fill_spool(sp, 20)
    first = ids[: trash.SLOW_IN_ROW]
    for id in first:
        assert trash.unlink_at_once(trash_dir)  # one slow unlink may be a fluke
        c = sp.claim(id)
        assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"
        assert names(root(sp), "trash") == []  # unlinked at once, and timed
    assert not trash.unlink_at_once(trash_dir)  # SLOW_IN_ROW slow ones: slow
    monkeypatch.setattr(trash, "reap_soon", lambda path: None)  # keep them to look at
    rest = ids[len(first) :]
    for id in rest:
        c = sp.claim(id)
        assert c is not None and c.settle(sent=c.envelope.recipients) == "removed"
    assert len(names(root(sp), "trash")) == len(rest)  # renamed, to be unlinked later
    assert sp.counts()["ready"] == 0
    # A pass of the reaper whose unlinks were all cheap brings them back.
    monkeypatch.setattr(trash, "SLOW_UNLINK", 10.0)
    assert sp.purge() == len(rest)
    assert trash.unlink_at_once(trash_dir)
