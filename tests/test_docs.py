"""The project's documentation lives in the repository and matches the code it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command_with_the_same_extras():
    line = next(line for line in _readme().splitlines() if line.rstrip().endswith("# run the tests"))
    readme_extras = re.search(r'pip install -e "\.\[([\w,]+)\]"', line).group(1)
    readme_command = re.search(r"&& (python -m pytest[^#]*?)\s*#", line).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    ci_extras = re.findall(r'pip install --quiet -e "\.\[([\w,]+)\]"', ci)
    commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert ci_extras == [readme_extras] and commands[-1] == readme_command


def test_the_dev_extra_is_the_default_test_run_and_ray_is_its_own():
    """`.[dev]` holds what `python -m pytest` imports unconditionally (pyarrow for parquet included);
    Ray comes only with `.[ray]`, and its tests skip without it."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    names = {extra: {re.match(r"[\w-]+", req).group(0).lower() for req in reqs} for extra, reqs in extras.items()}
    assert "ray" not in names["dev"] and "ray" in names["ray"]
    assert {"pytest", "hypothesis", "pyarrow", "transformers"} <= names["dev"]
    ray_tests = (ROOT / "tests" / "test_distributed.py").read_text(encoding="utf-8")
    assert re.search(r'^ray = pytest\.importorskip\("ray", reason=', ray_tests, re.MULTILINE)


def test_interrupt_exit_statuses_are_the_ones_the_readme_gives(cli, monkeypatch):
    """130 after Ctrl-C (here: while generating); chat ends with 0 on Ctrl-C at its prompt."""
    import builtins

    from pybitnet.cli import text_cmds

    assert "130 after Ctrl-C" in _readme() and "ends the chat with exit status 0" in _readme()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_cmds, "generate", interrupted)
    assert cli("generate", "synthetic:tiny", "hello", "--threads", "1").code == 130
    monkeypatch.setattr(builtins, "input", interrupted)
    done = cli("chat", "synthetic:tiny", "--threads", "1")
    assert done.code == 0 and "bye" in done.err


def test_bench_help_does_not_call_its_random_model_the_builtin_one(cli):
    done = cli("bench", "--help")
    text = " ".join(done.out.split())
    assert done.code == 0 and "random model of the exact shape of microsoft/bitnet-b1.58-2B-4T" in text
    assert "built-in 2B" not in text and "not the small built-in model" in text
