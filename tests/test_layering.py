"""The house's one-direction rules (../shared/ARCHITECTURE.md), checked on the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ecserve"


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("server", "ecserve.parallel"),  # the server asks the runner, never the EP internals
    ("model/hf", "ecserve.model.weights"),  # both loaders read files through model.checkpoint
    ("model", "ecserve.engine"),  # the model knows nothing of the engine around it
    ("engine", "ecserve.server"),
    ("engine", "ecserve.parallel"),  # the parallel package wraps the engine, not the reverse
])
def test_no_import_against_the_flow(importer: str, forbidden: str) -> None:
    root = PACKAGE / importer
    offenders = [str(p.relative_to(PACKAGE)) for p in sorted(root.rglob("*.py"))
                 if any(m == forbidden or m.startswith(forbidden + ".") for m in imports(p))]
    assert not offenders, f"{', '.join(offenders)} import {forbidden}"
