"""Imports go one way: pipeline -> steps -> steps/nn, and steps/nn is pure torch (torch, numpy, stdlib)."""

import ast
import re
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


# A file or folder name an artifact module owns: "model.pt", "_codes.json", "_SUCCESS", "part-empty".
FILE_NAME = re.compile(r"[\w.-]+\.(json|png|pt|parquet)|_[A-Z]+|\w+-\w[\w-]*")


def artifact_file_names() -> dict[str, str]:
    """Name -> the artifact module that owns it: every module-level string constant of ``steps/artifacts`` that
    looks like a file name (``MODEL = "model.pt"``, ``IMAGES, CODES = ...`` tuples too)."""
    owned = {}
    for path in python_files("steps/artifacts"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for v in values:
                    if isinstance(v, ast.Constant) and isinstance(v.value, str) and FILE_NAME.fullmatch(v.value):
                        owned[v.value] = path.name
    return owned


def code_strings(path: Path):
    """(line, text) of the string literals of ``path``'s code: docstrings left out, f-strings' literal parts in."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_artifact_modules_own_names_worth_checking():
    owned = artifact_file_names()
    for name in ("model.pt", "_codes.json", "_manifest.json", "samples.json", "recon.png", "part-empty", "_SUCCESS"):
        assert name in owned, f"{name} is not found as a constant of steps/artifacts: the test below would miss it"


def test_only_the_artifact_modules_name_files():
    """File names and layouts are the artifact modules' to know (DESIGN.md): no other product module spells one, even
    inside a path or an f-string (as ``f"{out}/recon.png"``)."""
    owned = artifact_file_names()
    for path in python_files("pipeline") + python_files("steps"):
        if path.parent == ROOT / "steps" / "artifacts":
            continue
        for line, text in code_strings(path):
            named = [n for n in owned if text == n or text.endswith("/" + n) or text.startswith(n + "/")]
            assert not named, (
                f"{path.relative_to(ROOT)}:{line} names {named} (owned by steps/artifacts/{owned[named[0]]}): "
                "open or write it through the artifact handle"
            )


def test_no_code_outside_the_graph_switches_on_a_step_name():
    """Orchestration, serving and support code ask the graph and the step's output handle, never ``step == "..."``
    or a hand-kept list of step names; step modules name only the upstream inputs they read."""
    from pipeline.graph import NAMES

    steps = step_modules()
    for path in python_files("pipeline") + python_files("steps"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if path == ROOT / "pipeline" / "graph.py" or module in steps:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                named = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in NAMES]
                assert not named, f"{path.relative_to(ROOT)}:{node.lineno} compares with step name(s) {named}"
            items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
            items = node.keys if isinstance(node, ast.Dict) else items
            named = {i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES}
            assert len(named) < 2, f"{path.relative_to(ROOT)}:{node.lineno} lists step names {sorted(named)}"


def test_every_step_names_an_output_handle_of_the_one_protocol():
    from pipeline.graph import GRAPH
    from steps.artifacts.base import Artifact

    for step in GRAPH:
        out = step.output
        assert issubclass(out, Artifact) and out is not Artifact, step.name
        assert out.__module__.startswith("steps.artifacts."), f"{step.name}: {out} is not an artifact module's handle"
        for method in ("open", "verify", "content_digest", "headline"):
            assert callable(getattr(out, method)), f"{out.__name__}.{method}"
    assert len({s.output for s in GRAPH}) == len(GRAPH), "each output kind is written by one step"
