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


# ------------------------------------------------------------------------------------------------ import graph
def step_modules() -> set[str]:
    """The modules of the graph's steps, and the stand-alone classifier-training step."""
    from pipeline.graph import GRAPH

    return {s.run.__module__ for s in GRAPH} | {"steps.train_classifier"}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file, deferred imports included)."""
    files = python_files("pipeline") + python_files("steps")
    names = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in files}
    known = set(names.values())
    graph: dict[str, set[str]] = {m: set() for m in known}
    for path, module in names.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module and target not in ("steps", "pipeline"):
                    graph[module].add(target)
    return graph


def test_no_import_circles():
    graph = import_graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for dep in sorted(graph[module]):
            if seen.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in seen:
                visit(dep, [*path, dep])
        seen[module] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])


def test_no_step_module_imports_another_step_module():
    graph, steps = import_graph(), step_modules()
    assert len(steps) == 7
    for module in sorted(steps):
        assert not graph[module] & steps, f"{module} imports {sorted(graph[module] & steps)}"


def test_artifact_contracts_sit_below_the_steps():
    graph, steps = import_graph(), step_modules()
    for module in [m for m in graph if m.startswith("steps.artifacts.")]:
        bad = {d for d in graph[module] if d in steps or d.startswith("pipeline")}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_model_kinds_are_listed_only_in_the_registry():
    """A literal collection naming two or more registered kinds is a hand-kept list of kinds."""
    from steps.nn import registry

    kinds = set(registry.KINDS) | set(registry.RENAMED)
    for path in python_files("pipeline") + python_files("steps"):
        if path == ROOT / "steps" / "nn" / "registry.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
            items = node.keys if isinstance(node, ast.Dict) else items
            named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in kinds}
            assert len(named) < 2, f"{path.relative_to(ROOT)}:{node.lineno} lists model kinds {sorted(named)}"


def test_only_the_artifact_modules_name_dataset_files():
    """The Parquet datasets' layout (split folders, sidecar records) is the artifact modules' to know (DESIGN.md)."""
    names = ("manifest.json", "codes.json")
    for path in python_files("pipeline") + python_files("steps"):
        if path.parent == ROOT / "steps" / "artifacts":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = [n for n in names if n in node.value]
                assert not named, (
                    f"{path.relative_to(ROOT)}:{node.lineno} names {named}: open it through steps.artifacts"
                )
