"""hakeeper/ha/policy/ stays pure: it imports nothing that does I/O, keeps time or logs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

POLICY = Path(__file__).resolve().parents[3] / "hakeeper" / "ha" / "policy"
FORBIDDEN = {"asyncio", "time", "os", "psycopg", "aiohttp", "subprocess", "socket", "logging", "structlog"}
FORBIDDEN_HAKEEPER = ("hakeeper.dcs", "hakeeper.pg", "hakeeper.util", "hakeeper.api", "hakeeper.backup")


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", sorted(POLICY.glob("*.py")), ids=lambda p: p.name)
def test_policy_module_imports_nothing_that_does_io(path: Path) -> None:
    modules = imported_modules(path)
    assert {m for m in modules if m.split(".")[0] in FORBIDDEN} == set()
    assert {m for m in modules if m.startswith(FORBIDDEN_HAKEEPER)} == set()
    # Within hakeeper.ha, only the policy itself (never the agent, the executors or the shells).
    outside = {m for m in modules if m.startswith("hakeeper.ha.") and not m.startswith("hakeeper.ha.policy")}
    assert outside == set()


def test_the_policy_package_is_found() -> None:
    assert {p.name for p in POLICY.glob("*.py")} >= {"decide.py", "candidates.py", "switchover.py", "sync.py"}
