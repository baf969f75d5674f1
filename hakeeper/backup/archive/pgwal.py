"""What the archiver reads of pg_wal: the ``.ready`` files of ``archive_status`` (PostgreSQL's
list of what it wants archived), their sizes, and the segment size."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from hakeeper.backup import layout
from hakeeper.backup.archive.state import ReadyFile

READY = ".ready"


def scan_ready(status_dir: Path) -> dict[str, float]:
    """``.ready`` files in archive_status: WAL file name -> mtime of its ``.ready``."""
    out: dict[str, float] = {}
    try:
        with os.scandir(status_dir) as it:
            for e in it:
                n = e.name
                if not n.endswith(READY):
                    continue
                fname = n[: -len(READY)]
                if not layout.WAL_FILE_RE.match(fname):
                    continue
                try:
                    out[fname] = e.stat().st_mtime
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        pass  # no data directory (yet)
    return out


def sync_files(files: dict[str, ReadyFile], ready: Mapping[str, float], pg_wal: Path) -> None:
    """Bring ``files`` in line with the scan: forget what is no longer ``.ready`` (unless a push
    of it is still running), add what is new (with its size in pg_wal)."""
    for name in list(files):
        if name not in ready and not files[name].in_flight:
            del files[name]
    for name, mtime in ready.items():
        if name in files:
            continue
        try:
            size = (pg_wal / name).stat().st_size
        except FileNotFoundError:
            continue
        files[name] = ReadyFile(name, mtime, size)


def segment_size(pg_wal: Path) -> int:
    """wal_segment_size, from the size of a segment file in pg_wal (16 MiB if there is none)."""
    with contextlib.suppress(OSError), os.scandir(pg_wal) as it:
        for e in it:
            if layout.parse_segment_name(e.name) is not None and e.is_file():
                return e.stat().st_size
    return layout.DEFAULT_SEGMENT_SIZE
