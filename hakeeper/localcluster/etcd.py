"""The etcd of a local cluster: one member on loopback, started and stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Protocol

from hakeeper.localcluster.layout import HOST, LocalClusterError
from hakeeper.localcluster.procs import etcd_program, send_signal, tail_file
from hakeeper.util.proc import proc_cmdline

__all__ = ["EtcdService", "LocalEtcd", "etcd_argv"]


def etcd_argv(
    name: str, data_dir: Path, client_url: str, peer_url: str, initial_cluster: str, token: str
) -> list[str]:
    """Command line of one etcd member tuned for a cluster on one machine (fast elections,
    compaction by revision so that watches see compaction like in production)."""
    return [
        etcd_program(),
        "--name",
        name,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        initial_cluster,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        token,
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        "--auto-compaction-mode",
        "revision",
        "--auto-compaction-retention",
        "1000",
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ]


class EtcdService(Protocol):
    """What a local cluster needs from its etcd, whether one member (:class:`LocalEtcd`) or
    several (the chaos harness)."""

    @property
    def url(self) -> str:
        """The client URL the agents and tools use."""

    @property
    def pid(self) -> int | None:
        """A running member's PID (None when none runs)."""

    def start(self, timeout: float = 30.0) -> int:
        """Start and wait until healthy; a member's PID."""

    def stop(self, timeout: float = 15.0) -> None: ...

    def leftover_pids(self) -> list[int]:
        """etcd processes of an earlier run on our data that we did not start."""


class LocalEtcd:
    """The single etcd member of a local cluster, with its data and log under ``etcd_dir``."""

    def __init__(
        self, *, etcd_dir: Path, data_dir: Path, log_path: Path, client_port: int, peer_port: int, token: str
    ) -> None:
        self.etcd_dir = etcd_dir
        self.data_dir = data_dir
        self.log_path = log_path
        self.url = f"http://{HOST}:{client_port}"
        self.peer_url = f"http://{HOST}:{peer_port}"
        self.token = token
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> int:
        """Start the single etcd member and wait until it is healthy; returns its PID."""
        if self.pid is not None:
            return self.pid
        self.etcd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = etcd_argv(
            "etcd1", self.data_dir, self.url, self.peer_url, f"etcd1={self.peer_url}", self.token
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.etcd_dir,
                start_new_session=True,
            )
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self._proc.pid

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise LocalClusterError(
                    f"etcd exited ({code}); see {self.log_path}:\n{tail_file(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    body = r.read()
                    if b'"true"' in body:
                        return
                    last = body.decode(errors="replace")
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise LocalClusterError(f"etcd not healthy after {timeout:.0f}s ({last}); see {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            send_signal(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def leftover_pids(self) -> list[int]:
        """etcd processes serving our etcd data directory that we did not start."""
        ours = self.pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == ours:
                continue
            args = proc_cmdline(int(entry))
            if not args or Path(args[0]).name != "etcd":
                continue
            for i, a in enumerate(args[:-1]):
                if a in ("--data-dir", "-data-dir") and Path(args[i + 1]).absolute() == self.data_dir:
                    found.append(int(entry))
        return found
