"""The project's documentation lives in the repository and matches the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pybitnet"


def test_the_architecture_lists_every_module_and_nothing_else():
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", (ROOT / "docs" / "architecture.md").read_text(), re.MULTILINE))
    assert sorted(modules - listed) == [], "modules missing from docs/architecture.md"
    assert sorted(listed - modules) == [], "docs/architecture.md lists modules that do not exist"


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|\bDESIGN\.md|\bFORMATS(\.md)?\b")
    texts = [ROOT / "README.md", *ROOT.joinpath("docs").rglob("*.md"), *PACKAGE.rglob("*.py"),
             *ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in texts
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if outside.search(line)]
    assert found == []


def test_documents_referred_to_exist():
    texts = [ROOT / "README.md", *PACKAGE.rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py")]
    named = {m for p in texts for m in re.findall(r"\bdocs/[\w-]+\.md\b", p.read_text(encoding="utf-8"))}
    assert named and all((ROOT / name).is_file() for name in named), sorted(named)
