"""The short torture run, for CI: the whole system under kills, faults and a full disk.

About 25 seconds: 15 seconds of chaos (30 kill rounds), the drain, one
power cut; with a PostgreSQL queue, about 20 seconds: 12 seconds of chaos
(20 kill rounds, two restarts of the database), the drain.
``python -m tests.torture.run`` runs the same with more rounds
(``--backend postgres`` for the PostgreSQL queue); docs/guarantees.md and
docs/postgres.md have the long runs' reports.  ``MAILSPOOL_TORTURE_SEED``
chooses another seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .pgserver import unavailable as pg_unavailable
from .powerloss import unavailable
from .run import Options, torture

SEED = int(os.environ.get("MAILSPOOL_TORTURE_SEED", "20240611"))
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.mark.slow
def test_short_torture_run(tmp_path: Path) -> None:
    opts = Options(
        rounds=30,
        seconds=15.0,
        seed=SEED,
        power_cuts=1,
        drain_timeout=25.0,
        workdir=str(tmp_path / "torture"),
    )
    report = torture(opts)
    text = report.text()
    print(text)
    assert report.passed, text
    v = report.verdict
    assert v is not None
    # It did what it says: mail flowed, processes died, the relay misbehaved.
    assert v.committed_messages > 200, text
    assert v.not_committed > 0 and v.expected_failures > 0, text
    assert report.kills["writers"] >= 3 and report.kills["processors"] >= 3, text
    drops = sum(n for kind, n in v.faults.items() if kind.startswith("drop-"))
    transient = sum(n for kind, n in v.faults.items() if kind.startswith(("4", "stall-")))
    assert drops >= 10 and transient >= 10 and v.faults["550-rcpt"] > 0, text
    assert report.self_exits == [] and v.lost == [] and v.unexplained == []
    if not ROOT:
        assert "skipped" in report.tmpfs_note
        return
    assert report.full_periods and report.refused_full > 0, text
    if unavailable() is None:
        (cut,) = report.cuts
        assert cut.committed_before > 0 and cut.present == cut.committed_before, text
        assert cut.missing == [] and cut.damaged == []


@pytest.mark.slow
def test_short_torture_run_with_postgresql(tmp_path: Path) -> None:
    """The same with a PostgreSQL queue: four processors, its server restarted twice."""
    why = pg_unavailable()
    if why is not None:
        pytest.skip(f"no private PostgreSQL server: {why}")
    opts = Options(
        rounds=20,
        seconds=12.0,
        seed=SEED,
        processors=4,
        backend="postgres",
        db_restarts=2,
        drain_timeout=25.0,
        workdir=str(tmp_path / "torture"),
    )
    report = torture(opts)
    text = report.text()
    print(text)
    assert report.passed, text
    v = report.verdict
    assert v is not None
    # (Few messages on a loaded machine: every kill costs a Python start.)
    assert v.committed_messages > 20 and v.not_committed > 0, text
    assert len(report.restarts) == 2, text
    assert report.kills["writers"] >= 3 and report.kills["processors"] >= 3, text
    assert sum(v.faults.values()) > 0, text
    # Nobody died of the restarts, nothing was lost, every duplicate has a cause,
    # and nothing unexpected was logged (waiting outcomes are expected).
    assert report.self_exits == [] and v.lost == [] and v.unexplained == []
    assert set(report.internal_errors) <= {"outcome waited for the database"}, text
