"""The privacy package stays pure: no coordinator/client imports, no I/O modules."""

from __future__ import annotations

import ast
from pathlib import Path

import privacy

FORBIDDEN = {
    "coordinator", "client", "os", "sys", "time", "datetime", "socket", "random",
    "pathlib", "io", "subprocess", "threading", "asyncio", "secrets", "urllib", "http",
    "logging", "shutil", "tempfile",
}


def test_privacy_imports_nothing_impure() -> None:
    root = Path(privacy.__file__).parent
    files = sorted(root.rglob("*.py"))  # subpackages too (privacy/secagg/)
    assert len(files) >= 6
    for path in files:
        rel = str(path.relative_to(root))
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"open", "input", "print"}, f"{rel} does I/O"
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{rel} imports {name}"
