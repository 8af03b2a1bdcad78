"""The package's layering (ARCHITECTURE.md): no import cycles among seqkv's modules, and no
module imports a layer above its own. Read from the source with ast, function-level imports
included, so nothing is imported to check it; imports under ``if TYPE_CHECKING:`` are
annotations only, never run, and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

import seqkv

ROOT = Path(seqkv.__file__).parent

# Lowest first: a module may import its own layer and the layers below it.
LAYERS = [
    ("core", ("seqkv.core", "seqkv.engine")),
    ("quant", ("seqkv.quant",)),
    ("tokens", ("seqkv.tokens",)),
    ("delta", ("seqkv.delta",)),
    ("store", ("seqkv.store",)),
    ("top", ("seqkv.blobs", "seqkv.demo", "seqkv.server", "seqkv.client", "seqkv.cli",
             "seqkv.__main__")),
]


def _module(path: Path) -> str:
    parts = ["seqkv", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The seqkv modules a module imports (a package's name stands for its __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node of a module but those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not (isinstance(child, ast.If) and isinstance(child.test, ast.Name)
                    and child.test.id == "TYPE_CHECKING"):
                todo.append(child)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _layer(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is on no layer: add it to LAYERS (and ARCHITECTURE.md)")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_sees_the_imports():
    graph = import_graph()
    assert "seqkv.core.cache" in graph["seqkv.tokens.api"]
    assert "seqkv.tokens.api" in graph["seqkv.delta.api"]
    assert "seqkv.delta" in graph["seqkv.blobs"]  # a function-level import counts too


def test_no_import_cycles():
    assert _cycle(import_graph()) is None


def test_cycles_are_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_a_layer_above_its_own():
    bad = [f"{a} -> {b}" for a, deps in import_graph().items() for b in deps
           if a != "seqkv" and _layer(b) > _layer(a)]
    assert bad == []
