"""The import graph of rlpost/ (docs/architecture.md, "Layers"): no cycles, no upward imports, and no rlpost
module imported inside a function. Built from the source with `ast` (nothing is imported): every `import` and
`from ... import` of an rlpost module, at the top of a module or inside a function, relative ones resolved."""

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rlpost"


@dataclass(frozen=True)
class Edge:
    source: str   # the importing module, e.g. rlpost.stages.sft
    target: str   # the imported rlpost module, e.g. rlpost.trainer
    where: str    # rlpost/stages/sft.py:25
    local: bool   # inside a function (or a lambda): run when the function runs, not when the module loads


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every .py under `root` (a package is named by its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules) -> list[str]:
    """The rlpost modules an import statement names: `from pkg import sub` names pkg.sub when that is a module,
    else pkg (a name defined in it); `from . import x` and `from ..a import b` are resolved against `module`."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".") if is_package else module.split(".")[:-1]
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = []
    for name in names:
        while name not in modules and "." in name:  # `import rlpost.a.b.c` of a name inside rlpost.a.b
            name = name.rsplit(".", 1)[0]
        if name in modules and name.split(".")[0] == "rlpost":
            out.append(name)
    return out


def import_edges(root: Path = ROOT) -> list[Edge]:
    """Every import of one rlpost module by another, top-level or function-local."""
    modules = module_files(root)
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(root.parent).as_posix()

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, module, path.name == "__init__.py", modules):
                        if target != module:
                            edges.append(Edge(module, target, f"{where}:{child.lineno}", in_function))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each as a sorted list."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return groups


def cycle_path(group: list[str], edges: list[Edge]) -> list[Edge]:
    """One cycle through the group's first module, as the import statements that make it (shortest, by BFS)."""
    inside = set(group)
    out: dict[str, list[Edge]] = {}
    for e in edges:
        if e.source in inside and e.target in inside:
            out.setdefault(e.source, []).append(e)
    start = group[0]
    paths = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in sorted(out.get(v, []), key=lambda e: e.target):
                if e.target == start:
                    return paths[v] + [e]
                if e.target not in paths:
                    paths[e.target] = paths[v] + [e]
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in its own group")  # Tarjan's groups always have one


def describe(group: list[str], edges: list[Edge]) -> str:
    path = cycle_path(group, edges)
    steps = " -> ".join([path[0].source] + [e.target for e in path])
    lines = "\n      ".join(f"{e.where} imports {e.target}" + (" (inside a function)" if e.local else "")
                            for e in path)
    return f"  {steps}   ({len(group)} modules in the group: {', '.join(group)})\n      {lines}"


def test_the_module_graph_has_no_cycle():
    edges = import_edges()
    found = cycles(edges)
    assert not found, ("import cycles in rlpost/ (a module imports one that imports it back); move the shared "
                       "piece down to the lower module instead:\n" + "\n".join(describe(g, edges) for g in found))


def test_no_rlpost_module_is_imported_inside_a_function():
    """A function-local import is only for an optional heavy package (vllm, ray, peft, ...), never to dodge a
    cycle with another rlpost module (docs/architecture.md, "Layers")."""
    local = sorted({(e.where, e.target) for e in import_edges() if e.local})
    assert not local, (f"{len(local)} function-local import(s) of rlpost modules; import them at the top of the "
                       "module (and break any cycle that makes by moving code down a layer):\n" +
                       "\n".join(f"  {where} imports {target}" for where, target in local))


def under(module: str, prefix: str) -> bool:
    """Is `module` the module or package `prefix`, or inside it?"""
    return module == prefix or module.startswith(prefix + ".")


def upward(edges: list[Edge], low: str, high: tuple[str, ...]) -> list[str]:
    """The imports from modules under `low` of modules under one of `high`."""
    return sorted(f"{e.where} imports {e.target}" for e in edges
                  if under(e.source, low) and any(under(e.target, h) for h in high))


def test_ops_is_a_leaf():
    """rlpost/ops.py (the masked math) imports no other rlpost module, so every layer can use it."""
    assert upward(import_edges(), "rlpost.ops", ("rlpost",)) == []


def test_stages_build_on_stages_base_never_on_the_run():
    """The run (run.py) imports the stages; a stage imports stages/base.py and the layers below, never the run or
    the command line, and stages/base.py imports no stage."""
    edges = import_edges()
    assert upward(edges, "rlpost.stages", ("rlpost.run", "rlpost.cli")) == []
    assert upward(edges, "rlpost.stages.base", ("rlpost.stages", "rlpost.run", "rlpost.cli")) == []


def test_library_modules_do_not_import_stages_the_run_or_the_cli():
    """The roles and helpers (everything but the front hall: cli.py, run.py, the stages, the commands) never
    reach up into a stage, the run or the command line."""
    front = ("rlpost.cli", "rlpost.run", "rlpost.stages", "rlpost.commands")
    found = sorted(f"{e.where} imports {e.target}" for e in import_edges()
                   if not any(under(e.source, f) for f in front + ("rlpost.__main__", "rlpost.plan"))
                   and any(under(e.target, f) for f in front))
    assert not found, "library modules importing the front hall:\n" + "\n".join(found)


def test_plug_ins_do_not_import_their_own_package():
    """An algorithm, preference loss or model family file (or any other module of those packages) imports its
    package's base.py (the registry, the base classes), never the package's __init__, which imports every
    plug-in."""
    edges = import_edges()
    packages = ("rlpost.algorithms", "rlpost.preference", "rlpost.rollout.families")
    found = sorted({f"{e.where} imports {e.target}" for e in edges
                    if e.target in packages and e.source.startswith(e.target + ".")})
    assert not found, "plug-ins importing their package's __init__:\n" + "\n".join(found)


def test_the_graph_builder_sees_local_relative_and_cyclic_imports(tmp_path):
    """The checks above can fail: a cycle through a relative, function-local import is found and named."""
    pkg = tmp_path / "rlpost"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from rlpost.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    edges = import_edges(pkg)
    assert {(e.source, e.target, e.local) for e in edges} == {("rlpost.a", "rlpost.sub.b", False),
                                                               ("rlpost.sub.b", "rlpost.a", True)}
    found = cycles(edges)
    assert found == [["rlpost.a", "rlpost.sub.b"]]
    assert "rlpost/sub/b.py:2 imports rlpost.a (inside a function)" in describe(found[0], edges)


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter: an import that reaches back into a module still being
    imported (its names not defined yet) fails here even when the graph above has no explicit cycle, e.g. through
    the package __init__ that importing a submodule runs first. Two at a time: each process loads torch."""
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent), "OMP_NUM_THREADS": "1"}

    def attempt(module: str) -> str | None:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                              timeout=300)
        return None if done.returncode == 0 else f"{module}: {(done.stderr.strip().splitlines() or ['?'])[-1]}"

    modules = [m for m in module_files() if m != "rlpost.__main__"]  # __main__ runs the command line
    with ThreadPoolExecutor(max_workers=2) as pool:
        failed = [f for f in pool.map(attempt, modules) if f]
    assert not failed, "modules that do not import on their own:\n  " + "\n  ".join(failed)
