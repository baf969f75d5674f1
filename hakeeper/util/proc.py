"""Running external programs from asyncio, as the right OS user.

PostgreSQL refuses to run as root.  When the agent (or a test, or the demo) runs as root,
every PostgreSQL program is started as an unprivileged user: the owner of the data directory,
or ``postgres``.  Everything here is async; nothing blocks the event loop.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class RunAs:
    """Who a child process runs as.  ``uid is None`` means: as ourselves."""

    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    home: str | None = None

    def kwargs(self) -> dict[str, object]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        """Give ``path`` to this user; a symbolic link is changed itself, never its target (as
        root, following a link the PostgreSQL user planted would hand it any file)."""
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)


def resolve_run_as(data_dir: Path, os_user: str | None = None) -> RunAs:
    """As root: run PostgreSQL as ``os_user``, else the (non-root) owner of the data dir or its
    nearest existing parent, else ``postgres``.  Not root: run as ourselves."""
    if os.geteuid() != 0:
        return RunAs()
    if os_user is None:
        probe = data_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            owner = probe.stat().st_uid
        except OSError:
            owner = 0
        if owner != 0:
            pw = pwd.getpwuid(owner)
            return RunAs(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir)
        os_user = "postgres"
    try:
        pw = pwd.getpwnam(os_user)
    except KeyError as e:
        raise RuntimeError(
            f"running as root, PostgreSQL needs an unprivileged OS user; user {os_user!r} does not exist"
        ) from e
    if pw.pw_uid == 0:
        raise RuntimeError("PostgreSQL cannot run as root; set postgresql.os_user to another user")
    return RunAs(pw.pw_uid, pw.pw_gid, pw.pw_name, pw.pw_dir)


@dataclass(frozen=True, slots=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, n: int = 20) -> str:
        lines = (self.stdout + "\n" + self.stderr).strip().splitlines()
        return "\n".join(lines[-n:])


class CommandFailed(RuntimeError):
    def __init__(self, result: Result) -> None:
        self.result = result
        super().__init__(f"{Path(result.argv[0]).name} exited {result.returncode}: {result.tail(8)}")


def child_env(run_as: RunAs, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "HAKEEPER_"))}
    env["LC_ALL"] = env.get("LC_ALL", "C.UTF-8")
    if run_as.home is not None:
        env["HOME"] = run_as.home
        if run_as.name:
            env["USER"] = env["LOGNAME"] = run_as.name
    if extra:
        env.update(extra)
    return env


async def run(
    argv: Sequence[str | Path],
    *,
    run_as: RunAs = RunAs(),
    env: Mapping[str, str] | None = None,
    timeout: float | None = 60.0,
    check: bool = True,
    cwd: str | Path = "/",
    stdin_data: bytes | None = None,
) -> Result:
    """Run a program to completion with a hard timeout (the child is killed when it expires)."""
    args = tuple(str(a) for a in argv)
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin_data is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(run_as, env),
        cwd=str(cwd),
        start_new_session=True,
        **run_as.kwargs(),  # type: ignore[arg-type]
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin_data)
    except (TimeoutError, asyncio.CancelledError):
        _kill_group(proc.pid)
        await proc.wait()
        raise
    result = Result(args, proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and not result.ok:
        raise CommandFailed(result)
    return result


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and parent_pid(int(e)) == pid]


def parent_pid(pid: int) -> int | None:
    """The process's parent PID, read from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def proc_comm(pid: int) -> str:
    """The process's command name ('' when it is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def proc_cmdline(pid: int) -> list[str]:
    """The process's arguments ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def postmaster_pid(data_dir: Path) -> int | None:
    """PID from ``data_dir/postmaster.pid`` if that process is alive, is postgres, and runs in
    that data directory (a recycled PID or another cluster's server is never reported)."""
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        # A single-user backend writes its PID negated; it owns the data dir all the same.
        pid = abs(int(first))
    except (OSError, ValueError):
        return None
    if pid == 0 or not pid_alive(pid) or proc_comm(pid) not in ("postgres", "postmaster"):
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return pid  # not ours to inspect; the name matched
    if os.path.realpath(cwd) != os.path.realpath(data_dir):
        return None
    return pid


def dirs_of_dead_processes(where: Path, pattern: re.Pattern[str]) -> list[Path]:
    """The directories in ``where`` whose name matches ``pattern`` (group 1: the pid of the
    process that made it) and whose process is gone: work directories a killed process left."""
    try:
        entries = list(where.iterdir())
    except OSError:
        return []
    out = []
    for d in entries:
        m = pattern.match(d.name)
        if m is not None and d.is_dir() and not d.is_symlink() and not pid_alive(int(m.group(1))):
            out.append(d)
    return out
