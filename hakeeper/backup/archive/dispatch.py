"""Which work the archiver starts in a pass, within its ``parallel`` slots: live pushes of
``.ready`` files (PostgreSQL's order, a slot kept for the queue), drains of the local queue,
probes of repositories that are down, and gap records to publish.

Each ``claim_*`` function marks what it returns as taken (a file in flight, a queued file being
drained, a probe or publication under way), so that the next pass does not start it again; the
archiver starts the returned work in the order given."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hakeeper.backup.archive.gaps import GapRecord
from hakeeper.backup.archive.plan import archive_order, is_history
from hakeeper.backup.archive.spool import SpoolQueue
from hakeeper.backup.archive.state import ReadyFile, RepoState


def live_targets(
    repos: Mapping[str, RepoState], f: ReadyFile, any_up: bool, now: float
) -> list[RepoState] | None:
    """The repositories to push ``f`` to now; None when every one is down and none may be probed
    yet (the file is blocked)."""
    missing = [rs for rs in repos.values() if rs.name not in f.stored | f.queued]
    if any_up:
        # Possibly none: every repository that still lacks it is down, so the push queues it (it
        # is stored somewhere).
        return [rs for rs in missing if rs.up]
    targets = [rs for rs in missing if rs.claim_probe(now)]
    return targets or None


def claim_live_pushes(
    files: Mapping[str, ReadyFile], repos: Mapping[str, RepoState], slots: int, reserve: int, now: float
) -> list[tuple[ReadyFile, list[RepoState]]]:
    """The .ready files to push now and where to, oldest first, leaving ``reserve`` of the
    ``slots`` for the queue."""
    # History files first: a segment of a new timeline never goes before its history file.
    history_pending = any(is_history(f.name) and not f.done and not f.conflicts for f in files.values())
    any_up = any(rs.up for rs in repos.values())
    pushes: list[tuple[ReadyFile, list[RepoState]]] = []
    for f in sorted(files.values(), key=lambda f: archive_order(f.name)):
        if slots - reserve <= 0:
            break
        if f.done or f.in_flight or f.conflicts or now < f.next_try:
            continue
        if history_pending and not is_history(f.name):
            break
        targets = live_targets(repos, f, any_up, now)
        if targets is None:
            f.blocked = True
            continue
        f.in_flight = True
        f.blocked = False
        slots -= 1
        pushes.append((f, targets))
    return pushes


def claim_queue_work(
    repos: Mapping[str, RepoState], queue: SpoolQueue, slots: int, now: float
) -> list[tuple[RepoState, str | None]]:
    """Queued files to drain into the repositories that lack them (``(repo, file)``), and probes
    of repositories that are down with nothing queued (``(repo, None)``), within ``slots``."""
    work: list[tuple[RepoState, str | None]] = []
    for rs in repos.values():
        if slots <= 0:
            break
        names = [n for n in queue.files_for(rs.name) if n not in rs.draining]
        if not names:
            if not rs.up and not queue.files_for(rs.name) and rs.claim_probe(now):
                slots -= 1
                work.append((rs, None))
            continue
        if not rs.up:
            if rs.draining or not rs.claim_probe(now):
                continue
            names = names[:1]  # one file probes a repository that was down
        for n in names:
            if slots <= 0:
                break
            rs.draining.add(n)
            slots -= 1
            work.append((rs, n))
    return work


def claim_gap_publications(
    records: Iterable[GapRecord], repos: Mapping[str, RepoState], publishing: set[tuple[str, str]]
) -> list[tuple[RepoState, GapRecord]]:
    """Gap records to publish to the repositories that are up and still lack them (not already
    under way: ``publishing`` holds ``(gap id, repository)``)."""
    work: list[tuple[RepoState, GapRecord]] = []
    for rec in list(records):
        for repo in list(rec.pending):
            target = repos.get(repo)
            key = (rec.gap_id, repo)
            if target is not None and target.up and key not in publishing:
                publishing.add(key)
                work.append((target, rec))
    return work
