"""One node's hakeeper agent in a local cluster, run as our child process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from hakeeper.localcluster.layout import LocalClusterError, NodeSpec
from hakeeper.localcluster.procs import send_signal
from hakeeper.util.proc import pid_alive, proc_cmdline


class AgentProcess:
    """The agent of ``node``: started with the command ``argv()`` gives at that moment (so a
    cluster can wrap it, e.g. in a network namespace), in ``cwd``, output appended to the
    node's agent.log; stopped by PID.  ``proc`` is the last process we started (None before)."""

    def __init__(self, node: NodeSpec, *, cwd: Path, argv: Callable[[], list[str]]) -> None:
        self.node = node
        self.cwd = cwd
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the agent we started, while it runs."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code of the agent we started, once it has exited (else None)."""
        return None if self.proc is None else self.proc.poll()

    def external_pids(self) -> list[int]:
        """Agents for this node's config that we did not start (e.g. restarted by hand)."""
        cfg = self.node.config_path
        ours = self.proc.pid if self.proc is not None else None
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == ours or int(entry) == os.getpid():
                continue
            pid = int(entry)
            args = proc_cmdline(pid)
            if "agent" not in args:
                continue
            for i, a in enumerate(args[:-1]):
                if a in ("-c", "--config"):
                    value = args[i + 1]
                elif a.startswith("--config="):
                    value = a.split("=", 1)[1]
                else:
                    continue
                try:
                    path = (
                        Path(value) if os.path.isabs(value) else Path(os.readlink(f"/proc/{pid}/cwd")) / value
                    )
                    if path.resolve() == cfg.resolve() and pid_alive(pid):
                        found.append(pid)
                except OSError:
                    pass
                break
        return found

    def start(self) -> int:
        """Start the agent (output appended to its agent.log); returns its PID."""
        n = self.node
        running = self.pid
        if running is not None:
            return running
        if not n.config_path.exists():
            raise LocalClusterError(f"{n.config_path} does not exist; call write_configs() first")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAKEEPER_", "PG"))}
        env["PYTHONUNBUFFERED"] = "1"
        with open(n.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` to the agent and wait for it to exit; SIGKILL (with its process group)
        after ``timeout``.  Returns its exit code (None if it was not started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            send_signal(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                send_signal(proc.pid, signal.SIGKILL)
                proc.wait()
        # Helpers it left behind in its own process group (pg_basebackup, ...).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def kill(self) -> None:
        """kill -9 the agent process only (its PostgreSQL keeps running)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            raise LocalClusterError(f"agent of {self.node.name} is not running")
        proc.kill()
        proc.wait()
