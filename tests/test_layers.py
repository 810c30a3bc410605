"""The layers of the code: floors only descend (import-linter contract in pyproject.toml)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_import_contract_is_kept() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    r = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_the_package_root_imports_no_upper_layer() -> None:
    """``import bilevel`` stays light and acyclic: it never imports hpo, train, cli or learners."""
    names = _imports(REPO / "bilevel" / "__init__.py")
    for upper in ("bilevel.hpo", "bilevel.train", "bilevel.cli", "learners"):
        assert not any(n == upper or n.startswith(upper + ".") for n in names), upper


def _root_imports(path: Path) -> list[str]:
    """``import bilevel`` and ``from bilevel import X`` where X is not a submodule (names of __init__)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name == "bilevel"]
        elif isinstance(node, ast.ImportFrom) and node.module == "bilevel" and node.level == 0:
            out += [f"bilevel.{a.name}" for a in node.names if not (REPO / "bilevel" / a.name).exists()
                    and not (REPO / "bilevel" / f"{a.name}.py").exists()]
    return out


def test_no_module_of_bilevel_imports_the_package_root() -> None:
    """Modules import from the module that defines a name, never the package root (a cycle through __init__)."""
    offenders = {}
    for path in (REPO / "bilevel").rglob("*.py"):
        if path == REPO / "bilevel" / "__init__.py":
            continue
        found = _root_imports(path)
        if found:
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, offenders
