"""docs/architecture.md shows the decision tables the code runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from hakeeper.ha.policy.decide import RULES
from hakeeper.ha.policy.decision import ACTIONS
from hakeeper.ha.policy.table import BEGIN, END, render, splice

DOC = Path(__file__).resolve().parents[3] / "docs" / "architecture.md"


def test_architecture_doc_shows_the_rendered_decision_table() -> None:
    doc = DOC.read_text(encoding="utf-8")
    assert splice(doc, render()) == doc, (
        "docs/architecture.md differs from the decision tables in hakeeper/ha/policy/decide.py; "
        "regenerate it with `python -m hakeeper.ha.policy.table`"
    )


def test_rendering_lists_every_rule_in_order_and_every_action() -> None:
    text = render()
    positions = [text.index(f"| {i} | {r.situation} |") for i, r in enumerate(RULES, 1)]
    assert positions == sorted(positions)
    for action, spec in ACTIONS.items():
        assert f"| `{action}` | {spec.doc} |" in text


def test_splice_replaces_only_the_marked_section() -> None:
    doc = f"before\n{BEGIN}\nold table\n{END}\nafter\n"
    assert splice(doc, "new\n") == f"before\n{BEGIN}\nnew\n{END}\nafter\n"
    assert splice(splice(doc, "new\n"), "new\n") == splice(doc, "new\n")
    with pytest.raises(ValueError, match="decision-table"):
        splice("no markers here\n", "new\n")
