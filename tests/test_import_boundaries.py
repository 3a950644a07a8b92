"""The package's import graph: no circles, and each subpackage imports only what it may.

Parsed from the source (every `import`, including ones inside functions), so a
circle cannot hide behind a deferred import.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "maskgen"

# subpackage -> maskgen modules/packages it must not import (prefix match).
FORBIDDEN = {
    "maskgen.scheduler": None,  # None: only ALLOWED below
    "maskgen.models": ("maskgen.sharding", "maskgen.training", "maskgen.scheduler", "maskgen.data",
                       "maskgen.eval", "maskgen.bundle", "maskgen.official", "maskgen.sampling"),
    "maskgen.data": None,
    "maskgen.eval": ("maskgen.training",),
}
ALLOWED = {
    "maskgen.scheduler": ("maskgen.scheduler", "maskgen.tokens"),
    "maskgen.data": ("maskgen.data",),
}
# Only these modules outside maskgen.training may import it (train.py's compatibility shim).
TRAINING_IMPORTERS = ("maskgen.trainer",)


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def _imports(path: pathlib.Path) -> set[str]:
    """maskgen modules imported anywhere in the file (`from a import b` counts a.b when b is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if _is_module(full) else base)
    return {name for name in found if name == "maskgen" or name.startswith("maskgen.")}


def import_graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules, or None (iterative DFS, three colours)."""
    colour, parent = {}, {}
    for root in graph:
        if colour.get(root):
            continue
        stack = [(root, iter(sorted(graph[root])))]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                continue
            if child not in graph:
                continue
            if colour.get(child) == 1:
                cycle = [child]
                for n, _ in reversed(stack):
                    cycle.append(n)
                    if n == child:
                        break
                return cycle[::-1]
            if not colour.get(child):
                colour[child] = 1
                parent[child] = node
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_parser_sees_function_level_and_relative_imports(tmp_path):
    graph = import_graph()
    # maskgen/__init__.py imports the bundle inside load(): the parser must see it.
    assert "maskgen.bundle" in graph["maskgen"]


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_subpackage_boundaries(package):
    graph = import_graph()
    members = [m for m in graph if m == package or m.startswith(package + ".")]
    assert members, f"{package} has no modules"
    bad = []
    for module in members:
        for dep in sorted(graph[module]):
            if package in ALLOWED:
                if not any(dep == a or dep.startswith(a + ".") for a in ALLOWED[package]):
                    bad.append(f"{module} imports {dep}")
            elif any(dep == f or dep.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{module} imports {dep}")
    assert not bad, "\n".join(bad)


def test_training_is_imported_only_by_training():
    graph = import_graph()
    bad = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
           if d.startswith("maskgen.training") and not m.startswith("maskgen.training")
           and m not in TRAINING_IMPORTERS]
    assert not bad, "\n".join(bad)
