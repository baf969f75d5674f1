"""``restore_command`` helper: fetch one archived WAL file from a repository, with prefetch.

    python -m hakeeper.backup.walfetch --config WALCONF.json %f %p

Exit status, as PostgreSQL reads it: 0 the file is at ``%p``; 1 it is in no repository (a
plain "not found": recovery asks for files that do not exist, e.g. the next ``.history``);
200 the answer is unknown (a repository unreachable after retries, or every copy corrupt).
A status above 125 makes PostgreSQL stop recovery with an error instead of treating the file as
missing and ending recovery early, which would silently lose the rest of the WAL.

Prefetch (``prefetch`` in the config, default 16; 0 turns it off).  Recovery calls
restore_command once per segment and waits for each; starting Python and importing the S3
client alone takes about half a second, and an S3 round trip per 16 MiB is more than replaying
it.  So after handing segment N over, this command leaves a detached *prefetch worker* (a fork)
that keeps N+1 .. N+k downloaded, checked and decompressed, ``prefetch_parallel`` at a time,
in the spool ``<pg_wal>/.hakeeper-prefetch/<tag>/``; the next calls find their segment there and
only ``rename()`` it to ``%p``, before importing anything heavy.  The window, its byte bound
(``prefetch_max_bytes``), timeline switches and the per-request statistics are
:mod:`hakeeper.backup.walspool`'s.

* Where: in pg_wal, because ``%p`` is in pg_wal: same file system, so handing a file over is an
  atomic rename (no copy); it belongs to PostgreSQL's OS user, who runs this command; it goes
  away with the data directory.  ``<tag>`` is a hash of the config file, so files fetched for
  another scope or other repositories are never served.  pg_basebackup never copies pg_wal's
  contents; pg_rewind removes the directory from a target (its server is stopped, so no worker
  runs there).
* Never stale or partial: a file is downloaded completely and verified by the codec (size,
  SHA-256, zstd checksum) before it is written to a temporary name, fsynced and renamed into
  place; only a complete, verified file ever has the segment's name.  Archived WAL is never
  overwritten (``put_unique``), so a name always means the same content.
* One worker at a time, by ``flock`` on ``<tag>/.lock``: a request writes the segment it got
  to ``<tag>/want``; a running worker follows it, else the request forks a new one holding the
  lock.  The worker keeps the window full as segments are taken (not window by window), drops
  files recovery will not ask for (behind the wanted segment, or of a timeline recovery left),
  stops the window at the first segment that is not in the archive (yet), and when recovery
  ends or after 30 s without requests removes what it fetched and exits.
* Timeline switches: a ``.history`` file this command fetched is also kept in the spool, and
  PostgreSQL keeps the target's in pg_wal; the worker predicts names along the newest history
  (the target's), so past the switch point it fetches the new timeline's segments.  A name is a
  timeline and a position, so a file is only ever handed over for the name it was fetched as.
* A segment failing its checks (size, SHA-256, zstd checksum) is fetched again, up to
  :data:`CORRUPT_ATTEMPTS` times, by the worker and by the request; then the request exits 200
  naming the segment and the reason, and PostgreSQL stops recovery.
* Only successful fetches of segments start or move a worker; "not found" (a standby probing
  for the next segment, ``.history`` probes) never does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hakeeper.backup import walspool

if TYPE_CHECKING:
    from hakeeper.backup.repo import Repository
    from hakeeper.core.backup_config import RepositoryConfig, WalToolConfig

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_UNKNOWN = 200
ATTEMPTS = 4
CORRUPT_ATTEMPTS = 3  # fetches of a segment that fails its checks before giving up on it
DEFAULT_PREFETCH = 16
DEFAULT_PREFETCH_MAX_BYTES = 512 * 1024 * 1024
PREFETCH_DIR = walspool.SPOOL_DIR
SHELL_WAIT_MAX = 30.0  # seconds the script waits for a segment the worker is fetching
T0_ENV = "HAKEEPER_WALFETCH_T0"  # the script's start (epoch seconds): Python's start-up is waiting too
HANDOVER_DIR = ".hakeeper-handover"  # see hakeeper.backup.handover
WORKER_IDLE_EXIT = 30.0  # seconds without a new request before the worker cleans up and exits
_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_TMP_MARK = walspool.TMP_MARK


# ====================================================================== the fast path (no heavy imports)


def prefetch_dir(dest: Path, conf_bytes: bytes) -> Path:
    """``<directory of %p>/.hakeeper-prefetch/<tag>``: ``%p`` is ``pg_wal/RECOVERYXLOG``."""
    tag = hashlib.sha256(conf_bytes).hexdigest()[:16]
    return dest.parent / PREFETCH_DIR / tag


def serve_prefetched(pdir: Path, fname: str, dest: Path) -> int | None:
    """Move a prefetched ``fname`` to ``dest``; its size, or None when there is none."""
    src = pdir / fname
    try:
        size = src.stat().st_size
        os.replace(src, dest)
    except FileNotFoundError:
        return None
    return size


FAST_PATH_SCRIPT = """#!/bin/sh
# hakeeper restore_command (generated by hakeeper restore): $1 = %f, $2 = %p.
# While the restoring process serves WAL (hakeeper.backup.handover) it answers through files.
# While a prefetch worker runs (it holds the lock), a segment it already fetched and verified is
# moved into place here without starting Python, and the worker is told which one was taken;
# everything else goes to hakeeper.backup.walfetch.  Every segment request leaves a line
# "<file> <hit> <seconds waited>" in the spool's stats (hakeeper.backup.walspool).
f="$1"; p="$2"
case "$p" in */*) pw="${{p%/*}}" ;; *) pw=. ;; esac  # dirname without a fork (one per segment)
h="$pw/{handover}"
d="$pw/{prefetch}/{tag}"
if [ -f "$h/pid" ] && [ -d "/proc/$(cat "$h/pid" 2>/dev/null)" ]; then
  # the restoring process serves WAL (it can read the repository; we may not); segments it
  # wrote ahead of the request are taken at once (it is told, to write the next ones)
  if [ "${{#f}}" -eq 24 ] && mv -f "$h/out/$f" "$p" 2>/dev/null; then
    : > "$h/req/$f.taken"
    {{ mkdir -p "$d" && echo "$f 1 0" >> "$d/stats"; }} 2>/dev/null
    exit 0
  fi
  t0="$(date +%s.%N)"
  : > "$h/req/$f" || exit 200
  while [ -d "/proc/$(cat "$h/pid" 2>/dev/null)" ]; do
    if [ -f "$h/out/$f" ]; then
      mv -f "$h/out/$f" "$p" || exit 200
      if [ "${{#f}}" -eq 24 ]; then
        w="$(echo "$t0 $(date +%s.%N)" | awk '{{printf "%.3f", $2 - $1}}')"
        {{ mkdir -p "$d" && echo "$f 0 $w" >> "$d/stats"; }} 2>/dev/null
      fi
      exit 0
    fi
    if [ -f "$h/out/$f.missing" ]; then rm -f "$h/out/$f.missing"; exit 1; fi
    if [ -f "$h/out/$f.error" ]; then cat "$h/out/$f.error" >&2; rm -f "$h/out/$f.error"; exit 200; fi
    sleep 0.01
  done
  exit 200
fi
if [ "${{#f}}" -eq 24 ] && [ -f "$d/.lock" ] && ! flock -n "$d/.lock" true 2>/dev/null; then
  # A worker runs.  Its segment, if there, is taken at once; one it is downloading (listed in
  # its window) is waited for, which is quicker than starting Python to download it again.
  hit=1; n=0; got=0
  while :; do
    if mv -f "$d/$f" "$p" 2>/dev/null; then got=1; break; fi
    if [ $hit -eq 1 ]; then
      grep -qx "$f" "$d/window" 2>/dev/null || break
      hit=0; t0="$(date +%s.%N)"
    fi
    sleep 0.01; n=$((n+1))
    if [ $((n % 20)) -eq 0 ]; then
      grep -qx "$f" "$d/window" 2>/dev/null || break  # the worker gave it up or moved on
      ! flock -n "$d/.lock" true 2>/dev/null || break  # the worker is gone
      [ $n -lt {wait_ticks} ] || break
    fi
  done
  if [ $got -eq 1 ]; then
    printf '{{"file": "%s", "seg_size": %s}}' "$f" "$(stat -c %s "$p")" > "$d/.want.sh$$" &&
      mv -f "$d/.want.sh$$" "$d/want"
    echo "$f" >> "$d/hits"
    if [ $hit -eq 1 ]; then w=0; else
      w="$(echo "$t0 $(date +%s.%N)" | awk '{{printf "%.3f", $2 - $1}}')"
    fi
    echo "$f $hit $w" >> "$d/stats"
    exit 0
  fi
fi
{t0_env}="$(date +%s.%N)" {python} --config {conf} "$f" "$p"
"""


def fast_path_script(python_cmd: str, conf_path: Path, conf_bytes: bytes) -> str:
    """A ``restore_command`` script (``SCRIPT %f %p``) that serves prefetched segments in the
    shell: a Python start per segment (0.1-0.2 s) is what made replay wait on restore_command.
    ``conf_bytes`` must be the exact content of ``conf_path`` (the prefetch directory's tag)."""
    import shlex

    tag = hashlib.sha256(conf_bytes).hexdigest()[:16]
    return FAST_PATH_SCRIPT.format(
        handover=HANDOVER_DIR,
        prefetch=PREFETCH_DIR,
        tag=tag,
        python=python_cmd,
        conf=shlex.quote(str(conf_path)),
        t0_env=T0_ENV,
        wait_ticks=int(SHELL_WAIT_MAX / 0.01),
    )


def _note_hit(pdir: Path, fname: str) -> None:
    """One line per segment served from the prefetch directory (``<tag>/hits``): how well
    prefetch works, for operators and tests."""
    walspool.append_line(pdir / walspool.HITS_FILE, f"{fname}\n")


def next_segments(fname: str, seg_size: int, count: int) -> list[str]:
    """The ``count`` segment names after ``fname`` on the same timeline."""
    m = _SEGMENT.match(fname)
    if m is None or count <= 0 or seg_size <= 0 or 0x100000000 % seg_size:
        return []
    per = 0x100000000 // seg_size
    tli = m.group(1)
    segno = int(m.group(2), 16) * per + int(m.group(3), 16)
    return [f"{tli}{(s // per):08X}{(s % per):08X}" for s in range(segno + 1, segno + 1 + count)]


def segno_of_name(fname: str, seg_size: int) -> int | None:
    m = _SEGMENT.match(fname)
    if m is None or seg_size <= 0 or 0x100000000 % seg_size:
        return None
    return int(m.group(2), 16) * (0x100000000 // seg_size) + int(m.group(3), 16)


def _write_small(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def request_prefetch(conf_path: Path, pdir: Path, fname: str, seg_size: int, window: int = 0) -> None:
    """Tell the prefetch worker that ``fname`` was just handed over; start one if none runs
    (``window``: how many segments it will keep ahead, announced before it runs).

    ``want`` is written before the lock is tried, and a worker re-reads ``want`` after it
    released the lock, so a request is never missed between the two."""
    import fcntl

    if not _in_recovery(pdir):
        return  # e.g. pg_rewind --restore-target-wal: no recovery will ask for the next ones
    try:
        pdir.mkdir(parents=True, exist_ok=True)
        _write_small(pdir / "want", json.dumps({"file": fname, "seg_size": seg_size}))
        fd = os.open(pdir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        print(f"hakeeper walfetch: prefetch not started: {e}", file=sys.stderr)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # a worker runs and follows `want`
        return
    # Announced before the worker has imported anything: the next request, coming while it
    # starts, waits for it rather than starting Python to fetch the same segment.
    walspool.write_window(
        pdir, walspool.predict_window(fname, seg_size, window, walspool.read_timeline_path(pdir))
    )
    # We hold the lock; the child inherits it (same open file description) and keeps it.
    try:
        pid = os.fork()
    except OSError as e:
        os.close(fd)
        print(f"hakeeper walfetch: prefetch not started: {e}", file=sys.stderr)
        return
    if pid != 0:
        os.close(fd)
        return
    # child: detached from restore_command and from its output (whoever runs restore_command may
    # wait for its stdout/stderr to close); problems go to <tag>/worker.log.
    code = 0
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        logfd = os.open(pdir / "worker.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(logfd, 2)
        os.close(devnull)
        os.close(logfd)
        run_worker(conf_path, pdir, fd)
    except BaseException as e:  # the worker must never raise into the parent's code path
        print(f"hakeeper walfetch prefetch: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    finally:
        os._exit(code)


def _started_at() -> float:
    """When this request began (epoch seconds): the script's stamp, else now."""
    import time

    try:
        return float(os.environ[T0_ENV])
    except (KeyError, ValueError):
        return time.time()


def _note(pdir: Path, fname: str, hit: bool, t0: float) -> None:
    """The request's line in the spool's statistics (only segments: probes are not waiting;
    only in recovery: pg_rewind's fetches are not replay waiting)."""
    import time

    if not _in_recovery(pdir):
        return
    try:
        pdir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    walspool.append_line(pdir / walspool.STATS_FILE, walspool.stats_line(fname, hit, time.time() - t0))


def _keep_history(pdir: Path, fname: str, dest: Path) -> None:
    """A copy of a fetched ``.history`` for the worker: recovery fetches the target
    timeline's history before its first segment, so the worker knows the switch points before
    its window reaches them."""
    try:
        pdir.mkdir(parents=True, exist_ok=True)
        _write(pdir / fname, dest.read_bytes())
    except OSError as e:
        print(f"hakeeper walfetch: {fname}: not kept for prefetch: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    t0 = _started_at()
    p = argparse.ArgumentParser(prog="hakeeper-walfetch", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--no-prefetch", action="store_true", help="fetch only the file asked for")
    p.add_argument("fname")
    p.add_argument("dest", type=Path)
    a = p.parse_args(argv)
    try:
        conf_bytes = a.config.read_bytes()
        raw = json.loads(conf_bytes)
        k = 0 if a.no_prefetch else int(raw.get("prefetch", DEFAULT_PREFETCH))
        max_bytes = int(raw.get("prefetch_max_bytes", DEFAULT_PREFETCH_MAX_BYTES))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        print(f"hakeeper walfetch: {a.fname}: config {a.config}: {e}", file=sys.stderr)
        return EXIT_UNKNOWN
    segment = _SEGMENT.match(a.fname) is not None
    pdir = prefetch_dir(Path(os.path.abspath(a.dest)), conf_bytes)
    if k > 0 and segment:
        try:
            size = serve_prefetched(pdir, a.fname, a.dest)
        except OSError as e:
            print(f"hakeeper walfetch: {a.fname}: prefetched copy unusable: {e}", file=sys.stderr)
            size = None
        if size is not None:
            _note_hit(pdir, a.fname)
            _note(pdir, a.fname, True, t0)
            window = min(k, walspool.spool_slots(max_bytes, size))
            if window > 0:
                request_prefetch(a.config, pdir, a.fname, size, window)
            return EXIT_OK
    import asyncio

    try:
        code, msg = asyncio.run(fetch(a.config, a.fname, a.dest))
    except Exception as e:  # anything unexpected must not read as "not found"
        code, msg = EXIT_UNKNOWN, f"{a.fname}: {type(e).__name__}: {e}"
    if code != EXIT_NOT_FOUND or not a.fname.endswith(".history"):
        if code != EXIT_OK:
            print(f"hakeeper walfetch: {msg}", file=sys.stderr)
    if segment and code == EXIT_OK:
        _note(pdir, a.fname, False, t0)
    if code == EXIT_OK and k > 0 and a.fname.endswith(".history") and _in_recovery(pdir):
        _keep_history(pdir, a.fname, a.dest)
    if code == EXIT_OK and k > 0 and segment:
        try:
            size = a.dest.stat().st_size
        except OSError:
            size = 0
        window = min(k, walspool.spool_slots(max_bytes, size))
        if window > 0:
            request_prefetch(a.config, pdir, a.fname, size, window)
    return code


# ====================================================================== fetching (slow path, worker)


def transient_retry() -> Any:
    """Retries of a repository read on transient errors (not on NotFound or CorruptObject)."""
    from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

    from hakeeper.backup.errors import CorruptObject, NotFound, RepoError

    return AsyncRetrying(
        retry=retry_if_exception(
            lambda e: isinstance(e, RepoError) and not isinstance(e, (NotFound, CorruptObject))
        ),
        stop=stop_after_attempt(ATTEMPTS),
        wait=wait_exponential(multiplier=0.5, max=4),
        reraise=True,
    )


async def _get_any(
    repos: list[tuple[RepositoryConfig, Repository]],
    key: str,
    retry: bool = True,
    corrupt_attempts: int = CORRUPT_ATTEMPTS,
) -> tuple[bytes | None, str | None, list[str]]:
    """(content, repository it came from, problems); content None when no repository has it
    (problems empty: definitely absent; else unknown).  A copy failing its checks is fetched
    again (``corrupt_attempts`` rounds over the repositories): bytes damaged on the way are
    not a damaged archive."""
    import asyncio

    attempt = 1
    while True:
        data, src, problems, corrupt = await _get_once(repos, key, retry)
        if data is not None or not corrupt or attempt >= corrupt_attempts:
            return data, src, problems
        print(
            f"hakeeper walfetch: {key}: failed its checks, fetching again: {'; '.join(problems)}",
            file=sys.stderr,
        )
        await asyncio.sleep(0.2 * attempt)
        attempt += 1


async def _get_once(
    repos: list[tuple[RepositoryConfig, Repository]], key: str, retry: bool
) -> tuple[bytes | None, str | None, list[str], bool]:
    """One round over the repositories: ``_get_any``'s answer and whether a copy was corrupt."""
    from hakeeper.backup.errors import CorruptObject, NotFound, RepoError

    problems: list[str] = []
    corrupt = False
    for rc, repo in repos:
        try:
            if retry:
                async for attempt in transient_retry():
                    with attempt:
                        data = await repo.get(key)
            else:
                data = await repo.get(key)
        except NotFound:
            continue
        except RepoError as e:  # CorruptObject included: try the next copy
            corrupt = corrupt or isinstance(e, CorruptObject)
            problems.append(f"{rc.name}: {e}")
            continue
        return data, rc.name, problems, corrupt
    return None, None, problems, corrupt


async def fetch(conf_path: Path, fname: str, dest: Path) -> tuple[int, str]:
    from hakeeper.backup import layout
    from hakeeper.backup.repos import make_repository
    from hakeeper.core.backup_config import WalToolConfig

    conf = WalToolConfig.load(conf_path)
    key = layout.wal_key(conf.scope, fname)
    repos = [(rc, make_repository(rc)) for rc in conf.repositories]
    try:
        data, src, problems = await _get_any(repos, key)
    finally:
        for _, r in repos:
            await r.close()
    if data is not None:
        import asyncio

        await asyncio.to_thread(_write, dest, data)
        return EXIT_OK, f"{fname}: restored from {src}"
    if problems:
        return EXIT_UNKNOWN, f"{fname}: not fetched: " + "; ".join(problems)
    return EXIT_NOT_FOUND, f"{fname}: not in the archive"


def _write(dest: Path, data: bytes) -> None:
    """``data`` at ``dest`` complete or not at all: a temporary name, fsync, rename."""
    tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ====================================================================== the prefetch worker


def _read_want(pdir: Path) -> tuple[str, int] | None:
    try:
        w = json.loads((pdir / "want").read_text())
        return str(w["file"]), int(w["seg_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_other_tags(pdir: Path) -> None:
    """Prefetch directories of other configurations that no worker holds: leftovers."""
    import fcntl
    import shutil

    parent = pdir.parent
    try:
        others = [d for d in parent.iterdir() if d.is_dir() and d.name != pdir.name]
    except FileNotFoundError:
        return
    for d in others:
        try:
            fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        shutil.rmtree(d, ignore_errors=True)
        os.close(fd)


def _in_recovery(pdir: Path) -> bool:
    """Whether the data directory (``<data>/pg_wal/.hakeeper-prefetch/<tag>``) is still in
    recovery: once PostgreSQL removed its signal file no more segments will be asked for."""
    data = pdir.parents[2]
    return (data / "recovery.signal").exists() or (data / "standby.signal").exists()


def run_worker(conf_path: Path, pdir: Path, lock_fd: int, idle_exit: float = WORKER_IDLE_EXIT) -> None:
    """Keep the segments after the wanted one prefetched until recovery ends or no request came
    for ``idle_exit`` seconds; ``lock_fd`` is the flocked ``.lock`` (released at the end)."""
    import asyncio
    import fcntl

    from hakeeper.core.backup_config import WalToolConfig

    conf = WalToolConfig.load(conf_path)
    _remove_other_tags(pdir)
    try:
        while True:
            asyncio.run(_worker_loop(conf, pdir, idle_exit))
            seen = _read_want(pdir)
            walspool.clear_spool(pdir)
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            if _read_want(pdir) == seen:
                return
            try:  # a request came in while we were leaving
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # and another worker took it
    finally:
        os.close(lock_fd)


WORKER_TICK = 0.02  # seconds between looks at `want` while downloads run or nothing changes
FAILED_COOLDOWN = 0.5  # seconds before a segment that could not be fetched is tried again


class _Spool:
    """The worker's state: downloads running, names found absent, failures."""

    def __init__(
        self, conf: WalToolConfig, pdir: Path, repos: list[tuple[RepositoryConfig, Repository]]
    ) -> None:
        import asyncio

        self.conf = conf
        self.pdir = pdir
        self.repos = repos
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.absent: set[str] = set()  # in no repository (yet): the window stops there
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.given_up: set[str] = set()  # the request fetches these itself (and fails naming them)

    def skip(self, now: float) -> set[str]:
        return self.given_up | {n for n, t in self.retry_at.items() if t > now}

    async def fetch(self, name: str) -> None:
        import asyncio
        import time

        from hakeeper.backup import layout

        key = layout.wal_key(self.conf.scope, name)
        try:
            # one round per try: the worker counts its tries itself (and waits between them)
            data, _, problems = await _get_any(self.repos, key, retry=False, corrupt_attempts=1)
            if data is not None:
                await asyncio.to_thread(_write, self.pdir / name, data)
                self.failures.pop(name, None)
                self.retry_at.pop(name, None)
            elif not problems:
                self.absent.add(name)
            else:
                self._failed(name, "; ".join(problems), time.monotonic())
        except Exception as e:  # a worker problem must not end the worker: the request fetches it
            self._failed(name, f"{type(e).__name__}: {e}", time.monotonic())

    def _failed(self, name: str, reason: str, now: float) -> None:
        n = self.failures.get(name, 0) + 1
        self.failures[name] = n
        self.retry_at[name] = now + FAILED_COOLDOWN * n
        if n >= CORRUPT_ATTEMPTS:
            self.given_up.add(name)
        # worker.log is the worker's stderr; recovery's own request reports to PostgreSQL's log
        print(f"hakeeper walfetch prefetch: {name}: not prefetched (attempt {n}): {reason}", file=sys.stderr)


async def _worker_loop(conf: WalToolConfig, pdir: Path, idle_exit: float) -> None:
    import asyncio
    import contextlib
    import time

    from hakeeper.backup.repos import make_repository

    spool = _Spool(conf, pdir, [(rc, make_repository(rc)) for rc in conf.repositories])
    try:
        last_want = None
        last_change = time.monotonic()
        path: walspool.TimelinePath | None = None
        announced: list[str] | None = None
        while True:
            now = time.monotonic()
            want = _read_want(pdir)
            if want != last_want:
                last_want = want
                last_change = now
                spool.absent.clear()  # the archive may have grown since
                path = walspool.read_timeline_path(pdir)  # recovery may have fetched a history
            elif now - last_change > idle_exit or not _in_recovery(pdir):
                return
            if want is not None:
                slots = walspool.spool_slots(conf.prefetch_max_bytes, want[1])
                window = walspool.predict_window(want[0], want[1], min(conf.prefetch, slots), path)
                plan = walspool.plan_spool(
                    window,
                    walspool.spool_segments(pdir),
                    spool.inflight,
                    slots,
                    conf.prefetch_parallel,
                    absent=spool.absent,
                    skip=spool.skip(now),
                )
                for name in plan.drop:  # before any new download: the bound holds at every moment
                    with contextlib.suppress(FileNotFoundError):
                        (pdir / name).unlink()
                for name in plan.start:
                    spool.inflight[name] = asyncio.ensure_future(spool.fetch(name))
                names = walspool.intended(window, slots, absent=spool.absent, given_up=spool.given_up)
                if names != announced:  # what a request may wait for instead of fetching it
                    walspool.write_window(pdir, names)
                    announced = names
            done = [n for n, t in spool.inflight.items() if t.done()]
            for n in done:
                spool.inflight.pop(n).result()  # fetch() catches its errors; a cancel propagates
            if spool.inflight:
                await asyncio.wait(
                    spool.inflight.values(), timeout=WORKER_TICK, return_when=asyncio.FIRST_COMPLETED
                )
            else:
                await asyncio.sleep(WORKER_TICK)
    finally:
        for t in spool.inflight.values():
            t.cancel()
        if spool.inflight:
            await asyncio.wait(spool.inflight.values())
        for _, r in spool.repos:
            await r.close()


if __name__ == "__main__":
    sys.exit(main())
