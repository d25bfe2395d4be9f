"""The house rules, checked on the source: import rules between the packages and the
layers of `coordinator/`, no import circle anywhere, the wire schema's explicit exports,
and the size limits that keep modules and functions readable.

Every `import` and `from ... import` of the project's own packages counts, including those
under TYPE_CHECKING and inside functions: a lazy import is still a dependency. The checks
are functions over a source tree, so the tests at the bottom can show them failing on a
copy of the tree with a bad import added.
"""

from __future__ import annotations

import ast
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "client", "privacy")

# What each part of the coordinator may import of the project (besides itself). Read it as
# the architecture: the wire schema and the pure core at the bottom, cluster services on
# them, the leader's round on those, and the shells (API, node, CLI, demo) on top.
LAYERS: dict[str, set[str]] = {
    "coordinator.wire": set(),
    "coordinator.lifeline": set(),
    "coordinator.durable": set(),
    "coordinator.core": {"coordinator.wire", "privacy"},
    "coordinator.audit": {"coordinator.wire", "coordinator.core", "coordinator.durable",
                          "privacy"},
    "coordinator.cluster": {"coordinator.wire", "coordinator.core", "coordinator.durable",
                            "coordinator.lifeline", "privacy"},
    "coordinator.round": {"coordinator.wire", "coordinator.core", "coordinator.cluster",
                          "coordinator.lifeline", "privacy"},
    "coordinator.api": {"coordinator.wire", "coordinator.core", "coordinator.cluster",
                        "coordinator.round"},
    "coordinator.node": {"coordinator.api", "coordinator.wire", "coordinator.core",
                         "coordinator.cluster", "coordinator.round", "coordinator.audit"},
    "coordinator.ops": {"coordinator.wire", "coordinator.cluster", "coordinator.durable"},
    "coordinator.demo": {"coordinator.wire", "coordinator.cluster", "coordinator.ops", "coordinator.durable",
                         "coordinator.audit", "coordinator.round", "coordinator.lifeline"},
    "coordinator.commands": {"coordinator.wire", "coordinator.cluster", "coordinator.ops",
                             "coordinator.durable",
                             "coordinator.audit", "coordinator.demo", "coordinator.node",
                             "coordinator.core", "coordinator.round", "coordinator.lifeline"},
    "coordinator.cli": {"coordinator.commands", "coordinator.audit", "coordinator.lifeline"},
    "coordinator.__main__": {"coordinator.cli"},
    "coordinator": set(),  # the package's __init__
}
CLIENT_MAY_IMPORT = {"coordinator.wire", "coordinator.lifeline", "client", "privacy"}
PURE = {  # pure parts: no clock, threads, processes, network or files
    "coordinator.core", "coordinator.wire.schema", "privacy"}
IMPURE_MODULES = {"os", "sys", "time", "datetime", "socket", "random", "pathlib", "io",
                  "subprocess", "threading", "multiprocessing", "asyncio", "secrets", "urllib",
                  "http", "logging", "shutil", "tempfile", "grpc", "sqlalchemy", "signal"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_COORDINATOR_TOP_LEVEL = 12


# ---------------------------------------------------------------- the checks


def modules(root: Path) -> dict[str, Path]:
    """Every module of the three packages under `root`, by dotted name."""
    out = {}
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            if "migrations" in path.parts:
                continue  # Alembic's files: loaded by Alembic, not imported
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """(dotted target, line) of every import in a module, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {project module it imports: line}; importing a name from a module counts
    as importing the module, and a module's own package (its __init__) is not an edge."""
    mods = modules(root)

    def resolve(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: dict[str, int] = {}
        for target, line in _imported(tree, name, path.name == "__init__.py"):
            if target.split(".")[0] not in PACKAGES:
                continue
            found = resolve(target)
            if found and found != name and not name.startswith(found + "."):
                edges.setdefault(found, line)
        graph[name] = edges
    return graph


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return found


def _layer(module: str) -> str | None:
    """The entry of LAYERS a coordinator module belongs to (its longest prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key
    return None


def _within(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def forbidden_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    """Every import that breaks DESIGN.md's rules, as `module:line imports target (why)`."""
    out = []
    for module, edges in sorted(graph.items()):
        top = module.split(".")[0]
        for target, line in sorted(edges.items()):
            if target in PACKAGES:
                continue  # a top-level package's __init__ (documentation only)
            why = _rule_broken(module, top, target)
            if why:
                out.append(f"{module}:{line} imports {target} ({why})")
    return out


def _rule_broken(module: str, top: str, target: str) -> str | None:
    if top == "privacy":
        return None if target.startswith("privacy") else "privacy imports neither coordinator nor client"
    if top == "client":
        return None if _within(target, CLIENT_MAY_IMPORT) else (
            "the site agent imports only coordinator.wire and coordinator.lifeline of the coordinator")
    if target.startswith("client"):
        return "the coordinator never imports the site agent"
    layer = _layer(module)
    if layer is None:
        return f"{module} belongs to no layer of the coordinator"
    if _layer(target) == layer or _within(target, LAYERS[layer]):
        return None
    return f"{layer} may import only {sorted(LAYERS[layer]) or 'nothing'}"


def impure_imports(root: Path) -> list[str]:
    """Imports of clocks, threads, processes, sockets or files in the pure parts."""
    out = []
    for name, path in modules(root).items():
        if not _within(name, PURE):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for target, line in _imported(tree, name, path.name == "__init__.py"):
            if target.split(".")[0] in IMPURE_MODULES:
                out.append(f"{name}:{line} imports {target} (a pure module does no I/O)")
    return out


def oversized(root: Path) -> list[str]:
    """Modules over MAX_MODULE_LINES lines and functions over MAX_FUNCTION_LINES."""
    out = []
    for name, path in modules(root).items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            out.append(f"{name}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{name}:{node.lineno} {node.name}: {n} lines "
                               f"(at most {MAX_FUNCTION_LINES})")
    return out


# ---------------------------------------------------------------- the rules, on this tree


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT)


def test_no_import_circle(graph: dict[str, dict[str, int]]) -> None:
    assert circles(graph) == []


def test_imports_follow_the_design(graph: dict[str, dict[str, int]]) -> None:
    assert forbidden_imports(graph) == []


def test_pure_parts_do_no_io() -> None:
    assert impure_imports(ROOT) == []


def test_every_coordinator_module_has_a_layer(graph: dict[str, dict[str, int]]) -> None:
    assert [m for m in graph if m.startswith("coordinator") and _layer(m) is None] == []


def test_modules_and_functions_stay_small() -> None:
    assert oversized(ROOT) == []
    top = sorted(p.name for p in (ROOT / "coordinator").glob("*.py"))
    assert len(top) <= MAX_COORDINATOR_TOP_LEVEL, top


def _defined(path: Path) -> set[str]:
    """The public names a module defines at its top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_wire_exports_exactly_its_public_names() -> None:
    """`coordinator.wire` is what sites build against: every public name its modules define
    is exported, nothing else, and the list is written down (httpx's habit)."""
    from coordinator import wire

    package = ROOT / "coordinator" / "wire"
    public = set().union(*(_defined(p) for p in package.glob("*.py") if p.name != "__init__.py"))
    assert len(wire.__all__) == len(set(wire.__all__)), "__all__ repeats a name"
    assert set(wire.__all__) == public
    assert all(hasattr(wire, name) for name in wire.__all__)


# ---------------------------------------------------------------- the checks can fail


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the three packages to break on purpose."""
    for top in PACKAGES:
        shutil.copytree(ROOT / top, tmp_path / top,
                        ignore=shutil.ignore_patterns("__pycache__", "migrations"))
    return tmp_path


def _add_import(tree: Path, module: str, line: str) -> None:
    path = tree / (module.replace(".", "/") + ".py")
    text = path.read_text()
    marker = "from __future__ import annotations\n"
    path.write_text(text.replace(marker, marker + line + "\n", 1) if marker in text
                    else line + "\n" + text)


def test_a_circle_under_type_checking_is_caught(tree: Path) -> None:
    _add_import(tree, "coordinator.core.state",
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from coordinator.round.driver import RoundDriver")
    found = circles(import_graph(tree))
    assert any({"coordinator.core.state", "coordinator.round.driver"} <= set(c) for c in found)
    assert any("coordinator.core.state" in v and "coordinator.round.driver" in v
               for v in forbidden_imports(import_graph(tree)))


def test_a_lazy_import_the_design_forbids_is_caught(tree: Path) -> None:
    path = tree / "client" / "agent.py"
    path.write_text(path.read_text() + "\n\ndef _peek() -> None:\n"
                    "    from coordinator.core import state  # noqa: F401\n")
    found = forbidden_imports(import_graph(tree))
    assert any(v.startswith("client.agent:") and "coordinator.core" in v for v in found), found


def test_privacy_reaching_into_the_coordinator_is_caught(tree: Path) -> None:
    _add_import(tree, "privacy.encoding", "from coordinator import wire")
    found = forbidden_imports(import_graph(tree))
    assert any(v.startswith("privacy.encoding:") for v in found), found


def test_io_in_the_core_and_oversized_code_are_caught(tree: Path) -> None:
    _add_import(tree, "coordinator.core.queries", "import time")
    assert any(v.startswith("coordinator.core.queries:") for v in impure_imports(tree))
    path = tree / "coordinator" / "core" / "queries.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    path.write_text(path.read_text() + f"\n\ndef _long() -> None:\n{body}")
    assert any("_long" in v for v in oversized(tree))
