"""The import direction of ARCHITECTURE §1: entry scripts -> engine -> dataloaders, modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "allowed"),
    [("modules", {"modules"}), ("dataloaders", {"dataloaders", "modules.tokenization", "modules.errors"})],
)
def test_packages_import_only_downstream(package, allowed):
    project = {"modules", "dataloaders", "engine", "main_task_clip", "frozen_tfrecord"}
    offending = []
    for path in sorted((ROOT / package).glob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in project and not any(name == a or name.startswith(a + ".") for a in allowed):
                offending.append(f"{path.name}: {name}")
    assert offending == []
