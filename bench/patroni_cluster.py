"""A throwaway 3-node Patroni cluster on 127.0.0.1, for side-by-side benchmarks only.

Patroni is *not* a dependency of hakeeper.  It must be installed in its own virtualenv (default
``/tmp/patroni-venv``, override with ``$PATRONI_VENV``)::

    python3 -m venv /tmp/patroni-venv
    /tmp/patroni-venv/bin/pip install 'patroni[etcd3]' 'psycopg[binary]'
    chmod -R a+rX /tmp/patroni-venv

Layout: its own etcd (own ports, own data dir) and three Patroni nodes with Patroni's default
timing (ttl 30, loop_wait 10, retry_timeout 10; nothing set in ``bootstrap.dcs`` but the
replication parameters the reference run used).  Patroni and PostgreSQL run as the unprivileged
``postgres`` OS user (both refuse root).  Every process is started by us and stopped by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hakeeper.localcluster import etcd_program, pg_program, port_is_free
from hakeeper.util.proc import children_of, pid_alive, postmaster_pid

HOST = "127.0.0.1"
RUN_AS = "postgres"


def patroni_venv() -> Path:
    return Path(os.environ.get("PATRONI_VENV", "/tmp/patroni-venv"))


def patroni_version() -> str | None:
    exe = patroni_venv() / "bin" / "patroni"
    if not os.access(exe, os.X_OK):
        return None
    try:
        r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None


@dataclass(frozen=True, slots=True)
class PatroniNode:
    name: str
    pg_port: int
    api_port: int
    dir: Path

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def config_path(self) -> Path:
        return self.dir / "patroni.yml"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"


class PatroniCluster:
    """etcd + 3 Patroni nodes.  Ports: base (etcd client), base+1 (peer), base+10+i (PostgreSQL),
    base+20+i (REST API)."""

    def __init__(self, base_dir: Path, base_port: int, nodes: int = 3, scope: str = "benchpatroni") -> None:
        self.base_dir = base_dir
        self.base_port = base_port
        self.scope = scope
        self.pw = pwd.getpwnam(RUN_AS)
        self.nodes = {
            f"node{i}": PatroniNode(f"node{i}", base_port + 10 + i, base_port + 20 + i, base_dir / f"node{i}")
            for i in range(1, nodes + 1)
        }
        self.etcd_url = f"http://{HOST}:{base_port}"
        self._etcd: subprocess.Popen[bytes] | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ config

    def ports(self) -> list[int]:
        return [self.base_port, self.base_port + 1] + [
            p for n in self.nodes.values() for p in (n.pg_port, n.api_port)
        ]

    def node_config(self, n: PatroniNode) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "name": n.name,
            "log": {"level": "INFO", "dir": str(n.dir), "file_num": 2},
            "restapi": {"listen": f"{HOST}:{n.api_port}", "connect_address": f"{HOST}:{n.api_port}"},
            "etcd3": {"hosts": f"{HOST}:{self.base_port}", "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "wal_keep_size": "128MB",
                            "wal_log_hints": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}],
            },
            "postgresql": {
                "listen": f"{HOST}:{n.pg_port}",
                "connect_address": f"{HOST}:{n.pg_port}",
                "data_dir": str(n.data_dir),
                "bin_dir": str(Path(pg_program("postgres")).parent),
                "pgpass": str(n.dir / "pgpass"),
                "pg_hba": [
                    "local all all trust",
                    f"host replication all {HOST}/32 trust",
                    f"host all all {HOST}/32 trust",
                ],
                "authentication": {
                    "superuser": {"username": "postgres", "password": "bench-su"},
                    "replication": {"username": "replicator", "password": "bench-rep"},
                    "rewind": {"username": "rewinder", "password": "bench-rw"},
                },
                "parameters": {"unix_socket_directories": str(n.dir), "shared_buffers": "64MB"},
            },
        }

    def write_dsn(self, dbname: str = "postgres") -> str:
        hosts = ",".join(HOST for _ in self.nodes)
        ports = ",".join(str(n.pg_port) for n in self.nodes.values())
        return f"host={hosts} port={ports} user=postgres dbname={dbname} target_session_attrs=read-write"

    def dsn(self, name: str) -> str:
        return f"host={HOST} port={self.nodes[name].pg_port} user=postgres dbname=postgres"

    # ------------------------------------------------------------------ processes

    def _chown(self, path: Path) -> None:
        os.chown(path, self.pw.pw_uid, self.pw.pw_gid)

    def start(self, timeout: float = 240.0) -> None:
        for p in self.ports():
            if not port_is_free(p):
                raise RuntimeError(f"port {p} is in use")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        etcd_dir = self.base_dir / "etcd"
        etcd_dir.mkdir(mode=0o700, exist_ok=True)
        peer = f"http://{HOST}:{self.base_port + 1}"
        with open(etcd_dir / "etcd.log", "ab") as log:
            self._etcd = subprocess.Popen(
                [
                    etcd_program(),
                    "--name=etcd1",
                    f"--data-dir={etcd_dir / 'data'}",
                    f"--listen-client-urls={self.etcd_url}",
                    f"--advertise-client-urls={self.etcd_url}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=etcd1={peer}",
                    "--initial-cluster-state=new",
                    "--log-level=warn",
                    "--logger=zap",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.startswith("ETCD")},
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.etcd_url + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self._etcd.poll() is not None:
                raise RuntimeError("Patroni's etcd did not become healthy")
            time.sleep(0.1)
        for n in self.nodes.values():
            n.dir.mkdir(mode=0o700, exist_ok=True)
            self._chown(n.dir)
            n.config_path.write_text(yaml.safe_dump(self.node_config(n), sort_keys=False))
            self._chown(n.config_path)
        deadline = time.monotonic() + timeout
        # node1 bootstraps alone, then the others clone from it (like the reference harness).
        self.start_node("node1")
        while self.http_status("node1", "/primary") != 200:
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("Patroni node1 did not become primary:\n" + self.tail("node1"))
            time.sleep(0.5)
        for name in list(self.nodes)[1:]:
            self.start_node(name)
        self.wait_healthy(max(10.0, deadline - time.monotonic()))

    def start_node(self, name: str) -> int:
        n = self.nodes[name]
        env = {
            "HOME": str(n.dir),
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
        }
        with open(n.dir / "patroni.out", "ab") as log:
            proc = subprocess.Popen(
                [str(patroni_venv() / "bin" / "patroni"), str(n.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(n.dir),
                user=self.pw.pw_uid,
                group=self.pw.pw_gid,
                extra_groups=[],
                start_new_session=True,
            )
        self._procs[name] = proc
        return proc.pid

    def agent_pid(self, name: str) -> int | None:
        p = self._procs.get(name)
        return p.pid if p is not None and p.poll() is None else None

    def _check_alive(self) -> None:
        for name, p in self._procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"Patroni {name} exited with {p.returncode}:\n" + self.tail(name))

    def tail(self, name: str, lines: int = 20) -> str:
        n = self.nodes[name]
        text = ""
        for f in (n.dir / "patroni.out", n.dir / "patroni.log"):
            with contextlib.suppress(OSError):
                text += f.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def http_status(self, name: str, path: str, timeout: float = 2.0) -> int | None:
        try:
            with urllib.request.urlopen(self.nodes[name].api_url + path, timeout=timeout) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return None

    def cluster_json(self) -> dict[str, Any] | None:
        for n in self.nodes.values():
            try:
                with urllib.request.urlopen(n.api_url + "/cluster", timeout=2) as r:
                    data = json.loads(r.read())
                    return data if isinstance(data, dict) else None
            except (OSError, ValueError):
                continue
        return None

    def leader(self) -> str | None:
        c = self.cluster_json() or {}
        for m in c.get("members", []):
            if m.get("role") == "leader" and m.get("state") == "running":
                return str(m["name"])
        return None

    def wait_healthy(self, timeout: float = 120.0) -> str:
        """Wait for one running leader and every other member streaming; returns the leader."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            c = self.cluster_json() or {}
            ms = c.get("members", [])
            leaders = [m for m in ms if m.get("role") == "leader" and m.get("state") == "running"]
            streaming = [m for m in ms if m.get("role") == "replica" and m.get("state") == "streaming"]
            if (
                len(leaders) == 1
                and len(streaming) == len(self.nodes) - 1
                and not c.get("scheduled_switchover")
            ):
                return str(leaders[0]["name"])
            time.sleep(0.3)
        raise RuntimeError(f"Patroni cluster not healthy after {timeout:.0f}s: {self.cluster_json()}")

    def switchover(self, leader: str, candidate: str, timeout: float = 60.0) -> tuple[int, str]:
        """POST /switchover to the leader's REST API (what patronictl does); (status, body)."""
        body = json.dumps({"leader": leader, "candidate": candidate}).encode()
        req = urllib.request.Request(
            self.nodes[leader].api_url + "/switchover",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")

    def stop(self) -> None:
        for p in self._procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for name, p in self._procs.items():
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            pm = postmaster_pid(self.nodes[name].data_dir)
            if pm is not None:
                for pid in [pm, *children_of(pm)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if self._etcd is not None:
            if self._etcd.poll() is None:
                self._etcd.terminate()
                try:
                    self._etcd.wait(15)
                except subprocess.TimeoutExpired:
                    self._etcd.kill()
                    self._etcd.wait()
            self._etcd = None

    def leftovers(self) -> list[str]:
        left = [f"patroni {n} (pid {p.pid})" for n, p in self._procs.items() if pid_alive(p.pid)]
        for n in self.nodes.values():
            pm = postmaster_pid(n.data_dir)
            if pm is not None:
                left.append(f"postgres {n.name} (pid {pm})")
        return left

    def wipe(self) -> None:
        shutil.rmtree(self.base_dir, ignore_errors=True)
