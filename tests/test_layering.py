"""The house's layering, checked: the import-linter contracts in pyproject.toml (floors; ops a leaf), no import
circle inside the package, and no module -- library, examples, benchmarks or tests -- importing another
module's private (underscore) name."""
from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dif_attention"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """``(line, imported module, names)`` for each import statement, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, target, [a.name for a in node.names]


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is in the [test] extra")
def test_import_linter_contracts_are_kept():
    proc = subprocess.run(["lint-imports", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def project_module(name: str) -> bool:
    """A module of this checkout: the package, or a top-level module of examples/, benchmarks/, tests/, tools/."""
    if name.startswith("dif_attention"):
        return True
    return any((ROOT / folder / f"{name.split('.')[0]}.py").exists()
               for folder in ("examples", "benchmarks", "tests", "tools"))


def test_no_import_circle_in_the_package():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path)
        edges = graph.setdefault(mod, set())
        for _, target, names in imports(path):
            subs = [f"{target}.{n}" for n in names if is_module(f"{target}.{n}")]  # from . import kernels
            for dep in subs or [target]:
                if dep.startswith("dif_attention") and is_module(dep) and dep != mod:
                    edges.add(dep)
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for nxt in sorted(graph.get(m, ())):
            visit(nxt)
        stack.pop()

    for m in sorted(graph):
        visit(m)
    assert not cycles, cycles
    assert "dif_attention.ops.launch" in graph["dif_attention.ops"]  # the graph is really built


@pytest.mark.parametrize("folder", ["dif_attention", "examples", "benchmarks", "tests", "tools"])
def test_no_module_imports_another_modules_private_name(folder):
    bad = []
    for path in (ROOT / folder).rglob("*.py"):
        for line, target, names in imports(path):
            if not project_module(target) and not target.startswith("."):
                continue  # a third-party library's internals are its own business
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
                bad.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(names)}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_private_imports(tmp_path):
    """The private-name check is not vacuous: it flags the shape of import it is meant to catch."""
    probe = ROOT / "tests" / "_probe_private.py"
    try:
        probe.write_text("from dif_attention.functional import _prepare\nfrom ._x import y\n")
        found = [names for _, _, names in imports(probe)]
        assert ["_prepare"] in found and ["y"] in found
        with pytest.raises(AssertionError, match="_probe_private.py:1"):
            test_no_module_imports_another_modules_private_name("tests")
    finally:
        probe.unlink()
