"""The prefetch spool of :mod:`hakeeper.backup.walfetch`: which segments to keep ahead of
recovery, within how many bytes, on which timeline; and what the restore_command requests
measured.

The spool is ``<pg_wal>/.hakeeper-prefetch/<tag>/``.  Recovery asks for one segment at a time;
the prefetch worker keeps the segments it will ask for next (the *window*) downloaded, checked
and decompressed there.  The window

* follows the recovery target timeline's history: past a switch point recovery reads the newer
  timeline's segments (the one holding the switch included), so those are the names fetched;
  a file of a timeline recovery has left is never in the window, and files outside the window
  are removed;
* never holds more than ``max_bytes``: a download counts from its start (its data is written
  as a temporary file before the rename), so the window shrinks to
  ``max_bytes // segment size`` slots;
* stops at the first segment that is not in the archive (yet).

Every segment request appends ``<name> <hit> <seconds>`` to ``<tag>/stats``: ``hit`` 1 when the
segment was in the spool; ``seconds`` how long the request waited (0 for a hit the shell took:
a rename).  :func:`prefetch_stats` sums them for the restore's "WAL fetch idle time".

The planning functions are pure (unit-tested directly); only the last section touches files.
This module is imported on walfetch's fast path: standard library and ``layout`` only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from hakeeper.backup import layout

SPOOL_DIR = ".hakeeper-prefetch"
STATS_FILE = "stats"
HITS_FILE = "hits"
WINDOW_FILE = "window"  # the names the worker is fetching or will fetch next, one a line
TMP_MARK = ".tmp."


# ====================================================================== planning (pure)


@dataclass(frozen=True, slots=True)
class TimelinePath:
    """The recovery target timeline and its history (the timelines it branched from)."""

    target: int
    history: tuple[layout.HistoryEntry, ...]

    def holds(self, tli: int) -> bool:
        """Whether ``tli`` is on the path to the target (recovery can be reading it)."""
        return tli == self.target or any(e.tli == tli for e in self.history)


def spool_slots(max_bytes: int, seg_size: int) -> int:
    """How many segments (complete or being written) fit in ``max_bytes``."""
    if seg_size <= 0 or max_bytes <= 0:
        return 0
    return max_bytes // seg_size


def predict_window(want: str, seg_size: int, count: int, path: TimelinePath | None) -> list[str]:
    """The names of the ``count`` segments recovery asks for after ``want``.

    Along ``path``, as recovery picks them: the newest timeline of the path that reaches into
    the segment (see :func:`hakeeper.backup.layout.wal_segments`), and never a timeline older
    than the one being read (recovery does not go back).  Without a path, or when ``want``'s
    timeline is not on it (a history we have not seen yet), the same timeline as ``want``.
    """
    parsed = layout.parse_segment_name(want, seg_size)
    if parsed is None or count <= 0 or seg_size <= 0 or 0x100000000 % seg_size:
        return []
    tli, segno = parsed
    names = []
    for s in range(segno + 1, segno + 1 + count):
        t = tli
        if path is not None and path.holds(tli):
            t = max(tli, layout.timeline_of((s + 1) * seg_size - 1, path.target, list(path.history)))
        names.append(layout.segment_name(t, s, seg_size))
    return names


@dataclass(frozen=True, slots=True)
class SpoolPlan:
    start: tuple[str, ...]  # downloads to begin now, in recovery's order
    drop: tuple[str, ...]  # spool files recovery will not ask for (behind, or another timeline)


def plan_spool(
    window: list[str],
    present: Iterable[str],
    inflight: Iterable[str],
    slots: int,
    parallel: int,
    *,
    absent: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> SpoolPlan:
    """What to download and what to remove so that the spool holds the window's first segments.

    ``present``: segment files in the spool; ``inflight``: downloads running (each already holds
    a slot, whether or not it is still wanted: its file appears when it ends).  ``absent``: names
    found in no repository (the window ends there: nothing after it exists yet); ``skip``: names
    not to try now (a failure is cooling down, or given up: the request fetches it itself).
    Files to drop are assumed gone before the downloads start, so at no time are more than
    ``slots`` segments on disk.
    """
    keep = set(window[:slots])
    present_set = set(present)
    inflight_set = set(inflight)
    absent_set, skip_set = set(absent), set(skip)
    drop = tuple(sorted(present_set - keep - inflight_set))
    room = min(slots - len(present_set & keep) - len(inflight_set), parallel - len(inflight_set))
    start: list[str] = []
    for name in window[:slots]:
        if room <= 0 or name in absent_set:
            break
        if name in present_set or name in inflight_set or name in skip_set:
            continue
        start.append(name)
        room -= 1
    return SpoolPlan(tuple(start), drop)


def intended(
    window: list[str], slots: int, *, absent: Iterable[str] = (), given_up: Iterable[str] = ()
) -> list[str]:
    """The names a request may wait for instead of fetching them itself: the window within the
    bound, up to the first name not in the archive, without the ones the worker gave up."""
    absent_set, given_up_set = set(absent), set(given_up)
    out = []
    for name in window[:slots]:
        if name in absent_set:
            break
        if name not in given_up_set:
            out.append(name)
    return out


# ====================================================================== statistics


class PrefetchStats(NamedTuple):
    """Segment requests of one recovery: unpacks as ``(requests, hits, seconds_waiting)``."""

    requests: int
    hits: int
    seconds_waiting: float

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def stats_line(fname: str, hit: bool, seconds: float) -> str:
    return f"{fname} {1 if hit else 0} {max(0.0, seconds):.3f}\n"


def parse_stats(text: str) -> PrefetchStats:
    """Sum of the lines of a stats file; a malformed line (a torn write) is skipped."""
    requests = hits = 0
    waiting = 0.0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or layout.parse_segment_name(parts[0]) is None or parts[1] not in ("0", "1"):
            continue
        try:
            secs = float(parts[2])
        except ValueError:
            continue
        requests += 1
        hits += parts[1] == "1"
        waiting += secs
    return PrefetchStats(requests, hits, waiting)


# ====================================================================== files


def spool_root(data_dir: Path) -> Path:
    return data_dir / "pg_wal" / SPOOL_DIR


def prefetch_stats(data_dir: Path) -> PrefetchStats:
    """What the segment requests of the recovery in ``data_dir`` measured (all spools summed;
    zeros when restore_command never ran)."""
    total = PrefetchStats(0, 0, 0.0)
    try:
        tags = sorted(spool_root(data_dir).iterdir())
    except OSError:
        return total
    for tag in tags:
        try:
            tag_fd = os.open(tag, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # not a directory, or a link
        try:
            s = parse_stats(_read_plain(STATS_FILE, tag_fd))
        except OSError:
            continue
        finally:
            os.close(tag_fd)
        total = PrefetchStats(
            total.requests + s.requests, total.hits + s.hits, total.seconds_waiting + s.seconds_waiting
        )
    return total


STATS_MAX = 16 << 20  # a stats line per segment request: far more than any recovery writes


def _read_plain(path: str, dir_fd: int) -> str:
    """A regular file's text (at most :data:`STATS_MAX` bytes), not through a link: the restore
    reads the spool as root, and the directory belongs to PostgreSQL's OS user."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(STATS_MAX).decode(errors="replace")
    finally:
        os.close(fd)


def append_line(path: Path, line: str) -> None:
    """One ``O_APPEND`` write: lines of concurrent writers never interleave.  Best effort: the
    statistics must never fail a request."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def write_window(pdir: Path, names: list[str]) -> None:
    """``<tag>/window``, replaced atomically (the shell script greps it while it waits)."""
    tmp = pdir / f".{WINDOW_FILE}{TMP_MARK}{os.getpid()}"
    with contextlib.suppress(OSError):
        tmp.write_text("".join(f"{n}\n" for n in names))
        os.replace(tmp, pdir / WINDOW_FILE)


def spool_segments(pdir: Path) -> set[str]:
    """Complete segment files in the spool (temporary files of downloads excluded)."""
    try:
        return {n for n in os.listdir(pdir) if layout.parse_segment_name(n) is not None}
    except FileNotFoundError:
        return set()


def read_timeline_path(pdir: Path) -> TimelinePath | None:
    """The newest timeline history recovery has seen: copies walfetch kept in the spool when it
    fetched them, and the ones PostgreSQL keeps in pg_wal.  Recovery fetches the target
    timeline's history before its first segment (and, with ``latest``, probes newer ones, which
    are then the target), so the newest one is the target."""
    found: dict[int, Path] = {}
    for d in (pdir, pdir.parent.parent):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            tli = layout.parse_history_name(n)
            if tli is not None and tli not in found:
                found[tli] = d / n
    for tli in sorted(found, reverse=True):
        try:
            return TimelinePath(tli, tuple(layout.parse_history(found[tli].read_text())))
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # half-written or unreadable: an older one still describes a prefix
    return None


def clear_spool(pdir: Path) -> None:
    """Remove the WAL the spool holds (segments, history copies, dead downloads); the
    statistics and the lock stay (a few bytes, read by the restore afterwards)."""
    try:
        names = os.listdir(pdir)
    except FileNotFoundError:
        return
    for n in names:
        if TMP_MARK in n:
            pid = n.rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}"):
                continue  # another live process writes it
        elif (
            layout.parse_segment_name(n) is None and layout.parse_history_name(n) is None and n != WINDOW_FILE
        ):
            continue
        with contextlib.suppress(FileNotFoundError):
            (pdir / n).unlink()


def remove_spool(data_dir: Path) -> None:
    """After recovery (the restore calls it when it is done): empty every spool no worker
    holds.  A worker leaves by itself once recovery ended; this covers one that was killed."""
    import fcntl

    try:
        tags = [d for d in spool_root(data_dir).iterdir() if d.is_dir()]
    except OSError:
        return
    for d in tags:
        try:
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a worker runs: it cleans up itself when recovery ends
        try:
            clear_spool(d)
        finally:
            os.close(fd)


def discard_spools(data_dir: Path) -> None:
    """After the restoring process served the WAL (recovery is over): remove every spool no
    worker holds, statistics included (the restore has read them), and the spool directory
    when it is then empty.  A worker still running (a fallback of a recovery that outlived
    the restore) keeps its spool: it cleans up itself.

    This runs as root while the directories belong to PostgreSQL's OS user: every step goes
    through descriptors opened without following a link, so a link planted there is never
    written or removed through (``rmtree`` with ``dir_fd`` does not follow links either)."""
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        wal_fd = os.open(spool_root(data_dir).parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            root_fd = os.open(SPOOL_DIR, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=wal_fd)
        except OSError:
            return
        try:
            for name in os.listdir(root_fd):
                _discard_tag(root_fd, name)
        finally:
            os.close(root_fd)
        with contextlib.suppress(OSError):
            os.rmdir(SPOOL_DIR, dir_fd=wal_fd)  # only if empty (a worker's spool stays)
    finally:
        os.close(wal_fd)


def _discard_tag(root_fd: int, name: str) -> None:
    import fcntl
    import shutil

    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        tag_fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=root_fd)
    except OSError:
        return  # not a directory, or a link
    try:
        lock_fd = os.open(".lock", os.O_RDWR | os.O_CREAT | nofollow, 0o600, dir_fd=tag_fd)
    except OSError:
        return
    finally:
        os.close(tag_fd)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a worker runs: it cleans up itself when recovery ends
        shutil.rmtree(name, ignore_errors=True, dir_fd=root_fd)
    finally:
        os.close(lock_fd)
