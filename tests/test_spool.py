"""The spool on a real disk: format, durability rules, claims, settling, admin."""

from __future__ import annotations

import errno
import logging
import mailbox
import os
import re
import stat
import threading
import time
import zlib
from pathlib import Path

import pytest

from _helpers_spool import fill_spool, message, names, run_child, small_fs
from _relays import wait_for
from mailspool.errors import SpoolError, SpoolIOError
from mailspool.maildir import directory as spooldir
from mailspool.maildir import fileformat as spoolfile
from mailspool.maildir import spool as spool_mod
from mailspool.maildir.spool import (
    LIFECYCLE,
    STATES,
    RecipientStatus,
    Record,
    Spool,
    decode_file,
    encode_file,
    next_area,
    settle_record,
)

THREE = ("a@example.org", '"Doe, Jane"@example.org', "jürgen@bücher.de")


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool")


def root(sp: Spool) -> Path:
    return Path(sp.path)


# --- layout, names, permissions ---------------------------------------------------


def test_layout_is_a_maildir_plus_state_areas(sp: Spool) -> None:
    for area in ("tmp", "new", "cur", "deferred", "hold", "failed", "quarantine"):
        assert (root(sp) / area).is_dir(), area


def test_open_without_create_needs_an_existing_spool(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="not a spool"):
        Spool(tmp_path / "nope", create=False)
    Spool(tmp_path / "yes")
    assert Spool(tmp_path / "yes", create=False).counts()["ready"] == 0


def test_names_follow_the_maildir_rules() -> None:
    seen = {spooldir.new_name() for _ in range(5000)}
    assert len(seen) == 5000
    for name in list(seen)[:200]:
        assert "/" not in name and ":" not in name and not name.startswith(".")
        assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+R[0-9a-f]{8}\.[A-Za-z0-9_-]+", name), name


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o377])
def test_directories_0700_files_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        sp = Spool(tmp_path / "spool")
        ids = fill_spool(sp, 1)
        later = sp.stage(message(1), not_before=time.time() + 3600)
        sp.publish([later])
    finally:
        os.umask(old)
    for area in ("", "tmp", "new", "cur", "deferred", "hold", "failed", "quarantine", "trash"):
        mode = stat.S_IMODE(os.stat(tmp_path / "spool" / area).st_mode)
        assert mode == 0o700, (area, oct(mode))
    for f in (tmp_path / "spool" / "new" / ids[0], tmp_path / "spool" / "deferred" / later.id):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600


# --- the file format -----------------------------------------------------------------


def test_file_starts_with_a_self_checking_envelope(sp: Spool) -> None:
    p = message(1, to=THREE)
    s = sp.stage(p)
    sp.publish([s])
    raw = (root(sp) / "new" / s.id).read_bytes()
    first, rest = raw.split(b"\r\n", 1)
    version, elen, mlen, crc = first.split(b" ")[1:]
    assert first.startswith(b"X-Mailspool: ") and version == b"1"
    assert len(rest) == int(elen) + int(mlen)
    assert rest[int(elen) :] == p.data
    assert zlib.crc32(rest) == int(crc, 16)
    env = rest[: int(elen)].decode("ascii")  # ASCII only, even for jürgen@bücher.de
    assert "X-Mailspool-From: sender@example.org\r\n" in env
    assert "X-Mailspool-To: pending %22Doe%2C%20Jane%22@example.org\r\n" in env
    assert "X-Mailspool-To: pending j%C3%BCrgen@b%C3%BCcher.de\r\n" in env
    assert f"X-Mailspool-Message-Id: {p.message_id}\r\n" in env
    assert "X-Mailspool-Attempts: 0\r\n" in env


def test_mailbox_maildir_opens_the_spool_and_lists_ready_messages(sp: Spool) -> None:
    ids = fill_spool(sp, 3)
    sp.publish([sp.stage(message(9), not_before=time.time() + 600)])  # deferred: not listed
    md = mailbox.Maildir(sp.path, create=False)
    assert sorted(md.keys()) == sorted(ids)
    msg = md[ids[0]]
    assert msg["Subject"] == "test 0"
    assert msg["X-Mailspool-From"] == "sender@example.org"
    assert msg["X-Mailspool-To"] == "pending a@example.org"
    assert b"line 2 of message 0" in msg.as_bytes()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[:-5], "truncated"),
        (lambda raw: raw[:40], "truncated"),
        (lambda raw: raw[:-3] + b"X" + raw[-2:], "checksum"),
        (lambda raw: raw.replace(b"pending a@", b"pending b@"), "checksum"),
        (lambda raw: raw + b"extra", "truncated or extended"),
        (lambda raw: raw.replace(b"X-Mailspool: 1 ", b"X-Mailspool: 7 "), "version"),
        (lambda raw: b"", "not a spool file"),
        (lambda raw: b"Subject: no envelope\r\n\r\nbody\r\n", "not a spool file"),
    ],
)
def test_damaged_files_are_detected(damage: object, reason: str) -> None:
    head, data = encode_file(
        Record("s@example.org", (RecipientStatus("a@example.org"),), 1.0),
        b"Subject: x\r\n\r\nbody\r\n",
    )
    raw = head + data
    assert decode_file(raw)[1] == data
    with pytest.raises(ValueError, match=reason):
        decode_file(damage(raw))  # type: ignore[operator]


def test_record_round_trips_every_field() -> None:
    rec = Record(
        "",  # the null reverse-path
        (
            RecipientStatus("a@example.org", "sent"),
            RecipientStatus('"x y,z"@example.org', "failed", 550, "5.1.1 no, such user"),
            RecipientStatus("ü@ü.de", "pending", None, "connection reset"),
            RecipientStatus("b@example.org", "pending", 451, ""),
        ),
        1700000000.123456,
        attempts=3,
        message_id="abc.123@example.org",
        last_error="-",
    )
    head, data = encode_file(rec, b"x\r\n")
    assert decode_file(head + data) == (rec, b"x\r\n")


def test_relay_text_is_capped() -> None:
    rec = Record("s@x.org", (RecipientStatus("a@x.org", "failed", 550, "é" * 5000),), 1.0)
    head, _ = encode_file(rec, b"x\r\n")
    back = decode_file(head + b"x\r\n")[0]
    assert back.recipients[0].text == "é" * spoolfile.MAX_TEXT
    assert max(len(line) for line in head.split(b"\r\n")) < 5000


# --- stage, publish, discard ---------------------------------------------------------


def test_staged_messages_are_invisible_until_published(sp: Spool) -> None:
    s = sp.stage(message(1))
    assert names(root(sp), "tmp") == [s.id]
    assert list(sp.due()) == [] and sp.counts()["ready"] == 0
    sp.publish([s])
    assert names(root(sp), "tmp") == [] and names(root(sp), "new") == [s.id]
    assert list(sp.due()) == [s.id]


def test_discard_removes_staged_files_and_never_raises(sp: Spool) -> None:
    s = [sp.stage(message(i)) for i in range(3)]
    sp.discard(s)
    sp.discard(s)  # already gone: still fine
    assert names(root(sp), "tmp") == [] and names(root(sp), "new") == []


def test_publish_fsyncs_each_target_directory_once_per_batch(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = Spool._fsync_dir
    monkeypatch.setattr(Spool, "_fsync_dir", lambda self, a: (calls.append(a), real(self, a)))
    now = time.time()
    batch = [sp.stage(message(i)) for i in range(5)]
    batch += [sp.stage(message(9), not_before=now + 60), sp.stage(message(8), not_before=now + 90)]
    sp.publish(batch)
    assert sorted(calls) == ["deferred", "new"]
    assert len(names(root(sp), "new")) == 5 and len(names(root(sp), "deferred")) == 2


def test_not_before_defers_until_then(sp: Spool) -> None:
    now = time.time()
    s = sp.stage(message(1), not_before=now + 3600)
    past = sp.stage(message(2), not_before=now - 10)  # already due: plain ready
    sp.publish([s, past])
    assert s.area == "deferred" and past.area == "new"
    assert os.stat(root(sp) / "deferred" / s.id).st_mtime == pytest.approx(now + 3600, abs=1e-3)
    assert set(sp.due(now)) == {past.id}
    assert set(sp.due(now + 3601)) == {past.id, s.id}
    assert sp.next_due() == pytest.approx(now + 3600, abs=1e-3)
    assert sp.counts(now + 3601)["ready"] == 2 and sp.counts()["deferred"] == 1


def test_failed_fsync_is_a_failed_stage_never_retried(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def bad_fsync(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_mod.os, "fsync", bad_fsync)
    with pytest.raises(SpoolError) as info:
        sp.stage(message(1))
    monkeypatch.undo()
    assert len(calls) == 1
    assert info.value.errno == errno.EIO
    assert sp.path in str(info.value) and "EIO" in str(info.value)
    assert names(root(sp), "tmp") == []


def test_failed_close_is_a_failed_stage(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    real_close = os.close
    failed = []

    tmp_dir = str(root(sp) / "tmp")

    def bad_close(fd: int) -> None:
        # Only the staged file's close fails: another thread (a trash reaper,
        # a finalizer of an earlier spool) may close its own fds meanwhile.
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        real_close(fd)
        if not failed and target.startswith(tmp_dir):
            failed.append(fd)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(spool_mod.os, "close", bad_close)
    with pytest.raises(SpoolError, match="EDQUOT"):
        sp.stage(message(1))
    monkeypatch.undo()
    assert failed and names(root(sp), "tmp") == []


def test_full_disk_fails_with_enospc_and_leaves_nothing(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "64k") as fs:
        sp = Spool(fs / "spool")
        big = message(1, body_lines=4000)  # ~100 KB, more than the disk
        with pytest.raises(SpoolError, match="ENOSPC") as info:
            sp.stage(big)
        assert str(fs / "spool") in str(info.value)
        assert names(fs / "spool", "tmp") == []
        fill_spool(sp, 1)  # a small one still fits: nothing was leaked
        assert sp.counts()["ready"] == 1


def test_read_only_spool_fails_with_erofs(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "1m") as fs:
        sp = Spool(fs / "spool")
        fill_spool(sp, 1)
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        with pytest.raises(SpoolError, match="EROFS"):
            sp.stage(message(2))
        # Still readable for the CLI.
        assert Spool(fs / "spool", create=False).counts()["ready"] == 1


def test_permission_denied_fails_with_eacces(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    if os.geteuid() == 0:
        # Root ignores permissions: stage as "nobody" in a child process.
        code = (
            "import os, sys, json\n"
            "from mailspool.maildir.spool import Spool\n"
            "from mailspool.message import prepare\n"
            "sp = Spool(json.loads(sys.argv[1]), create=False)\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n"
            "    sp.stage(prepare('a@example.org', ['b@example.org'], b'S: x\\r\\n\\r\\nx'))\n"
            "except Exception as e:\n"
            "    print(type(e).__name__, e)\n"
        )
        os.chmod(tmp_path, 0o755)
        proc = run_child(code, sp.path)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    else:
        os.chmod(root(sp) / "tmp", 0o500)
        try:
            with pytest.raises(SpoolIOError) as info:
                sp.stage(message(1))
            out = f"SpoolIOError {info.value}"
        finally:
            os.chmod(root(sp) / "tmp", 0o700)
    assert out.startswith("SpoolIOError ") and "EACCES" in out and sp.path in out


# --- claims and settling ---------------------------------------------------------------


def test_claim_gives_the_envelope_and_the_message(sp: Spool) -> None:
    p = message(1, to=THREE)
    s = sp.stage(p)
    sp.publish([s])
    with sp.claim(s.id) as c:  # type: ignore[union-attr]
        assert c.envelope.sender == "sender@example.org"
        assert c.envelope.recipients == THREE
        assert c.data == p.data and c.message_id == p.message_id
        assert c.attempts == 0 and not c.legacy
        assert c.queued_at == pytest.approx(time.time(), abs=5)
        assert names(root(sp), "cur") == [s.id] and names(root(sp), "new") == []
        assert sp.claim(s.id) is None  # held: no one else gets it
        assert list(sp.due()) == []
    # Left without settling: back to ready, untouched.
    assert names(root(sp), "new") == [s.id]
    assert sp.get(s.id).attempts == 0


def test_claim_of_a_missing_id_is_none_and_bad_ids_are_refused(sp: Spool) -> None:
    assert sp.claim("1.M1P1Q1R00000000.nohost") is None
    for bad in ("", ".hidden", "../new/x", "a/b", "x\0y"):
        with pytest.raises(ValueError):
            sp.claim(bad)


def test_all_sent_removes_the_message(sp: Spool) -> None:
    (mid,) = fill_spool(sp, 1, to=THREE)
    c = sp.claim(mid)
    assert c is not None
    assert c.settle(sent=THREE) == "removed"
    assert sp.counts() == dict.fromkeys(STATES.values(), 0)
    with pytest.raises(KeyError):
        sp.get(mid)
    assert sp.claim(mid) is None
    with pytest.raises(SpoolError, match="already removed"):
        c.settle(sent=THREE)
    assert wait_for(lambda: not os.listdir(root(sp) / "trash"))  # reaped in the background


def test_trash_left_by_a_dead_process_is_reaped(sp: Spool) -> None:
    for i in range(3):
        (root(sp) / "trash" / f"left.{i}").write_bytes(b"x")
    assert sp.sweep() == 0  # nothing to recover; the reaper takes the trash
    assert wait_for(lambda: not os.listdir(root(sp) / "trash"))
    (root(sp) / "trash" / "left.9").write_bytes(b"x")
    assert sp.purge() == 1 and sp.counts() == dict.fromkeys(STATES.values(), 0)


def test_per_recipient_outcomes_and_sent_never_pending_again(sp: Spool) -> None:
    (mid,) = fill_spool(sp, 1, to=THREE)
    a, b, c_ = THREE
    c = sp.claim(mid)
    assert c is not None
    retry = time.time() + 300
    out = c.settle(
        sent=[a],
        deferred={b: (451, "4.7.1 greylisted")},
        failed={c_: (550, "5.1.1 unknown")},
        retry_at=retry,
    )
    assert out == "deferred"
    e = sp.get(mid)
    assert e.state == "deferred" and e.attempts == 1
    assert e.next_attempt == pytest.approx(retry, abs=1e-3)
    assert e.recipients == (
        RecipientStatus(a, "sent"),
        RecipientStatus(b, "pending", 451, "4.7.1 greylisted"),
        RecipientStatus(c_, "failed", 550, "5.1.1 unknown"),
    )
    assert e.last_error == "451 4.7.1 greylisted"
    assert list(sp.due()) == [] and list(sp.due(retry + 1)) == [mid]

    c2 = sp.claim(mid)
    assert c2 is not None
    assert c2.envelope.recipients == (b,)  # only what is still pending
    assert c2.attempts == 1
    with pytest.raises(ValueError, match="not pending"):
        c2.settle(sent=[a])  # a was sent already: refused, nothing changes
    assert c2.settle(sent=[b]) == "failed"
    e = sp.get(mid)
    assert e.state == "failed" and e.attempts == 2
    assert [r.status for r in e.recipients] == ["sent", "sent", "failed"]
    assert e.recipients[2].code == 550 and e.last_error == "451 4.7.1 greylisted"
    assert mid not in set(sp.due(time.time() + 10**6))


def test_defer_whole_message_with_or_without_counting(sp: Spool) -> None:
    (mid,) = fill_spool(sp, 1)
    c = sp.claim(mid)
    assert c is not None
    c.defer(time.time() + 60, "relay down", count_attempt=False)
    e = sp.get(mid)
    assert (e.state, e.attempts, e.last_error) == ("deferred", 0, "relay down")
    c = sp.claim(mid)
    assert c is not None
    c.defer(time.time() - 1, "421 too busy")
    assert sp.get(mid).attempts == 1 and list(sp.due()) == [mid]


def test_settle_refuses_contradictions(sp: Spool) -> None:
    (mid,) = fill_spool(sp, 1, to=THREE)
    c = sp.claim(mid)
    assert c is not None
    with pytest.raises(ValueError, match="more than one outcome"):
        c.settle(sent=[THREE[0]], failed={THREE[0]: (550, "no")})
    with pytest.raises(ValueError, match="not pending"):
        c.settle(sent=["stranger@example.org"])
    # Unnamed pending recipients stay pending; no retry_at means due now.
    assert c.settle(sent=[THREE[0]]) == "deferred"
    assert set(sp.due()) == {mid}
    c = sp.claim(mid)
    assert c is not None and c.envelope.recipients == THREE[1:]
    c.release()
    with pytest.raises(SpoolError, match=r"cannot settle .* already released"):
        c.settle(sent=THREE[1:])


def test_settle_record_is_the_pure_state_rule() -> None:
    rec = Record("s@x.org", tuple(RecipientStatus(a) for a in ("a@x", "b@x")), 1.0)
    assert settle_record(rec, sent=["a@x", "b@x"])[1] == "removed"
    r, out = settle_record(rec, sent=["a@x"], failed={"b@x": (550, "no")})
    assert out == "failed" and r.attempts == 1 and r.last_error == "550 no"
    r, out = settle_record(rec, deferred={"a@x": (None, "timeout")})
    assert out == "deferred" and r.pending == ("a@x", "b@x") and r.last_error == "timeout"


def test_a_claim_is_checked_against_the_inode_it_opened(sp: Spool) -> None:
    """A processor that opened new/ID just before another one finished and
    removed it must not send it again."""
    (mid,) = fill_spool(sp, 1)
    path = str(root(sp) / "new" / mid)
    late_fd = os.open(path, os.O_RDONLY)  # opened, not yet locked...
    c = sp.claim(mid)
    assert c is not None
    c.settle(sent=c.envelope.recipients)  # ...meanwhile sent and removed
    assert sp._claim_fd("new", mid, path, late_fd) is None
    os.close(late_fd)

    # Same for a name that now holds a different file.
    (mid2,) = fill_spool(sp, 1)
    path2 = str(root(sp) / "new" / mid2)
    late_fd = os.open(path2, os.O_RDONLY)
    os.rename(path2, root(sp) / "hold" / mid2)
    with open(path2, "wb") as f:
        f.write(b"another file")
    assert sp._claim_fd("new", mid2, path2, late_fd) is None
    os.close(late_fd)
    assert (root(sp) / "new" / mid2).read_bytes() == b"another file"


def test_threads_each_claim_a_message_exactly_once(sp: Spool) -> None:
    ids = fill_spool(sp, 300)
    got: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        for _ in range(3):
            for mid in sp.due():
                c = sp.claim(mid)
                if c is not None:
                    with lock:
                        got.append(c.id)
                    c.settle(sent=c.envelope.recipients)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == sorted(ids)  # every one, none twice
    assert sp.counts()["ready"] == 0 and sp.counts()["in_flight"] == 0


# --- quarantine ------------------------------------------------------------------------


def test_corrupt_file_is_quarantined_once_and_the_rest_flows(
    sp: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    ids = fill_spool(sp, 3)
    bad = root(sp) / "new" / ids[1]
    bad.write_bytes(bad.read_bytes()[:-10])  # truncated
    caplog.set_level(logging.WARNING, logger="mailspool.spool")
    sent = []
    for mid in list(sp.due()):
        c = sp.claim(mid)
        if c is not None:
            sent.append(mid)
            c.settle(sent=c.envelope.recipients)
    assert sorted(sent) == sorted([ids[0], ids[2]])
    assert sp.claim(ids[1]) is None  # gone: no second log line
    records = [r for r in caplog.records if "quarantined" in r.getMessage()]
    assert len(records) == 1 and ids[1] in records[0].getMessage()
    assert names(root(sp), "quarantine") == [ids[1]]
    e = sp.get(ids[1])
    assert e.state == "quarantined" and "truncated" in (e.last_error or "")
    assert sp.counts()["quarantined"] == 1


def test_planted_symlink_neither_leaks_nor_is_followed(sp: Spool, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    head, data = encode_file(
        Record("s@x.org", (RecipientStatus("evil@x.org"),), 1.0), b"S: x\r\n\r\nsecret\r\n"
    )
    secret.write_bytes(head + data)  # a valid spool file, reachable only by the link
    os.symlink(secret, root(sp) / "new" / "1.link.host")
    assert list(sp.due()) == ["1.link.host"]
    assert sp.claim("1.link.host") is None
    assert os.path.islink(root(sp) / "quarantine" / "1.link.host")
    assert secret.read_bytes() == head + data  # untouched
    assert "it is a symbolic link" in (sp.get("1.link.host").last_error or "")


def test_planted_fifo_does_not_hang(sp: Spool) -> None:
    os.mkfifo(root(sp) / "new" / "1.fifo.host")
    (good,) = fill_spool(sp, 1)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.extend(sp.claim(i) for i in sorted(sp.due())))
    t.start()
    t.join(10)
    assert not t.is_alive(), "claiming a FIFO hung"
    assert result[0] is None and getattr(result[1], "id", None) == good
    assert stat.S_ISFIFO(os.lstat(root(sp) / "quarantine" / "1.fifo.host").st_mode)
    assert "not a regular file" in (sp.get("1.fifo.host").last_error or "")


def test_unreadable_file_is_quarantined(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    (mid,) = fill_spool(sp, 1)

    def bad_read(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_mod.os, "read", bad_read)  # a failing disk on demand
    assert sp.claim(mid) is None
    monkeypatch.undo()
    assert names(root(sp), "quarantine") == [mid]
    assert "EIO" in (sp.get(mid).last_error or "")


def test_a_failing_spool_raises_spool_error_and_keeps_the_message(
    sp: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    (mid,) = fill_spool(sp, 1)

    def no_rename(src: str, dst: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(spool_mod.os, "rename", no_rename)
    with pytest.raises(SpoolError, match="EROFS"):
        sp.claim(mid)
    monkeypatch.undo()
    c = sp.claim(mid)  # nothing was held or lost
    assert c is not None and c.source == "new"
    c.release()


def test_a_directory_in_new_is_quarantined(sp: Spool) -> None:
    (root(sp) / "new" / "1.dir.host").mkdir()
    assert sp.claim("1.dir.host") is None
    assert (root(sp) / "quarantine" / "1.dir.host").is_dir()


def test_claim_quarantine_keeps_the_reason(sp: Spool) -> None:
    (mid,) = fill_spool(sp, 1)
    c = sp.claim(mid)
    assert c is not None
    c.quarantine("message refused by policy")
    assert sp.get(mid).last_error == "message refused by policy"
    sp.retry(mid)  # the operator fixed it
    assert sp.get(mid).state == "ready" and sp.get(mid).last_error is None


# --- listing and admin ------------------------------------------------------------------


def test_counts_entries_and_get_by_state(sp: Spool) -> None:
    ids = fill_spool(sp, 4, to=THREE)
    c = sp.claim(ids[0])
    assert c is not None
    c.settle(failed={a: (550, "no") for a in THREE})
    sp.hold(ids[1])
    c = sp.claim(ids[2])
    assert c is not None
    expected = {"ready": 1, "in_flight": 1, "deferred": 0, "held": 1, "failed": 1, "quarantined": 0}
    assert sp.counts() == expected
    by_state = {e.id: e.state for e in sp.entries()}
    assert by_state == {ids[0]: "failed", ids[1]: "held", ids[2]: "in_flight", ids[3]: "ready"}
    assert [e.id for e in sp.entries("failed")] == [ids[0]]
    e = next(sp.entries("ready"))
    assert e.sender == "sender@example.org" and [r.address for r in e.recipients] == list(THREE)
    assert e.size == len(message(3, to=THREE).data)
    with pytest.raises(ValueError):
        list(sp.entries("bogus"))
    with pytest.raises(KeyError):
        sp.get("1.M1P1Q1R00000000.nohost")
    c.release()


def test_admin_moves_follow_the_lifecycle(sp: Spool) -> None:
    ids = fill_spool(sp, 2)
    sp.hold(ids[0])
    assert list(sp.due()) == [ids[1]]
    with pytest.raises(SpoolError, match="cannot hold a message that is held"):
        sp.hold(ids[0])
    sp.release(ids[0])
    assert sp.get(ids[0]).state == "ready"
    with pytest.raises(SpoolError, match=r"not held \(it is ready\): nothing to release"):
        sp.release(ids[0])
    with pytest.raises(SpoolError, match="cannot retry a message that is ready"):
        sp.retry(ids[0])
    c = sp.claim(ids[1])
    assert c is not None
    with pytest.raises(SpoolError, match="being sent"):
        sp.delete(ids[1])
    c.settle(failed={"a@example.org": (550, "5.1.1 unknown")})
    sp.retry(ids[1])  # failed -> ready, the recipient pending again
    e = sp.get(ids[1])
    assert e.state == "ready" and e.recipients[0] == RecipientStatus(
        "a@example.org", "pending", 550, "5.1.1 unknown"
    )
    c = sp.claim(ids[1])
    assert c is not None and c.envelope.recipients == ("a@example.org",)
    c.defer(time.time() + 999, "later")
    sp.retry(ids[1])
    assert list(sp.due()) and sp.get(ids[1]).state == "ready"
    sp.delete(ids[0])
    sp.delete(ids[1])
    assert sp.counts() == dict.fromkeys(STATES.values(), 0)
    with pytest.raises(KeyError):
        sp.delete(ids[0])


def test_lifecycle_table_names_state_and_action() -> None:
    assert next_area("claim", "new") == "cur"
    assert next_area("remove", "cur") is None
    with pytest.raises(SpoolError, match="cannot defer a message that is ready"):
        next_area("defer", "new")
    for sources, target in LIFECYCLE.values():
        assert target is None or target in STATES
        assert sources <= set(STATES) | {"tmp"}


def test_sweep_removes_old_tmp_files_and_recovers_abandoned_claims(sp: Spool) -> None:
    ids = fill_spool(sp, 2)
    orphan = sp.stage(message(5))  # a writer that died before publish
    held = sp.claim(ids[0])
    assert held is not None
    # An abandoned claim: in cur/, nobody holds its lock.
    os.rename(root(sp) / "new" / ids[1], root(sp) / "cur" / ids[1])
    assert sp.sweep() == 1  # the tmp file is young; only the abandoned claim
    assert names(root(sp), "tmp") == [orphan.id]
    assert names(root(sp), "new") == [ids[1]] and names(root(sp), "cur") == [ids[0]]
    assert sp.sweep(time.time() + 36 * 3600 + 1) == 1
    assert names(root(sp), "tmp") == []
    assert orphan.id not in set(sp.due(time.time() + 10**6))
    held.release()


def test_a_stale_cur_file_from_a_crashed_settle_is_dropped(sp: Spool) -> None:
    """cur/ID left behind after the new state reached deferred/ (a crash
    between the two steps): the newer file wins, the recipient stays sent."""
    (mid,) = fill_spool(sp, 1, to=THREE)
    old = (root(sp) / "new" / mid).read_bytes()
    c = sp.claim(mid)
    assert c is not None
    c.settle(sent=[THREE[0]], deferred={a: (451, "later") for a in THREE[1:]}, retry_at=0)
    (root(sp) / "cur" / mid).write_bytes(old)  # the old file, as a crash leaves it
    c = sp.claim(mid)
    assert c is not None and c.envelope.recipients == THREE[1:]
    c.release()
    (root(sp) / "cur" / mid).write_bytes(old)
    assert sp.sweep() >= 1
    assert names(root(sp), "cur") == [] and sp.get(mid).recipients[0].status == "sent"


def test_oldest_agrees_with_the_entries_and_reads_odd_names(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    assert sp.oldest() is None
    fill_spool(sp, 5)
    waiting = [e.queued_at for e in sp.entries() if e.queued_at is not None]
    assert sp.oldest() == min(waiting)
    # A file whose name does not start with a time (copied in by hand, in
    # zope.sendmail's format) is read to learn its age: here, the oldest.
    legacy = tmp_path / "spool" / "new" / "hand-copied.message"
    legacy.write_bytes(b"X-Zope-From: a@example.org\r\nX-Zope-To: b@example.org\r\n\r\nold\r\n")
    os.utime(legacy, (1_000_000_000, 1_000_000_000))
    assert sp.oldest() == 1_000_000_000
    # Failed and quarantined messages are not waiting: not counted.
    for e in list(sp.entries("ready")):
        if e.id != "hand-copied.message":
            sp.hold(e.id)
    assert sp.oldest(("held",)) == min(waiting)
    sp.delete("hand-copied.message")
    assert sp.oldest() == min(waiting)  # the held ones still wait
