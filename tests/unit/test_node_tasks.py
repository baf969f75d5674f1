"""The composition root's containment of backup tasks (hakeeper/node.py)."""

from __future__ import annotations

import structlog

from hakeeper.node import _contained


async def test_a_failing_backup_task_ends_alone_and_is_logged() -> None:
    """In the agent's TaskGroup an escaping exception would end the agent, whose shutdown stops
    PostgreSQL: a backup task's must not escape."""

    async def broken_scheduler() -> None:
        raise ValueError("a bug in the scheduler")

    with structlog.testing.capture_logs() as logs:
        await _contained(broken_scheduler())  # returns: nothing escapes

    crashed = [e for e in logs if e["event"] == "backup_task_crashed"]
    assert len(crashed) == 1 and "broken_scheduler" in crashed[0]["task"]
