"""The state of the primary's part of a major upgrade (``POST /upgrade/primary``, ``GET
/upgrade``), kept by :class:`~hakeeper.ha.upgrade.Upgrader`; apart so that the API sees it
without the executors."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hakeeper.core import timefmt
from hakeeper.core.lsn import format_lsn


class JobState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class UpgradeJob:
    """The primary's part of one upgrade, as the API shows it (``GET /upgrade``).

    ``phases``: seconds of each finished phase, in order; ``downtime_s``: from the fast
    shutdown of the old primary to the new one accepting writes; ``rolled_back``: the upgrade
    failed and the old cluster runs again as before; ``state_after``: on a failure that could
    not be undone, the cluster's state and what to do."""

    id: str
    member: str
    from_major: int
    to_major: int
    method: str
    state: JobState
    phase: str
    started_at: float
    phases: dict[str, float] = field(default_factory=dict)
    finished_at: float | None = None
    error: str | None = None
    stop_lsn: int | None = None
    downtime_s: float | None = None
    data_bytes: int | None = None
    old_system_identifier: str | None = None
    system_identifier: str | None = None
    rolled_back: bool = False
    state_after: str | None = None
    backup: dict[str, Any] | None = None  # the full backup taken after the upgrade
    steps: list[dict[str, Any]] = field(default_factory=list)  # pg_upgrade's own, timed

    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    def doc(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "member": self.member,
            "from_major": self.from_major,
            "to_major": self.to_major,
            "method": self.method,
            "state": self.state.value,
            "phase": self.phase,
            "phases": {k: round(v, 3) for k, v in self.phases.items()},
            "started_at": timefmt.iso(self.started_at, timespec="milliseconds", zulu=False),
            "finished_at": timefmt.iso(self.finished_at, timespec="milliseconds", zulu=False),
            "error": self.error,
            "stop_lsn": None if self.stop_lsn is None else format_lsn(self.stop_lsn),
            "downtime_s": None if self.downtime_s is None else round(self.downtime_s, 3),
            "data_bytes": self.data_bytes,
            "old_system_identifier": self.old_system_identifier,
            "system_identifier": self.system_identifier,
            "rolled_back": self.rolled_back,
            "state_after": self.state_after,
            "backup": self.backup,
            "pg_upgrade_steps": self.steps,
        }


def problem(check: str, text: str, fix: str | None, log_file: Path | None = None) -> dict[str, Any]:
    return {"check": check, "text": text, "fix": fix, "log_file": None if log_file is None else str(log_file)}
