"""The package's shape, checked: no import cycles, imports at the top (lazy imports only for
optional dependencies), a docstring on every module, no function longer than 60 lines.

The imports are read with `ast`, so a cycle through a function-level import counts too."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "minilars")
OPTIONAL = ("gguf", "minilars._cext")      # may be imported where first needed
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


MODULES = _modules()
TREES = {name: ast.parse(open(path, encoding="utf-8").read()) for name, path in MODULES.items()}


def _imported(name: str, node) -> list[str]:
    """The minilars modules an import statement of module `name` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:                                   # relative: resolve against the package
        base = name.rsplit(".", node.level - (name in _packages()))[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    out = [target] if target in MODULES else []
    out += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return out


def _packages() -> set[str]:
    return {n for n, p in MODULES.items() if p.endswith("__init__.py")}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, tree in TREES.items():
        graph[name] = {t for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for t in _imported(name, node) if t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a list of modules, or None (depth-first, colouring)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_library_never_imports_the_lab():
    graph = import_graph()
    lab_users = {n for n, deps in graph.items() if not n.startswith(("minilars.lab", "minilars.cli"))
                 and any(d.startswith("minilars.lab") for d in deps)}
    assert not lab_users, lab_users


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_has_a_docstring(name):
    assert ast.get_docstring(TREES[name]), f"{MODULES[name]} has no module docstring"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_are_at_the_top(name):
    lazy = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import):
                    mods = [a.name for a in inner.names]
                elif isinstance(inner, ast.ImportFrom):
                    mods = [f"{inner.module}.{a.name}" for a in inner.names]
                else:
                    continue
                lazy += [f"{node.name}:{inner.lineno} {m}" for m in mods
                         if not m.startswith(OPTIONAL)]
    assert not lazy, f"{MODULES[name]}: function-level imports of required modules: {lazy}"


def test_no_function_is_longer_than_60_lines():
    long = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{MODULES[name]}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)
