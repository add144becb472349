"""The house rules: no module over 500 lines, no function over 60; the map.

One concept per module and per function: a module that grows past the
limit holds two concepts, a function that does takes two steps.  The
complexity of a function is ruff's part (C901, at most 12, pyproject.toml).
And the map of the house, docs/architecture.md, shows every module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "mailspool"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def too_long(path: Path, root: Path) -> list[str]:
    """What in the module at ``path`` is over its limit, one line each."""
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(root)
    found: list[str] = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{where}: {lines} lines (at most {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(
                    f"{where}:{node.lineno}: {node.name}() is {n} lines "
                    f"(at most {MAX_FUNCTION_LINES})"
                )
    return found


def test_no_module_or_function_of_the_package_is_too_long() -> None:
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 50  # an empty walk would prove nothing
    found = [line for path in modules for line in too_long(path, SRC.parent)]
    assert found == []


def test_the_rule_names_a_long_module_and_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x = {i}" for i in range(MAX_FUNCTION_LINES))
    short = "\n".join(f"y{i} = {i}" for i in range(MAX_MODULE_LINES - 62))
    path = tmp_path / "pkg" / "big.py"
    path.parent.mkdir()
    path.write_text(f"async def f() -> None:\n{body}\n\n\n{short}\n", encoding="utf-8")
    assert too_long(path, tmp_path) == [
        f"pkg/big.py: {MAX_MODULE_LINES + 1} lines (at most {MAX_MODULE_LINES})",
        f"pkg/big.py:1: f() is {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})",
    ]


def test_the_map_of_the_house_names_every_module_and_no_other() -> None:
    # docs/architecture.md must match the folders (paths from src/mailspool).
    doc = (SRC.parent.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = {n for n in re.findall(r"`([\w/]+\.py)`", doc) if not n.startswith("tests/")}
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == []  # a module the map does not show
    assert sorted(n for n in named if not (SRC / n).exists()) == []  # gone from the house
