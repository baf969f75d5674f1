"""Where things live in a backup repository, and the WAL arithmetic around it.

Every object of one cluster is below ``<scope>/`` (several clusters may share a bucket):

* ``<scope>/wal/<file>``: an archived WAL file exactly as PostgreSQL names it (segments
  ``TTTTTTTTXXXXXXXXYYYYYYYY``, ``TTTTTTTT.history``, ``*.partial``, ``*.backup``), stored with
  :meth:`~hakeeper.backup.repo.Repository.put_unique` (never overwritten).
* ``<scope>/backup/<id>/...``: one base backup (see :mod:`hakeeper.backup.catalog`).

Pure functions only: no I/O, so they are unit-tested directly.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from hakeeper.core.lsn import format_lsn

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_SEGMENT_RE = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_HISTORY_RE = re.compile(r"^([0-9A-F]{8})\.history$")
# Names PostgreSQL hands to archive_command / restore_command.
WAL_FILE_RE = re.compile(r"^[0-9A-F]{8}(?:[0-9A-F]{16}(?:\.partial|\.[0-9A-F]{8}\.backup)?|\.history)$")


def wal_prefix(scope: str) -> str:
    return f"{scope}/wal/"


def wal_key(scope: str, fname: str) -> str:
    """Object name of the WAL file ``fname`` (ValueError for anything PostgreSQL would not name so)."""
    if not WAL_FILE_RE.match(fname):
        raise ValueError(f"not a WAL file name: {fname!r}")
    return f"{scope}/wal/{fname}"


def backup_prefix(scope: str, backup_id: str | None = None) -> str:
    return f"{scope}/backup/" if backup_id is None else f"{scope}/backup/{backup_id}/"


def segments_per_xlogid(seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return 0x100000000 // seg_size


def segno_of(lsn: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """The segment number holding ``lsn`` (an LSN exactly on a boundary starts the next one)."""
    return lsn // seg_size


def segment_name(tli: int, segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per = segments_per_xlogid(seg_size)
    return f"{tli:08X}{segno // per:08X}{segno % per:08X}"


def parse_segment_name(name: str, seg_size: int = DEFAULT_SEGMENT_SIZE) -> tuple[int, int] | None:
    """``(timeline, segno)`` of a plain segment name, None for anything else."""
    m = _SEGMENT_RE.match(name)
    if m is None:
        return None
    return int(m.group(1), 16), int(m.group(2), 16) * segments_per_xlogid(seg_size) + int(m.group(3), 16)


def segment_start_lsn(segno: int, seg_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return segno * seg_size


def history_name(tli: int) -> str:
    return f"{tli:08X}.history"


def parse_history_name(name: str) -> int | None:
    m = _HISTORY_RE.match(name)
    return int(m.group(1), 16) if m else None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of ``N.history``: timeline ``tli`` ended at ``switch_lsn`` (exclusive: the
    first byte that is no longer on ``tli``)."""

    tli: int
    switch_lsn: int
    reason: str


def parse_history(text: str) -> list[HistoryEntry]:
    """The entries of a timeline history file, oldest first (ValueError if malformed)."""
    from hakeeper.core.lsn import parse_lsn

    entries: list[HistoryEntry] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2:
            raise ValueError(f"bad history line: {raw!r}")
        lsn = parse_lsn(parts[1])
        assert lsn is not None
        entries.append(HistoryEntry(int(parts[0]), lsn, parts[2] if len(parts) > 2 else ""))
    for a, b in itertools.pairwise(entries):
        if b.tli <= a.tli or b.switch_lsn < a.switch_lsn:
            raise ValueError("history entries out of order")
    return entries


def timeline_of(lsn: int, target_tli: int, history: list[HistoryEntry]) -> int:
    """On the history of ``target_tli``, the timeline that holds ``lsn``."""
    for e in history:
        if lsn < e.switch_lsn:
            return e.tli
    return target_tli


def wal_segments(
    start_lsn: int,
    end_lsn: int,
    target_tli: int,
    history: list[HistoryEntry],
    seg_size: int = DEFAULT_SEGMENT_SIZE,
) -> list[str]:
    """Names of the segments recovery reads to get from ``start_lsn`` to ``end_lsn``
    (inclusive) along the history of ``target_tli``.

    A segment in which the timeline switched is read from the newer timeline (PostgreSQL copies
    the old timeline's part into the new timeline's first segment at promotion), as recovery
    does.
    """
    if end_lsn < start_lsn:
        raise ValueError(f"end {format_lsn(end_lsn)} before start {format_lsn(start_lsn)}")
    names = []
    for segno in range(segno_of(start_lsn, seg_size), segno_of(end_lsn, seg_size) + 1):
        # the newest timeline on the path that reaches into this segment, as recovery picks it
        tli = timeline_of((segno + 1) * seg_size - 1, target_tli, history)
        names.append(segment_name(tli, segno, seg_size))
    return names
