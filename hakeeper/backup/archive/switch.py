"""After a promotion: does every repository hold the WAL of the earlier timelines up to the switch
point?  WAL the old primary never archived is in no archive, though the new primary streamed it
(pgBackRest #626); a standby's copy need not be byte-identical, so this only reports."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hakeeper.backup import layout
from hakeeper.backup.archive import LOG_NAME
from hakeeper.backup.archive.pgwal import READY, segment_size
from hakeeper.backup.archive.state import ReadyFile, RepoState
from hakeeper.backup.errors import RepoError
from hakeeper.core.lsn import format_lsn
from hakeeper.util.fsutil import read_regular
from hakeeper.util.log import get_logger

log = get_logger(LOG_NAME)


def on_path(name: str, segno: int, tli: int, history: list[layout.HistoryEntry], seg_size: int) -> bool:
    """Whether segment ``name`` is the one recovery reads for ``segno`` on ``tli``'s history."""
    end = (segno + 1) * seg_size - 1
    return layout.segment_name(layout.timeline_of(end, tli, history), segno, seg_size) == name


class SwitchCheck:
    """The check for one archiver; ``report`` is the last result (``status()["switch_check"]``).

    ``files`` is the archiver's live map of ``.ready`` files: the check waits until this node's
    history file is handed back, then lists each repository."""

    def __init__(
        self,
        *,
        scope: str,
        pg_wal: Path,
        repos: Mapping[str, RepoState],
        files: Mapping[str, ReadyFile],
        repo_timeout: float,
    ) -> None:
        self.scope = scope
        self.pg_wal = pg_wal
        self.status_dir = pg_wal / "archive_status"
        self.repos = repos
        self.files = files
        self.repo_timeout = repo_timeout
        self.report: dict[str, Any] | None = None

    async def run(self, tli: int) -> None:
        hist = layout.history_name(tli)
        try:
            raw = await asyncio.to_thread(read_regular, self.pg_wal / hist)  # never through a link
            history = layout.parse_history(raw.decode())
        except (OSError, ValueError) as e:
            log.warning("archive_switch_check_skipped", timeline=tli, reason=str(e))
            return
        if not history:
            return
        switch = history[-1].switch_lsn
        for _ in range(600):  # until our history file is handed back (at most a minute)
            f = self.files.get(hist)
            if (f is not None and f.done) or not (self.status_dir / f"{hist}{READY}").exists():
                break
            await asyncio.sleep(0.1)
        seg_size = await asyncio.to_thread(segment_size, self.pg_wal)
        last = layout.segno_of(switch, seg_size) - 1  # the switch segment itself is on the new timeline
        results: dict[str, Any] = {}
        for name, rs in self.repos.items():
            try:
                async with asyncio.timeout(self.repo_timeout):
                    objs = await rs.repo.list_objects(layout.wal_prefix(self.scope))
            except (TimeoutError, RepoError, OSError) as e:
                results[name] = {"checked": False, "error": str(e)}
                continue
            have = {o.name.rsplit("/", 1)[1] for o in objs}
            results[name] = _check_repository(name, have, tli, history, switch, last, seg_size)
        self.report = {"timeline": tli, "switch_lsn": format_lsn(switch), "repositories": results}


def _check_repository(
    name: str,
    have: set[str],
    tli: int,
    history: list[layout.HistoryEntry],
    switch: int,
    last: int,
    seg_size: int,
) -> dict[str, Any]:
    """One repository's result, from the names of the WAL files it holds (logged when not clean)."""
    on_this_path = [
        seg[1]
        for n in have
        if (seg := layout.parse_segment_name(n, seg_size)) is not None
        and seg[1] <= last
        and on_path(n, seg[1], tli, history, seg_size)
    ]
    if last < 0 or not on_this_path:
        return {"checked": True, "missing": 0, "note": "no earlier WAL in this repository"}
    wanted = layout.wal_segments(
        layout.segment_start_lsn(min(on_this_path), seg_size),
        layout.segment_start_lsn(last, seg_size),
        tli,
        history,
        seg_size,
    )
    missing = [n for n in wanted if n not in have]
    result: dict[str, Any] = {"checked": True, "from": wanted[0], "to": wanted[-1], "missing": len(missing)}
    if missing:
        result["first_missing"] = missing[0]
        log.warning(
            "archive_gap_before_switch",
            repo=name,
            timeline=tli,
            switch_lsn=format_lsn(switch),
            missing=len(missing),
            first=missing[0],
            last=missing[-1],
            hint="the old primary did not archive them; take a new base backup",
        )
    else:
        log.info("archive_complete_before_switch", repo=name, timeline=tli, first=wanted[0], last=wanted[-1])
    return result
