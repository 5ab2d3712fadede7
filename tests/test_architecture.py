"""The package layering is a design rule: shapesynth <- trainers <- validation."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import
FORBIDDEN = {
    "shapesynth": {"trainers", "validation"},
    "trainers": {"validation"},
    "validation": set(),
}
PEERS = {"pytorch_grad_cam", "quantus"}  # test/benchmark oracles, never runtime imports


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    offenders = {
        str(f.relative_to(ROOT)): sorted(_imported_roots(f) & (FORBIDDEN[package] | PEERS))
        for f in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"forbidden imports: {offenders}"


def test_rule_detects_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import validation.metrics\nfrom trainers import x\n")
    assert {"validation", "trainers"} <= _imported_roots(bad)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_runs_as_module(package):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()
