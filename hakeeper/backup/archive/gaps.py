"""Gap records: which WAL files a repository will never get, kept in ``<spool>/gaps/`` and
published as ``<scope>/wal-gaps/<id>.json`` to every repository."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hakeeper.util.fsutil import fsync_dir as _fsync_dir

GAPS_DIR = "gaps"
GAP_FORMAT = 1


def gap_key(scope: str, gap_id: str) -> str:
    return f"{scope}/wal-gaps/{gap_id}.json"


@dataclass(slots=True)
class GapRecord:
    gap_id: str
    body: bytes  # the JSON document, exactly as published (identical re-push succeeds)
    pending: set[str]  # repositories it has not been published to yet


class GapBook:
    """Gap records: ``<root>/<id>.json`` (the record, fsynced) and ``<root>/<id>.pending``
    (repositories it still has to go to).  Synchronous (called in a worker thread)."""

    def __init__(self, root: Path, repos: Sequence[str]) -> None:
        self.root = root
        self.repos = list(repos)
        self.records: dict[str, GapRecord] = {}
        self.count = 0

    def load(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.records.clear()
        self.count = 0
        for f in sorted(self.root.glob("*.json")):
            self.count += 1
            pend = f.with_suffix(".pending")
            if not pend.exists():
                continue
            try:
                names = set(json.loads(pend.read_text())) & set(self.repos)
            except (OSError, ValueError):
                names = set(self.repos)
            if names:
                self.records[f.stem] = GapRecord(f.stem, f.read_bytes(), names)
            else:
                pend.unlink(missing_ok=True)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def record(self, doc: dict[str, Any]) -> GapRecord:
        first = doc["files"][0] if doc["files"] else "none"
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        gap_id = f"{stamp}-{first}-{doc['reason']}"
        body = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        pending = set(self.repos)
        self._write(self.root / f"{gap_id}.pending", json.dumps(sorted(pending)).encode())
        self._write(self.root / f"{gap_id}.json", body)
        _fsync_dir(self.root)
        rec = GapRecord(gap_id, body, pending)
        self.records[gap_id] = rec
        self.count += 1
        return rec

    def published(self, gap_id: str, repo: str) -> None:
        rec = self.records.get(gap_id)
        if rec is None:
            return
        rec.pending.discard(repo)
        pend = self.root / f"{gap_id}.pending"
        if rec.pending:
            self._write(pend, json.dumps(sorted(rec.pending)).encode())
        else:
            pend.unlink(missing_ok=True)
            del self.records[gap_id]
