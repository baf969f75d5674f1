"""The local cluster as a whole: its layout and node configs, its etcd and agents, and what its
PostgreSQL servers answer."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import yaml

from hakeeper.core.config import EtcdConfig
from hakeeper.dcs.etcd import EtcdClient
from hakeeper.localcluster import pgbuilds
from hakeeper.localcluster.agent import AgentProcess
from hakeeper.localcluster.certs import TlsFiles
from hakeeper.localcluster.etcd import (
    ETCD_USER,
    EtcdSecurity,
    EtcdService,
    LocalEtcd,
    read_secret,
    write_secret,
)
from hakeeper.localcluster.layout import (
    API_USER,
    DEFAULT_BASE_PORT,
    HOST,
    MAX_NODES,
    REPLICATION_USER,
    SUPERUSER,
    LocalClusterError,
    NodeSpec,
    PortInUseError,
    port_is_free,
)
from hakeeper.localcluster.procs import (
    fencer_pids,
    send_signal,
    stop_fencers,
    stop_postmaster,
    tail_file,
    user_can,
    wait_dead,
)
from hakeeper.util.proc import RunAs, postmaster_pid, resolve_run_as


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


def one_primary_all_streaming(states: dict[str, NodeState]) -> bool:
    """Exactly one primary, and every other node a streaming replica."""
    roles = [s.role for s in states.values()]
    return roles.count("primary") == 1 and roles.count("replica") == len(roles) - 1


def ready_primary(states: dict[str, NodeState], missing: Iterable[str] = ()) -> str | None:
    """The primary when the cluster is ready without the ``missing`` nodes (their agents are
    gone): exactly one primary, a node with a running agent, and every other node with a running
    agent a streaming replica.  A missing node's PostgreSQL may still run (a killed agent leaves
    it behind); it does not count, except that a second primary never makes a cluster ready."""
    gone = set(missing)
    primaries = [s.name for s in states.values() if s.role == "primary"]
    if len(primaries) != 1 or primaries[0] in gone:
        return None
    live = [s for s in states.values() if s.name not in gone and s.name != primaries[0]]
    return primaries[0] if all(s.role == "replica" for s in live) else None


def not_ready_error(
    nodes: Iterable[NodeSpec], states: dict[str, NodeState], timeout: float
) -> LocalClusterError:
    """The error for a cluster not ready in time: every node's role and its log's last lines."""
    summary = ", ".join(f"{s.name}: {s.role}" + (f" ({s.error})" if s.error else "") for s in states.values())
    logs = "\n".join(f"--- {n.log_path} (last lines):\n{tail_file(n.log_path, 5)}" for n in nodes)
    return LocalClusterError(f"cluster not ready after {timeout:.0f}s: {summary}\n{logs}")


def load_or_make_passwords(config_paths: Iterable[Path]) -> tuple[str, str]:
    """The PostgreSQL superuser and replication passwords of the first existing node config
    (a restart reuses the data), else new ones."""
    for path in config_paths:
        if not path.exists():
            continue
        try:
            data = yaml.safe_load(path.read_text())
            pg = data["postgresql"]
            su, repl = pg["superuser"]["password"], pg["replication"]["password"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise LocalClusterError(f"cannot reuse {path}: {e}; use a fresh directory") from e
        if isinstance(su, str) and isinstance(repl, str):
            return su, repl
    return secrets.token_urlsafe(18), secrets.token_urlsafe(18)


def load_or_make_api_credentials(config_paths: Iterable[Path]) -> tuple[str, str]:
    """REST API token and password of user ``hakeeper`` (kept across restarts, like the
    PostgreSQL passwords; configs written before the API had credentials get new ones)."""
    for path in config_paths:
        if not path.exists():
            continue
        try:
            api = yaml.safe_load(path.read_text()).get("api") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        token, password = api.get("token"), api.get("password")
        if isinstance(token, str) and isinstance(password, str):
            return token, password
    return secrets.token_urlsafe(24), secrets.token_urlsafe(18)


def load_or_make_etcd_password(config_paths: Iterable[Path]) -> str:
    """The ``hakeeper`` etcd user's password of the first node config that has one, else new."""
    for path in config_paths:
        if not path.exists():
            continue
        try:
            etcd = yaml.safe_load(path.read_text()).get("etcd") or {}
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        password = etcd.get("password") if isinstance(etcd, dict) else None
        if isinstance(password, str) and password:
            return password
    return secrets.token_urlsafe(24)


def prepare_dirs(base_dir: Path, run_as: RunAs, etcd_dir: Path, node_dirs: Iterable[Path]) -> None:
    """Create ``base_dir`` (reachable by PostgreSQL's OS user), etcd's directory and the node
    directories (owned by that user)."""
    base_dir.mkdir(parents=True, exist_ok=True)
    if run_as.uid is not None:
        # PostgreSQL runs as another user: it must be able to reach its directory.
        mode = base_dir.stat().st_mode & 0o777
        if mode & 0o001 == 0 and base_dir.stat().st_uid == os.geteuid():
            base_dir.chmod(mode | 0o711)
        if not user_can(run_as, "-x", base_dir):
            raise LocalClusterError(
                f"{base_dir} is not reachable by OS user {run_as.name!r}, which runs "
                "PostgreSQL (a parent directory is not traversable); use a directory such as "
                "/tmp/hakeeper-demo"
            )
    etcd_dir.mkdir(mode=0o700, exist_ok=True)
    for node_dir in node_dirs:
        node_dir.mkdir(mode=0o700, exist_ok=True)
        run_as.chown(node_dir)


def newer_bin_dirs(major: int, run_as: RunAs) -> dict[int, str]:
    """The binaries of every major newer than ``major`` installed here (``postgresql.bin_dirs``):
    what ``hakeeper upgrade --to-version N`` runs, and what a node runs once its data directory
    is of that major."""
    found: dict[int, str] = {}
    for newer in pgbuilds.SUPPORTED_MAJORS:
        if newer <= major:
            continue
        try:
            found[newer] = str(pgbuilds.reachable_bin_dir(newer, run_as))
        except LocalClusterError:
            continue  # not installed: no upgrade to it here
    return found


class LocalCluster:
    """etcd + ``nodes`` hakeeper agents on 127.0.0.1, laid out under ``base_dir``.

    ``dynamic`` overrides ``bootstrap.dcs`` (e.g. ``{"ttl": 10}``); ``tags`` maps a node name to
    its tags (e.g. ``{"node3": {"nofailover": True}}``).  Configs already in ``base_dir`` keep
    their passwords (a restart reuses the data); :meth:`wipe` removes everything we created.

    ``secure_etcd`` (the default): etcd serves HTTPS only, wants a client certificate of the
    cluster's own CA and has authentication on (see :mod:`hakeeper.localcluster.etcd`); the node
    configs carry the CA, the client certificate and key, and the etcd user and password.
    :meth:`etcd_client` and :meth:`etcd_env` give tests and tools the same access.

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
        secure_etcd: bool = True,
        pg_version: int | None = None,
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
        config_paths = [n.config_path for n in self.nodes.values()]
        self.superuser_password, self.replication_password = load_or_make_passwords(config_paths)
        self.api_token, self.api_password = load_or_make_api_credentials(config_paths)
        # As root: the owner of an existing node dir, else of base_dir if not root, else "postgres"
        # -- the same rule the agent applies to its data directory.
        self.run_as = resolve_run_as(self.base_dir / "node1" / "data")
        # The PostgreSQL major (default: $TEST_PG_VERSION, else 15); its binaries: bin_dir.
        self.pg_version = pgbuilds.check_major(
            pg_version if pg_version is not None else pgbuilds.default_major()
        )
        self.etcd_security: EtcdSecurity | None = None
        if secure_etcd:
            self.etcd_security = EtcdSecurity(
                tls=TlsFiles(self.etcd_dir / "tls"),
                prefix=f"/hakeeper/{scope}",
                password=load_or_make_etcd_password(config_paths),
                # Written with the configs (a file in etcd/), not here: a LocalCluster object
                # made only to stop leftovers or wipe must not create files.
                root_password=read_secret(self.etcd_dir / "root.password") or secrets.token_urlsafe(24),
            )
        self.etcd: EtcdService = LocalEtcd(
            etcd_dir=self.etcd_dir,
            data_dir=self.etcd_data_dir,
            log_path=self.etcd_log,
            client_port=self.etcd_client_port,
            peer_port=self.etcd_peer_port,
            token=f"hakeeper-{scope}",
            security=self.etcd_security,
        )
        self.agents = {
            name: AgentProcess(n, cwd=self.base_dir, argv=functools.partial(self.agent_argv, name))
            for name, n in self.nodes.items()
        }

    # ----------------------------------------------------------------- layout and configs

    @functools.cached_property
    def bin_dir(self) -> Path:
        """The binaries of :attr:`pg_version` that PostgreSQL's OS user can run (looked up when
        first needed: an object made only to stop or wipe a cluster needs none)."""
        return pgbuilds.reachable_bin_dir(self.pg_version, self.run_as)

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

    @property
    def etcd_root_password_file(self) -> Path:
        return self.etcd_dir / "root.password"

    def etcd_section(self) -> dict[str, Any]:
        """The ``etcd:`` section of the node configs: URL, and with ``secure_etcd`` the CA, the
        client certificate and key, user and password."""
        section: dict[str, Any] = {"hosts": [self.etcd.url]}
        sec = self.etcd_security
        if sec is not None:
            section |= {
                "cacert": str(sec.tls.ca_cert),
                "cert": str(sec.tls.client_cert),
                "key": str(sec.tls.client_key),
                "username": ETCD_USER,
                "password": sec.password,
            }
        return section

    def etcd_client(self, timeout: float = 2.0) -> EtcdClient:
        """An etcd client with the agents' access (TLS, user) to this cluster's etcd."""
        return EtcdClient.from_config(EtcdConfig.model_validate(self.etcd_section()), min_timeout=timeout)

    def etcd_env(self) -> dict[str, str]:
        """Environment for ``hakeeper ... --etcd URL --scope NAME`` against this cluster's etcd
        (the CLI reads TLS files and the etcd user from ``HAKEEPER_ETCD__*``)."""
        sec = self.etcd_section()
        names = {
            "cacert": "CACERT",
            "cert": "CERT",
            "key": "KEY",
            "username": "USERNAME",
            "password": "PASSWORD",
        }
        return {f"HAKEEPER_ETCD__{env}": str(sec[k]) for k, env in names.items() if k in sec}

    def node_config(self, name: str) -> dict[str, Any]:
        """The YAML document of one node, as a dict."""
        n = self.nodes[name]
        # Small enough for several nodes on one machine.  The agent keeps each node's Unix socket
        # in its data directory, so nodes never share a socket directory.
        parameters: dict[str, Any] = {"shared_buffers": "64MB"}
        newer = newer_bin_dirs(self.pg_version, self.run_as)  # what `hakeeper upgrade` may move to
        cfg: dict[str, Any] = {
            "scope": self.scope,
            "name": n.name,
            "etcd": self.etcd_section(),
            "api": {
                "listen": f"{HOST}:{n.api_port}",
                "username": API_USER,
                "password": self.api_password,
                "token": self.api_token,
                # The CLI run with this file may call every member's API (and only those).
                "client": {"urls": [m.api_url for m in self.nodes.values()]},
            },
            "postgresql": {
                "data_dir": str(n.data_dir),
                "bin_dir": str(self.bin_dir),
                "bin_dirs": {self.pg_version: str(self.bin_dir), **newer},
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

    def write_configs(self) -> None:
        """Create the directories and write every node's YAML (mode 0600)."""
        prepare_dirs(self.base_dir, self.run_as, self.etcd_dir, (n.node_dir for n in self.nodes.values()))
        if self.etcd_security is not None:
            # Kept beside etcd's data (0700 directory, 0600 file): a restarted cluster finds
            # authentication on and needs root to bring the hakeeper user up to date.
            write_secret(self.etcd_root_password_file, self.etcd_security.root_password)
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

    # ----------------------------------------------------------------- agents (see ``agents``)

    def agent_argv(self, name: str) -> list[str]:
        """The command that runs node ``name``'s agent (a subclass may wrap it, e.g. to run it
        in a network namespace)."""
        return [sys.executable, "-m", "hakeeper", "agent", "-c", str(self.nodes[name].config_path)]

    # ----------------------------------------------------------------- PostgreSQL

    def postmaster_pid(self, name: str) -> int | None:
        """PID from ``data/postmaster.pid`` if that process is alive and is PostgreSQL."""
        return postmaster_pid(self.nodes[name].data_dir)

    def kill_postgres(self, name: str) -> int:
        """kill -9 the postmaster of ``name``; returns the PID killed."""
        pid = self.postmaster_pid(name)
        if pid is None:
            raise LocalClusterError(f"PostgreSQL of {name} is not running")
        os.kill(pid, signal.SIGKILL)
        return pid

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

    def wait_ready(
        self, timeout: float = 180.0, on_poll: Callable[[dict[str, NodeState]], None] | None = None
    ) -> str:
        """Wait for exactly one primary and every other node streaming from it; returns the primary.

        Fails early when an agent we started exits.  ``on_poll`` sees every round of states."""
        deadline = time.monotonic() + timeout
        states: dict[str, NodeState] = {}
        while True:
            for name, agent in self.agents.items():
                code = agent.returncode
                if code is not None:
                    raise LocalClusterError(
                        f"agent of {name} exited with code {code}; see {self.nodes[name].log_path}:\n"
                        + tail_file(self.nodes[name].log_path)
                    )
            states = self.states()
            if on_poll is not None:
                on_poll(states)
            if one_primary_all_streaming(states):
                return next(s.name for s in states.values() if s.role == "primary")
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        raise not_ready_error(self.nodes.values(), states, timeout)

    # ----------------------------------------------------------------- whole cluster

    def start(self, etcd_timeout: float = 30.0) -> None:
        """Write configs, check ports, start etcd and every agent (does not wait for readiness)."""
        if self.etcd.pid is None:
            self.check_ports()
        self.write_configs()
        self.etcd.start(etcd_timeout)
        for agent in self.agents.values():
            agent.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop everything we run: agents (SIGTERM, then SIGKILL), any PostgreSQL still running
        from our data directories, any fencer helper left by a killed agent, then etcd.
        Safe to call more than once."""
        for agent in self.agents.values():
            pid = agent.pid
            if pid is not None:
                send_signal(pid, signal.SIGTERM)
            for pid in agent.external_pids():
                send_signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            agent.stop(timeout=max(0.1, deadline - time.monotonic()))
            for pid in agent.external_pids():
                if not wait_dead(pid, max(0.1, deadline - time.monotonic())):
                    send_signal(pid, signal.SIGKILL)
        for n in self.nodes.values():
            stop_postmaster(n.data_dir, self.run_as)
            stop_fencers(n.node_dir)
        self.etcd.stop()

    def stop_leftovers(self) -> list[str]:
        """Stop processes of an earlier run from this directory that nobody supervises any more
        (agents for our configs, PostgreSQL from our data dirs, etcd on our data dir).
        Returns what was stopped."""
        stopped = []
        for name, agent in self.agents.items():
            for pid in agent.external_pids():
                send_signal(pid, signal.SIGTERM)
                if not wait_dead(pid, 30.0):
                    send_signal(pid, signal.SIGKILL)
                stopped.append(f"{name} agent (pid {pid})")
        for name, n in self.nodes.items():
            pm = self.postmaster_pid(name)
            if pm is not None:
                stop_postmaster(n.data_dir, self.run_as)
                stopped.append(f"{name} postgres (pid {pm})")
        for name, n in self.nodes.items():
            stopped.extend(f"{name} fencer (pid {pid})" for pid in stop_fencers(n.node_dir))
        for pid in self.etcd.leftover_pids():
            send_signal(pid, signal.SIGTERM)
            if not wait_dead(pid, 15.0):
                send_signal(pid, signal.SIGKILL)
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
            "pg_version": self.pg_version,
            "etcd": [self.etcd.url],
            **self._describe_etcd_access(),
            "etcd_pid": self.etcd.pid,
            "write_dsn": self.write_dsn(),
            "nodes": [
                {
                    "name": n.name,
                    "dsn": self.dsn(n.name),
                    "api_url": n.api_url,
                    "config": str(n.config_path),
                    "data_dir": str(n.data_dir),
                    "agent_pid": self.agents[n.name].pid
                    or next(iter(self.agents[n.name].external_pids()), None),
                }
                for n in self.nodes.values()
            ],
        }

    def _describe_etcd_access(self) -> dict[str, Any]:
        """What a client of the etcd needs, by path (no password: it is in the node configs)."""
        sec = self.etcd_security
        if sec is None:
            return {}
        return {
            "etcd_tls": {
                "cacert": str(sec.tls.ca_cert),
                "cert": str(sec.tls.client_cert),
                "key": str(sec.tls.client_key),
            },
            "etcd_user": ETCD_USER,
            "etcd_password_in": str(next(iter(self.nodes.values())).config_path) + " (etcd.password)",
        }

    def tail_log(self, name: str, lines: int = 15) -> str:
        return tail_file(self.nodes[name].log_path, lines)

    def processes(self) -> Iterator[tuple[str, int]]:
        """(what, pid) of every process of this cluster we can see running now."""
        etcd_pid = self.etcd.pid
        if etcd_pid is not None:
            yield "etcd", etcd_pid
        for name, agent in self.agents.items():
            pid = agent.pid
            if pid is not None:
                yield f"{name} agent", pid
            for ext in agent.external_pids():
                yield f"{name} agent", ext
            pm = self.postmaster_pid(name)
            if pm is not None:
                yield f"{name} postgres", pm
            for fencer in fencer_pids(self.nodes[name].node_dir):
                yield f"{name} fencer", fencer
