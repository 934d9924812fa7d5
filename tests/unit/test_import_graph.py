"""The modules of `scope_mega` import each other without a cycle.

Every `import` / `from ... import` of a package module counts, wherever it stands: at module level,
inside a function, or under `if TYPE_CHECKING:`. Relative imports are resolved; `from pkg.sub import mod`
names the submodule `pkg.sub.mod` when there is one, else the module `pkg.sub`; importing a package
means importing its `__init__.py`. The check reads the source with `ast` and imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import scope_mega

PACKAGE_DIR = Path(scope_mega.__file__).parent


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package_dir` (the package's own name
    being the folder's)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement in `module` may name as modules, most specific first."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join([*parts, *([base] if base else [])])
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package modules `module` (stored at `path`) imports anywhere in its file."""
    out = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        names = _imported(node, module, is_package)
        if isinstance(node, ast.ImportFrom):
            found = [n for n in names[:-1] if n in modules]  # `from pkg import submodule`
            if len(found) < len(names) - 1 and names[-1] in modules:
                found.append(names[-1])  # a name that is not a submodule comes from `pkg` itself
        else:
            found = [_deepest_module(n, modules) for n in names]
        out.update(n for n in found if n is not None and n != module)
    return out


def _deepest_module(name: str, modules: set[str]) -> str | None:
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = module_names(package_dir)
    return {module: imports_of(path, module, set(files)) for module, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None when the graph is a DAG (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_scope_mega_imports_form_a_dag():
    graph = import_graph(PACKAGE_DIR)
    assert len(graph) > 50 and "scope_mega.checkpointing" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_downward():
    """The run layout is a leaf; `runtime/` uses none of the stages, `models/` none of the stages."""
    graph = import_graph(PACKAGE_DIR)
    names = ("checkpointing", "train_step", "trainer", "sft", "stage", "eval", "tasks", "plan", "cli")
    stages = {f"scope_mega.{m}" for m in names}
    assert graph["scope_mega.run_dir"] == set()
    for module, imported in graph.items():
        if module.startswith(("scope_mega.runtime", "scope_mega.models")):
            assert not imported & stages, f"{module} imports {sorted(imported & stages)}"


def test_a_planted_cycle_is_found(tmp_path):
    """The finder on a tiny package whose cycle runs through a function-level import, a TYPE_CHECKING
    import, a relative import and a `from package import submodule`."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import C\n")
    (pkg / "a.py").write_text("def f():\n    from pkg.sub import c\n    return c\n")
    (pkg / "sub" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import B\nC = 1\n"
    )
    (pkg / "b.py").write_text("from . import a\nimport os\nB = 2\n")
    (pkg / "leaf.py").write_text("import pkg.sub\n")

    graph = import_graph(pkg)
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.c"},
        "pkg.a": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.b"},
        "pkg.b": {"pkg.a"},
        "pkg.leaf": {"pkg.sub"},
    }
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.c", "pkg.b", "pkg.a"]

    (pkg / "b.py").write_text("import os\nB = 2\n")  # the cycle cut: a DAG
    assert find_cycle(import_graph(pkg)) is None
