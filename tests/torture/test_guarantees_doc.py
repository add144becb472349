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
