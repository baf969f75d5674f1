"""Benchmark: how long writers cannot write during a planned switchover.

A 3-node cluster (hakeeper's :class:`~hakeeper.localcluster.LocalCluster` with default settings; with
``--patroni`` also a 3-node Patroni 4 cluster with Patroni's defaults, see
:mod:`bench.patroni_cluster`) and one HAProxy per cluster built from ``deploy/haproxy.cfg``.
Per switchover:

1. two writers start, each inserting one row every 10 ms (autocommit, a new id per attempt,
   never retried): one through the libpq multi-host DSN (``target_session_attrs=read-write``),
   one through HAProxy's write port.  Every INSERT returns ``inet_server_port()`` so we know
   which node acknowledged it;
2. after 1.5 s plus a random phase in [0, 1) s, a switchover to the next replica (alternating
   between the two) is requested from the leader's HTTP API (``POST /switchover`` with leader
   and candidate, which is also what ``hakeeper switchover`` and ``patronictl switchover`` send);
3. **window** = the longest gap between two successive acknowledged INSERTs of a writer, where
   the second one ends after the request; the writers stop 1 s after both have an ack from the
   new primary;
4. **lost** = acknowledged ids missing on the new primary afterwards;
5. we wait until the cluster is healthy again (one primary, both others streaming).

Usage::

    python -m bench.switchover [--trials 12] [--patroni] [--out docs/benchmarks.md] [--json FILE]

Only the section between ``<!-- bench:switchover:start -->`` and ``<!-- bench:switchover:end -->``
is written.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psycopg

from bench.failover import DOC_TITLE, machine_facts, make_base_dir, percentile, pick_base_port
from hakeeper.core.config import DynamicConfig, load_node_config
from hakeeper.localcluster import LocalCluster, port_is_free

INTERVAL_S = 0.010
CONNECT_TIMEOUT_S = 1
TABLE = "bench_switchover"
MARK_START = "<!-- bench:switchover:start -->"
MARK_END = "<!-- bench:switchover:end -->"
TARGET_P50_S = 1.0
TARGET_P99_S = 2.5
REPO = Path(__file__).resolve().parent.parent
HAPROXY_TEMPLATE = REPO / "deploy" / "haproxy.cfg"


# --------------------------------------------------------------------------------- doc sections


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Put ``section`` (which starts with ``start`` and ends with ``end``) into ``path``,
    replacing only the text between those markers."""
    text = path.read_text() if path.exists() else DOC_TITLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if not section.endswith("\n"):
        section += "\n"
    if pattern.search(text):
        text = pattern.sub(lambda _m: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------- HAProxy


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    host: str
    pg_port: int
    api_port: int


_SKIP_GLOBAL = ("log ", "chroot ", "user ", "group ", "daemon", "stats socket", "pidfile")


def haproxy_config(
    template: str, backends: Sequence[Backend], write_port: int, read_port: int, stats_port: int
) -> str:
    """``deploy/haproxy.cfg`` with its listen addresses and servers replaced by ours (loopback
    ports) and the daemon/chroot/syslog settings of ``global`` removed (we run it in the
    foreground as the current user).  Every check and timing option is kept as shipped."""
    binds = {"stats": stats_port, "postgres_write": write_port, "postgres_read": read_port}
    out: list[str] = []
    section = ""
    servers_done = False
    for line in template.splitlines():
        s = line.strip()
        if line and not line[0].isspace():
            parts = s.split()
            section = (
                parts[1] if len(parts) > 1 and parts[0] in ("listen", "frontend", "backend") else parts[0]
            )
            servers_done = False
            out.append(line)
            continue
        if section == "global" and s.startswith(_SKIP_GLOBAL):
            continue
        if s.startswith("bind ") and section in binds:
            out.append(f"    bind 127.0.0.1:{binds[section]}")
            continue
        if s.startswith("server "):
            if servers_done:
                continue
            servers_done = True
            opts = s.split()[3:]
            for b in backends:
                mine = list(opts)
                if "port" in mine:
                    mine[mine.index("port") + 1] = str(b.api_port)
                else:
                    mine += ["port", str(b.api_port)]
                out.append(f"    server {b.name} {b.host}:{b.pg_port} {' '.join(mine)}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def write_check_settings(cfg_text: str) -> str:
    """The ``default-server`` line of the write backend (check timing), for the report."""
    section = ""
    for line in cfg_text.splitlines():
        if line and not line[0].isspace():
            section = line.split()[-1]
        elif section == "postgres_write" and line.strip().startswith("default-server"):
            return line.strip()
    return "unknown"


def haproxy_program() -> str:
    for c in ("/usr/sbin/haproxy", shutil.which("haproxy")):
        if c and os.access(c, os.X_OK):
            return c
    raise RuntimeError("haproxy not found (apt-get install haproxy; scripts/setup.sh does)")


def free_port() -> int:
    for _ in range(200):
        p = random.randrange(41000, 49000)
        if port_is_free(p):
            return p
    raise RuntimeError("no free port")


class HAProxy:
    """One HAProxy in the foreground (``-db``), started and stopped by PID."""

    def __init__(self, backends: Sequence[Backend], workdir: Path, template: Path = HAPROXY_TEMPLATE) -> None:
        self.write_port = free_port()
        self.read_port = free_port()
        self.stats_port = free_port()
        while len({self.write_port, self.read_port, self.stats_port}) < 3:
            self.read_port, self.stats_port = free_port(), free_port()
        self.workdir = workdir
        self.cfg_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.text = haproxy_config(
            template.read_text(), backends, self.write_port, self.read_port, self.stats_port
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> int:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg_path.write_text(self.text)
        check = subprocess.run(
            [haproxy_program(), "-c", "-q", "-f", str(self.cfg_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c failed: {check.stdout}{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [haproxy_program(), "-db", "-f", str(self.cfg_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while port_is_free(self.write_port) or port_is_free(self.read_port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        return self.proc.pid

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def server_states(self) -> dict[str, dict[str, str]]:
        """``{backend: {server: status}}`` from the stats page's CSV export."""
        url = f"http://127.0.0.1:{self.stats_port}/;csv"
        with urllib.request.urlopen(url, timeout=2) as r:
            lines = r.read().decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states: dict[str, dict[str, str]] = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))
            if row.get("svname") in ("FRONTEND", "BACKEND", None):
                continue
            states.setdefault(row["pxname"], {})[row["svname"]] = row.get("status", "")
        return states

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------------- writer


@dataclass(slots=True)
class Ack:
    id: int
    start: float
    end: float
    server_port: int


@dataclass(slots=True)
class Probe:
    ok: list[Ack] = field(default_factory=list)
    failed: int = 0
    unknown: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class Writer(threading.Thread):
    """One INSERT every ``interval`` seconds through ``dsn``; records every acknowledged id with
    the port of the PostgreSQL that acknowledged it."""

    def __init__(
        self, dsn: str, label: str, trial: int, ids: Callable[[], int], interval: float = INTERVAL_S
    ):
        super().__init__(name=f"writer-{label}", daemon=True)
        self.dsn = dsn
        self.label = label
        self.trial = trial
        self.ids = ids
        self.interval = interval
        self.probe = Probe()
        self.stop_event = threading.Event()
        self._lock = threading.Lock()

    def acks(self) -> list[Ack]:
        with self._lock:
            return list(self.probe.ok)

    def _error(self, e: BaseException, unknown: bool) -> None:
        key = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:120]
        with self._lock:
            self.probe.errors[key] = self.probe.errors.get(key, 0) + 1
            if unknown:
                self.probe.unknown += 1
            else:
                self.probe.failed += 1

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        next_tick = time.monotonic()
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                if now < next_tick:
                    self.stop_event.wait(next_tick - now)
                    continue
                next_tick = max(next_tick + self.interval, time.monotonic())
                row_id = self.ids()
                start = time.monotonic()
                if conn is None:
                    try:
                        conn = psycopg.connect(
                            self.dsn,
                            connect_timeout=CONNECT_TIMEOUT_S,
                            autocommit=True,
                            keepalives=1,
                            keepalives_idle=1,
                            keepalives_interval=1,
                            keepalives_count=3,
                            tcp_user_timeout=3000,
                            application_name=f"bench-switchover-{self.label}",
                        )
                    except psycopg.Error as e:
                        self._error(e, unknown=False)
                        continue
                try:
                    row = conn.execute(
                        f"INSERT INTO {TABLE} (id, trial, path) VALUES (%s, %s, %s) "
                        "RETURNING inet_server_port()",
                        (row_id, self.trial, self.label),
                    ).fetchone()
                except psycopg.Error as e:
                    broken = conn.closed or conn.broken or (e.sqlstate or "").startswith(("08", "57P"))
                    self._error(e, unknown=broken or e.sqlstate is None)
                    with contextlib.suppress(Exception):
                        conn.close()
                    conn = None
                    continue
                with self._lock:
                    self.probe.ok.append(Ack(row_id, start, time.monotonic(), int(row[0]) if row else 0))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()


def window(acks: Sequence[Ack], t0: float) -> float | None:
    """Longest gap between successive acks whose second ack ends after ``t0``."""
    ends = sorted(a.end for a in acks)
    gaps = [b - a for a, b in itertools.pairwise(ends) if b > t0]
    return max(gaps) if gaps else None


# --------------------------------------------------------------------------------- managers


class Manager(Protocol):
    label: str

    def leader(self) -> str | None: ...
    def pg_port(self, name: str) -> int: ...
    def names(self) -> list[str]: ...
    def backends(self) -> list[Backend]: ...
    def write_dsn(self) -> str: ...
    def su_password(self) -> str | None: ...
    def request_switchover(self, leader: str, candidate: str) -> tuple[int, str]: ...
    def wait_healthy(self, timeout: float) -> str: ...


class HakeeperManager:
    label = "hakeeper"

    def __init__(self, cluster: LocalCluster) -> None:
        self.c = cluster
        self.method = "POST /switchover (agent API)"

    def names(self) -> list[str]:
        return self.c.names

    def pg_port(self, name: str) -> int:
        return self.c.nodes[name].pg_port

    def backends(self) -> list[Backend]:
        return [Backend(n.name, "127.0.0.1", n.pg_port, n.api_port) for n in self.c.nodes.values()]

    def write_dsn(self) -> str:
        return self.c.write_dsn()

    def su_password(self) -> str | None:
        return self.c.superuser_password

    def leader(self) -> str | None:
        return self.c.primary()

    def wait_healthy(self, timeout: float) -> str:
        return self.c.wait_ready(timeout)

    def _auth(self, name: str) -> dict[str, str]:
        api = load_node_config(self.c.nodes[name].config_path).api
        if api.token is not None:
            return {"Authorization": "Bearer " + api.token.get_secret_value()}
        if api.username and api.password:
            raw = f"{api.username}:{api.password.get_secret_value()}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def request_switchover(self, leader: str, candidate: str) -> tuple[int, str]:
        req = urllib.request.Request(
            self.c.nodes[leader].api_url + "/switchover",
            data=json.dumps({"leader": leader, "candidate": candidate}).encode(),
            method="POST",
            headers={"Content-Type": "application/json", **self._auth(leader)},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return int(r.status), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            if e.code not in (404, 405):
                return int(e.code), e.read().decode(errors="replace")
        # The agent's API does not offer POST /switchover yet: write the same request into etcd
        # with the function the API calls, and wait for the agents to carry it out.
        self.method = "hakeeper.ha.requests.request_switchover (etcd; the API had no POST /switchover)"
        return self._via_etcd(leader, candidate)

    def _via_etcd(self, leader: str, candidate: str) -> tuple[int, str]:
        from hakeeper.api.server import REFUSAL_STATUS
        from hakeeper.core.errors import Refused
        from hakeeper.core.keys import Keys
        from hakeeper.dcs.store import ClusterStore
        from hakeeper.ha.requests import request_switchover, wait_for_new_leader

        async def go() -> tuple[int, str]:
            client = self.c.etcd_client(timeout=2.0)
            store = ClusterStore(client, Keys(f"/hakeeper/{self.c.scope}"))
            try:
                await request_switchover(store, leader=leader, candidate=candidate)
                new = await wait_for_new_leader(store, old_leader=leader, candidate=candidate, timeout=30)
            except Refused as e:
                return REFUSAL_STATUS[e.kind], e.message
            finally:
                await client.close()
            return (200, f"switched over to {new}") if new else (503, "switchover did not complete")

        return asyncio.run(go())


class PatroniManager:
    label = "patroni"

    def __init__(self, cluster: Any) -> None:
        self.c = cluster
        self.method = "POST /switchover (Patroni REST API)"

    def names(self) -> list[str]:
        return list(self.c.nodes)

    def pg_port(self, name: str) -> int:
        return int(self.c.nodes[name].pg_port)

    def backends(self) -> list[Backend]:
        return [Backend(n.name, "127.0.0.1", n.pg_port, n.api_port) for n in self.c.nodes.values()]

    def write_dsn(self) -> str:
        return str(self.c.write_dsn())

    def su_password(self) -> str | None:
        return None

    def leader(self) -> str | None:
        lead = self.c.leader()
        return str(lead) if lead else None

    def wait_healthy(self, timeout: float) -> str:
        return str(self.c.wait_healthy(timeout))

    def request_switchover(self, leader: str, candidate: str) -> tuple[int, str]:
        status, body = self.c.switchover(leader, candidate)
        return int(status), str(body)


# --------------------------------------------------------------------------------- trials


@dataclass(slots=True)
class PathResult:
    path: str
    window_s: float | None
    first_new_s: float | None  # request -> first ack from the new primary
    last_old_s: float | None  # request -> last ack from the old primary
    acked: int
    failed: int
    unknown: int
    lost: int
    errors: dict[str, int]


@dataclass(slots=True)
class Trial:
    manager: str
    number: int
    old: str
    new: str
    request_status: int
    request_s: float  # how long the API call took to return
    request_answer: str
    paths: list[PathResult] = field(default_factory=list)
    healthy_again_s: float | None = None
    hap_old_down_s: float | None = None  # request -> HAProxy marks the old primary not UP
    hap_new_up_s: float | None = None  # request -> HAProxy marks the new primary UP


class StatePoller(threading.Thread):
    """Polls HAProxy's write backend every 25 ms; remembers when old left and new reached UP."""

    def __init__(self, hap: HAProxy, old: str, new: str) -> None:
        super().__init__(name="haproxy-poller", daemon=True)
        self.hap, self.old, self.new = hap, old, new
        self.t0: float | None = None
        self.old_down: float | None = None
        self.new_up: float | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.025):
            if self.t0 is None:
                continue
            try:
                st = self.hap.server_states().get("postgres_write", {})
            except OSError:
                continue
            now = time.monotonic() - self.t0
            if self.old_down is None and not st.get(self.old, "").startswith("UP"):
                self.old_down = now
            if self.new_up is None and st.get(self.new, "").startswith("UP"):
                self.new_up = now


def _setup_table(dsn: str) -> None:
    with psycopg.connect(dsn, connect_timeout=5, autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigint PRIMARY KEY, trial int NOT NULL, "
            "path text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )


def _present(dsn: str, trial: int, label: str) -> set[int]:
    deadline = time.monotonic() + 30
    while True:
        try:
            with psycopg.connect(dsn, connect_timeout=2, autocommit=True) as conn:
                rows = conn.execute(
                    f"SELECT id FROM {TABLE} WHERE trial = %s AND path = %s", (trial, label)
                ).fetchall()
                return {int(r[0]) for r in rows}
        except psycopg.Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_trial(m: Manager, hap: HAProxy, number: int, ids: Callable[[], int], timeout: float) -> Trial:
    old = m.leader()
    if old is None:
        raise RuntimeError("no primary before the switchover")
    replicas = [n for n in m.names() if n != old]
    new = replicas[number % len(replicas)]
    pw = m.su_password()
    auth = f" password={pw}" if pw else ""
    dsns = {
        "multi-host DSN": m.write_dsn() + auth,
        "HAProxy": f"host=127.0.0.1 port={hap.write_port} user=postgres dbname=postgres{auth}",
    }
    writers = {label: Writer(dsn, label, number, ids) for label, dsn in dsns.items()}
    for w in writers.values():
        w.start()
    poller = StatePoller(hap, old, new)
    poller.start()
    time.sleep(1.5 + random.random())
    t0 = time.monotonic()
    poller.t0 = t0
    status, answer = m.request_switchover(old, new)
    t_answer = time.monotonic()
    new_port = m.pg_port(new)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if all(any(a.server_port == new_port and a.end > t0 for a in w.acks()) for w in writers.values()):
            break
        time.sleep(0.05)
    time.sleep(1.0)
    for w in writers.values():
        w.stop_event.set()
    for w in writers.values():
        w.join(10)
    poller.stop_event.set()
    poller.join(5)
    trial = Trial(m.label, number, old, new, status, t_answer - t0, answer.strip()[:200])
    trial.hap_old_down_s, trial.hap_new_up_s = poller.old_down, poller.new_up
    for label, w in writers.items():
        acks = w.acks()
        firsts = [a.end - t0 for a in acks if a.server_port == new_port and a.end > t0]
        lasts = [a.end - t0 for a in acks if a.server_port == m.pg_port(old)]
        present = _present(m.write_dsn() + auth, number, label)
        lost = sum(1 for a in acks if a.id not in present)
        trial.paths.append(
            PathResult(
                label,
                window(acks, t0),
                min(firsts) if firsts else None,
                max(lasts) if lasts else None,
                len(acks),
                w.probe.failed,
                w.probe.unknown,
                lost,
                dict(w.probe.errors),
            )
        )
    t1 = time.monotonic()
    with contextlib.suppress(Exception):
        m.wait_healthy(120)
        trial.healthy_again_s = time.monotonic() - t1
    return trial


def run_manager(
    m: Manager, trials: int, timeout: float, workdir: Path, log: Callable[[str], None]
) -> tuple[list[Trial], str]:
    hap = HAProxy(m.backends(), workdir / f"haproxy-{m.label}")
    hap.start()
    results: list[Trial] = []
    counter = iter(range(1, 10**9))
    lock = threading.Lock()

    def next_id() -> int:
        with lock:
            return next(counter)

    try:
        pw = m.su_password()
        _setup_table(m.write_dsn() + (f" password={pw}" if pw else ""))
        time.sleep(2)  # HAProxy's first checks
        for i in range(1, trials + 1):
            t = run_trial(m, hap, i, next_id, timeout)
            results.append(t)
            log(trial_line(t))
            if t.healthy_again_s is None:
                log("cluster did not become healthy again; stopping")
                break
            time.sleep(1.0)
    finally:
        hap.stop()
    return results, hap.text


def trial_line(t: Trial) -> str:
    parts = [f"{t.manager} #{t.number} {t.old}->{t.new} HTTP {t.request_status} in {t.request_s:.2f}s"]
    for p in t.paths:
        w = "n/a" if p.window_s is None else f"{p.window_s:.3f}s"
        parts.append(f"{p.path}: window {w} lost {p.lost} failed {p.failed} unknown {p.unknown}")
    return " | ".join(parts)


def summarize(trials: Sequence[Trial]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mgr in sorted({t.manager for t in trials}):
        ts = [t for t in trials if t.manager == mgr]
        for path in ("multi-host DSN", "HAProxy"):
            ps = [p for t in ts for p in t.paths if p.path == path]
            ws = [p.window_s for p in ps if p.window_s is not None]
            fs = [p.first_new_s for p in ps if p.first_new_s is not None]
            out[f"{mgr} / {path}"] = {
                "n": len(ws),
                "p50": percentile(ws, 50),
                "p99": percentile(ws, 99),
                "max": max(ws) if ws else float("nan"),
                "min": min(ws) if ws else float("nan"),
                "first_new_p50": percentile(fs, 50),
                "lost": sum(p.lost for p in ps),
                "acked": sum(p.acked for p in ps),
                "failed": sum(p.failed for p in ps),
                "unknown": sum(p.unknown for p in ps),
                "ok_requests": sum(1 for t in ts if 200 <= t.request_status < 300),
                "trials": len(ts),
            }
    return out


def _f(v: float | None, d: int = 2) -> str:
    return "n/a" if v is None or v != v else f"{v:.{d}f}"


def render(
    facts: dict[str, str],
    trials: Sequence[Trial],
    summary: dict[str, dict[str, Any]],
    command: str,
    methods: dict[str, str],
    patroni_note: str,
    haproxy_text: str,
) -> str:
    dyn = DynamicConfig()
    lines = [
        MARK_START,
        "## Switchover: write-unavailability window",
        "",
        f"_Generated by `bench/switchover.py` on {facts['date_utc']}; command: `{command}`._",
        "",
        "### Machine",
        "",
        "| | |",
        "|---|---|",
        f"| date (UTC) | {facts['date_utc']} |",
        f"| CPUs | {facts['nproc']} x {facts['cpu_model']} |",
        f"| memory | {facts['memory']} |",
        f"| kernel / Debian | {facts['kernel']} / {facts['debian']} |",
        f"| PostgreSQL | {facts['postgresql']} |",
        f"| etcd | {facts['etcd']} |",
        f"| HAProxy | {facts.get('haproxy', 'unknown')} |",
        f"| Patroni | {facts.get('patroni', 'not run')} |",
        f"| Python / psycopg | {facts['python']} / {facts['psycopg']} |",
        f"| load average at start (1/5/15 min) | {facts['load_avg_start']} |",
        f"| load average at end | {facts.get('load_avg_end', 'unknown')} |",
        f"| hakeeper code under test | {facts['hakeeper']} |",
        "",
        "Everything (etcd, 3 PostgreSQL, 3 agents or 3 Patroni processes, HAProxy, the writers) runs on "
        "this one machine on 127.0.0.1; the machine is shared with other work.",
        "",
        "### Method",
        "",
        f"- hakeeper: `LocalCluster`, 3 nodes, default settings (ttl {dyn.ttl} s, "
        f"loop_wait {dyn.loop_wait} s), "
        f"asynchronous replication.  Switchover requested with: {methods.get('hakeeper', 'n/a')}.",
        "- Patroni: " + patroni_note,
        "- Per switchover two writers run at the same time, each one autocommit `INSERT ... RETURNING "
        "inet_server_port()` every 10 ms with a new id (never retried), `connect_timeout=1`: one through "
        "the libpq multi-host DSN (`target_session_attrs=read-write`), one through HAProxy's write port "
        "(`deploy/haproxy.cfg` with loopback addresses; `GET /primary` checks, "
        f"`{write_check_settings(haproxy_text)}`).  So every switchover is measured on both paths.",
        "- The switchover goes to the other replica each time (alternating), requested from the leader's "
        "HTTP API with leader and candidate 1.5-2.5 s (random) after the writers started.",
        "- **window** = the longest gap between two successive acknowledged INSERTs of one writer where "
        "the second ack comes after the request (steady state: ~10 ms).  *first ack on new* = request → "
        "first ack from the new primary, *last ack on old* = request → last ack from the old one.  "
        "*HAProxy old down / new up* = request → the stats page (polled every 25 ms) first shows the "
        "old primary not UP / the new one UP in the write backend.  **lost** = acknowledged ids "
        "missing on the new primary.",
        "- p99 over n ≈ 12 is interpolated between the two largest values: read it as 'close to the max'.",
        "",
        "### Results",
        "",
        "| manager / path | n | window p50 s | window p99 s | window max s | min s | first ack on new p50 s "
        "| lost acked rows | acked | failed | unknown |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        lines.append(
            f"| {key} | {s['n']} | **{_f(s['p50'])}** | **{_f(s['p99'])}** | {_f(s['max'])} | {_f(s['min'])} "
            f"| {_f(s['first_new_p50'])} | **{s['lost']}** | {s['acked']} | {s['failed']} | {s['unknown']} |"
        )
    lines += [""]
    for key, s in summary.items():
        if key.startswith("hakeeper"):
            ok50 = "met" if s["p50"] <= TARGET_P50_S else "NOT met"
            ok99 = "met" if s["p99"] <= TARGET_P99_S else "NOT met"
            lines.append(f"- {key}: target p50 ≤ {TARGET_P50_S:g} s {ok50}, p99 ≤ {TARGET_P99_S:g} s {ok99}.")
    lines += [
        "- Reference, **not re-measured here**: `patroni-bench.md` (the shared Patroni baseline, "
        "measured on this machine type on 2026-11-23/24) reports a switchover write window of "
        "2.38 / 2.39 / 2.40 s (min / median / max, n = 5, Patroni 4.1.5 defaults, `patronictl "
        "switchover --force`, writer every 20 ms through a multi-host DSN).",
        "",
        "<details><summary>Every switchover</summary>",
        "",
        "| manager | # | old → new | API answer | API call s | path | window s | last ack on old s "
        "| first ack on new s | HAProxy: old down / new up s | acked | failed | unknown | lost "
        "| healthy again s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        for p in t.paths:
            lines.append(
                f"| {t.manager} | {t.number} | {t.old} → {t.new} | {t.request_status} | {t.request_s:.2f} "
                f"| {p.path} | {_f(p.window_s, 3)} | {_f(p.last_old_s)} | {_f(p.first_new_s)} "
                f"| {_f(t.hap_old_down_s)} / {_f(t.hap_new_up_s)} | {p.acked} | {p.failed} "
                f"| {p.unknown} "
                f"| {p.lost} | {_f(t.healthy_again_s, 1)} |"
            )
    errors: dict[str, int] = {}
    for t in trials:
        for p in t.paths:
            for k, v in p.errors.items():
                k2 = f"{t.manager} / {p.path}: {k}"
                errors[k2] = errors.get(k2, 0) + v
    lines += ["", "Errors the writers saw (count):", ""]
    lines += [
        f"- `{k.replace('|', '/')}`: {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1])[:20]
    ]
    lines += ["", "</details>", "", MARK_END]
    return "\n".join(lines) + "\n"


def patroni_method(version: str) -> str:
    return (
        f"{version} from PyPI in a throwaway venv, 3 nodes (`bench/patroni_cluster.py`), "
        "Patroni's default timing (ttl 30, loop_wait 10, retry_timeout 10), its own etcd, "
        "PostgreSQL and Patroni as the `postgres` OS user; the same writers and the same HAProxy "
        "config (checks go to Patroni's REST port, whose `/primary` means the same); switchover "
        "requested with `POST /switchover {leader, candidate}` on the leader's REST API (what "
        "patronictl sends)."
    )


def rerender(path: Path, out: Path) -> int:
    """Write the section again from a ``--json`` file (e.g. after a change of the text)."""
    doc = json.loads(path.read_text())
    trials = []
    for t in doc["trials"]:
        paths = [PathResult(**p) for p in t.pop("paths")]
        trials.append(Trial(**t, paths=paths))
    facts = doc["facts"]
    methods = doc.get("methods") or {"hakeeper": "POST /switchover (agent API)"}
    note = doc.get("patroni_note") or (
        patroni_method(facts["patroni"]) if "patroni" in facts else "not run in this invocation."
    )
    command = doc.get("command") or "python -m bench.switchover"
    hap = doc.get("haproxy_text") or HAPROXY_TEMPLATE.read_text()
    text = render(facts, trials, summarize(trials), command, methods, note, hap)
    write_section(out, MARK_START, MARK_END, text)
    return 0


def _load() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.switchover", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=12, help="switchovers per manager (12)")
    p.add_argument(
        "--patroni", action="store_true", help="also measure a Patroni cluster (bench/patroni_cluster.py)"
    )
    p.add_argument("--no-hakeeper", action="store_true", help="only Patroni")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=40.0, help="give up on one switchover after (40 s)")
    p.add_argument(
        "--render-json", type=Path, default=None, help="only re-render the section from an earlier --json"
    )
    args = p.parse_args(argv)
    if args.render_json is not None:
        return rerender(args.render_json, args.out)
    command = "python -m bench.switchover " + " ".join(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    facts = machine_facts()
    facts["haproxy"] = subprocess.run(
        [haproxy_program(), "-v"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]

    def log(line: str) -> None:
        print(line, flush=True)

    for k, v in facts.items():
        log(f"  {k}: {v}")
    trials: list[Trial] = []
    methods: dict[str, str] = {}
    patroni_note = "not run in this invocation."
    haproxy_text = ""
    workdir = Path(tempfile.mkdtemp(prefix="bench-switchover-"))
    rc = 0
    try:
        if not args.no_hakeeper:
            base = make_base_dir("hakeeper-bench-sw-")
            cluster = LocalCluster(base, nodes=3, base_port=pick_base_port(3), scope="benchswitchover")
            try:
                cluster.start()
                log(f"hakeeper ready, primary {cluster.wait_ready(180)}")
                hm = HakeeperManager(cluster)
                res, haproxy_text = run_manager(hm, args.trials, args.timeout, workdir, log)
                trials += res
                methods["hakeeper"] = hm.method
            finally:
                cluster.stop()
                left = list(cluster.processes())
                if left:
                    log(f"hakeeper processes left: {left}")
                    rc = 1
                shutil.rmtree(base, ignore_errors=True)
        if args.patroni:
            from bench.patroni_cluster import PatroniCluster, patroni_version

            ver = patroni_version()
            if ver is None:
                patroni_note = "not measured: no Patroni found in $PATRONI_VENV (see bench/README.md)."
            else:
                facts["patroni"] = ver
                base = make_base_dir("patroni-bench-sw-")
                pc = PatroniCluster(base, pick_base_port(3))
                try:
                    t = time.monotonic()
                    pc.start()
                    log(f"patroni ready in {time.monotonic() - t:.1f}s")
                    pm = PatroniManager(pc)
                    res, _ = run_manager(pm, args.trials, args.timeout, workdir, log)
                    trials += res
                    methods["patroni"] = pm.method
                    patroni_note = patroni_method(ver)
                finally:
                    pc.stop()
                    left2 = pc.leftovers()
                    if left2:
                        log(f"patroni processes left: {left2}")
                        rc = 1
                    pc.wipe()
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    facts["load_avg_end"] = _load()
    summary = summarize(trials)
    for k, s in summary.items():
        log(
            f"{k}: n={s['n']} p50={_f(s['p50'], 3)} p99={_f(s['p99'], 3)} max={_f(s['max'], 3)} "
            f"lost={s['lost']} first_new_p50={_f(s['first_new_p50'])}"
        )
    if trials:
        write_section(
            args.out,
            MARK_START,
            MARK_END,
            render(facts, trials, summary, command, methods, patroni_note, haproxy_text),
        )
        log(f"wrote the switchover section of {args.out}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "facts": facts,
                    "command": command,
                    "methods": methods,
                    "patroni_note": patroni_note,
                    "haproxy_text": haproxy_text,
                    "summary": summary,
                    "trials": [asdict(t) for t in trials],
                },
                indent=1,
            )
        )
    return rc if trials else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())
