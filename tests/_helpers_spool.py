"""Shared bits of the spool tests: messages, child processes, small disks."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from _fs import fill, tmpfs
from mailspool.maildir.spool import Spool
from mailspool.message import Prepared, prepare

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


def small_fs(path: Path, size: str = "64k") -> contextlib.AbstractContextManager[Path]:
    """A tmpfs of ``size`` mounted on ``path``; skips the test where that is impossible."""
    return tmpfs(path, size=size)


def fill_disk(path: Path) -> Path:
    """Write ``path/filler`` until the file system is full; return its path."""
    fill(path)
    return path / "filler"
