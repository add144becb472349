"""One version, written once: ``mailspool.__version__``.

The package metadata (pyproject reads the attribute), ``mailspool
--version`` and the attribute agree; the spool format's own version is
documented next to the package's, and is the one a new spool file carries.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import transaction

import mailspool
from mailspool import QueuedMailDelivery

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_same_for_the_command_the_metadata_and_the_attribute() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mailspool", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mailspool {mailspool.__version__}\n"
    assert importlib.metadata.version("mailspool") == mailspool.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?(a|b|rc|dev|post)\d+)*", mailspool.__version__)


def test_pyproject_reads_the_version_from_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "mailspool.__version__"}


def test_the_documented_spool_format_is_the_one_written(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "spool.md").read_text("utf-8")
    stated = re.search(r"mailspool (\S+) writes spool\s+format (\d+)", doc)
    assert stated, "docs/spool.md must say which spool format this version writes"
    assert stated.group(1) == mailspool.__version__, (
        f"docs/spool.md states the spool format of mailspool {stated.group(1)}; "
        f"say which format {mailspool.__version__} writes"
    )

    spool = tmp_path / "spool"
    delivery = QueuedMailDelivery(str(spool))
    with transaction.manager:
        delivery.send("a@example.org", ["b@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
    [written] = list((spool / "new").iterdir())
    first_line = written.read_bytes().split(b"\r\n", 1)[0]
    assert first_line.split()[:2] == [b"X-Mailspool:", stated.group(2).encode()]
