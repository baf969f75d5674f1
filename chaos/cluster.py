"""The chaos cluster: :class:`hakeeper.localcluster.LocalCluster` with every host (node or etcd member)
on its own address -- its own network namespace when :mod:`chaos.net` can make them -- and an
etcd of one or three members."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from chaos.net import HUB_IP, SUBNET, Host, Loopback, Namespaces
from hakeeper.localcluster import SUPERUSER, LocalCluster, LocalClusterError, etcd_argv


class EtcdMember:
    """One etcd member on its host; started and stopped by PID."""

    def __init__(self, name: str, host: Host, client_port: int, peer_port: int, base_dir: Path) -> None:
        self.name = name
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.dir = base_dir / name
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self.initial_cluster = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host.ip}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    def start(self) -> None:
        if self.pid is not None:
            return
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv = etcd_argv(
            self.name, self.data_dir, self.url, self.peer_url, self.initial_cluster, "hakeeper-chaos"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.host.wrap(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def is_leader(self) -> bool:
        req = urllib.request.Request(self.url + "/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=1) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):
            return False
        return bool(body.get("leader")) and body.get("leader") == body.get("header", {}).get("member_id")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.kill(signal.SIGTERM)
        self.proc = None


class ChaosEtcd:
    """An etcd of several members (each on its own host), as the cluster's etcd."""

    def __init__(self, members: list[EtcdMember]) -> None:
        self.members = members
        initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
        for m in members:
            m.initial_cluster = initial

    @property
    def url(self) -> str:
        return self.members[0].url

    @property
    def pid(self) -> int | None:
        return next((m.pid for m in self.members if m.pid is not None), None)

    def start(self, timeout: float = 30.0) -> int:
        for m in self.members:
            m.start()
        deadline = time.monotonic() + timeout
        while not all(m.healthy() for m in self.members):
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None:
                    raise LocalClusterError(f"{m.name} exited; see {m.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise LocalClusterError(f"etcd not healthy after {timeout:.0f}s")
            time.sleep(0.1)
        pid = self.pid
        assert pid is not None
        return pid

    def stop(self, timeout: float = 15.0) -> None:
        for m in self.members:
            m.stop()

    def leftover_pids(self) -> list[int]:
        return []

    def leader(self) -> EtcdMember | None:
        return next((m for m in self.members if m.pid is not None and m.is_leader()), None)


class ChaosCluster(LocalCluster):
    """3 PostgreSQL nodes + ``etcd_members`` etcd members, each on a host of ``net``."""

    def __init__(
        self,
        base_dir: Path,
        net: Namespaces | Loopback,
        base_port: int,
        etcd_members: int = 1,
        dynamic: dict[str, Any] | None = None,
        pg_version: int | None = None,
    ) -> None:
        # Chaos runs its own etcd members (plain HTTP, one per network namespace) in place of
        # LocalCluster's: no certificates or etcd users to make for it.
        super().__init__(
            base_dir,
            nodes=3,
            base_port=base_port,
            scope="chaos",
            dynamic=dynamic,
            secure_etcd=False,
            pg_version=pg_version,
        )
        self.net = net
        self.hosts = {name: net.add(name) for name in self.nodes}
        members = []
        for i in range(1, etcd_members + 1):
            host = net.add(f"etcd{i}")
            members.append(
                EtcdMember(f"etcd{i}", host, base_port + 30 + 2 * i, base_port + 31 + 2 * i, self.base_dir)
            )
        self.etcd: ChaosEtcd = ChaosEtcd(members)

    # ------------------------------------------------------------------ layout

    def port_plan(self) -> list[tuple[int, str]]:
        plan = [(n.pg_port, f"{n.name} PostgreSQL") for n in self.nodes.values()]
        plan += [(n.api_port, f"{n.name} REST API") for n in self.nodes.values()]
        for m in self.etcd.members:
            plan += [(m.client_port, f"{m.name} client"), (m.peer_port, f"{m.name} peer")]
        return plan

    def check_ports(self) -> None:
        if isinstance(self.net, Loopback):
            super().check_ports()

    def node_config(self, name: str) -> dict[str, Any]:
        cfg = super().node_config(name)
        ip = self.hosts[name].ip
        n = self.nodes[name]
        cfg["etcd"] = {"hosts": [m.url for m in self.etcd.members]}
        cfg["api"]["listen"] = f"{ip}:{n.api_port}"
        cfg["postgresql"]["listen"] = f"{ip}:{n.pg_port}"
        net = "127.0.0.1/32" if isinstance(self.net, Loopback) else f"{SUBNET}.0/24"
        # No replication line: the agents admit replication from the members' published
        # addresses themselves, which the runs thereby exercise across namespaces.
        cfg["postgresql"]["pg_hba"] = [f"host all all {net} scram-sha-256"]
        # The runs check that every node comes back on its own.  Since the default became
        # false (Patroni's: a failed rewind waits for an operator), a former primary whose WAL
        # went past the fork point (e.g. SIGSTOPped for 3 x ttl) would wait for 'hakeeper
        # reinit'; here its directory is moved aside and it is cloned again.
        cfg["postgresql"]["remove_data_directory_on_rewind_failure"] = True
        return cfg

    def agent_argv(self, name: str) -> list[str]:
        return self.hosts[name].wrap(super().agent_argv(name))

    def api_url(self, name: str) -> str:
        return f"http://{self.hosts[name].ip}:{self.nodes[name].api_port}"

    def dsn(self, name: str, dbname: str = "postgres") -> str:
        n = self.nodes[name]
        return (
            f"host={self.hosts[name].ip} port={n.pg_port} user={SUPERUSER} "
            f"password={self.superuser_password} dbname={dbname}"
        )

    def write_dsn(self, dbname: str = "postgres") -> str:
        hosts = ",".join(self.hosts[n].ip for n in self.nodes)
        ports = ",".join(str(n.pg_port) for n in self.nodes.values())
        return (
            f"host={hosts} port={ports} user={SUPERUSER} password={self.superuser_password} "
            f"dbname={dbname} target_session_attrs=read-write connect_timeout=2"
        )

    def node_of(self, host: str, port: int) -> str | None:
        for name, n in self.nodes.items():
            if self.hosts[name].ip == host and n.pg_port == port:
                return name
        return None

    @property
    def client_ip(self) -> str:
        return "127.0.0.1" if isinstance(self.net, Loopback) else HUB_IP
