"""The house's one-direction rules (docs/architecture.md), checked on the import graph.

The graph is ecserve's own modules and the imports between them, read from the source (nothing
is imported): module-level imports and those inside functions alike, since a lazy import is
still a design dependency. `from pkg import name` is an edge to the module `pkg.name` when that
is a module, else to `pkg`. Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first, but
that implicit edge to the parent packages is not counted: every module would otherwise depend
on its package, whose `__init__` often imports its modules, and all would be one cycle.

A package `__init__` is a module like the others: what it imports, it depends on, and so does
whoever imports from it. That holds for its lazy re-exports too (`__getattr__` calling
`importlib.import_module` on names kept as strings): the strings naming package modules count
as its imports. So a re-exporting facade (`ecserve`, `ecserve.loadtest`) is the top of its
package: the modules it re-exports must not import it back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ecserve"
# Each checked package: its import name, the folder it installs from.
PACKAGES = {"ecserve": PACKAGE, "ecserve_kernels": ROOT / "kernels" / "ecserve_kernels"}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package in folder `root`, by its dotted name."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def module_imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules that module `name` (its source at `path`) imports."""
    tree = ast.parse(path.read_text(), str(path))
    # The package a relative import starts from: a package's own name, a module's parent.
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    lazy = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            lazy = lazy or called == "import_module"
    if lazy:  # names kept as strings for importlib: absolute, or relative to this package
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.update(m for m in (node.value, f"{here}.{node.value}") if m in modules)
    return (out & modules) - {name}


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    files = module_files(root, package)
    return {name: module_imports(name, path, set(files)) for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle, as a path `[a, b, ..., a]`, per strongly connected component of more than one
    module (Tarjan's algorithm; each path is a shortest cycle through the component's first
    module, so the report names an edge to cut)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_shortest_cycle(graph, set(c), c[0]) for c in sorted(components)]


def _shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:  # breadth first, inside the component, back to `start`
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle of {sorted(component)}")


def describe(cycles: list[list[str]]) -> str:
    return "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycles(package: str) -> None:
    cycles = import_cycles(import_graph(PACKAGES[package], package))
    assert not cycles, describe(cycles)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_cycle_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    root = _write(tmp_path / "pkg", {
        # A facade importing its modules: their implicit import of `pkg` is no cycle.
        "__init__.py": "from pkg.a import A\nfrom .c import C\n",
        "a.py": "import pkg.b\nA = 1\n",
        "b.py": "def f():\n    from pkg import a  # lazy, still a dependency\n",
        "c.py": "from pkg.a import A\nC = A\n",
        "sub/__init__.py": "",
        "sub/d.py": "from .. import c\nfrom ..sub import e\n",
        "sub/e.py": "from pkg.sub import d\n",
    })
    graph = import_graph(root, "pkg")
    assert graph == {
        "pkg": {"pkg.a", "pkg.c"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"},
        "pkg.sub": set(), "pkg.sub.d": {"pkg.c", "pkg.sub.e"}, "pkg.sub.e": {"pkg.sub.d"},
    }
    cycles = import_cycles(graph)
    assert cycles == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub.d", "pkg.sub.e", "pkg.sub.d"]]
    assert describe(cycles) == ("import cycles:\n  pkg.a -> pkg.b -> pkg.a\n"
                                "  pkg.sub.d -> pkg.sub.e -> pkg.sub.d")


def test_lazy_re_exports_are_imports(tmp_path: Path) -> None:
    """A facade's `__getattr__` re-export is an edge, so a re-exported module importing the
    facade back is a cycle; a name that is not a module is an edge to the package."""
    root = _write(tmp_path / "pkg", {
        "__init__.py": ("import importlib\n_EXPORTS = {'X': 'pkg.x', 'Y': 'y'}\n"
                        "def __getattr__(n):\n    return importlib.import_module(_EXPORTS[n])\n"),
        "x.py": "from pkg import __version__\n",
        "y.py": "",
        "z.py": "import pkg.x\n",
    })
    graph = import_graph(root, "pkg")
    assert graph == {"pkg": {"pkg.x", "pkg.y"}, "pkg.x": {"pkg"}, "pkg.y": set(),
                     "pkg.z": {"pkg.x"}}
    assert import_cycles(graph) == [["pkg", "pkg.x", "pkg"]]


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("server", "ecserve.parallel"),  # the server asks the runner, never the EP internals
    ("model/hf", "ecserve.model.weights"),  # both loaders read files through model.checkpoint
    ("model", "ecserve.engine"),  # the model knows nothing of the engine around it
    ("model", "ecserve.metrics"),
    ("model", "ecserve.parallel"),  # expert parallelism installs its backend from outside
    ("engine", "ecserve.server"),
    ("engine", "ecserve.parallel"),  # the parallel package wraps the engine, not the reverse
])
def test_no_import_against_the_flow(importer: str, forbidden: str) -> None:
    graph = import_graph(PACKAGE, "ecserve")
    prefix = "ecserve." + importer.replace("/", ".")
    offenders = [m for m in sorted(graph) if m == prefix or m.startswith(prefix + ".")
                 if any(d == forbidden or d.startswith(forbidden + ".") for d in graph[m])]
    assert not offenders, f"{', '.join(offenders)} import {forbidden}"


def policy_name_comparisons(path: Path, names: set[str]) -> list[int]:
    """Lines of `cfg.policy == "capped"`, `policy in ("ec", ...)` and the like: a policy (an
    expression naming one) compared with a routing policy's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = (node.left, *node.comparators)
        named = [s for s in sides if any(
            isinstance(c, ast.Constant) and c.value in names
            for c in (s.elts if isinstance(s, (ast.Tuple, ast.List, ast.Set)) else [s]))]
        if named and any("policy" in ast.unparse(s) for s in sides if s not in named):
            found.append(node.lineno)
    return found


def test_only_the_routing_package_and_the_config_compare_policy_names() -> None:
    """Everything else asks the policy object (ecserve/routing/policies.py)."""
    from ecserve.config import POLICIES

    allowed = (PACKAGE / "routing", PACKAGE / "config")
    offenders = [f"{path.relative_to(ROOT)}:{line}" for path in sorted(PACKAGE.rglob("*.py"))
                 if not any(path.is_relative_to(a) for a in allowed)
                 for line in policy_name_comparisons(path, set(POLICIES))]
    assert not offenders, "compare the policy's properties instead: " + ", ".join(offenders)


def test_the_policy_name_check_finds_comparisons_not_values(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text('name = "ec"\nif cfg.policy == "capped" or policy in ("ec", "x"):\n    pass\n'
                 'RoutingConfig(policy="capped")\nif preset == "ec":\n    pass\n')
    assert policy_name_comparisons(f, {"ec", "capped"}) == [2, 2]
