"""The shape of the house (DESIGN.md): module-level imports between the project's modules form
no cycle, and the arrows point one way, train.py -> training -> (nets, detection, optim, data),
tools -> (nets, training). Read from the source with `ast`: nothing is imported."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("nets", "detection", "optim", "data", "training", "tools", "experiments")
# What each package may import of the project, besides itself.
ALLOWED = {
    "nets": set(),
    "detection": set(),
    "optim": set(),
    "data": set(),
    "training": {"nets", "detection", "optim", "data"},
    "tools": {"nets", "training", "data", "detection"},
    "experiments": {"nets"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    found = {"train": ROOT / "train.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """The project modules `path` imports when it is imported (not inside functions)."""
    imported = set()
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:   # relative: from . import x
                    base = ".".join([package, base]).strip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    imported.add(sub if sub in MODULES else base)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, block, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])

    visit(tree.body)
    return {name for name in imported if name in MODULES}


GRAPH = {name: _top_level_imports(path) for name, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(GRAPH):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_the_graph_reads_the_imports_it_should():
    assert "nets.registry" in GRAPH["nets"] and "training.loop" in GRAPH["training"]
    assert {"training.steps", "training.tasks"} <= GRAPH["training.classification"]


def test_no_import_cycle_between_project_modules():
    assert _cycle() is None, " -> ".join(_cycle())


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package):
    wrong = sorted(f"{module} imports {imported}" for module, imports in GRAPH.items()
                   if module.split(".")[0] == package for imported in imports
                   if imported.split(".")[0] not in ALLOWED[package] | {package})
    assert not wrong, wrong


def test_nets_submodules_never_import_the_package_itself():
    """`import nets` inside nets/ would run nets/__init__ (the registry) from a family."""
    assert not [m for m, imports in GRAPH.items() if m.startswith("nets.") and "nets" in imports]
