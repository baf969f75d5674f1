"""The programs and processes of a local cluster: finding programs, running them quietly,
signalling and waiting by PID, and finding the helpers an agent leaves behind (PostgreSQL's
postmaster, the fencer).  Nothing is matched by name alone."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from hakeeper.localcluster.layout import LocalClusterError
from hakeeper.util.proc import RunAs, child_env, children_of, pid_alive, postmaster_pid, proc_cmdline


def find_program(name: str, *candidates: str) -> str:
    """The first executable of ``candidates``, else ``name`` on PATH."""
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found is None:
        raise LocalClusterError(f"{name} not found; install it (scripts/setup.sh does)")
    return found


def etcd_program() -> str:
    return find_program("etcd", "/usr/bin/etcd", "/usr/local/bin/etcd")


def wait_dead(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone; False if it still runs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def send_signal(pid: int, sig: int) -> None:
    """``kill(pid, sig)``, quiet when the process is gone or not ours."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def run_quiet(argv: list[str], run_as: RunAs, timeout: float | None = None) -> int:
    """Run a program as ``run_as`` without output; its exit code."""
    res = subprocess.run(
        argv,
        env=child_env(run_as),
        cwd="/",
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=timeout,
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=None if run_as.uid is None else [],
    )
    return res.returncode


def user_can(run_as: RunAs, test_flag: str, path: Path) -> bool:
    """Whether ``run_as`` may access ``path`` (``test -x``/``-w``): every parent must be traversable."""
    if run_as.uid is None:
        return True
    return run_quiet(["test", test_flag, str(path)], run_as, timeout=10) == 0


def tail_file(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (from its last 8 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def fencer_pids(node_dir: Path) -> list[int]:
    """The agent's fencer helper processes for the node in ``node_dir`` (``python -m
    hakeeper.ha.fence --state <file below the node dir>``).  A fencer outlives a killed agent
    on purpose."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = proc_cmdline(int(entry))
        if "hakeeper.ha.fence" not in args:
            continue
        for i, a in enumerate(args[:-1]):
            if a == "--state" and Path(args[i + 1]).is_relative_to(node_dir) and pid_alive(int(entry)):
                found.append(int(entry))
    return found


def stop_fencers(node_dir: Path) -> list[int]:
    """SIGKILL the fencers of the node in ``node_dir`` and wait for them; their PIDs."""
    pids = fencer_pids(node_dir)
    for pid in pids:
        send_signal(pid, signal.SIGKILL)  # a fencer ignores SIGTERM by design; it holds no state
    for pid in pids:
        wait_dead(pid, 5.0)
    return pids


def stop_postmaster(data_dir: Path, run_as: RunAs, timeout: float = 30.0) -> None:
    """Stop the PostgreSQL running from ``data_dir``, if any: a fast shutdown (SIGINT, what
    ``pg_ctl stop -m fast`` sends, with no need for the binaries of the data directory's
    major), then SIGKILL for it and its children."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return
    send_signal(pid, signal.SIGINT)
    wait_dead(pid, timeout)
    if wait_dead(pid, 2.0):
        return
    children = children_of(pid)
    send_signal(pid, signal.SIGKILL)
    for child in children:
        send_signal(child, signal.SIGKILL)
    wait_dead(pid, 5.0)
