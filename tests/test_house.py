"""The house rules on size: no module over 500 lines, no function over 60.

One concept per module and per function: a module that grows past the
limit holds two concepts, a function that does takes two steps.  The
complexity of a function is ruff's part (C901, at most 12, pyproject.toml).
"""

from __future__ import annotations

import ast
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
