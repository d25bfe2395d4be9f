"""Reports how many cases each fuzz target ran (the long mode's figures)."""

from __future__ import annotations

from typing import Any

from tests.fuzz.common import CASES, EXAMPLES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not CASES:
        return
    terminalreporter.section(f"fuzz cases per target (max_examples={EXAMPLES})")
    for target, n in sorted(CASES.items()):
        terminalreporter.write_line(f"{target:<48} {n:>7}")
    terminalreporter.write_line(f"{'total':<48} {sum(CASES.values()):>7}")
