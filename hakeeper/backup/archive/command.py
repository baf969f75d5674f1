"""The archive_command hand-shake: the POSIX sh script PostgreSQL runs, which only waits for
``<spool>/done/<file>``, and the check that PostgreSQL's OS user can reach that directory."""

from __future__ import annotations

import shlex
import stat
from pathlib import Path

from hakeeper.util.proc import RunAs

SCRIPT_NAME = "archive_command.sh"
DONE_DIR = "done"


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
