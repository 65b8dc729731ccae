"""The package's layers: every import goes downward, no cycles, function-local imports explained.

Layers, top to bottom: cli -> service -> model -> io -> kernels -> base (docs/architecture.md).
A module may import from its own layer and the ones below. Function-local imports are allowed
only for optional dependencies or start-up time, with a ``# local import: <reason>`` comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lhtstream"
LAYERS = ("base", "kernels", "io", "model", "service", "cli")  # bottom to top


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # lhtstream itself: only __version__
        return 0
    if parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer; put it in one of {LAYERS}")
    return LAYERS.index(parts[1])


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The lhtstream modules an import statement loads (submodules named in `from X import m`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lhtstream"]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        if not is_package:
            anchor = anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != "lhtstream":
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _imports(module: str) -> list[tuple[ast.stmt, bool, list[str]]]:
    """(statement, inside a function, lhtstream modules imported) for every import."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[ast.stmt, bool, list[str]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function,
                              _resolve(module, child, path.name == "__init__.py")))
            visit(child, in_function or isinstance(child, (ast.FunctionDef,
                                                           ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_downward_only(module: str) -> None:
    mine = layer_of(module)
    for node, _, targets in _imports(module):
        for target in targets:
            assert layer_of(target) <= mine, (
                f"{module} (layer {LAYERS[mine]}) imports {target} (layer "
                f"{LAYERS[layer_of(target)]}) at line {node.lineno}: layers import only downward"
            )


@pytest.mark.parametrize("module", sorted(MODULES))
def test_function_local_imports_say_why(module: str) -> None:
    lines = MODULES[module].read_text().splitlines()
    for node, in_function, _ in _imports(module):
        if in_function:
            text = " ".join(lines[node.lineno - 1: node.end_lineno])
            assert "# local import:" in text, (
                f"{module}:{node.lineno}: a function-local import needs a reason "
                f"('# local import: optional dependency' or '... start-up time'), or move "
                f"it to the top of the module: {lines[node.lineno - 1].strip()}"
            )


def test_no_import_cycles() -> None:
    graph = {m: sorted({t for node, local, ts in _imports(m) if not local for t in ts
                        if t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above must be able to fail: an io module importing the service layer."""
    fake = "lhtstream.io.fake_upward"
    node = ast.parse("from lhtstream.service import monitor").body[0]
    targets = _resolve(fake, node, False)
    assert targets == ["lhtstream.service.monitor"]
    assert layer_of(targets[0]) > layer_of(fake)
