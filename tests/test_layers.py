"""Layers borrow downwards only: the CDS Hooks models and the JWT checks import nothing from the
store (the store takes its feedback column lengths from cds_service.lengths, and raises the
StoreUnavailable declared in cds_service.errors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT


def imported_names(path: Path) -> set[str]:
    """Every module (and ``module.name``) a source file imports, at any depth in it."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("module", ["protocol.py", "security.py", "replay.py"])
def test_protocol_and_security_import_nothing_from_the_store(module: str) -> None:
    path = ROOT / "cds_service" / module
    borrowed = sorted(name for name in imported_names(path)
                      if name == "cds_service.store" or name.startswith("cds_service.store."))
    assert borrowed == []
    assert "cds_service.store" not in path.read_text(encoding="utf-8")


def test_the_feedback_limits_and_columns_agree() -> None:
    """The request model refuses what the feedback table could not hold, and no more."""
    from cds_service.protocol import FeedbackCoding, FeedbackItem
    from cds_service.store import column_length

    def max_length(model: type, name: str) -> int | None:
        found = [getattr(m, "max_length", None) for m in model.model_fields[name].metadata]
        return next((n for n in found if n is not None), None)

    assert max_length(FeedbackItem, "card") == column_length("card_uuid")
    for field, column in (("system", "override_system"), ("code", "override_code"),
                          ("display", "override_display")):
        assert max_length(FeedbackCoding, field) == column_length(column)
