"""The two daemons share only the domain types (`cascadeinfer.domain`) and their wire
conversions (`cascadeinfer.wire`): the scheduler imports nothing of the worker's package, so
either can change its internals alone."""

from __future__ import annotations

import ast
from pathlib import Path

import cascadeinfer

PACKAGE = Path(cascadeinfer.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_scheduler_imports_nothing_of_the_worker() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(
            m for m in imported_modules(path) if m.startswith("cascadeinfer.worker")
        )
        for path in (PACKAGE / "scheduler").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_shared_modules_import_neither_daemon() -> None:
    for name in ("domain.py", "wire.py"):
        modules = imported_modules(PACKAGE / name)
        assert not {
            m for m in modules if m.startswith(("cascadeinfer.worker", "cascadeinfer.scheduler"))
        }
