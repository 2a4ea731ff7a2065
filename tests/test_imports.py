"""The library's import arrows point one way: nothing outside `toyworld/` (and the CLI's `demo` command) imports the
toy world, and no two diffalign modules import each other, directly or in a circle (every import counts: top level,
inside functions, under TYPE_CHECKING)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "diffalign"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """diffalign modules imported anywhere in `path` (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("diffalign")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("diffalign"):
                found.add(module)
                found |= {f"{module}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _imports(path) if t in modules and t != name}
        # importing `a.b.c` runs `a/__init__` and `a/b/__init__` too, but those arrows are the packages' own
        graph[name] = targets
    return graph


def test_nothing_outside_the_toy_world_imports_it():
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in _graph().items()
        for target in targets
        if target.startswith("diffalign.toyworld") and not name.startswith("diffalign.toyworld")
        and name != "diffalign.cli"
    )  # fmt: skip
    assert offenders == []


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):  # a package importing its own submodules (`__init__` re-exports)
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
