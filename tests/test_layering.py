"""The layering rule of docs/architecture.md, read from the source with `ast`: the tokenizer imports nothing
above it, and no module of the package imports itself back through others at import time."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pybitnet"
# What tokenizer.py (text <-> ids over what it is handed) may import from the package: only the error types.
TOKENIZER_MAY_IMPORT = {"pybitnet.errors"}


def _modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by the name of its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("pybitnet", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _imported(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules an import statement of module `name` loads, by their dotted names."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in MODULES}
    if node.level:
        package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    found = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES}
    if base in MODULES and len(found) < len(node.names):  # names defined in `base` itself
        found.add(base)
    return found


def _module_level_imports(body: list[ast.stmt]):
    """Import statements that run when the module is imported: not those inside functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _module_level_imports(getattr(node, field, None) or [])


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(encoding="utf-8"), filename=str(MODULES[name]))


def test_the_tokenizer_imports_nothing_above_it():
    """tokenizer.py turns text into ids over metadata handed to it; finding a MODEL spec's tokenizer (loaders,
    synthetic.py, GGUF files) is the loaders' work, so none of it is imported here, not even inside a function."""
    imports = [node for node in ast.walk(_tree("pybitnet.tokenizer")) if isinstance(node, (ast.Import, ast.ImportFrom))]
    imported = set().union(*(_imported("pybitnet.tokenizer", node) for node in imports))
    assert imported <= TOKENIZER_MAY_IMPORT, f"tokenizer.py imports {sorted(imported - TOKENIZER_MAY_IMPORT)}"


def test_the_package_has_no_import_cycle():
    graph = {name: set().union(set(), *(_imported(name, node) for node in _module_level_imports(_tree(name).body)))
             - {name} for name in MODULES}
    assert graph["pybitnet"] >= {"pybitnet.loaders", "pybitnet.model"}  # the walk sees the imports it should
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
