"""The package's layering (ARCHITECTURE.md): imports point down, never sideways into a cycle.

Every import in every module is read from the source, including imports inside functions, so a cycle
cannot hide behind a lazy import.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "hf_hybrid_sparse"
ROOT = Path(__file__).resolve().parent.parent / "src" / PACKAGE

#: unit (top-level module or subpackage) -> level; a unit may import only units of a lower level
LEVELS = {
    "errors": 0,
    "version": 0,
    "bits": 0,
    "hostops": 0,
    "devices": 0,
    "logs": 0,
    "system": 0,
    "state": 1,
    "config": 1,
    "viz": 1,
    "models": 1,
    "native": 1,
    "pruning": 2,
    "data": 2,
    "engine": 3,
    "kernels": 3,
    "evaluation": 3,
    "checkpoint": 4,
    "api": 5,
    "training": 6,
    "cli": 7,
    "__init__": 8,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Fully qualified package modules imported anywhere in ``path``."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base[: len(base) - (node.level - 1)]
                target = ".".join(parent + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # `from . import x` may name a submodule
                sub = f"{target}.{alias.name}"
                found.add(sub if _exists(sub) else target)
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").exists() or (ROOT / rel / "__init__.py").exists()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def test_every_unit_has_a_level():
    units = {_unit(m) for m in _graph()}
    assert units <= set(LEVELS), (
        f"new unit(s) {units - set(LEVELS)}: give them a level here and in ARCHITECTURE.md"
    )


def test_imports_point_down():
    bad = []
    for module, targets in _graph().items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b and LEVELS[b] >= LEVELS[a]:
                bad.append(f"{module} -> {target} ({a}:{LEVELS[a]} -> {b}:{LEVELS[b]})")
    assert not bad, "imports that do not point down:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_checker_sees_a_hidden_cycle(tmp_path, monkeypatch):
    """The checks above would catch a lazy import pointing up (the kind issue #10 found)."""
    fake = tmp_path / PACKAGE
    (fake / "engine").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "engine" / "report.py").write_text("def plot():\n    from ..checkpoint import hub\n")
    (fake / "checkpoint").mkdir()
    (fake / "checkpoint" / "__init__.py").write_text("")
    (fake / "checkpoint" / "hub.py").write_text("from ..engine import report\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    with pytest.raises(AssertionError, match="engine.report -> hf_hybrid_sparse.checkpoint.hub"):
        test_imports_point_down()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
