"""The pure halves of a switchover: what the old primary does after waiting for the candidate."""

from __future__ import annotations

import pytest

from hakeeper.ha.policy.switchover import NOT_CAUGHT_UP, HandoverPlan, plan_handover_result


@pytest.mark.parametrize(
    ("caught_up", "force", "expected"),
    [
        # The candidate has everything up to our shutdown checkpoint: a clean hand-over.
        (True, False, HandoverPlan(hand_over=True, needs_rewind=False)),
        (True, True, HandoverPlan(hand_over=True, needs_rewind=False)),
        # It missed some of our WAL: abort and restart in place, unless the operator forced it ...
        (False, False, HandoverPlan(hand_over=False, needs_rewind=False, abort_reason=NOT_CAUGHT_UP)),
        # ... in which case we hand over anyway and rewind before following the candidate.
        (False, True, HandoverPlan(hand_over=True, needs_rewind=True)),
    ],
    ids=["caught up", "caught up, forced", "not caught up: abort", "not caught up, forced: rewind"],
)
def test_plan_handover_result(caught_up: bool, force: bool, expected: HandoverPlan) -> None:
    assert plan_handover_result(caught_up, force) == expected


def test_abort_reason_is_the_sentence_operators_grep_for() -> None:
    assert NOT_CAUGHT_UP == "candidate did not receive our final WAL in time; restarting as primary"
