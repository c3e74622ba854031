"""The layout of rlpost.models: the package's __init__ only re-exports its modules' API, and the modules of the
package (and rlpost/heldout.py) import rlpost modules at their top, never inside a function."""

import ast
import inspect
import pathlib

import rlpost.models

ROOT = pathlib.Path(rlpost.__file__).parent


def test_the_package_init_only_re_exports():
    tree = ast.parse((ROOT / "models" / "__init__.py").read_text())
    body = tree.body[1:] if isinstance(tree.body[0], ast.Expr) else tree.body  # the docstring
    defined = [node for node in body if not isinstance(node, ast.ImportFrom)
               and not (isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"])]
    assert not defined, f"rlpost/models/__init__.py defines code at lines {[n.lineno for n in defined]}"
    for name in rlpost.models.__all__:
        value = getattr(rlpost.models, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert value.__module__.startswith("rlpost.models."), (name, value.__module__)


def test_models_and_heldout_import_rlpost_at_the_top():
    files = sorted((ROOT / "models").glob("*.py")) + [ROOT / "heldout.py"]
    local = []
    for path in files:
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlpost") or \
                        isinstance(node, ast.Import) and any(a.name.startswith("rlpost") for a in node.names):
                    local.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    assert not local, f"function-local rlpost imports: {local}"


def _imports(path: pathlib.Path, module: str, modules: set[str]) -> set[str]:
    """The rlpost modules `path` imports, at the top or inside functions (an imported name that is not a module
    counts as its module), with the packages Python runs first: importing rlpost.models.gpt_mini from outside
    the package runs rlpost/models/__init__.py."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = module.rsplit(".", node.level - (path.name == "__init__.py"))[0]
            names = [f"{base}.{node.module}" if node.module else base]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        if isinstance(node, ast.ImportFrom):
            names = [f"{names[0]}.{a.name}" for a in node.names] + names
        for name in names:
            while name not in modules and "." in name:
                name = name.rsplit(".", 1)[0]
            while name in modules and name != module and not module.startswith(name + "."):
                out.add(name)
                name = name.rsplit(".", 1)[0]
    return out


def test_the_models_package_is_in_no_import_cycle():
    files = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    for start in [m for m in graph if m.startswith("rlpost.models")]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert start not in seen, f"{start} imports (through other rlpost modules) itself"
