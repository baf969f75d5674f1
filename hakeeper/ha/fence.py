"""The fence: stop a primary's writes before its leader lease can expire, even if the agent stalls.

The etcd lease is only a promotion gate.  What stops an old primary from writing is this: the
agent computes ``deadline = CLOCK_BOOTTIME time the last successful keepalive was sent + TTL -
margin`` and hands it to a small **separate process** (the fencer) through a state file.  The
fencer polls ``CLOCK_BOOTTIME`` (system-wide, shared by every process, and unlike
``CLOCK_MONOTONIC`` still running while the host is suspended, as etcd's TTL does:
:mod:`hakeeper.util.clock`) every 50 ms and, once the deadline has passed while armed, shuts
PostgreSQL down in immediate mode (SIGQUIT to the postmaster: every backend exits at once, open
sessions included; SIGKILL if that does not finish in time).  ``fence_margin`` must cover that
poll and that grace (:mod:`hakeeper.core.fencing`).

A thread would not do: it stops with the agent under SIGSTOP or swap.  The fencer has no etcd,
no asyncio and almost no code, so there is little that can make it late.

The agent runs the same check in its own loop as a first line (``FenceClient.expired``); the
fencer is the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hakeeper.core.fencing import FENCER_KILL_GRACE, FENCER_POLL
from hakeeper.util import clock
from hakeeper.util.proc import children_of, pid_alive, postmaster_pid

POLL_INTERVAL = FENCER_POLL


@dataclass(slots=True)
class FenceState:
    armed: bool = False
    deadline: float = 0.0  # CLOCK_BOOTTIME seconds (hakeeper.util.clock.boottime)
    agent_pid: int = 0
    data_dir: str = ""
    seq: int = 0
    exit: bool = False

    @classmethod
    def read(cls, path: Path) -> FenceState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)  # root mode
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self)))
        os.replace(tmp, path)


def _log(event: str, **facts: object) -> None:
    rec = {"event": event, "logger": "hakeeper.fencer", "pid": os.getpid(), **facts}
    rec["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    try:
        sys.stderr.write(json.dumps(rec) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def fence_postgres(data_dir: Path, grace: float = FENCER_KILL_GRACE) -> str:
    """Stop the postmaster of ``data_dir`` at once, open sessions included.  Returns what happened."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return "not running"
    children = children_of(pid)
    try:
        os.kill(pid, signal.SIGQUIT)  # immediate shutdown: backends exit without committing more
    except ProcessLookupError:
        return "not running"
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if postmaster_pid(data_dir) is None and not any(pid_alive(c) for c in children):
            return "immediate shutdown"
        time.sleep(0.02)
    for p in [pid, *children, *children_of(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return "killed"


def run_fencer(state_path: Path) -> int:
    """Main loop of the fencer process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the state file (or SIGKILL) stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _log("fencer_started", state=str(state_path))
    pid_path = state_path.with_name("fencer.pid")
    fd = os.open(pid_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)  # root mode
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    fenced_seq = -1
    missing_since: float | None = None
    while True:
        now = clock.boottime()
        st = FenceState.read(state_path)
        if st is None:
            # The agent writes the file before starting us and replaces it atomically; a missing
            # file means somebody removed the runtime dir.  Give it a moment, then stop.
            missing_since = missing_since or now
            if now - missing_since > 5:
                _log("fencer_exiting", reason="state file gone")
                return 0
            time.sleep(POLL_INTERVAL)
            continue
        missing_since = None
        if st.exit:
            _log("fencer_exiting", reason="asked by agent")
            return 0
        if st.armed and now >= st.deadline and fenced_seq != st.seq:
            outcome = fence_postgres(Path(st.data_dir))
            fenced_seq = st.seq
            _log(
                "fence_fired",
                late_by=round(now - st.deadline, 3),
                outcome=outcome,
                data_dir=st.data_dir,
                reason="leader lease not renewed before the fence deadline",
            )
        guarding = st.armed and fenced_seq != st.seq
        if not guarding and st.agent_pid and not pid_alive(st.agent_pid):
            _log("fencer_exiting", reason="agent gone and nothing left to guard")
            return 0
        time.sleep(POLL_INTERVAL)


class FenceClient:
    """The agent's handle on its fencer process."""

    def __init__(self, runtime_dir: Path, data_dir: Path) -> None:
        self.path = runtime_dir / "fence.json"
        self.log_path = runtime_dir / "fencer.log"
        self.state = FenceState(agent_pid=os.getpid(), data_dir=str(data_dir))
        self.proc: subprocess.Popen[bytes] | None = None
        self.adopted_pid: int | None = None

    def _running_fencer(self) -> int | None:
        """PID of a fencer left by an earlier agent on this data dir, if it still runs."""
        try:
            pid = int((self.path.with_name("fencer.pid")).read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if b"hakeeper.ha.fence" in cmdline and pid_alive(pid) else None

    def inherit(self) -> bool:
        """Keep an armed fence left by an earlier agent on this data dir (fail closed).

        If that agent died while its PostgreSQL was a writable primary, the fence must still fire
        at *its* deadline unless we confirm our own lease and re-arm it first.  Returns True when
        an armed fence was inherited."""
        prev = FenceState.read(self.path)
        if prev is None or prev.exit or not prev.armed:
            return False
        self.state.armed = True
        self.state.deadline = prev.deadline
        self.state.seq = prev.seq + 1
        return True

    def start(self) -> None:
        """Start the fencer, or adopt the one an earlier agent left running on this data dir."""
        self.state.write(self.path)
        if self.proc is not None and self.proc.poll() is None:
            return
        self.adopted_pid = self._running_fencer()
        if self.adopted_pid is not None:
            return
        log = os.fdopen(
            os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600), "ab"
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hakeeper.ha.fence", "--state", str(self.path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()

    def ensure_running(self) -> None:
        if self.adopted_pid is not None and pid_alive(self.adopted_pid):
            return
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    @property
    def armed(self) -> bool:
        return self.state.armed

    def arm(self, deadline: float) -> None:
        """Allow writes until ``deadline`` (boottime); called on every successful keepalive."""
        changed = not self.state.armed or deadline != self.state.deadline
        self.state.armed = True
        self.state.deadline = deadline
        if changed:
            self.state.seq += 1
            self.state.write(self.path)

    def disarm(self) -> None:
        if self.state.armed:
            self.state.armed = False
            self.state.seq += 1
            self.state.write(self.path)

    def expired(self, now: float | None = None) -> bool:
        return self.state.armed and (now if now is not None else clock.boottime()) >= self.state.deadline

    def stop(self) -> None:
        self.state.armed = False
        self.state.exit = True
        self.state.seq += 1
        try:
            self.state.write(self.path)
        except OSError:
            pass
        if self.adopted_pid is not None:
            end = time.monotonic() + 2
            while pid_alive(self.adopted_pid) and time.monotonic() < end:
                time.sleep(0.05)
        if self.proc is not None:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hakeeper-fencer")
    parser.add_argument("--state", required=True, type=Path)
    args = parser.parse_args(argv)
    return run_fencer(args.state)


if __name__ == "__main__":
    sys.exit(main())
