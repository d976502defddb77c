"""Imports go one way: pipeline -> steps -> steps/nn, and steps/nn is pure torch (torch, numpy, stdlib)."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(
                alias.name.split(".")[0] if not alias.name.startswith("steps") else alias.name for alias in node.names
            )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module if node.module.startswith("steps") else node.module.split(".")[0])
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", python_files("steps/nn"), ids=lambda p: p.name)
def test_nn_is_pure_torch(path):
    allowed_third_party = {"torch", "numpy"}
    for name in imported_modules(path):
        top = name.split(".")[0]
        ok = top in allowed_third_party or top in sys.stdlib_module_names or name.startswith("steps.nn")
        assert ok, f"{path.relative_to(ROOT)} imports {name}: steps/nn may import only torch, numpy and stdlib"


@pytest.mark.parametrize("path", python_files("steps"), ids=lambda p: str(p.relative_to(ROOT)))
def test_steps_do_not_import_pipeline(path):
    assert "pipeline" not in {n.split(".")[0] for n in imported_modules(path)}, f"{path} imports pipeline/"


def test_required_top_level_exists():
    for name in ("pyproject.toml", "README.md", "cluster.yaml", "pipeline", "steps", "conf", "tests"):
        assert (ROOT / name).exists(), f"missing required top-level {name}"
