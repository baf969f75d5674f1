"""A whole hakeeper cluster on one machine: one etcd member plus N agents, each with its own
PostgreSQL.  Used by ``hakeeper demo``, by integration tests and by benchmarks.

Layout under ``base_dir``::

    etcd/data        etcd's data directory        etcd/etcd.log   its output
    node1/node.yml   node1's config (mode 0600)   node1/agent.log the agent's output (JSON lines)
    node1/data       node1's PGDATA (created by the agent, never by us)
    ...

Port plan, from ``base_port`` (default 25000; nodes are numbered from 1, at most 9):

    base_port          etcd client URL
    base_port + 1      etcd peer URL
    base_port + 10 + i PostgreSQL of node i  (node1: 25011, node2: 25012, ...)
    base_port + 20 + i REST API of node i    (node1: 25021, node2: 25022, ...)

Everything listens on 127.0.0.1 only.  Every process is started and stopped by PID; nothing is
matched by name.  When we run as root, PostgreSQL runs as an unprivileged user (see
:func:`hakeeper.util.proc.resolve_run_as`): the node directories are owned by that user and every
directory above them must be traversable by it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import yaml

from hakeeper.util.proc import (
    RunAs,
    child_env,
    children_of,
    pid_alive,
    postmaster_pid,
    proc_cmdline,
    resolve_run_as,
)

DEFAULT_BASE_PORT = 25000
MAX_NODES = 9
SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
API_USER = "hakeeper"  # basic-auth user of the REST API
HOST = "127.0.0.1"


class LocalClusterError(RuntimeError):
    """Something the user can fix (a port in use, a missing program, an unusable directory)."""


class PortInUseError(LocalClusterError):
    def __init__(self, port: int, purpose: str) -> None:
        self.port = port
        self.purpose = purpose
        super().__init__(
            f"port {port} ({purpose}) on {HOST} is already in use; "
            "pick another base port, or stop whatever uses it (a previous demo still running?)"
        )


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """Where one node lives and which ports it uses."""

    name: str
    index: int
    pg_port: int
    api_port: int
    node_dir: Path
    data_dir: Path
    config_path: Path
    log_path: Path

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"


@dataclass(frozen=True, slots=True)
class NodeState:
    """What one node's PostgreSQL answered (``error`` set when it could not be asked)."""

    name: str
    in_recovery: bool | None = None
    receiver_status: str | None = None
    error: str | None = None

    @property
    def role(self) -> str:
        if self.error is not None or self.in_recovery is None:
            return "down"
        if not self.in_recovery:
            return "primary"
        return "replica" if self.receiver_status == "streaming" else "replica (not streaming)"


def _find_program(name: str, *candidates: str) -> str:
    for c in candidates:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found is None:
        raise LocalClusterError(f"{name} not found; install it (scripts/setup.sh does)")
    return found


def pg_program(name: str) -> str:
    """Path of a PostgreSQL program (Debian's PostgreSQL 15 first, then PATH)."""
    return _find_program(name, f"/usr/lib/postgresql/15/bin/{name}")


def etcd_program() -> str:
    return _find_program("etcd", "/usr/bin/etcd", "/usr/local/bin/etcd")


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


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a socket in TIME_WAIT is no conflict, a listener is.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _run_quiet(argv: list[str], run_as: RunAs, timeout: float | None = None) -> int:
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
    return _run_quiet(["test", test_flag, str(path)], run_as, timeout=10) == 0


class LocalCluster:
    """etcd + ``nodes`` hakeeper agents on 127.0.0.1, laid out under ``base_dir``.

    ``dynamic`` overrides ``bootstrap.dcs`` (e.g. ``{"ttl": 10}``); ``tags`` maps a node name to
    its tags (e.g. ``{"node3": {"nofailover": True}}``).  Configs already in ``base_dir`` keep
    their passwords (a restart reuses the data); :meth:`wipe` removes everything we created.

    Use as a context manager to guarantee :meth:`stop`; entering does not start anything::

        with LocalCluster(tmp) as c:
            c.start()
            c.wait_ready()
    """

    def __init__(
        self,
        base_dir: Path,
        nodes: int = 3,
        base_port: int = DEFAULT_BASE_PORT,
        scope: str = "demo",
        dynamic: dict[str, Any] | None = None,
        tags: dict[str, dict[str, Any]] | None = None,
        backup: dict[str, Any] | None = None,
    ) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise LocalClusterError(f"nodes must be between 1 and {MAX_NODES}, not {nodes}")
        if not 1024 <= base_port <= 65535 - 20 - MAX_NODES:
            raise LocalClusterError(f"base port must be between 1024 and {65535 - 20 - MAX_NODES}")
        self.base_dir = Path(base_dir).absolute()
        self.n_nodes = nodes
        self.base_port = base_port
        self.scope = scope
        self.dynamic = dict(dynamic or {})
        self.tags = {k: dict(v) for k, v in (tags or {}).items()}
        self.backup = dict(backup or {})  # the `backup:` section of every node's config
        unknown = set(self.tags) - {f"node{i}" for i in range(1, nodes + 1)}
        if unknown:
            raise LocalClusterError(f"tags for unknown nodes: {', '.join(sorted(unknown))}")
        self.etcd_dir = self.base_dir / "etcd"
        self.etcd_data_dir = self.etcd_dir / "data"
        self.etcd_log = self.etcd_dir / "etcd.log"
        self.etcd_client_port = base_port
        self.etcd_peer_port = base_port + 1
        self.nodes: dict[str, NodeSpec] = {}
        for i in range(1, nodes + 1):
            name = f"node{i}"
            node_dir = self.base_dir / name
            self.nodes[name] = NodeSpec(
                name=name,
                index=i,
                pg_port=base_port + 10 + i,
                api_port=base_port + 20 + i,
                node_dir=node_dir,
                data_dir=node_dir / "data",
                config_path=node_dir / "node.yml",
                log_path=node_dir / "agent.log",
            )
        self.superuser_password, self.replication_password = self._load_or_make_passwords()
        self.api_token, self.api_password = self._load_or_make_api_credentials()
        # As root: the owner of an existing node dir, else of base_dir if not root, else "postgres"
        # -- the same rule the agent applies to its data directory.
        self.run_as = resolve_run_as(self.base_dir / "node1" / "data")
        self._etcd: subprocess.Popen[bytes] | None = None
        self._agents: dict[str, subprocess.Popen[bytes]] = {}

    # ----------------------------------------------------------------- layout and configs

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_client_port}"

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    def port_plan(self) -> list[tuple[int, str]]:
        """Every port this cluster listens on, with what it is for."""
        plan = [(self.etcd_client_port, "etcd client"), (self.etcd_peer_port, "etcd peer")]
        for n in self.nodes.values():
            plan.append((n.pg_port, f"{n.name} PostgreSQL"))
            plan.append((n.api_port, f"{n.name} REST API"))
        return plan

    def _load_or_make_passwords(self) -> tuple[str, str]:
        for n in self.nodes.values():
            if not n.config_path.exists():
                continue
            try:
                data = yaml.safe_load(n.config_path.read_text())
                pg = data["postgresql"]
                su, repl = pg["superuser"]["password"], pg["replication"]["password"]
            except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
                raise LocalClusterError(f"cannot reuse {n.config_path}: {e}; use a fresh directory") from e
            if isinstance(su, str) and isinstance(repl, str):
                return su, repl
        return secrets.token_urlsafe(18), secrets.token_urlsafe(18)

    def _load_or_make_api_credentials(self) -> tuple[str, str]:
        """REST API token and password of user ``hakeeper`` (kept across restarts, like the
        PostgreSQL passwords; configs written before the API had credentials get new ones)."""
        for n in self.nodes.values():
            if not n.config_path.exists():
                continue
            try:
                api = yaml.safe_load(n.config_path.read_text()).get("api") or {}
            except (OSError, yaml.YAMLError, AttributeError):
                continue
            token, password = api.get("token"), api.get("password")
            if isinstance(token, str) and isinstance(password, str):
                return token, password
        return secrets.token_urlsafe(24), secrets.token_urlsafe(18)

    def node_config(self, name: str) -> dict[str, Any]:
        """The YAML document of one node, as a dict."""
        n = self.nodes[name]
        # Small enough for several nodes on one machine.  The agent keeps each node's Unix socket
        # in its data directory, so nodes never share a socket directory.
        parameters: dict[str, Any] = {"shared_buffers": "64MB"}
        cfg: dict[str, Any] = {
            "scope": self.scope,
            "name": n.name,
            "etcd": {"hosts": [self.etcd_url]},
            "api": {
                "listen": f"{HOST}:{n.api_port}",
                "username": API_USER,
                "password": self.api_password,
                "token": self.api_token,
            },
            "postgresql": {
                "data_dir": str(n.data_dir),
                "listen": f"{HOST}:{n.pg_port}",
                "superuser": {"username": SUPERUSER, "password": self.superuser_password},
                "replication": {"username": REPLICATION_USER, "password": self.replication_password},
                "parameters": parameters,
                "pg_hba": [
                    f"host all all {HOST}/32 scram-sha-256",
                    f"host replication {REPLICATION_USER} {HOST}/32 scram-sha-256",
                ],
            },
            "log": {"format": "json", "level": "INFO"},
        }
        if name in self.tags:
            cfg["tags"] = self.tags[name]
        if self.backup:
            cfg["backup"] = self.backup
        if self.dynamic:
            cfg["bootstrap"] = {"dcs": self.dynamic}
        return cfg

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.run_as.uid is not None:
            # PostgreSQL runs as another user: it must be able to reach its directory.
            mode = self.base_dir.stat().st_mode & 0o777
            if mode & 0o001 == 0 and self.base_dir.stat().st_uid == os.geteuid():
                self.base_dir.chmod(mode | 0o711)
            if not user_can(self.run_as, "-x", self.base_dir):
                raise LocalClusterError(
                    f"{self.base_dir} is not reachable by OS user {self.run_as.name!r}, which runs "
                    "PostgreSQL (a parent directory is not traversable); use a directory such as "
                    "/tmp/hakeeper-demo"
                )
        self.etcd_dir.mkdir(mode=0o700, exist_ok=True)
        for n in self.nodes.values():
            n.node_dir.mkdir(mode=0o700, exist_ok=True)
            self.run_as.chown(n.node_dir)

    def write_configs(self) -> None:
        """Create the directories and write every node's YAML (mode 0600)."""
        self._prepare_dirs()
        for name, n in self.nodes.items():
            text = f"# hakeeper demo node {name} (generated; local demo passwords)\n" + yaml.safe_dump(
                self.node_config(name), sort_keys=False
            )
            tmp = n.config_path.with_suffix(".yml.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o600)
            os.replace(tmp, n.config_path)

    def wipe(self) -> None:
        """Remove what this cluster created under ``base_dir`` (it must not be running)."""
        for path in [self.etcd_dir, *(n.node_dir for n in self.nodes.values())]:
            if path.exists():
                shutil.rmtree(path)
        for extra in self.base_dir.glob("node[0-9]*"):
            if extra.is_dir() and (extra / "node.yml").exists():
                shutil.rmtree(extra)
        with contextlib.suppress(FileNotFoundError):
            (self.base_dir / "demo.json").unlink()

    def check_ports(self) -> None:
        """Raise :class:`PortInUseError` for the first port of the plan that is taken."""
        for port, purpose in self.port_plan():
            if not port_is_free(port):
                raise PortInUseError(port, purpose)

    # ----------------------------------------------------------------- etcd

    @property
    def etcd_pid(self) -> int | None:
        if self._etcd is None or self._etcd.poll() is not None:
            return None
        return self._etcd.pid

    def start_etcd(self, timeout: float = 30.0) -> int:
        """Start the single etcd member and wait until it is healthy; returns its PID."""
        if self.etcd_pid is not None:
            return self.etcd_pid
        self.etcd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        peer = f"http://{HOST}:{self.etcd_peer_port}"
        argv = etcd_argv(
            "etcd1", self.etcd_data_dir, self.etcd_url, peer, f"etcd1={peer}", f"hakeeper-{self.scope}"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.etcd_log, "ab") as log:
            self._etcd = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.etcd_dir,
                start_new_session=True,
            )
        try:
            self._wait_etcd_healthy(timeout)
        except BaseException:
            self.stop_etcd()
            raise
        return self._etcd.pid

    def _wait_etcd_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self._etcd is None or self._etcd.poll() is not None:
                code = None if self._etcd is None else self._etcd.returncode
                raise LocalClusterError(
                    f"etcd exited ({code}); see {self.etcd_log}:\n{self._tail(self.etcd_log)}"
                )
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=1) as r:
                    body = r.read()
                    if b'"true"' in body:
                        return
                    last = body.decode(errors="replace")
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise LocalClusterError(f"etcd not healthy after {timeout:.0f}s ({last}); see {self.etcd_log}")

    def stop_etcd(self, timeout: float = 15.0) -> None:
        proc, self._etcd = self._etcd, None
        if proc is None:
            return
        if proc.poll() is None:
            _signal(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    # ----------------------------------------------------------------- agents

    def agent_pid(self, name: str) -> int | None:
        """PID of the agent we started for ``name``, while it runs."""
        proc = self._agents.get(name)
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    def agent_returncode(self, name: str) -> int | None:
        """Exit code of the agent we started for ``name``, once it has exited (else None)."""
        proc = self._agents.get(name)
        return None if proc is None else proc.poll()

    def external_agent_pids(self, name: str) -> list[int]:
        """Agents for this node's config that we did not start (e.g. restarted by hand)."""
        cfg = self.nodes[name].config_path
        ours = {p.pid for p in self._agents.values()}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in ours or int(entry) == os.getpid():
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

    def agent_argv(self, name: str) -> list[str]:
        """The command that runs node ``name``'s agent (a subclass may wrap it, e.g. to run it
        in a network namespace)."""
        return [sys.executable, "-m", "hakeeper", "agent", "-c", str(self.nodes[name].config_path)]

    def start_agent(self, name: str) -> int:
        """Start the agent of node ``name`` (output appended to its agent.log); returns its PID."""
        n = self.nodes[name]
        running = self.agent_pid(name)
        if running is not None:
            return running
        if not n.config_path.exists():
            raise LocalClusterError(f"{n.config_path} does not exist; call write_configs() first")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAKEEPER_", "PG"))}
        env["PYTHONUNBUFFERED"] = "1"
        with open(n.log_path, "ab") as log:
            proc = subprocess.Popen(
                self.agent_argv(name),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.base_dir,
                start_new_session=True,
            )
        self._agents[name] = proc
        return proc.pid

    def stop_agent(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` to the agent and wait for it to exit; SIGKILL (with its process group)
        after ``timeout``.  Returns its exit code (None if it was not started)."""
        proc = self._agents.get(name)
        if proc is None:
            return None
        if proc.poll() is None:
            _signal(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal(proc.pid, signal.SIGKILL)
                proc.wait()
        # Helpers it left behind in its own process group (pg_basebackup, ...).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode

    def kill_agent(self, name: str) -> None:
        """kill -9 the agent process only (its PostgreSQL keeps running)."""
        proc = self._agents.get(name)
        if proc is None or proc.poll() is not None:
            raise LocalClusterError(f"agent of {name} is not running")
        proc.kill()
        proc.wait()

    # ----------------------------------------------------------------- PostgreSQL

    def postmaster_pid(self, name: str) -> int | None:
        """PID from ``data/postmaster.pid`` if that process is alive and is PostgreSQL."""
        return postmaster_pid(self.nodes[name].data_dir)

    def fencer_pids(self, name: str) -> list[int]:
        """The agent's fencer helper processes for this node (``python -m hakeeper.ha.fence
        --state <file below the node dir>``).  A fencer outlives a killed agent on purpose."""
        node_dir = self.nodes[name].node_dir
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

    def _stop_fencers(self, name: str) -> list[int]:
        pids = self.fencer_pids(name)
        for pid in pids:
            _signal(pid, signal.SIGKILL)  # a fencer ignores SIGTERM by design; it holds no state
        for pid in pids:
            _wait_dead(pid, 5.0)
        return pids

    def kill_postgres(self, name: str) -> int:
        """kill -9 the postmaster of ``name``; returns the PID killed."""
        pid = self.postmaster_pid(name)
        if pid is None:
            raise LocalClusterError(f"PostgreSQL of {name} is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

    def _stop_postmaster(self, name: str, timeout: float = 30.0) -> None:
        pid = self.postmaster_pid(name)
        if pid is None:
            return
        data_dir = self.nodes[name].data_dir
        with contextlib.suppress(subprocess.TimeoutExpired, OSError, LocalClusterError):
            argv = [
                pg_program("pg_ctl"),
                "stop",
                "-D",
                str(data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout)),
            ]
            _run_quiet(argv, self.run_as, timeout=timeout + 5)
        if _wait_dead(pid, 2.0):
            return
        children = children_of(pid)
        _signal(pid, signal.SIGKILL)
        for child in children:
            _signal(child, signal.SIGKILL)
        _wait_dead(pid, 5.0)

    def dsn(self, name: str, dbname: str = "postgres") -> str:
        """libpq key/value connection string of one node, as the superuser."""
        n = self.nodes[name]
        return (
            f"host={HOST} port={n.pg_port} user={SUPERUSER} "
            f"password={self.superuser_password} dbname={dbname}"
        )

    def write_dsn(self, dbname: str = "postgres") -> str:
        """Multi-host connection string that always lands on the writable node."""
        hosts = ",".join(HOST for _ in self.nodes)
        ports = ",".join(str(n.pg_port) for n in self.nodes.values())
        return (
            f"host={hosts} port={ports} user={SUPERUSER} password={self.superuser_password} "
            f"dbname={dbname} target_session_attrs=read-write"
        )

    def node_state(self, name: str, timeout: float = 2.0) -> NodeState:
        try:
            with psycopg.connect(
                self.dsn(name), connect_timeout=max(1, int(timeout)), autocommit=True
            ) as conn:
                row = conn.execute(
                    "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver LIMIT 1)"
                ).fetchone()
        except psycopg.Error as e:
            return NodeState(
                name, error=str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            )
        if row is None:
            return NodeState(name, error="no answer")
        return NodeState(name, in_recovery=bool(row[0]), receiver_status=row[1])

    def states(self) -> dict[str, NodeState]:
        return {name: self.node_state(name) for name in self.nodes}

    def primary(self) -> str | None:
        """Name of the single writable node, or None (none, or more than one)."""
        primaries = [s.name for s in self.states().values() if s.role == "primary"]
        return primaries[0] if len(primaries) == 1 else None

    @staticmethod
    def _ready(states: dict[str, NodeState]) -> bool:
        roles = [s.role for s in states.values()]
        return roles.count("primary") == 1 and roles.count("replica") == len(roles) - 1

    def wait_ready(
        self, timeout: float = 180.0, on_poll: Callable[[dict[str, NodeState]], None] | None = None
    ) -> str:
        """Wait for exactly one primary and every other node streaming from it; returns the primary.

        Fails early when an agent we started exits.  ``on_poll`` sees every round of states."""
        deadline = time.monotonic() + timeout
        states: dict[str, NodeState] = {}
        while True:
            for name, proc in self._agents.items():
                code = proc.poll()
                if code is not None:
                    raise LocalClusterError(
                        f"agent of {name} exited with code {code}; see {self.nodes[name].log_path}:\n"
                        + self._tail(self.nodes[name].log_path)
                    )
            states = self.states()
            if on_poll is not None:
                on_poll(states)
            if self._ready(states):
                return next(s.name for s in states.values() if s.role == "primary")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        summary = ", ".join(
            f"{s.name}: {s.role}" + (f" ({s.error})" if s.error else "") for s in states.values()
        )
        logs = "\n".join(
            f"--- {n.log_path} (last lines):\n{self._tail(n.log_path, 5)}" for n in self.nodes.values()
        )
        raise LocalClusterError(f"cluster not ready after {timeout:.0f}s: {summary}\n{logs}")

    # ----------------------------------------------------------------- whole cluster

    def start(self, etcd_timeout: float = 30.0) -> None:
        """Write configs, check ports, start etcd and every agent (does not wait for readiness)."""
        if self.etcd_pid is None:
            self.check_ports()
        self.write_configs()
        self.start_etcd(etcd_timeout)
        for name in self.nodes:
            self.start_agent(name)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop everything we run: agents (SIGTERM, then SIGKILL), any PostgreSQL still running
        from our data directories, any fencer helper left by a killed agent, then etcd.
        Safe to call more than once."""
        for name in self.nodes:
            proc = self._agents.get(name)
            if proc is not None and proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM)
            for pid in self.external_agent_pids(name):
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in self.nodes:
            self.stop_agent(name, timeout=max(0.1, deadline - time.monotonic()))
            for pid in self.external_agent_pids(name):
                if not _wait_dead(pid, max(0.1, deadline - time.monotonic())):
                    _signal(pid, signal.SIGKILL)
        for name in self.nodes:
            self._stop_postmaster(name)
            self._stop_fencers(name)
        self.stop_etcd()

    def etcd_leftover_pids(self) -> list[int]:
        """etcd processes serving our etcd data directory that we did not start."""
        ours = self.etcd_pid
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == ours:
                continue
            args = proc_cmdline(int(entry))
            if not args or Path(args[0]).name != "etcd":
                continue
            for i, a in enumerate(args[:-1]):
                if a in ("--data-dir", "-data-dir") and Path(args[i + 1]).absolute() == self.etcd_data_dir:
                    found.append(int(entry))
        return found

    def stop_leftovers(self) -> list[str]:
        """Stop processes of an earlier run from this directory that nobody supervises any more
        (agents for our configs, PostgreSQL from our data dirs, etcd on our data dir).
        Returns what was stopped."""
        stopped = []
        for name in self.nodes:
            for pid in self.external_agent_pids(name):
                _signal(pid, signal.SIGTERM)
                if not _wait_dead(pid, 30.0):
                    _signal(pid, signal.SIGKILL)
                stopped.append(f"{name} agent (pid {pid})")
        for name in self.nodes:
            pm = self.postmaster_pid(name)
            if pm is not None:
                self._stop_postmaster(name)
                stopped.append(f"{name} postgres (pid {pm})")
        for name in self.nodes:
            stopped.extend(f"{name} fencer (pid {pid})" for pid in self._stop_fencers(name))
        for pid in self.etcd_leftover_pids():
            _signal(pid, signal.SIGTERM)
            if not _wait_dead(pid, 15.0):
                _signal(pid, signal.SIGKILL)
            stopped.append(f"etcd (pid {pid})")
        return stopped

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def describe(self) -> dict[str, Any]:
        """What ``demo.json`` holds."""
        return {
            "scope": self.scope,
            "base_port": self.base_port,
            "etcd": [self.etcd_url],
            "etcd_pid": self.etcd_pid,
            "write_dsn": self.write_dsn(),
            "nodes": [
                {
                    "name": n.name,
                    "dsn": self.dsn(n.name),
                    "api_url": n.api_url,
                    "config": str(n.config_path),
                    "data_dir": str(n.data_dir),
                    "agent_pid": self.agent_pid(n.name) or next(iter(self.external_agent_pids(n.name)), None),
                }
                for n in self.nodes.values()
            ],
        }

    @staticmethod
    def _tail(path: Path, lines: int = 15) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def tail_log(self, name: str, lines: int = 15) -> str:
        return self._tail(self.nodes[name].log_path, lines)

    def processes(self) -> Iterator[tuple[str, int]]:
        """(what, pid) of every process of this cluster we can see running now."""
        if self.etcd_pid is not None:
            yield "etcd", self.etcd_pid
        for name in self.nodes:
            pid = self.agent_pid(name)
            if pid is not None:
                yield f"{name} agent", pid
            for ext in self.external_agent_pids(name):
                yield f"{name} agent", ext
            pm = self.postmaster_pid(name)
            if pm is not None:
                yield f"{name} postgres", pm
            for fencer in self.fencer_pids(name):
                yield f"{name} fencer", fencer


# ====================================================================== demo backups

DEMO_BUCKET = "hakeeper-demo"
S3_PORT_OFFSET = 30  # SeaweedFS: P+30 .. P+39 (an HTTP and a gRPC port per component)


def prepare_fs_repository(path: Path, run_as: RunAs) -> None:
    """The demo's filesystem repository: written by the agents (root when the demo runs as
    root), read by PostgreSQL's OS user when a restored server fetches WAL, so the directory is
    group-owned by that user's group and setgid (new files inherit the group; objects are 0640)."""
    path.mkdir(parents=True, exist_ok=True)
    if run_as.gid is not None:
        os.chown(path, -1, run_as.gid)
        os.chmod(path, 0o2750)


def demo_s3_ports(base_port: int) -> dict[str, tuple[int, int]]:
    from hakeeper.util.s3local import COMPONENTS

    first = base_port + S3_PORT_OFFSET
    return {c: (first + 2 * i, first + 2 * i + 1) for i, c in enumerate(COMPONENTS)}


def demo_s3_credentials(base_dir: Path) -> tuple[str, str]:
    """Access and secret key of the demo's S3 server (generated once, kept in ``s3/keys``)."""
    path = base_dir / "s3" / "keys"
    try:
        access, secret = path.read_text().split()
        return access, secret
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    access, secret = "demo-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{access} {secret}\n")
    return access, secret


def demo_backup_section(
    base_dir: Path, s3_endpoint: str | None, keys: tuple[str, str] | None
) -> dict[str, Any]:
    """The `backup:` section of the demo's node configs: a filesystem repository under the demo
    directory, plus the local SeaweedFS bucket with ``--s3``."""
    repos: list[dict[str, Any]] = [{"name": "local", "type": "fs", "path": str(base_dir / "backups")}]
    if s3_endpoint is not None and keys is not None:
        repos.append(
            {
                "name": "s3",
                "type": "s3",
                "endpoint": s3_endpoint,
                "bucket": DEMO_BUCKET,
                "access_key": keys[0],
                "secret_key": keys[1],
            }
        )
    return {"repositories": repos}
