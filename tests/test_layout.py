"""The house's shape (issues 18 and 30): dispatch goes one way, from the CLIs down to the jobs and from the jobs down to
the library they share (jobs/lib/); infra/ uses that library and nothing of the jobs; no import runs in a circle; and
no module or function grows past what one reading holds, except the few named below with the reason."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("jobs", "infra")
LIBRARY = "jobs.lib"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Modules over MAX_MODULE_LINES, each with the most lines it may have and why it is one module.
LONG_MODULES = {
    "infra/cli.py": (620, "the `t2s-infra` commands, each a thin typer shell over infra's modules: one table of them"),
    "jobs/lib/card.py": (420, "the model card: its sections are one document, read top to bottom"),
    "jobs/lib/config.py": (480, "the run's one schema (every section's defaults and checks) and its loading: the "
                                "defaults live in one place"),
    "jobs/lib/rundir.py": (460, "a run's folder: its paths, markers, records and atomic writes, one vocabulary"),
    "jobs/lib/sandbox.py": (600, "the worker processes and the parent's side of their one protocol (deadlines, "
                                 "memory caps, kills): split, each half would be read with the other open"),
    "jobs/push.py": (470, "push's checks, the Hub upload with its retries and the one-line reading of every Hub "
                          "failure: one job's I/O"),
    "jobs/serve_app.py": (440, "the FastAPI app: routes, batching engine and lifespan share one state object"),
    "jobs/train.py": (470, "the train job: its checks, the accelerate launcher and the worker it launches as "
                           "`python -m jobs.train --worker` (what it shares with rl is jobs/lib/training.py)"),
}
# Functions over MAX_FUNCTION_LINES, as "path:name", each with the most lines it may have and why it is one function.
LONG_FUNCTIONS = {
    "infra/cli.py:launch": (110, "a typer command: half of it is the declaration of its options"),
    "infra/launch.py:launch_pod": (70, "one pod's life in order (create, wait, follow, end), each step a call"),
    "jobs/export.py:check_files": (90, "export's checks in the order they are promised (read back, f16 through "
                                        "transformers, every file through llama.cpp), over one set of merged answers"),
    "jobs/eval.py:run": (75, "eval's loop over models and decodings: the report is built from what it gathers"),
    "jobs/rl.py:run": (85, "the RL job in order: checks, model, rewards, trainer, resume, save"),
    "jobs/serve_app.py:create_app": (115, "the FastAPI routes are closures over the app's state, declared together"),
    "jobs/train.py:make_callbacks": (70, "the trainer callbacks, small classes defined over one run's state"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports, at its top or inside a function (jobs.x, jobs.lib.y, infra.z)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # from jobs.lib import config
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    return {name: project_imports(path, set(files)) - {name} for name, path in files.items()}


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


def in_library(module: str) -> bool:
    return module == LIBRARY or module.startswith(LIBRARY + ".")


def test_no_job_imports_the_cli_and_no_import_runs_in_a_circle():
    graph = import_graph()
    above_the_cli = sorted(module for module, imports in graph.items() if "jobs.cli" in imports)
    assert above_the_cli == [], f"these import jobs.cli, which dispatches to them: {above_the_cli}"
    knows_runpod = sorted(module for module, imports in graph.items()
                          if module.startswith("jobs.") and any(name.startswith("infra.") for name in imports))
    assert knows_runpod == [], f"jobs/ knows nothing about RunPod, but these import infra/: {knows_runpod}"
    assert find_cycle(graph) is None, f"an import circle: {' -> '.join(find_cycle(graph))}"
    assert {"jobs.prep", "jobs.train", "jobs.merge", "jobs.eval", "jobs.push"} <= graph["jobs.cli"]  # named, not looked up


def test_infra_imports_only_the_jobs_shared_library():
    graph = import_graph()
    into_jobs = {module: sorted(name for name in imports if name.startswith("jobs.") and not in_library(name))
                 for module, imports in graph.items() if module.startswith("infra.")}
    into_jobs = {module: names for module, names in into_jobs.items() if names}
    assert into_jobs == {}, f"infra/ imports job modules (move what it needs into jobs/lib/): {into_jobs}"
    assert any(in_library(name) for module, imports in graph.items() if module.startswith("infra.") for name in imports)


def test_the_library_imports_no_job():
    graph = import_graph()
    back_up = {module: sorted(name for name in imports if not in_library(name))
               for module, imports in graph.items() if in_library(module)}
    back_up = {module: names for module, names in back_up.items() if names}
    assert back_up == {}, f"jobs/lib/ is below the jobs and infra, but these import from above it: {back_up}"
    assert len([module for module in graph if in_library(module)]) >= 10  # the library is where this test looks


def module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def function_lines(source: str) -> dict[str, int]:
    """{name: lines} of every function and method in `source` (its def line to its last line; a method as Class.name)."""
    sizes = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                sizes[prefix + child.name] = child.end_lineno - child.lineno + 1
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return sizes


def test_no_module_and_no_function_is_over_the_limits_but_those_named_with_a_reason():
    over = {}
    for path in project_files().values():
        where = path.relative_to(ROOT).as_posix()
        lines = module_lines(path)
        limit = LONG_MODULES.get(where, (MAX_MODULE_LINES,))[0]
        if lines > limit:
            over[where] = f"{lines} lines > {limit}"
        for name, size in function_lines(path.read_text()).items():
            allowed = LONG_FUNCTIONS.get(f"{where}:{name}", (MAX_FUNCTION_LINES,))[0]
            if size > allowed:
                over[f"{where}:{name}"] = f"{size} lines > {allowed}"
    assert over == {}, f"split these at a seam (or name them in LONG_MODULES / LONG_FUNCTIONS with why): {over}"


def test_every_exception_to_the_limits_is_still_needed():
    files = {path.relative_to(ROOT).as_posix(): path for path in project_files().values()}
    stale = [where for where in LONG_MODULES if where not in files or module_lines(files[where]) <= MAX_MODULE_LINES]
    for key in LONG_FUNCTIONS:
        where, name = key.split(":")
        if where not in files or function_lines(files[where].read_text()).get(name, 0) <= MAX_FUNCTION_LINES:
            stale.append(key)
    assert stale == [], f"within the limits now: remove them from the allow-lists: {stale}"
    assert all(why for _, why in [*LONG_MODULES.values(), *LONG_FUNCTIONS.values()])


def test_the_cycle_finder_and_the_function_sizes_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = "class A:\n    def m(self):\n" + "        x = 1\n" * 70 + "\ndef f():\n    def g():\n        pass\n"
    assert function_lines(source) == {"A.m": 71, "f": 3, "f.g": 2}
