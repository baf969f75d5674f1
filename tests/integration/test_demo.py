"""LocalCluster and `hakeeper demo` against real etcd / PostgreSQL processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hakeeper.core.config import load_node_config
from hakeeper.localcluster import REPLICATION_USER, LocalCluster, PortInUseError, pg_program
from hakeeper.util.proc import pid_alive
from tests.integration.test_ha import wait_for
from tests.support.cluster import cluster_tmpdir, etcd_gateway, free_base_port, running_cluster

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base_dir() -> Iterator[Path]:
    path = cluster_tmpdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == str(pid):
                        out.append(int(entry))
            except (OSError, IndexError):
                pass
    return out


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def test_configs_ports_and_permissions(base_dir: Path) -> None:
    cluster = LocalCluster(
        base_dir,
        nodes=3,
        base_port=free_base_port(3),
        dynamic={"ttl": 10},
        tags={"node3": {"nofailover": True}},
    )
    cluster.write_configs()
    pg_ports = set()
    for i, (name, node) in enumerate(cluster.nodes.items(), start=1):
        assert name == f"node{i}"
        assert stat.S_IMODE(node.config_path.stat().st_mode) == 0o600
        assert not node.data_dir.exists(), "PGDATA is the agent's to create"
        cfg = load_node_config(node.config_path)
        assert cfg.scope == "demo" and cfg.name == name
        assert cfg.postgresql.listen_host_port == ("127.0.0.1", cluster.base_port + 10 + i)
        assert cfg.api.listen_host_port == ("127.0.0.1", cluster.base_port + 20 + i)
        # etcd over TLS with a client certificate and a user (issue 12, finding 3).
        assert cfg.etcd.hosts == [f"https://127.0.0.1:{cluster.base_port}"]
        assert cfg.etcd.cacert == base_dir / "etcd" / "tls" / "ca.crt"
        assert cfg.etcd.cert == base_dir / "etcd" / "tls" / "client.crt"
        assert cfg.etcd.key == base_dir / "etcd" / "tls" / "client.key"
        assert cfg.etcd.username == "hakeeper" and cfg.etcd.password is not None
        # The CLI run with this file trusts exactly the members' API URLs.
        assert cfg.api.client.urls == [n.api_url for n in cluster.nodes.values()]
        assert cfg.log.format == "json"
        assert cfg.bootstrap.dcs.ttl == 10
        assert cfg.tags.nofailover is (name == "node3")
        pg_ports.add(cfg.postgresql.listen_host_port[1])
        if os.geteuid() == 0:
            assert node.node_dir.stat().st_uid == cluster.run_as.uid != 0
    assert len(pg_ports) == 3
    write = cluster.write_dsn()
    assert "target_session_attrs=read-write" in write
    assert ",".join(str(p) for p in sorted(pg_ports)) in write
    # A second LocalCluster on the same directory reuses the passwords (a restart).
    again = LocalCluster(base_dir, nodes=3, base_port=cluster.base_port)
    assert again.superuser_password == cluster.superuser_password
    assert again.replication_password == cluster.replication_password
    assert again.etcd_security is not None and cluster.etcd_security is not None
    assert again.etcd_security.password == cluster.etcd_security.password
    assert again.etcd_security.root_password == cluster.etcd_security.root_password
    root_file = base_dir / "etcd" / "root.password"
    assert stat.S_IMODE(root_file.stat().st_mode) == 0o600


def test_port_conflict_is_refused_with_a_clear_error(base_dir: Path) -> None:
    base = free_base_port(3)
    cluster = LocalCluster(base_dir, nodes=3, base_port=base)
    taken = base + 12  # node2's PostgreSQL
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        with pytest.raises(PortInUseError) as exc:
            cluster.check_ports()
        assert exc.value.port == taken
        assert str(taken) in str(exc.value) and "node2 PostgreSQL" in str(exc.value)

        # The CLI refuses with exit code 2 and the same message, without a traceback.
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "hakeeper",
                "demo",
                "--dir",
                str(base_dir / "cli"),
                "--base-port",
                str(base),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"port {taken} (node2 PostgreSQL)" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_etcd_start_and_stop_by_pid(base_dir: Path) -> None:
    cluster = LocalCluster(base_dir, nodes=1, base_port=free_base_port(1))
    with cluster:
        pid = cluster.etcd.start()
        assert pid_alive(pid)
        assert cluster.etcd.pid == pid
        assert cluster.etcd_security is not None
        ctx = cluster.etcd_security.ssl_context()
        with urllib.request.urlopen(cluster.etcd.url + "/health", timeout=5, context=ctx) as r:
            assert b'"true"' in r.read()
        assert ("etcd", pid) in list(cluster.processes())
        cluster.etcd.stop()
        assert cluster.etcd.pid is None
        assert not pid_alive(pid)
        # Restarting on the same data directory works (a demo restart).
        pid2 = cluster.etcd.start()
        assert pid2 != pid and pid_alive(pid2)
        # Authentication is on from the first start; the restart found it on and kept it.
        raw = etcd_gateway(cluster, "/v3/kv/range", {"key": "Lw==", "range_end": "MA=="}, user="root")
        assert "kvs" not in raw
        with pytest.raises(urllib.error.HTTPError) as exc:
            etcd_gateway(cluster, "/v3/kv/range", {"key": "Lw=="}, user=None)
        assert exc.value.code == 403
    assert not pid_alive(pid2), "leaving the context manager stops etcd"
    assert (base_dir / "etcd" / "data").is_dir()


def test_stop_also_stops_a_postgres_left_in_a_data_dir(base_dir: Path) -> None:
    """The safety net of stop(): a postmaster running from our data dir is stopped even without
    an agent (here started by hand, as the agent would, as PostgreSQL's OS user)."""
    cluster = LocalCluster(base_dir, nodes=1, base_port=free_base_port(1))
    cluster.write_configs()
    node = cluster.nodes["node1"]
    run_as = cluster.run_as
    # As root: as PostgreSQL's OS user (None everywhere else: the defaults, ourselves).
    extra_groups: list[int] | None = [] if run_as.uid is not None else None
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run(
        [pg_program("initdb"), "-D", str(node.data_dir), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
        env=env,
        cwd="/",
        timeout=120,
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=extra_groups,
    )
    opts = f"-c port={node.pg_port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={node.node_dir}"
    subprocess.run(
        [
            pg_program("pg_ctl"),
            "start",
            "-D",
            str(node.data_dir),
            "-w",
            "-t",
            "60",
            "-o",
            opts,
            "-l",
            str(node.node_dir / "pg.log"),
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd="/",
        timeout=90,
        start_new_session=True,
        user=run_as.uid,
        group=run_as.gid,
        extra_groups=extra_groups,
    )
    pm = cluster.postmaster_pid("node1")
    assert pm is not None and pid_alive(pm)
    backends = _children(pm)
    cluster.stop()
    assert _wait_gone([pm, *backends], 10) == []
    assert cluster.postmaster_pid("node1") is None


@pytest.mark.timeout(420)
def test_failover_after_agent_kill_then_stop_leaves_nothing() -> None:
    """kill -9 the primary's agent: another node takes over; stop() then ends every process,
    including the fencer the killed agent left behind.  Needs a working agent."""
    with running_cluster(nodes=3) as cluster:
        old = cluster.wait_ready(180)
        agent = cluster.agents[old].pid
        assert agent is not None
        cluster.agents[old].kill()
        assert not pid_alive(agent)
        assert cluster.agents[old].pid is None
        deadline = time.monotonic() + 90
        new = None
        while time.monotonic() < deadline:
            new = cluster.primary()
            if new is not None and new != old:
                break
            time.sleep(0.5)
        assert new is not None and new != old, {k: v.role for k, v in cluster.states().items()}
        pids = [pid for _, pid in cluster.processes()]
        for name in cluster.names:
            pm = cluster.postmaster_pid(name)
            if pm is not None:
                pids.extend(_children(pm))
        cluster.stop()
        assert _wait_gone(pids, 10) == []
        assert list(cluster.processes()) == []


@pytest.mark.timeout(480)
def test_demo_end_to_end(base_dir: Path) -> None:
    """`hakeeper demo` brings up 1 primary + 2 streaming replicas, writes demo.json, and on
    SIGTERM stops every process it started.  Needs a working agent."""
    base = free_base_port(3)
    log_path = base_dir / "demo.out"
    demo_dir = base_dir / "demo"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hakeeper",
                "demo",
                "--dir",
                str(demo_dir),
                "--nodes",
                "3",
                "--base-port",
                str(base),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    pids: set[int] = set()
    # Only a view: it reads the passwords from the configs the demo writes (so it is made after).
    view: LocalCluster | None = None
    try:
        state_path = demo_dir / "demo.json"
        deadline = time.monotonic() + 60
        while not state_path.exists():
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, "demo.json was not written"
            time.sleep(0.2)
        state = json.loads(state_path.read_text())
        view = LocalCluster(demo_dir, nodes=3, base_port=base)
        assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
        assert state["scope"] == "demo"
        assert state["etcd"] == [f"https://127.0.0.1:{base}"]
        tls = state["etcd_tls"]
        assert set(tls) == {"cacert", "cert", "key"} and all(Path(p).is_file() for p in tls.values())
        assert stat.S_IMODE(Path(tls["key"]).stat().st_mode) == 0o600
        assert state["etcd_user"] == "hakeeper"
        assert "target_session_attrs=read-write" in state["write_dsn"]
        assert [n["name"] for n in state["nodes"]] == ["node1", "node2", "node3"]
        for n in state["nodes"]:
            assert set(n) >= {"name", "dsn", "api_url", "config", "data_dir", "agent_pid"}
            assert Path(n["config"]).is_absolute() and Path(n["config"]).exists()
            assert isinstance(n["agent_pid"], int)
            pids.add(n["agent_pid"])
        assert isinstance(state["etcd_pid"], int)
        pids.add(state["etcd_pid"])

        # Ready: exactly one primary, two streaming replicas (asked over TCP as the superuser).
        deadline = time.monotonic() + 240
        roles: list[str] = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()}"
            roles = sorted(s.role for s in view.states().values())
            if roles == ["primary", "replica", "replica"]:
                break
            time.sleep(1)
        assert roles == ["primary", "replica", "replica"], f"{roles}\n{log_path.read_text()[-3000:]}"
        primary = view.primary()
        assert primary is not None
        api = next(n["api_url"] for n in state["nodes"] if n["name"] == primary)
        with urllib.request.urlopen(api + "/primary", timeout=5) as r:
            assert r.status == 200
        for name in view.names:
            pm = view.postmaster_pid(name)
            assert pm is not None
            pids.add(pm)
            pids.update(_children(pm))

        # The demo reports readiness and the write DSN.
        deadline = time.monotonic() + 30
        while "read-write" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "target_session_attrs=read-write" in log_path.read_text()
        ready_state = json.loads(state_path.read_text())
        assert state["ready"] is False  # the first demo.json, written while starting
        assert ready_state["ready"] is True and ready_state["missing"] == []

        # What the README tells a user to run against the demo works on the secure etcd ...
        cli_env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
        node1 = str(demo_dir / "node1" / "node.yml")
        for args in (["list", "-o", "json"], ["history"], ["pause"], ["resume"]):
            res = subprocess.run(
                [sys.executable, "-m", "hakeeper", *args, "-c", node1],
                capture_output=True,
                text=True,
                timeout=60,
                env=cli_env,
                stdin=subprocess.DEVNULL,
            )
            assert res.returncode == 0, (args, res.stdout, res.stderr)
        # ... while a request without the client certificate and credentials gets no keys.
        with pytest.raises(OSError):
            urllib.request.urlopen(state["etcd"][0].replace("https:", "http:") + "/v3/kv/range", b"{}", 5)
        # No etcd password in the demo's output or etcd's log.
        assert view.etcd_security is not None
        for secret in (view.etcd_security.password, view.etcd_security.root_password):
            assert secret not in log_path.read_text()
            assert secret not in view.etcd_log.read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(150) == 0, log_path.read_text()[-3000:]
        assert _wait_gone(sorted(pids), 10) == [], "processes left behind"
        assert list(view.processes()) == []
        assert view.etcd.leftover_pids() == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if view is not None:
            view.stop_leftovers()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _read_json(path: Path) -> dict[str, Any]:
    """demo.json as last written (it is replaced atomically, so a read never sees half a file)."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.timeout(480)
def test_demo_survives_a_node_killed_during_start_up(base_dir: Path) -> None:
    """kill -9 of one agent before the demo is ready: the demo reports it (node, exit code), the
    other nodes and etcd keep running, demo.json turns `"ready": true` with the node listed as
    missing, and SIGTERM still stops everything cleanly (issue 13, item 6)."""
    base = free_base_port(3)
    log_path = base_dir / "demo.out"
    demo_dir = base_dir / "demo"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hakeeper", "demo", "--dir", str(demo_dir), "--base-port", str(base)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    pids: set[int] = set()
    view: LocalCluster | None = None
    try:
        state_path = demo_dir / "demo.json"
        deadline = time.monotonic() + 60
        while not state_path.exists():
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, "demo.json was not written"
            time.sleep(0.1)
        first = _read_json(state_path)
        assert first["ready"] is False, first
        agents = {n["name"]: n["agent_pid"] for n in first["nodes"]}
        assert all(isinstance(p, int) and pid_alive(p) for p in agents.values()), agents
        os.kill(agents["node3"], signal.SIGKILL)
        assert _read_json(state_path)["ready"] is False
        pids.update(agents.values())
        pids.add(first["etcd_pid"])
        view = LocalCluster(demo_dir, nodes=3, base_port=base)

        deadline = time.monotonic() + 300
        state = first
        while not state.get("ready"):
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"never ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
            state = _read_json(state_path)
        out = log_path.read_text()
        assert "node3: agent exited with code -9 during start-up" in out, out[-3000:]
        assert "Demo cluster stopped" not in out
        assert state["missing"] == ["node3"]
        by_name = {n["name"]: n for n in state["nodes"]}
        assert by_name["node3"]["agent_pid"] is None
        for name in ("node1", "node2"):
            assert by_name[name]["agent_pid"] == agents[name] and pid_alive(agents[name])
        assert pid_alive(state["etcd_pid"])
        # Ready means what it says: a primary and the other running node streaming from it.
        roles = {name: view.node_state(name).role for name in ("node1", "node2")}
        assert sorted(roles.values()) == ["primary", "replica"], roles
        assert "is ready" in out and "2 of 3 nodes" in out, out[-3000:]
        for name in view.names:
            pm = view.postmaster_pid(name)
            if pm is not None:
                pids.add(pm)
                pids.update(_children(pm))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(150) == 0, log_path.read_text()[-3000:]
        assert _wait_gone(sorted(pids), 10) == [], "processes left behind"
        assert list(view.processes()) == []
        assert _read_json(state_path)["ready"] is False
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if view is None:
            view = LocalCluster(demo_dir, nodes=3, base_port=base)
        view.stop_leftovers()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _bootstrapped(view: LocalCluster, name: str) -> bool:
    """``name`` runs the primary and its bootstrap created the replication role."""
    try:
        with psycopg.connect(view.dsn(name), connect_timeout=1, autocommit=True) as conn:
            row = conn.execute(
                "SELECT NOT pg_is_in_recovery() AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)",
                (REPLICATION_USER,),
            ).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


@pytest.mark.timeout(600)
def test_demo_names_a_missing_bootstrap_node_and_counts_it_again_once_restarted(base_dir: Path) -> None:
    """kill -9 of the agent that bootstrapped the cluster (its PostgreSQL has just become primary):
    the other agents may have nothing to clone from, so the demo may not become ready; past its
    --timeout it says which node is missing and keeps running.  Restarted by hand (as the demo
    says), the node counts again and the demo is ready with every node (issue 13, item 6)."""
    base = free_base_port(3)
    log_path = base_dir / "demo.out"
    demo_dir = base_dir / "demo"
    argv = [sys.executable, "-m", "hakeeper", "demo", "--dir", str(demo_dir), "--base-port", str(base)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*argv, "--timeout", "20"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    state_path = demo_dir / "demo.json"
    # Only a view, made once the demo has written the configs (it reads their passwords).
    view = LocalCluster(demo_dir, nodes=3, base_port=base)
    hand: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: proc.poll() is None and state_path.exists(), 60, "demo.json")
        view = LocalCluster(demo_dir, nodes=3, base_port=base)
        deadline = time.monotonic() + 240
        victim = None
        while victim is None:
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, "no PostgreSQL started"
            # The bootstrap's winner once its server is primary and has the replication role.
            # Not earlier: an agent killed during initdb leaves a data directory of its own
            # (refused by the restarted agent as another cluster's), and one killed between the
            # superuser's password and the replication role leaves a cluster nobody can clone
            # from; both are bootstrap gaps outside the demo (reported in issue 13's work).
            victim = next((n for n in view.names if _bootstrapped(view, n)), None)
            time.sleep(0.05)
        state = _read_json(state_path)
        assert state["ready"] is False
        agent_pid = next(n["agent_pid"] for n in state["nodes"] if n["name"] == victim)
        os.kill(agent_pid, signal.SIGKILL)

        def reported() -> bool:
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            text = log_path.read_text()
            return f"{victim}: agent exited with code -9 during start-up" in text and (
                f"missing: {victim} -- still waiting" in text or _read_json(state_path)["ready"] is True
            )

        wait_for(reported, 120, "the demo names the missing node (or is ready without it)")
        assert _read_json(state_path)["missing"] == [victim]
        assert "Demo cluster stopped" not in log_path.read_text()
        print(f"killed {victim}'s agent; ready without it: {_read_json(state_path)['ready']}")

        # Restarted by hand, with the command the demo printed.
        cfg = str(demo_dir / victim / "node.yml")
        assert f"Restart it with: hakeeper agent -c {cfg}" in log_path.read_text().replace("\n", "")
        hand = subprocess.Popen(
            [sys.executable, "-m", "hakeeper", "agent", "-c", cfg],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
            start_new_session=True,
        )

        def all_back() -> bool:
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            s = _read_json(state_path)
            return s["ready"] is True and s["missing"] == []

        wait_for(all_back, 240, "ready with every node", interval=0.5)
        # "missing" is about agents; the restarted node then rejoins (or is cloned) as a replica.
        wait_for(
            lambda: sorted(view.node_state(n).role for n in view.names) == ["primary", "replica", "replica"],
            240,
            "the restarted node streams again",
            interval=0.5,
        )
        assert f"{victim}: agent running (pid {hand.pid})" in log_path.read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(150) == 0, log_path.read_text()[-3000:]
        assert hand.wait(30) is not None, "the demo's stop ends an agent started by hand too"
        assert list(view.processes()) == []
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if hand is not None and hand.poll() is None:
            hand.kill()
            hand.wait()
        view.stop_leftovers()
