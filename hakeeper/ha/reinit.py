"""The state of a reinitialize (``POST /reinitialize``) that runs in the background on the agent.

A reinitialize throws a replica's data directory away, clones it again from the leader and waits
until the new copy streams from the leader.  That takes from seconds to hours, far longer than an
HTTP request should stay open, so the API answers at once with a :class:`ReinitStatus` (the
handle) and ``GET /reinitialize`` shows how it goes.  The
:class:`~hakeeper.ha.operator.Operator` runs the job and replaces its (frozen) status as it moves
on; this module holds that status and how the bytes copied so far are measured.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from hakeeper.core import timefmt

# How long a fresh copy may take from its start to streaming from the leader before the job is
# reported failed.  Replaying the WAL written during the clone comes first; with
# backup.replica_from_backup the archive since the backup too, hence generous.  The HA loop keeps
# trying after that: "failed" says the operator should look, not that the node was given up.
STREAMING_TIMEOUT = 900.0


class ReinitState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class ReinitPhase(StrEnum):
    STOPPING = "stopping"  # stopping the local PostgreSQL
    DELTA = "delta"  # reinit --delta: bringing the old copy to the newest backup, block by block
    REMOVING = "removing"  # removing the data directory
    CLONING = "cloning"  # pg_basebackup (or a restore from a backup) into the empty directory
    STARTING = "starting"  # starting PostgreSQL as a replica of the leader
    STREAMING = "streaming"  # waiting until its WAL receiver streams from the leader


@dataclass(frozen=True, slots=True)
class ReinitStatus:
    """One reinitialize: what a client is told when it starts it and when it asks later.

    Times are wall-clock epoch seconds; ``bytes_copied`` is the size of the data directory while
    it is being cloned (None before the clone starts)."""

    id: str
    member: str
    source: str  # the leader it clones from
    state: ReinitState
    phase: ReinitPhase
    started_at: float
    finished_at: float | None = None
    error: str | None = None
    bytes_copied: int | None = None
    delta: bool = False  # asked for: reinit --delta
    method: str | None = None  # how the copy is made: "delta" (from a backup) or "clone"

    @property
    def running(self) -> bool:
        return self.state is ReinitState.RUNNING

    def doc(self) -> dict[str, Any]:
        """The JSON document of the API (``POST`` and ``GET /reinitialize``)."""
        return {
            "id": self.id,
            "member": self.member,
            "source": self.source,
            "state": self.state.value,
            "phase": self.phase.value,
            "started_at": timefmt.iso(self.started_at, timespec="milliseconds", zulu=False),
            "finished_at": timefmt.iso(self.finished_at, timespec="milliseconds", zulu=False),
            "error": self.error,
            "bytes_copied": self.bytes_copied,
            "delta": self.delta,
            "method": self.method,
        }


def dir_size(path: Path) -> int:
    """Bytes in the regular files under ``path`` (without following links), as well as it can
    be told while another process writes there: files that vanish meanwhile count as 0.  Blocking:
    call it in a thread."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    total += e.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total
