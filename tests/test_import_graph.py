"""Imports inside famnet_pl run one way: no cycle between its modules, lazy imports included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "famnet_pl"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):  # every statement, inside functions too
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_in_the_package():
    graph = _graph()
    assert "famnet_pl.config" in graph["famnet_pl.loso.runner"]  # the walker sees imports (lazy ones too)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_walker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


# Layers, top to bottom: a module may import its own layer or lower ones, never a higher one. The
# famnet_pl.sweep / .slurm / .aggregate aliases of the old layout sit on top with the CLI.
LAYERS = (
    ("famnet_pl.cli", "famnet_pl.sweep", "famnet_pl.slurm", "famnet_pl.aggregate"),
    ("famnet_pl.studies",),
    ("famnet_pl.loso",),
    ("famnet_pl.deploy",),
    ("famnet_pl.config", "famnet_pl.recipes"),
    ("famnet_pl.models", "famnet_pl.data"),
    ("famnet_pl.losses", "famnet_pl.metrics", "famnet_pl.utils"),
)


def _layer(module: str) -> int:
    for depth, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return depth
    raise AssertionError(f"{module} is in no layer of tests/test_import_graph.py: add it")


def test_imports_run_one_way_from_the_cli_down():
    graph = _graph()
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() if a != "famnet_pl"
                    for b in targets if b != "famnet_pl" and _layer(b) < _layer(a))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)
