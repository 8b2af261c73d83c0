"""Imports go one way: cli -> engine -> models -> ops; data, tracking, reports and config below engine;
all of them may read the ground floor (vocabulary, formats, fileio, errors), which reads nothing else.

Read with `ast` from the source files (every import, also those inside functions), not by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "remamber"
GROUND = {"vocabulary", "formats", "fileio", "errors", "__init__"}  # __init__: the version string
# layer -> the layers it may import (besides itself and the ground floor)
ALLOWED = {
    "ops": set(),
    "models": {"ops"},
    "data": set(),
    "tracking": set(),
    "reports": set(),
    "config": set(),
    "engine": {"models", "ops", "data", "tracking", "config"},
    "cli": {"engine", "models", "ops", "data", "tracking", "reports", "config"},
}
GROUND_ALLOWED = {"fileio": {"errors"}, "formats": {"errors"}, "vocabulary": set(), "errors": set(), "__init__": set()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the module's package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return [(line, name) for line, name in out if name == "remamber" or name.startswith("remamber.")]


def _violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        layer = _layer(module)
        allowed = GROUND_ALLOWED[layer] if layer in GROUND else ALLOWED[layer] | GROUND
        for line, name in _imports(path):
            target = _layer(name)
            if target != layer and target not in allowed:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer} imports {name}")
    return found


def test_every_module_belongs_to_a_known_layer():
    layers = {_layer(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    known = set(ALLOWED) | GROUND
    assert layers <= known, f"unknown layers {sorted(layers - known)}: add them to the rules"


def test_no_import_climbs_the_layers():
    assert _violations() == []


def test_the_checker_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The rule must not be blind to lazy imports (the way a climb usually hides)."""
    pkg = tmp_path / "remamber"
    (pkg / "reports").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "reports" / "x.py").write_text("def f():\n    from remamber.engine import y\n")
    (pkg / "engine" / "y.py").write_text("from ..models import z\n")  # relative, and allowed
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    assert _violations() == ["remamber/reports/x.py:2: reports imports remamber.engine"]


def test_report_command_does_not_import_torch(tmp_path):
    """`remamber report` renders tables from metrics files: it must not pull in torch and the models."""
    import subprocess
    import sys

    code = ("import sys; import remamber.cli, remamber.reports.tables, remamber.reports.figures, remamber.config;"
            "from remamber.config import ExperimentConfig;"
            f"ExperimentConfig.from_yaml({str(PACKAGE.parents[1] / 'params' / 'demo.yaml')!r});"
            "print(sorted(m for m in ('torch', 'remamber.models', 'remamber.engine.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":  # pragma: no cover - a quick look while refactoring
    print("\n".join(_violations()) or "no violations")
    pytest.main([__file__])
