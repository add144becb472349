"""One pass over a spool directory: counts, and the oldest names, exact and bounded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from mailspool.maildir import scan
from mailspool.maildir.scan import name_time, scan_dir


def touch(d: Path, names: list[str]) -> None:
    d.mkdir(exist_ok=True)
    for n in names:
        (d / n).touch()


def test_the_oldest_names_are_ordered_by_time_not_as_text(tmp_path: Path) -> None:
    names = [
        "1700000000.M5P1Q1R0.host",
        "1700000000.M10P1Q2R0.host,P=urgent",  # after M5, though before it as text
        "1700000000.M999999P1Q3R0.host",
        "1699999999.M999998P1Q4R0.host",  # an earlier second
        "1700000001.M0P1Q5R0.host,P=bulk",
        "legacy-without-a-time",
        ".hidden",
    ]
    touch(tmp_path / "d", names)
    n, oldest = scan_dir(str(tmp_path / "d"), 3)
    assert n == 6  # dot names are not messages
    assert oldest == [
        "1699999999.M999998P1Q4R0.host",
        "1700000000.M5P1Q1R0.host",
        "1700000000.M10P1Q2R0.host,P=urgent",  # after M5, though before it as text
    ]
    _, everything = scan_dir(str(tmp_path / "d"), 10)
    assert everything[-1] == "legacy-without-a-time"  # undated ones last
    assert name_time("1700000000.M10P1Q2R0.host,P=urgent") == (1700000000, 10)
    assert scan_dir(str(tmp_path / "missing"), 3) == (0, [])


def test_a_big_directory_is_counted_parsing_few_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"{1_700_000_000 + i // 100}.M{i % 100}P1Q{i}R0.host" for i in range(20_000)]
    random.Random(7).shuffle(names)
    touch(tmp_path / "d", names)
    parsed: list[str] = []
    real = scan.name_time
    monkeypatch.setattr(scan, "name_time", lambda n: (parsed.append(n), real(n))[1])
    n, oldest = scan_dir(str(tmp_path / "d"), 50)
    assert n == 20_000
    assert oldest == sorted(names, key=lambda x: real(x) or (0, 0))[:50]
    # Only names that could be among the oldest are parsed: a few hundred, not 20,000.
    assert len(parsed) < 2_000, len(parsed)


def test_deferred_entries_due_are_counted_apart(tmp_path: Path) -> None:
    d = tmp_path / "deferred"
    touch(d, ["1.M1P1Q1R0.h", "2.M1P1Q2R0.h", "3.M1P1Q3R0.h"])
    os.utime(d / "1.M1P1Q1R0.h", (100, 100))
    os.utime(d / "2.M1P1Q2R0.h", (200, 200))
    os.utime(d / "3.M1P1Q3R0.h", (300, 300))
    ready = [0]
    n, oldest = scan_dir(str(d), 1, due_by=250, ready=ready)
    assert (n, ready[0], oldest) == (1, 2, ["1.M1P1Q1R0.h"])


def test_a_name_not_in_utf8_is_kept_as_a_listing_of_str_would_name_it(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    odd = os.fsencode(str(d)) + b"/\xffodd"
    open(odd, "wb").close()
    touch(d, ["1700000000.M5P1Q1R0.host"])
    n, names = scan_dir(str(d), 5)
    assert n == 2
    assert names == ["1700000000.M5P1Q1R0.host", os.fsdecode(b"\xffodd")]
    assert names[1] in os.listdir(d)  # the name the rest of the spool opens it by
