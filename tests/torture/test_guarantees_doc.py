"""docs/guarantees.md links each claim to a test: every such test must exist.

A renamed or deleted test would otherwise leave a promise without its proof.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "guarantees.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name.startswith("test_")
    }


def test_every_test_the_guarantees_name_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    references = REFERENCE.findall(text)
    assert len(references) >= 40, "the page lost its proofs"
    missing = []
    for file, name in sorted(set(references)):
        path = ROOT / file
        if not path.is_file() or name not in _test_names(path):
            missing.append(f"{file}::{name}")
    assert missing == [], f"docs/guarantees.md names tests that do not exist: {missing}"


def test_the_page_has_the_long_runs_report() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert "LONG_RUN_REPORT" not in text
    assert "python -m tests.torture.run" in text
    assert "mailspool torture run: seed" in text


_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def test_the_count_of_findings_matches_the_list_and_the_tests() -> None:
    text = " ".join(DOC.read_text(encoding="utf-8").split())
    findings = text.split("## Findings", 1)[1]
    fixed_part, _, open_part = findings.partition(" Open:")
    fixed = len(re.findall(r" - \*\*Finding \d+\.", fixed_part))
    still_open = len(re.findall(r" - \*\*Finding \d+\.", open_part))
    # An open finding is a test marked xfail(strict=True); a fixed one is not.
    marker = "@pytest.mark." + "xfail"  # spelled so that this file does not hold it
    marked = sum(
        path.read_text(encoding="utf-8").count(marker)
        for path in (ROOT / "tests").rglob("test_*.py")
    )
    assert marked == still_open
    total = _WORDS[fixed + still_open]
    if still_open:
        verb = "is" if still_open == 1 else "are"
        said = (
            f"found {total} defects; {_WORDS[fixed]} are fixed, each with its regression "
            f"test, and {_WORDS[still_open]} {verb} open"
        )
    else:
        said = f"found {total} defects; all {total} are fixed, each with its regression test"
    assert said in text


def test_the_postgres_page_has_its_long_runs_report() -> None:
    text = (ROOT / "docs" / "postgres.md").read_text(encoding="utf-8")
    assert "RESULTS_PLACEHOLDER" not in text
    assert "python -m tests.torture.run --backend postgres" in text
    assert "mailspool torture run: seed" in text and "verdict: PASS" in text
