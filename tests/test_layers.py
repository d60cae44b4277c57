"""Layering rules of the tree (shared/design.md): imports only point down."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_top_levels(folder: str) -> dict[str, set[str]]:
    """For each module of ``folder``, the top-level packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("dht", {"peer", "relay", "monitor", "loadtests", "bench"}),
        ("relay", {"peer", "dht", "monitor", "loadtests", "bench"}),
        ("common", {"peer", "dht", "relay", "monitor", "loadtests", "aiortc", "aioquic"}),
        ("peer", {"monitor", "loadtests", "bench"}),
    ],
)
def test_imports_point_down(folder: str, forbidden: set[str]) -> None:
    offenders = {m: sorted(n & forbidden) for m, n in imported_top_levels(folder).items()}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_engine_loads_without_the_relay_or_quic() -> None:
    code = (
        "import sys, peer.engine, peer.placement\n"
        "heavy = ('relay', 'aioquic', 'aiortc', 'dht')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _module_graph(folders: tuple[str, ...]) -> dict[str, set[str]]:
    """Imports between our own modules (``TYPE_CHECKING`` imports included)."""
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for folder in folders
        for p in (ROOT / folder).rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycles() -> None:
    graph = _module_graph(("peer", "relay", "dht", "common"))
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
