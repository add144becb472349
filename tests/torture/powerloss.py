"""A simulated power loss: writers commit onto ext4, the file system is cut off.

The spool sits on a fresh ext4 image, loop-mounted.  Writer processes commit
as fast as they can, journalling each message on another disk once
``commit()`` returned.  At a random moment the harness calls the
``EXT4_IOC_SHUTDOWN`` ioctl with ``EXT4_GOING_FLAGS_NOLOGFLUSH``: from that
instant nothing more reaches the image, and what the journal had not
committed is gone, as if the power had been cut.  The image is unmounted,
mounted again (the journal is replayed) and checked: every message whose
``commit()`` returned before the cut must be there, ready, and whole (the
spool's own checksum and the body's checksum).

Root, a loop device and ``mkfs.ext4`` are needed; :func:`unavailable` says
why not when they are not there.
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailspool.maildir.spool import Spool

from .judge import read_events
from .relay import check_message

__all__ = ["EXT4_IOC_SHUTDOWN", "CutResult", "power_cut", "unavailable"]

#: _IOR('X', 125, __u32)
EXT4_IOC_SHUTDOWN = 0x8004587D
#: Stop at once, without flushing the journal: a power cut.
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@dataclass
class CutResult:
    """What one power cut showed."""

    committed_before: int = 0  # commit() returned before the cut
    present: int = 0  # of those, found whole after remounting
    missing: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # quarantined or a bad body
    after_cut: int = 0  # commit() returned after the cut (fsync had already succeeded)
    after_cut_present: int = 0
    #: commit() returned although mailspool logged CRITICAL (finding 2, fixed: it raises)
    finish_failed: list[str] = field(default_factory=list)
    finish_failed_missing: list[str] = field(default_factory=list)
    refused: int = 0  # commits that raised (EIO after the cut)
    in_spool: int = 0  # messages found after remounting, in all

    @property
    def problems(self) -> list[str]:
        gone = set(self.finish_failed_missing)
        return (
            [f"missing after the power cut: {m}" for m in self.missing]
            + [f"damaged after the power cut: {m}" for m in self.damaged]
            + [
                f"commit() of {m} returned although mailspool logged CRITICAL (finding 2)"
                + (" and the message is gone" if m in gone else "")
                for m in self.finish_failed
            ]
        )


def unavailable() -> str | None:
    """Why a power cut cannot be simulated here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install e2fsprogs mount)"
    if not os.path.exists("/dev/loop-control") and not os.path.exists("/dev/loop0"):
        return "no loop devices (/dev/loop*)"
    return None


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


def power_cut(
    workdir: Path,
    index: int,
    *,
    rng: random.Random,
    spawn_writer: Callable[[str, str, int], subprocess.Popen[bytes]],
    writers: int = 2,
    before_cut: tuple[float, float] = (0.3, 1.2),
) -> CutResult:
    """Run writers on a fresh ext4 image, cut its power, remount, check.

    Args:
        workdir: where the image, the mount point and the journals go.
        index: the number of this cut (names files).
        rng: decides when to cut.
        spawn_writer: starts a writer ``(spool, journal, slot)`` in power mode.
        writers: how many writer processes.
        before_cut: the cut comes this many seconds (uniform) after the
            first commit.

    Raises:
        RuntimeError: the image could not be made or mounted.
    """
    image = workdir / f"power{index}.img"
    mnt = workdir / f"power{index}"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(image))
    _run("mount", "-o", "loop", str(image), str(mnt))
    mounted = True
    procs: list[subprocess.Popen[bytes]] = []
    result = CutResult()
    try:
        spool_dir = str(mnt / "spool")
        Spool(spool_dir)
        journals = [str(workdir / f"power{index}-w{slot}.jsonl") for slot in range(writers)]
        procs = [spawn_writer(spool_dir, j, slot) for slot, j in enumerate(journals)]
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline and not all(
            os.path.exists(j) and os.path.getsize(j) > 0 for j in journals
        ):
            time.sleep(0.02)
        time.sleep(rng.uniform(*before_cut))
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
        try:
            t_cut = time.monotonic()
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
        finally:
            os.close(fd)
        time.sleep(0.05)  # let the writers run into the dead file system
        for p in procs:
            p.send_signal(signal.SIGKILL)
        for p in procs:
            p.wait()
        _run("umount", str(mnt))
        mounted = False
        _run("mount", "-o", "loop", str(image), str(mnt))
        mounted = True
        _check_spool(spool_dir, journals, t_cut, result)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if mounted:
            subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        image.unlink(missing_ok=True)
    return result


def _check_spool(spool_dir: str, journals: Sequence[str], t_cut: float, r: CutResult) -> None:
    spool = Spool(spool_dir)
    found: set[str] = set()
    for id in list(spool.due(now=math.inf)):
        claim = spool.claim(id)
        if claim is None:
            continue
        with claim:
            mid, intact = check_message(claim.data)
            if not intact or mid is None or mid != claim.message_id:
                r.damaged.append(f"{id} ({mid}): body does not match its checksum")
            elif mid is not None:
                found.add(mid)
            claim.release()
    for entry in spool.entries("quarantined"):
        r.damaged.append(f"{entry.id}: quarantined: {entry.last_error}")
    r.in_spool = len(found)
    for e in read_events(journals):
        if e["e"] == "A":
            r.refused += 1
            continue
        mid = e["mid"]
        if e.get("crit"):
            r.finish_failed.append(mid)
            if mid not in found:
                r.finish_failed_missing.append(mid)
        if float(e["t"]) < t_cut:
            r.committed_before += 1
            if mid in found:
                r.present += 1
            else:
                r.missing.append(mid)
        else:
            r.after_cut += 1
            r.after_cut_present += mid in found
