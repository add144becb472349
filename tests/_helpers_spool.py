"""Shared bits of the spool tests: messages, child processes, small disks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailspool.message import Prepared, prepare
from mailspool.spool import Spool

SRC = str(Path(__file__).resolve().parents[1] / "src")


def message(
    n: int = 0, *, body_lines: int = 3, to: tuple[str, ...] = ("a@example.org",)
) -> Prepared:
    body = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(body_lines))
    return prepare("sender@example.org", list(to), b"Subject: test %d\r\n\r\n" % n + body)


def fill_spool(spool: Spool, count: int, **kw: object) -> list[str]:
    staged = [spool.stage(message(i, **kw)) for i in range(count)]  # type: ignore[arg-type]
    spool.publish(staged)
    return [s.id for s in staged]


def names(path: Path, area: str) -> list[str]:
    d = path / area
    return sorted(n for n in os.listdir(d) if not n.startswith(".")) if d.exists() else []


def run_child(code: str, *args: object, **popen: object) -> subprocess.Popen[str]:
    """Start ``python -c code`` with mailspool importable and JSON ``args`` in argv."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-c", code, *(json.dumps(a) for a in args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


@contextlib.contextmanager
def small_fs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path``; skips the test where that is impossible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill_disk(path: Path) -> Path:
    """Write ``path/filler`` until the file system is full; return its path."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        with contextlib.suppress(OSError):
            while os.write(fd, block):
                pass
    finally:
        os.close(fd)
    return filler
