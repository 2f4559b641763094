"""The house layout, derived from the code: the import graph has no cycle, stage modules stand alone,
``dvc.yaml`` lists every module each stage runs, the wheel installs one package, modules stay short."""

from __future__ import annotations

import ast
import graphlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from graft.stages import STAGE_MODULES, STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "graft"
MAX_LINES = 300


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    """Every project module by import name (graft.tasks.* and graft.flows.* through the package symlinks)."""
    out = {}
    for sub in ("", "tasks", "flows"):
        for f in sorted((PACKAGE / sub).glob("*.py")):
            out[_module_name(f)] = f
    return out


def _runtime_imports(tree: ast.AST) -> list[str]:
    """Modules imported anywhere in the file (functions too), except under ``if TYPE_CHECKING:``."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{a.name}" for a in node.names)  # `from graft import cache` is a module
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports at run time."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = {m for m in _runtime_imports(ast.parse(path.read_text())) if m in mods and m != name}
        graph[name] = deps
    return graph


def closure(graph: dict[str, set[str]], roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def repo_file(module: str) -> str:
    """The module's file as dvc.yaml names it: the real path in the repository (tasks/x.py, not graft/tasks/x.py)."""
    return _modules()[module].resolve().relative_to(REPO).as_posix()


def missing_deps(dvc: dict, graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Per stage, the project files its code imports that its ``deps`` do not list."""
    out = {}
    for stage in STAGES:
        deps = set(dvc["stages"][stage]["deps"])
        needed = {repo_file(m) for m in closure(graph, STAGE_MODULES[stage])}
        if gap := sorted(needed - deps):
            out[stage] = gap
    return out


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")
    assert set(order) == set(graph)


def test_stage_modules_import_no_other_stage_and_no_flow() -> None:
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("graft.tasks."):
            others = {d for d in deps if d.startswith("graft.tasks.") or d.startswith("graft.flows")}
            assert not others, f"{name} imports {sorted(others)}: move the shared code into a graft/ library module"
    library = {n for n in graph if not n.startswith(("graft.tasks", "graft.flows"))}
    for name in library - {"graft.stages", "graft.cli"}:  # the dispatcher and the CLI call stages and flows
        assert not {d for d in graph[name] if d.startswith(("graft.tasks.", "graft.flows."))}, name


def test_cycle_detection_catches_a_cycle() -> None:
    """The checker itself: a graph with a cycle is refused (so a pass above means something)."""
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter({"a": {"b"}, "b": {"c"}, "c": {"a"}}).static_order())


def test_dvc_deps_list_every_module_a_stage_imports() -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert missing_deps(dvc, import_graph()) == {}
    for stage in STAGES:  # and nothing stale: every listed .py file exists
        for dep in dvc["stages"][stage]["deps"]:
            assert not dep.endswith(".py") or (REPO / dep).is_file(), f"{stage}: {dep} does not exist"


def test_dvc_deps_check_fails_when_a_module_is_missing() -> None:
    """Dropping graft/model.py from train (the bug this check was written for) is caught."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc["stages"]["train"]["deps"].remove("graft/model.py")
    assert "graft/model.py" in missing_deps(dvc, import_graph())["train"]


def test_modules_stay_short() -> None:
    """The package's modules and the benchmark scripts (and the modules beside them in bench/)."""
    files = {**_modules(), **{f"bench/{p.name}": p for p in sorted((REPO / "bench").glob("*.py"))}}
    long = {name: n for name, p in files.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.slow
def test_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ into the source folder
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if (REPO / rel).is_symlink():
            dst.symlink_to(Path(os.readlink(REPO / rel)))
        elif (REPO / rel).is_file():
            shutil.copy2(REPO / rel, dst)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("graft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"graft"}
    assert {"graft/tasks/featurize.py", "graft/flows/pipeline.py", "graft/stages.py"} <= set(names)
