"""A process killed at any step of a commit leaves a whole message or none."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailspool import Spool

BODY = "crash test body line\r\n" * 50

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import transaction
    from mailspool import QueuedMailDelivery

    spool, kill_at = sys.argv[1], int(sys.argv[2])
    delivery = QueuedMailDelivery(spool)
    calls = 0

    def counted(fn):
        def wrapper(*args, **kw):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kw)
        return wrapper

    # Only to choose the instant of death: every file-system step of the commit.
    for name in ("open", "write", "fsync", "close", "rename", "replace", "link", "utime"):
        setattr(os, name, counted(getattr(os, name)))

    transaction.begin()
    for i in range(3):
        delivery.send(
            "a@example.org", [f"r{i}@example.org"],
            f"Message-Id: <m{i}@example.org>\\r\\nSubject: {i}\\r\\n\\r\\n" + BODY,
        )
    transaction.commit()
    print("committed", calls, flush=True)
    """
).replace("BODY", repr(BODY))


def run_child(spool: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(spool), str(kill_at)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_sigkill_at_every_step_of_a_commit(tmp_path: Path) -> None:
    # First a clean run tells how many steps a commit takes.
    clean = run_child(tmp_path / "probe", 0)
    assert clean.returncode == 0, clean.stderr
    steps = int(clean.stdout.split()[1])
    assert steps >= 3 * 3  # at least write, fsync and rename per message

    killed = 0
    for kill_at in range(1, steps + 1):
        spool_dir = tmp_path / f"spool{kill_at}"
        proc = run_child(spool_dir, kill_at)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        killed += 1
        if not spool_dir.exists():
            continue
        spool = Spool(spool_dir)
        spool.sweep(tmp_max_age=0)  # what a processor does with leftovers in tmp/
        seen = set()
        for msg_id in spool.due():
            claim = spool.claim(msg_id)
            assert claim is not None, f"kill at step {kill_at}: unreadable {msg_id}"
            with claim:
                i = int(claim.message_id[1]) if claim.message_id else -1
                assert claim.message_id == f"m{i}@example.org"
                assert claim.envelope.recipients == (f"r{i}@example.org",)
                assert claim.data.endswith(BODY.encode())
                seen.add(i)
                claim.release()
        # Nothing was set aside as corrupt, and nothing half-written remains.
        assert spool.counts()["quarantined"] == 0
        assert not any(os.scandir(spool_dir / "tmp"))
    assert killed >= steps // 2
    # The run that was not killed committed all three, whole.
    spool = Spool(spool_dir)
    assert sorted(e.message_id or "" for e in spool.entries("ready")) == [
        "m0@example.org",
        "m1@example.org",
        "m2@example.org",
    ]
