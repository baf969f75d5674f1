"""The archive_command hand-shake: the POSIX sh script PostgreSQL runs, which only waits for
``<spool>/done/<file>``; the markers the archiver creates there once a file is durable (and
withdraws when it may no longer vouch for them); the check that PostgreSQL's OS user can reach
that directory."""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hakeeper.backup.archive.pgwal import READY
from hakeeper.backup.archive.state import ReadyFile
from hakeeper.util.fsutil import fsync_dir as _fsync_dir
from hakeeper.util.proc import RunAs

SCRIPT_NAME = "archive_command.sh"
DONE_DIR = "done"
MARKER_REWRITE_AFTER = 2.0  # a done file still .ready without its marker: PostgreSQL retried it


def render_script(spool: Path, timeout: float) -> str:
    """The ``archive_command`` script: wait for ``<spool>/done/<%f>``, remove it, exit 0;
    exit 1 after ``timeout`` seconds.  POSIX sh plus ``sleep`` with fractions (coreutils)."""
    fast_wait, slow_wait = 0.05, 0.25
    fast = max(1, min(100, round(timeout / fast_wait)))
    slow = max(0, round((timeout - fast * fast_wait) / slow_wait))
    done = shlex.quote(str(spool / DONE_DIR))
    return f"""#!/bin/sh
# hakeeper archive_command (written by the agent at every start; edits are overwritten).
#   archive_command = '<this script> "%p" "%f"'
# The agent's archiver finds pg_wal/archive_status/%f.ready itself and stores %f in every
# repository; then it creates the marker done/%f.  This script only waits for that marker.
# Exit 0: %f is durable (in every repository, or in one and durably queued for the others).
# Exit 1: no marker within {timeout:g} s (agent down, not allowed to archive, or failing):
# PostgreSQL keeps the file and retries later.
case "$2" in
    '' | .* | */*) echo "hakeeper archive_command: bad file name '$2'" >&2; exit 1 ;;
esac
marker={done}/"$2"
i=0
while [ "$i" -lt {fast} ]; do
    if [ -e "$marker" ]; then rm -f "$marker"; exit 0; fi
    sleep {fast_wait}
    i=$((i + 1))
done
i=0
while [ "$i" -lt {slow} ]; do
    if [ -e "$marker" ]; then rm -f "$marker"; exit 0; fi
    sleep {slow_wait}
    i=$((i + 1))
done
if [ -e "$marker" ]; then rm -f "$marker"; exit 0; fi
echo "hakeeper archive_command: $2 not archived within {timeout:g} s (is the agent running and primary?)" >&2
exit 1
"""


def reachable_by(path: Path, run_as: RunAs) -> bool:
    """Whether ``run_as`` can traverse every directory down to ``path`` (owner/group/other
    execute bits; supplementary groups not considered, so this may err on the side of no)."""
    if run_as.uid is None:
        return True
    p = path.resolve()
    for d in [*reversed(p.parents), p]:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == run_as.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


def install_script(spool: Path, timeout: float, run_as: RunAs) -> None:
    """Create the spool directory, ``done/`` (owned by PostgreSQL's OS user, who removes the
    markers) and the script (written anew at every start: edits are overwritten)."""
    spool.mkdir(parents=True, exist_ok=True)
    # PostgreSQL's user must reach the script and done/, but not the queue or gap records.
    os.chmod(spool, 0o711 if run_as.uid is not None else 0o700)
    done_dir = spool / DONE_DIR
    done_dir.mkdir(mode=0o700, exist_ok=True)
    os.chmod(done_dir, 0o700)
    run_as.chown(done_dir)
    tmp = spool / f".{SCRIPT_NAME}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o755)
    try:
        os.write(fd, render_script(spool, timeout).encode())
        os.fchmod(fd, 0o755)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, spool / SCRIPT_NAME)
    _fsync_dir(spool)


@dataclass(frozen=True, slots=True)
class Markers:
    """``<spool>/done/<file>``: the archiver's word that ``<file>`` is durable.  Only this
    process's word counts, so markers of an earlier run (or of a time this node could not
    archive) are removed."""

    done_dir: Path

    def write(self, f: ReadyFile) -> None:
        """Hand ``f`` back to PostgreSQL (the script waiting for it exits 0)."""
        try:
            fd = os.open(
                self.done_dir / f.name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
            )
            os.close(fd)
        except FileExistsError:
            pass
        f.done = True
        f.marker_at = time.monotonic()

    def wipe(self) -> int:
        """Remove every marker; returns how many there were."""
        n = 0
        with contextlib.suppress(FileNotFoundError):
            for m in self.done_dir.iterdir():
                m.unlink(missing_ok=True)
                n += 1
        return n

    def put_back(self, files: Iterable[ReadyFile], ready: Mapping[str, float], now: float) -> None:
        """A file we handed back is .ready again or still (PostgreSQL crashed between our
        marker and its rename to .done, and calls archive_command again): put the marker back."""
        for f in files:
            if f.done and f.name in ready and now - f.marker_at > MARKER_REWRITE_AFTER:
                if not (self.done_dir / f.name).exists():
                    self.write(f)
                else:
                    f.marker_at = now

    def sweep_orphans(self, ready: Mapping[str, float], status_dir: Path) -> None:
        """Remove markers of files PostgreSQL no longer wants archived (nobody will take them)."""
        try:
            names = os.listdir(self.done_dir)
        except FileNotFoundError:
            return
        for n in names:
            if n not in ready and not (status_dir / (n + READY)).exists():
                with contextlib.suppress(FileNotFoundError):
                    (self.done_dir / n).unlink()
