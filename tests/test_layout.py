"""The house's shape (issue 18): dispatch goes one way, from the CLIs down to the jobs, and no import runs in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("jobs", "infra")


def project_imports(path: Path) -> set[str]:
    """The project modules a file imports, at its top or inside a function (jobs.x, infra.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from jobs import prep
    modules = {f"{p.parent.name}.{p.stem}" for package in PACKAGES for p in (ROOT / package).glob("*.py")}
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    return {f"{package}.{path.stem}": project_imports(path) - {f"{package}.{path.stem}"}
            for package in PACKAGES for path in sorted((ROOT / package).glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in graph:
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_job_imports_the_cli_and_no_import_runs_in_a_circle():
    graph = import_graph()
    above_the_cli = sorted(module for module, imports in graph.items() if "jobs.cli" in imports)
    assert above_the_cli == [], f"these import jobs.cli, which dispatches to them: {above_the_cli}"
    knows_runpod = sorted(module for module, imports in graph.items()
                          if module.startswith("jobs.") and any(name.startswith("infra.") for name in imports))
    assert knows_runpod == [], f"jobs/ knows nothing about RunPod, but these import infra/: {knows_runpod}"
    assert find_cycle(graph) is None, f"an import circle: {' -> '.join(find_cycle(graph))}"
    assert {"jobs.prep", "jobs.train", "jobs.merge", "jobs.eval", "jobs.push"} <= graph["jobs.cli"]  # named, not looked up


# The jobs and the commands: what infra must not import (it launches them on a pod by name, through the image).
JOB_MODULES = {"jobs.cli", "jobs.prep", "jobs.train", "jobs.merge", "jobs.eval", "jobs.push", "jobs.rl", "jobs.compare",
               "jobs.ask", "jobs.serve", "jobs.serve_app", "jobs.serve_api"}


def test_infra_imports_only_the_jobs_shared_library():
    graph = import_graph()
    assert JOB_MODULES <= set(graph), f"not modules any more: {sorted(JOB_MODULES - set(graph))}"
    into_jobs = {module: sorted(imports & JOB_MODULES) for module, imports in graph.items()
                 if module.startswith("infra.") and imports & JOB_MODULES}
    assert into_jobs == {}, f"infra/ imports job modules (move what it needs into the shared library): {into_jobs}"


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
