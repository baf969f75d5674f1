"""Archive RPO (per repository): how old the newest WAL is that a restore from that repository
could replay to, i.e. the ``.ready`` time of the newest file stored there with every older one.
It lives in each :class:`RepoState` (``stored_ready``, ``durable_at``); these functions keep it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import Gauge

from hakeeper.backup import layout
from hakeeper.backup.archive.plan import is_history
from hakeeper.backup.archive.spool import SpoolQueue
from hakeeper.backup.archive.state import ReadyFile, RepoState


def note_durable(rs: RepoState, name: str, files: Mapping[str, ReadyFile], queue: SpoolQueue) -> None:
    """``name`` is stored in ``rs``: remember when it became .ready (its content is older)."""
    if is_history(name):
        return  # says nothing about how far WAL is durable
    f = files.get(name)
    if f is not None:
        rs.stored_ready[name] = f.ready_at
        return
    with contextlib.suppress(OSError):  # a queued file: its queue copy is as old as .ready or younger
        rs.stored_ready[name] = queue.path(rs.name, name).stat().st_mtime
        return
    rs.stored_ready[name] = time.time()


def start_from_done_files(status_dir: Path, repos: Mapping[str, RepoState], queue: SpoolQueue) -> None:
    """At this process's first activation: WAL PostgreSQL marked ``.done`` was archived before
    (by an earlier agent: it hands back only durable files); the newest one's mtime (kept by
    the rename from .ready) starts the RPO of every repository with nothing queued."""
    newest = 0.0
    with contextlib.suppress(OSError), os.scandir(status_dir) as it:
        for e in it:
            if e.name.endswith(".done") and layout.parse_segment_name(e.name[:-5]) is not None:
                with contextlib.suppress(OSError):
                    newest = max(newest, e.stat().st_mtime)
    if newest:
        for rs in repos.values():
            if rs.durable_at is None and not queue.files_for(rs.name):
                rs.durable_at = newest


def fold_durable(
    repos: Mapping[str, RepoState],
    files: Mapping[str, ReadyFile],
    queue: SpoolQueue,
    gauge: Gauge,
    now: float,
    *,
    active: bool,
) -> None:
    """Fold stored files into ``durable_at`` up to the oldest WAL file still missing in a
    repository (live and not stored there, or queued for it): restore replays WAL in order,
    so nothing after a hole is restorable from that repository.  ``gauge``:
    hakeeper_archive_rpo_seconds."""
    if not active:
        gauge.clear()  # only the archiving primary knows; after a promotion, start afresh
        for rs in repos.values():
            rs.durable_at = None
            rs.stored_ready.clear()
        return
    for name, rs in repos.items():
        missing = [f.name for f in files.values() if name not in f.stored and not is_history(f.name)]
        missing += [n for n in queue.files_for(name) if not is_history(n)]
        first_missing = min(missing, default=None)
        for n, t in list(rs.stored_ready.items()):
            if first_missing is None or n < first_missing:
                rs.durable_at = t if rs.durable_at is None else max(rs.durable_at, t)
                del rs.stored_ready[n]
        if rs.durable_at is not None:
            gauge.labels(name).set(max(0.0, now - rs.durable_at))


def rpo_seconds(repos: Mapping[str, RepoState], now: float) -> dict[str, float | None]:
    """Each repository's archive RPO at ``now`` (None: not known yet)."""
    return {
        name: None if rs.durable_at is None else max(0.0, now - rs.durable_at) for name, rs in repos.items()
    }
