"""What ``hakeeper info`` shows per repository (pgBackRest's ``info``), and the wait of
``hakeeper check``: read-only views of a repository's ``<scope>/``.

Each repository is read on its own: one that cannot be read is a row with its reason, never a
reason not to show the others.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hakeeper.backup import catalog, layout
from hakeeper.backup.binding import BINDING_NAME, read_binding
from hakeeper.backup.errors import NotFound, RepoError
from hakeeper.backup.phases import phases_dict
from hakeeper.backup.repo import ListEntry, Repository
from hakeeper.core.timefmt import iso


@dataclass(frozen=True, slots=True)
class TimelineRange:
    timeline: int
    first: str
    last: str
    segments: int
    missing: int  # holes between first and last

    def to_dict(self) -> dict[str, Any]:
        return {
            "timeline": self.timeline,
            "first": self.first,
            "last": self.last,
            "segments": self.segments,
            "missing": self.missing,
        }


def wal_ranges(names: Sequence[str]) -> list[TimelineRange]:
    """Oldest..newest archived segment per timeline (names: WAL file names, any order)."""
    per_tli: dict[int, list[int]] = {}
    for n in names:
        parsed = layout.parse_segment_name(n)
        if parsed is not None:
            per_tli.setdefault(parsed[0], []).append(parsed[1])
    out = []
    for tli in sorted(per_tli):
        segs = sorted(set(per_tli[tli]))
        out.append(
            TimelineRange(
                tli,
                layout.segment_name(tli, segs[0]),
                layout.segment_name(tli, segs[-1]),
                len(segs),
                segs[-1] - segs[0] + 1 - len(segs),
            )
        )
    return out


@dataclass
class RepoInfo:
    repository: str
    ok: bool = True
    error: str | None = None
    system_identifier: str | None = None  # the binding's
    wal: list[TimelineRange] = field(default_factory=list)
    history_files: int = 0
    last_archived: str | None = None  # newest segment by time stored
    last_archived_at: dt.datetime | None = None
    backups: int = 0
    complete_backups: int = 0
    chains: int = 0  # full backups with their incrementals
    newest_backup: dict[str, Any] | None = None
    objects: int = 0
    stored_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "status": "ok" if self.ok else "error",
            "error": self.error,
            "system_identifier": self.system_identifier,
            "wal": [r.to_dict() for r in self.wal],
            "history_files": self.history_files,
            "last_archived": self.last_archived,
            "last_archived_at": iso(self.last_archived_at.timestamp()) if self.last_archived_at else None,
            "backups": self.backups,
            "complete_backups": self.complete_backups,
            "chains": self.chains,
            "newest_backup": self.newest_backup,
            "objects": self.objects,
            "stored_bytes": self.stored_bytes,
            "problems": self.problems,
        }


def summarize(repository: str, scope: str, listing: Sequence[ListEntry], cat: catalog.Catalog) -> RepoInfo:
    """The info of one repository from its listing of ``<scope>/`` and its catalog (pure)."""
    info = RepoInfo(repository)
    wal_prefix = layout.wal_prefix(scope)
    wal = [e for e in listing if e.name.startswith(wal_prefix)]
    names = [e.name[len(wal_prefix) :] for e in wal]
    info.wal = wal_ranges(names)
    info.history_files = sum(1 for n in names if layout.parse_history_name(n) is not None)
    segments = [e for e, n in zip(wal, names, strict=True) if layout.parse_segment_name(n) is not None]
    if segments:
        newest = max(segments, key=lambda e: (e.modified, e.name))
        info.last_archived = newest.name[len(wal_prefix) :]
        info.last_archived_at = newest.modified
    info.objects = len(listing)
    info.stored_bytes = sum(e.stored_size for e in listing)
    info.backups = len(cat.records)
    done = cat.complete()
    info.complete_backups = len(done)
    if done:
        b = done[0]
        info.newest_backup = {
            "id": b.id,
            "stop_time": iso(b.stop_time.timestamp()) if b.stop_time else None,
            "size": b.size,
            "stored_size": b.stored_size,
            "wal_stop": b.wal_stop,
            "type": b.kind,
            "parent": b.parent,
            "chain": b.root,
            "phases": phases_dict(b.phases),  # how long it took, by phase (issue 16)
        }
    info.problems = list(cat.problems)
    by_id = {r.id: r for r in cat.records}
    info.chains = len({b.root for b in done})
    for b in done:  # an incremental without its whole chain cannot be restored
        broken = catalog.chain_problem(b, by_id)
        if broken is not None:
            info.problems.append(broken)
    return info


async def repository_info(repo: Repository, scope: str, timeout: float = 60.0) -> RepoInfo:
    """:func:`summarize` of ``repo``, or a row with ``ok=False`` and the reason."""
    try:
        async with asyncio.timeout(timeout):
            listing = await repo.list_objects(f"{scope}/")
            cat = await catalog.load_catalog(repo, scope, wal=False)
            binding = (
                await read_binding(repo, scope)
                if any(e.name == f"{scope}/{BINDING_NAME}" for e in listing)
                else None
            )
    except TimeoutError:
        return RepoInfo(repo.name, ok=False, error=f"no answer within {timeout:g} s")
    except (RepoError, OSError, ValueError) as e:
        return RepoInfo(repo.name, ok=False, error=str(e) or type(e).__name__)
    info = summarize(repo.name, scope, listing, cat)
    info.system_identifier = binding.system_identifier if binding else None
    return info


async def wait_for_wal(
    repos: Sequence[Repository], scope: str, fname: str, timeout: float, poll: float = 0.5
) -> dict[str, str | None]:
    """Wait until every repository holds the WAL file ``fname`` (a stat that reads its
    trailer), at most ``timeout`` seconds: repository -> None when it has it, else why not."""
    key = layout.wal_key(scope, fname)
    state: dict[str, str | None] = {r.name: "not checked" for r in repos}
    deadline = time.monotonic() + timeout

    async def one(r: Repository) -> None:
        while True:
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    await r.stat(key)
                state[r.name] = None
                return
            except NotFound:
                state[r.name] = f"{fname} not in the repository after {timeout:g} s"
            except TimeoutError:
                state[r.name] = f"{fname}: no answer within {timeout:g} s"
            except (RepoError, OSError) as e:
                state[r.name] = f"{fname}: {e}"
            if time.monotonic() + poll > deadline:
                return
            await asyncio.sleep(poll)

    await asyncio.gather(*(one(r) for r in repos))
    return state
