"""``restore_command`` helper: fetch one archived WAL file from a repository, with prefetch.

    python -m hakeeper.backup.walfetch --config WALCONF.json %f %p

Exit status, as PostgreSQL reads it: 0 the file is at ``%p``; 1 it is in no repository (a
plain "not found": recovery asks for files that do not exist, e.g. the next ``.history``);
200 the answer is unknown (a repository unreachable after retries, or every copy corrupt).
A status above 125 makes PostgreSQL stop recovery with an error instead of treating the file as
missing and ending recovery early, which would silently lose the rest of the WAL.

Prefetch (``prefetch`` in the config, default 8; 0 turns it off).  Recovery calls
restore_command once per segment and waits for each; starting Python and importing the S3
client alone takes about half a second.  So after handing segment N over, this command leaves a
detached *prefetch worker* (a fork) that downloads N+1 .. N+k, ``prefetch_parallel`` at a time,
into ``<pg_wal>/.hakeeper-prefetch/<tag>/``; the next calls find their segment there and only
``rename()`` it to ``%p``, before importing anything heavy.

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
  lock.  The worker drops files behind the wanted segment, stops a window at the first segment
  that is not in the archive (yet), and after 30 s without requests removes what it fetched
  and exits.
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

if TYPE_CHECKING:
    from hakeeper.backup.config import RepositoryConfig, WalToolConfig
    from hakeeper.backup.repo import Repository

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_UNKNOWN = 200
ATTEMPTS = 4
PREFETCH_DIR = ".hakeeper-prefetch"
WORKER_IDLE_EXIT = 30.0  # seconds without a new request before the worker cleans up and exits
_SEGMENT = re.compile(r"^([0-9A-F]{8})([0-9A-F]{8})([0-9A-F]{8})$")
_TMP_MARK = ".tmp."


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


def _note_hit(pdir: Path, fname: str) -> None:
    """One line per segment served from the prefetch directory (``<tag>/hits``): how well
    prefetch works, for operators and tests."""
    try:
        fd = os.open(pdir / "hits", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{fname}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass


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


def request_prefetch(conf_path: Path, pdir: Path, fname: str, seg_size: int) -> None:
    """Tell the prefetch worker that ``fname`` was just handed over; start one if none runs.

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hakeeper-walfetch", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--no-prefetch", action="store_true", help="fetch only the file asked for")
    p.add_argument("fname")
    p.add_argument("dest", type=Path)
    a = p.parse_args(argv)
    try:
        conf_bytes = a.config.read_bytes()
        raw = json.loads(conf_bytes)
        k = 0 if a.no_prefetch else int(raw.get("prefetch", 8))
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
            request_prefetch(a.config, pdir, a.fname, size)
            return EXIT_OK
    import asyncio

    try:
        code, msg = asyncio.run(fetch(a.config, a.fname, a.dest))
    except Exception as e:  # anything unexpected must not read as "not found"
        code, msg = EXIT_UNKNOWN, f"{a.fname}: {type(e).__name__}: {e}"
    if code != EXIT_NOT_FOUND or not a.fname.endswith(".history"):
        if code != EXIT_OK:
            print(f"hakeeper walfetch: {msg}", file=sys.stderr)
    if code == EXIT_OK and k > 0 and segment:
        try:
            size = a.dest.stat().st_size
        except OSError:
            size = 0
        if size > 0:
            request_prefetch(a.config, pdir, a.fname, size)
    return code


# ====================================================================== fetching (slow path, worker)


def _retrying() -> Any:
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
    repos: list[tuple[RepositoryConfig, Repository]], key: str, retry: bool = True
) -> tuple[bytes | None, str | None, list[str]]:
    """(content, repository it came from, problems); content None when no repository has it
    (problems empty: definitely absent; else unknown)."""
    from hakeeper.backup.errors import NotFound, RepoError

    problems: list[str] = []
    for rc, repo in repos:
        try:
            if retry:
                async for attempt in _retrying():
                    with attempt:
                        data = await repo.get(key)
            else:
                data = await repo.get(key)
        except NotFound:
            continue
        except RepoError as e:  # CorruptObject included: try the next copy
            problems.append(f"{rc.name}: {e}")
            continue
        return data, rc.name, problems
    return None, None, problems


async def fetch(conf_path: Path, fname: str, dest: Path) -> tuple[int, str]:
    from hakeeper.backup import layout
    from hakeeper.backup.config import WalToolConfig, make_repository

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


def _cleanup(pdir: Path, keep_from: tuple[str, int] | None) -> None:
    """Remove prefetched files behind the wanted segment (all of them when ``keep_from`` is
    None), and temporary files of dead downloads."""
    try:
        names = os.listdir(pdir)
    except FileNotFoundError:
        return
    floor = None if keep_from is None else segno_of_name(*keep_from)
    for n in names:
        path = pdir / n
        if _TMP_MARK in n:
            pid = n.rsplit(".", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and os.path.exists(f"/proc/{pid}"):
                continue  # another live process writes it
            path.unlink(missing_ok=True)
            continue
        if not _SEGMENT.match(n):
            continue
        if floor is None or keep_from is None:
            path.unlink(missing_ok=True)
            continue
        s = segno_of_name(n, keep_from[1])
        if s is not None and s < floor:
            path.unlink(missing_ok=True)


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
    """Keep the segments after the wanted one prefetched until no request came for
    ``idle_exit`` seconds; ``lock_fd`` is the flocked ``.lock`` (released at the end)."""
    import asyncio
    import fcntl

    from hakeeper.backup.config import WalToolConfig

    conf = WalToolConfig.load(conf_path)
    _remove_other_tags(pdir)
    try:
        while True:
            asyncio.run(_worker_loop(conf, pdir, idle_exit))
            seen = _read_want(pdir)
            _cleanup(pdir, None)
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            if _read_want(pdir) == seen:
                return
            try:  # a request came in while we were leaving
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # and another worker took it
    finally:
        os.close(lock_fd)


async def _worker_loop(conf: WalToolConfig, pdir: Path, idle_exit: float) -> None:
    import asyncio
    import time

    from hakeeper.backup import layout
    from hakeeper.backup.config import make_repository

    repos = [(rc, make_repository(rc)) for rc in conf.repositories]
    sem = asyncio.Semaphore(conf.prefetch_parallel)
    end_of_archive: set[str] = set()  # names found in no repository (the window stops there)

    async def one(name: str) -> None:
        async with sem:
            if (pdir / name).exists() or name in end_of_archive:
                return
            data, _, problems = await _get_any(repos, layout.wal_key(conf.scope, name), retry=False)
            if data is None:
                if not problems:
                    end_of_archive.add(name)
                return
            await asyncio.to_thread(_write, pdir / name, data)

    try:
        last_want = None
        last_change = time.monotonic()
        while True:
            want = _read_want(pdir)
            if want != last_want:
                last_want = want
                last_change = time.monotonic()
                end_of_archive.clear()
                if want is not None:
                    _cleanup(pdir, want)
                    window = next_segments(want[0], want[1], conf.prefetch)
                    results = await asyncio.gather(*(one(n) for n in window), return_exceptions=True)
                    for res in results:
                        if isinstance(res, BaseException):
                            if not isinstance(res, Exception):
                                raise res
                            print(f"hakeeper walfetch prefetch: {res}", file=sys.stderr)
                continue
            if time.monotonic() - last_change > idle_exit or not _in_recovery(pdir):
                return
            await asyncio.sleep(0.05)
    finally:
        for _, r in repos:
            await r.close()


if __name__ == "__main__":
    sys.exit(main())
