"""Check what the built sdist and wheel contain (called by .ci/build-check).

    python .ci/dist_contents.py SDIST WHEEL < tracked-files
        the sdist carries the project files, and every tracked file under
        src/, docs/ and tests/; the wheel carries the package with py.typed
        and the license, and nothing from tests/ or bench/.
    python .ci/dist_contents.py --version WHEEL    the wheel's version
    python .ci/dist_contents.py --extras WHEEL     its extras, one a line

Prints one line per problem and exits with 1 if there is any.
"""

from __future__ import annotations

import email.parser
import sys
import tarfile
import zipfile
from pathlib import PurePosixPath

SDIST_FILES = (
    "PKG-INFO",
    "pyproject.toml",
    "README.md",
    "LICENSE",
    "COPYRIGHT.txt",
    "CHANGES.md",
    "SECURITY.md",
    "CONTRIBUTING.md",
    "mkdocs.yml",
    "src/mailspool/__init__.py",
    "src/mailspool/py.typed",
)
SDIST_TREES = ("src/", "docs/", "tests/")
NEVER_SHIPPED = ("bench", ".ci", "__pycache__")


def wheel_metadata(wheel: str) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.BytesParser().parsebytes(zf.read(name))


def sdist_problems(sdist: str, tracked: list[str]) -> list[str]:
    with tarfile.open(sdist) as tf:
        names = {m.name.split("/", 1)[1] for m in tf.getmembers() if "/" in m.name}
    problems = [f"sdist: {f} is missing" for f in SDIST_FILES if f not in names]
    problems += [
        f"sdist: {f} is missing (tracked in git)"
        for f in tracked
        if f.startswith(SDIST_TREES) and f not in names
    ]
    problems += [
        f"sdist: {n} should not be there"
        for n in sorted(names)
        if set(PurePosixPath(n).parts) & set(NEVER_SHIPPED)
    ]
    return problems


def wheel_problems(wheel: str, tracked: list[str]) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    version = wheel_metadata(wheel)["Version"]
    dist_info = f"mailspool-{version}.dist-info/"
    problems = [
        f"wheel: {f} is missing"
        for f in ("mailspool/py.typed", "mailspool/__init__.py", f"{dist_info}licenses/LICENSE")
        if f not in names
    ]
    problems += [
        f"wheel: {f} is missing (tracked in git)"
        for f in tracked
        if f.startswith("src/mailspool/") and f.endswith(".py")
        if f.removeprefix("src/") not in names
    ]
    for n in sorted(names):
        parts = set(PurePosixPath(n).parts)
        if not n.startswith(("mailspool/", dist_info)):
            problems.append(f"wheel: {n} is outside the package")
        elif parts & {"tests", *NEVER_SHIPPED}:
            problems.append(f"wheel: {n} should not be there")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--version":
        print(wheel_metadata(argv[1])["Version"])
        return 0
    if len(argv) == 2 and argv[0] == "--extras":
        print("\n".join(wheel_metadata(argv[1]).get_all("Provides-Extra") or []))
        return 0
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    tracked = [line.strip() for line in sys.stdin if line.strip()]
    problems = sdist_problems(argv[0], tracked) + wheel_problems(argv[1], tracked)
    for problem in problems:
        print(f"build-check: {problem}", file=sys.stderr)
    if not problems:
        print(f"sdist and wheel complete ({len(tracked)} tracked files compared)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
