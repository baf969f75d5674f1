"""The archiver's pure planners: PostgreSQL's archiving order, which queued files to drop at the
queue cap, which ``.ready`` files to give up at the pg_wal cap, and the back-off between tries.
No I/O: each is a function of its arguments, tested as a table in tests/unit/test_archiver.py."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0


def is_history(name: str) -> bool:
    return name.endswith(".history")


def archive_order(name: str) -> tuple[int, str]:
    """PostgreSQL's own archiving order: timeline history files first, then by name (oldest
    first; a ``.partial`` or ``.backup`` file sorts right after its segment)."""
    return (0 if is_history(name) else 1, name)


def drop_order(name: str) -> tuple[int, str]:
    """Which queued file goes first when the queue is over its cap: the oldest segment; history
    files (tiny, and needed to follow a timeline) only when nothing else is left."""
    return (1 if is_history(name) else 0, name)


def plan_queue_drops(sizes: Mapping[str, int], cap: int, busy: Iterable[str] = ()) -> list[str]:
    """The queued files to drop, in order, until the queue holds at most ``cap`` bytes.  Files in
    ``busy`` (being pushed right now) count but are not dropped."""
    skip = set(busy)
    total = sum(sizes.values())
    drops: list[str] = []
    for name in sorted(sizes, key=drop_order):
        if total <= cap:
            break
        if name in skip:
            continue
        drops.append(name)
        total -= sizes[name]
    return drops


@dataclass(frozen=True, slots=True)
class ReadyInfo:
    name: str
    size: int
    eligible: bool  # may be given up: failed (or blocked), not in flight, not handed back yet
    done: bool = False  # handed back already (PostgreSQL has not taken it yet)


def plan_give_up(ready: Iterable[ReadyInfo], cap: int) -> list[str]:
    """The ``.ready`` files to give up so that pg_wal stops growing past ``cap`` bytes.

    1. The files not handed back yet, in PostgreSQL's order (history first, then oldest), until
       those total at most ``cap``.  Files already handed back do not count here: PostgreSQL
       takes them as soon as its archiver gets to them.
    2. Unless its archiver cannot get to them: it archives in order, so a file *before* a
       handed-back one (a history file or segment in conflict) blocks them all.  When every
       ``.ready`` file together exceeds ``cap``, such blockers are given up too.

    Only a prefix of the files not handed back, in that order, is ever given up: a file that is
    not eligible (still being tried) stops the plan, so the oldest always go first."""
    items = sorted(ready, key=lambda r: archive_order(r.name))
    pending = sum(r.size for r in items if not r.done)
    out: list[str] = []
    for r in items:
        if r.done:
            continue
        if pending <= cap or not r.eligible:
            break
        out.append(r.name)
        pending -= r.size
    last_done = max((i for i, r in enumerate(items) if r.done), default=-1)
    if last_done > 0 and sum(r.size for r in items if r.name not in out) > cap:
        for r in items[:last_done]:
            if r.done or r.name in out:
                continue
            if not r.eligible:
                break
            out.append(r.name)
    return sorted(out, key=archive_order)


def backoff(attempts: int, lo: float = BACKOFF_MIN, hi: float = BACKOFF_MAX) -> float:
    """Seconds to wait after ``attempts`` consecutive failures (1, 2, 4, ... up to ``hi``)."""
    if attempts <= 0:
        return 0.0
    return float(min(hi, lo * 2 ** min(attempts - 1, 20)))


AUTO_PG_WAL_FRACTION = 0.25  # max_pg_wal_bytes "auto": this share of pg_wal's filesystem
CAP_WARN_LEVELS = (50, 80)  # percent of the pg_wal cap at which the archiver warns


def auto_pg_wal_cap(filesystem_bytes: int) -> int:
    """The pg_wal cap ``auto`` stands for on a filesystem of ``filesystem_bytes`` (decisions.md:
    a quarter leaves the rest of the disk to the data and to WAL PostgreSQL keeps anyway --
    max_wal_size, wal_keep_size, slots -- while hours of WAL at ordinary rates fit below it)."""
    return int(filesystem_bytes * AUTO_PG_WAL_FRACTION)


def cap_level(pending_bytes: int, cap: int | None) -> int:
    """The highest warning level (percent of ``cap``: 0, 50, 80 or 100) that ``pending_bytes``
    (the ``.ready`` bytes not handed back) has reached; 0 without a cap."""
    if cap is None or cap <= 0:
        return 0 if cap is None else 100 if pending_bytes > 0 else 0
    pct = 100.0 * pending_bytes / cap
    if pct >= 100:
        return 100
    return max((lvl for lvl in CAP_WARN_LEVELS if pct >= lvl), default=0)
