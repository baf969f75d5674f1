"""The decision tables of ``decide.py`` rendered as Markdown for docs/architecture.md.

``python -m hakeeper.ha.policy.table [PATH]`` rewrites the part of PATH (docs/architecture.md
by default) between the two markers; a unit test fails while the document and the rendering
differ, so the documented table is always the one the code runs.
"""

from __future__ import annotations

import sys

from hakeeper.ha.policy.decide import RULES
from hakeeper.ha.policy.decision import ACTIONS, STALE_VIEW_WHY, Action

BEGIN = "<!-- decision-table:begin -->"
END = "<!-- decision-table:end -->"
DEFAULT_DOC = "docs/architecture.md"


def _code(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _demote_row() -> int:
    """The row whose sentence quotes what the election rows after it would say."""
    return next(i for i, r in enumerate(RULES, 1) if r.action == Action.DEMOTE and "({why})" in r.why)


def render() -> str:
    """The situation -> action table, then one row of flags per action."""
    lines = [
        "<!-- generated from hakeeper/ha/policy/decide.py by `python -m hakeeper.ha.policy.table`;"
        " do not edit by hand -->",
        "",
        "Rows are tried in order and the first whose situation holds decides, so each row reads",
        '"..., given that no row above matched".  The agent logs the decision as',
        "`decision_<action>` with the sentence of the last column (`{...}` filled in).",
        "",
        "| # | Situation | Action | Logged why |",
        "|---|---|---|---|",
    ]
    for i, rule in enumerate(RULES, 1):
        lines.append(f"| {i} | {rule.situation} | {_code(rule.action)} | {_code(rule.why)} |")
    lines += [
        "",
        f"In row {_demote_row()}, `{{why}}` is what the rows after it would have decided.  While etcd",
        "is unreachable the agent decides on the last view it read, and an action not safe without",
        f"etcd becomes `wait` with {_code(STALE_VIEW_WHY)}.",
        "",
        "| Action | What it does | Writable after | Fresh lease first | Safe without etcd |",
        "|---|---|---|---|---|",
    ]

    def flag(on: bool) -> str:
        return "yes" if on else ""

    for action, spec in ACTIONS.items():
        lines.append(
            f"| {_code(action)} | {spec.doc} | {flag(spec.makes_writable)} | {flag(spec.fresh_lease)} "
            f"| {flag(spec.safe_without_etcd)} |"
        )
    return "\n".join(lines) + "\n"


def splice(doc: str, rendered: str) -> str:
    """``doc`` with the text between the markers replaced by ``rendered``."""
    start = doc.find(BEGIN)
    end = doc.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the document has no {BEGIN} ... {END} section")
    return doc[: start + len(BEGIN)] + "\n" + rendered + doc[end:]


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else DEFAULT_DOC
    with open(path, encoding="utf-8") as f:
        doc = f.read()
    new = splice(doc, render())
    if new == doc:
        print(f"{path}: the decision table is current")
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"{path}: decision table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
