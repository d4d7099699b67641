"""The package's layers (docs/design.md) hold: import-linter's contracts, and no private name crosses a package."""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "snncompress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to: snncompress.compress.masks -> snncompress.compress."""
    return ".".join(module.split(".")[:2])


def private_imports_across_packages() -> list[str]:
    """``importer: from target import _name`` lines whose importer and target lie in different parts."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _imported_from(node, module, path.name == "__init__.py")
            if not target.startswith("snncompress") or _part(target) == _part(module):
                continue
            found += [f"{module}: from {target} import {a.name}" for a in node.names if a.name.startswith("_")
                      and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_across_packages():
    assert private_imports_across_packages() == []


def test_the_private_import_check_finds_one(tmp_path, monkeypatch):
    fake = tmp_path / "snncompress"
    (fake / "deploy").mkdir(parents=True)
    (fake / "deploy" / "prepare.py").write_text("from ..training.memory import _swap_pools, lean_memory\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert private_imports_across_packages() == ["snncompress.deploy.prepare: from snncompress.training.memory "
                                                 "import _swap_pools"]


def test_import_linter_contracts_are_kept():
    lint = shutil.which("lint-imports")
    assert lint is not None, "import-linter is part of the test extra (pip install -e '.[test]')"
    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def snncompress_imports_missing(script: Path) -> list[str]:
    """``from snncompress... import name`` lines of ``script`` whose module or name no longer exists."""
    import importlib

    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("snncompress")):
            continue
        try:
            module = importlib.import_module(node.module)
        except ImportError:
            missing.append(f"{script.name}:{node.lineno} {node.module}")
            continue
        for alias in node.names:
            if not hasattr(module, alias.name):
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    missing.append(f"{script.name}:{node.lineno} {node.module}.{alias.name}")
    return missing


def test_benchmarks_and_examples_import_what_exists():
    """Scripts outside the test run (benchmarks/, examples/) still name modules and names the package has."""
    root = Path(__file__).resolve().parent.parent
    scripts = sorted([*root.glob("benchmarks/*.py"), *root.glob("examples/*.py")])
    assert len(scripts) >= 5
    assert [line for script in scripts for line in snncompress_imports_missing(script)] == []


def test_the_script_import_check_finds_a_moved_module(tmp_path):
    script = tmp_path / "old.py"
    script.write_text("from snncompress.metrics.footprint import footprint\nfrom snncompress import no_such_name\n")
    assert snncompress_imports_missing(script) == ["old.py:1 snncompress.metrics.footprint",
                                                   "old.py:2 snncompress.no_such_name"]
