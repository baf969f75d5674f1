"""Benchmark: the leader's ``GET /primary`` health endpoint under load, and the agent's memory.

``wrk`` (a bench-only dependency: ``make bench-setup``) runs ``-t1 -c16 -d5s --latency``
against the leader's API, 5 repetitions, the same command as the Patroni reference numbers.
The process that answers (the hakeeper agent; with ``--patroni`` also the Patroni process) is
pinned to CPU 0 with ``taskset -a -p -c 0`` (all its threads); wrk is pinned to CPU 1.
PostgreSQL, etcd and the other nodes are not pinned.

Then the same again while 1,000 idle TCP connections to the same API are open: they are opened
just before each repetition (and send nothing), because the hakeeper API closes a connection
that has not sent a request within ``api.request_timeout`` (5 s) on purpose; we count how many
are still open 4 s after they were opened.  RSS (``VmRSS``) of the answering process is read from
``/proc`` before, during and after.

Usage::

    python -m bench.health [--reps 5] [--patroni] [--out docs/benchmarks.md] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.failover import machine_facts, make_base_dir, percentile, pick_base_port
from bench.switchover import write_section
from hakeeper.localcluster import LocalCluster

MARK_START = "<!-- bench:health:start -->"
MARK_END = "<!-- bench:health:end -->"
WRK_ARGS = ["-t1", "-c16", "-d5s", "--latency"]
IDLE_CONNECTIONS = 1000
IDLE_COUNT_AT_S = 4.0  # count the idle connections still open this long after opening them


def wrk_program() -> str | None:
    return shutil.which("wrk")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass(slots=True)
class WrkResult:
    rps: float
    avg_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    non_2xx: int
    socket_errors: str
    idle_open_after: int | None = None
    rss_kib_during: int | None = None


def parse_wrk(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    dist = dict(re.findall(r"^\s+(\d+)%\s+(\S+)", out, re.MULTILINE))
    reqs = re.search(r"(\d+) requests in", out)
    non2 = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:\s+(.*)", out)
    if reqs is not None and int(reqs.group(1)) == 0:
        lat = None
        dist = {}
    return WrkResult(
        rps=rps,
        avg_ms=_ms(lat.group(1)) if lat else float("nan"),
        p50_ms=_ms(dist.get("50", "nan")),
        p99_ms=_ms(dist.get("99", "nan")),
        max_ms=_ms(lat.group(3)) if lat else float("nan"),
        requests=int(reqs.group(1)) if reqs else 0,
        non_2xx=int(non2.group(1)) if non2 else 0,
        socket_errors=sock.group(1).strip() if sock else "none",
    )


def rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def pin(pid: int, cpu: int) -> str:
    r = subprocess.run(
        ["taskset", "-a", "-p", "-c", str(cpu), str(pid)], capture_output=True, text=True, check=False
    )
    return "ok" if r.returncode == 0 else (r.stderr.strip() or f"taskset exit {r.returncode}")


def open_idle(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect((host, port))
        except OSError:
            s.close()
            continue
        s.setblocking(False)
        socks.append(s)
    return socks


def still_open(socks: Sequence[socket.socket]) -> int:
    """Sockets the server has not closed (no EOF/reset waiting to be read)."""
    n = 0
    for s in socks:
        try:
            r, _, _ = select.select([s], [], [], 0)
            if not r:
                n += 1
                continue
            data = s.recv(4096, socket.MSG_PEEK)
            if data:
                n += 1  # the server said something (e.g. a 503) but did not close (yet)
        except OSError:
            continue
    return n


def run_wrk(url: str) -> WrkResult:
    prog = wrk_program()
    assert prog is not None
    r = subprocess.run(
        ["taskset", "-c", "1", prog, *WRK_ARGS, url], capture_output=True, text=True, timeout=60, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed: {r.stdout}{r.stderr}")
    return parse_wrk(r.stdout)


@dataclass(slots=True)
class Subject:
    manager: str
    url: str
    pid: int
    pinned: str
    rss_idle_kib: int | None = None
    plain: list[WrkResult] = field(default_factory=list)
    with_idle: list[WrkResult] = field(default_factory=list)
    rss_after_kib: int | None = None
    idle_opened: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def measure(manager: str, url: str, pid: int, reps: int, log: Callable[[str], None]) -> Subject:
    s = Subject(manager, url, pid, pin(pid, 0))
    time.sleep(1)
    s.rss_idle_kib = rss_kib(pid)
    run_wrk(url)  # warm-up, not recorded
    for i in range(reps):
        w = run_wrk(url)
        s.plain.append(w)
        log(f"{manager} plain #{i + 1}: {w.rps:.0f} req/s p99 {w.p99_ms:.2f} ms non-2xx {w.non_2xx}")
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    for i in range(reps):
        socks = open_idle(host, int(port), IDLE_CONNECTIONS)
        s.idle_opened.append(len(socks))
        counted: dict[str, int | None] = {}

        def count_later(socks: list[socket.socket] = socks, counted: dict[str, int | None] = counted) -> None:
            time.sleep(IDLE_COUNT_AT_S)
            counted["open"] = still_open(socks)
            counted["rss"] = rss_kib(pid)

        counter = threading.Thread(target=count_later, daemon=True)
        try:
            time.sleep(0.2)
            counter.start()
            w = run_wrk(url)
            counter.join(10)
            w.rss_kib_during = counted.get("rss")
            w.idle_open_after = counted.get("open")
        except RuntimeError as e:
            s.notes.append(f"rep {i + 1} with idle connections: {e}")
            log(f"{manager} idle #{i + 1}: {e}")
            continue
        finally:
            for sk in socks:
                sk.close()
        s.with_idle.append(w)
        log(
            f"{manager} +{len(socks)} idle #{i + 1}: {w.rps:.0f} req/s p99 {w.p99_ms:.2f} ms, "
            f"{w.idle_open_after} idle still open, RSS {w.rss_kib_during} KiB"
        )
        time.sleep(1)
    time.sleep(1)
    s.rss_after_kib = rss_kib(pid)
    return s


def _mm(xs: Sequence[float], d: int = 2) -> str:
    xs = [x for x in xs if x == x]  # drop NaN (no request answered)
    if not xs:
        return "n/a"
    return f"{min(xs):.{d}f} / {percentile(xs, 50):.{d}f} / {max(xs):.{d}f}"


def render(facts: dict[str, str], subjects: Sequence[Subject], command: str, patroni_note: str) -> str:
    lines = [
        MARK_START,
        "## Health endpoint: `GET /primary` throughput and latency, agent memory",
        "",
        f"_Generated by `bench/health.py` on {facts['date_utc']}; command: `{command}`._",
        "",
        "| machine | |",
        "|---|---|",
        f"| date (UTC) | {facts['date_utc']} |",
        f"| CPUs | {facts['nproc']} x {facts['cpu_model']} |",
        f"| kernel / Debian | {facts['kernel']} / {facts['debian']} |",
        f"| PostgreSQL / etcd | {facts['postgresql']} / {facts['etcd']} |",
        f"| wrk | {facts.get('wrk', 'unknown')} |",
        f"| Patroni | {facts.get('patroni', 'not run')} |",
        f"| load average at start / end | {facts['load_avg_start']} / {facts.get('load_avg_end', '?')} |",
        f"| hakeeper code under test | {facts['hakeeper']} |",
        "",
        "### Method",
        "",
        f"- `wrk {' '.join(WRK_ARGS)} <leader API>/primary`, pinned to CPU 1 (`taskset -c 1`); one "
        "warm-up run, then the repetitions below.  The answering process is pinned to CPU 0 with "
        "`taskset -a -p -c 0` (every thread).  PostgreSQL, etcd and the other two nodes run unpinned "
        "on both CPUs, so they compete with both sides.  A 3-node cluster, default settings, idle.",
        f"- *with {IDLE_CONNECTIONS} idle connections*: just before each repetition we open "
        f"{IDLE_CONNECTIONS} TCP connections to the same API port that never send a byte, and keep them "
        "open during the wrk run; *still open* = how many the server had not closed "
        f"{IDLE_COUNT_AT_S:g} s after they were opened (RSS is read at the same moment).  "
        "The hakeeper API closes a connection that has not sent a request within `api.request_timeout` "
        "(5 s) on purpose, so they are re-opened for each repetition.",
        "- RSS = `VmRSS` of the answering process from `/proc` (the agent only; its PostgreSQL and its "
        "fencer helper are separate processes).",
        "- Patroni: " + patroni_note,
        "",
        "### Results (min / median / max over the repetitions)",
        "",
        "| manager | load | n | req/s | avg ms | p99 ms | max ms | non-2xx | idle conns still open "
        "| RSS KiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in subjects:
        for label, rows in (("plain", s.plain), (f"+{IDLE_CONNECTIONS} idle conns", s.with_idle)):
            rss = (
                str(s.rss_idle_kib)
                if label == "plain"
                else _mm([float(r.rss_kib_during) for r in rows if r.rss_kib_during], 0)
            )
            still = (
                "-"
                if label == "plain"
                else _mm([float(r.idle_open_after) for r in rows if r.idle_open_after is not None], 0)
            )
            lines.append(
                f"| {s.manager} | {label} | {len(rows)} | **{_mm([r.rps for r in rows], 0)}** "
                f"| {_mm([r.avg_ms for r in rows])} | **{_mm([r.p99_ms for r in rows])}** "
                f"| {_mm([r.max_ms for r in rows])} | {sum(r.non_2xx for r in rows)} | {still} | {rss} |"
            )
    lines += ["", "| manager | pinned | RSS KiB idle / after all runs | socket errors (wrk) | notes |"]
    lines += ["|---|---|---|---|---|"]
    for s in subjects:
        runs = s.plain + s.with_idle
        reads = sum(int(m) for r in runs for m in re.findall(r"read (\d+)", r.socket_errors))
        others = sum(
            int(m) for r in runs for m in re.findall(r"(?:connect|write|timeout) (\d+)", r.socket_errors)
        )
        total = sum(r.requests for r in runs)
        errs = (
            "none"
            if reads + others == 0
            else f"read {reads} (of {total} requests: the server closes the connection after each "
            f"response, no keep-alive), other {others}"
        )
        lines.append(
            f"| {s.manager} | {s.pinned} | {s.rss_idle_kib} / {s.rss_after_kib} | {errs} "
            f"| {'; '.join(s.notes)[:600] or '-'} |"
        )
    obs = []
    for s in subjects:
        starved = [r for r in s.with_idle if r.requests == 0]
        if starved:
            obs.append(
                f"- {s.manager}: in {len(starved)} of {len(s.with_idle)} repetitions with "
                f"{IDLE_CONNECTIONS} idle connections open, wrk got **no answer at all** within its 5 s."
            )
    if obs:
        lines += ["", "Observations (computed from the data above):", "", *obs]
    lines += [
        "",
        "Reference, **not re-measured here**: `patroni-bench.md` (the shared Patroni 4.1.5 baseline, "
        "this machine type, 2026-11-23/24, load average 0.3-0.8, nothing pinned) reports for the "
        "leader's `/primary` with the same wrk command 1368 / 1459 / 1694 req/s and p99 11.40 / 13.00 / "
        "14.98 ms (min / median / max, n = 5), and 49.5-49.7 MiB RSS per Patroni process.",
    ]
    lines += ["", MARK_END]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.health", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--patroni", action="store_true", help="also measure Patroni (bench/patroni_cluster.py)")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--render-json", type=Path, default=None, help="only re-render from an earlier --json")
    args = p.parse_args(argv)
    if args.render_json is not None:
        doc = json.loads(args.render_json.read_text())
        subs = []
        for d in doc["subjects"]:
            d["plain"] = [WrkResult(**r) for r in d["plain"]]
            d["with_idle"] = [WrkResult(**r) for r in d["with_idle"]]
            subs.append(Subject(**d))
        note = doc.get("patroni_note", "not run in this invocation.")
        text = render(doc["facts"], subs, doc.get("command", "python -m bench.health"), note)
        write_section(args.out, MARK_START, MARK_END, text)
        return 0
    if wrk_program() is None:
        print("wrk is not installed (make bench-setup); it is a benchmark-only dependency", file=sys.stderr)
        return 2
    command = "python -m bench.health " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = machine_facts()
    facts["wrk"] = (
        subprocess.run([wrk_program() or "wrk", "-v"], capture_output=True, text=True, check=False).stdout
        or "wrk"
    ).splitlines()[0]

    def log(line: str) -> None:
        print(line, flush=True)

    subjects: list[Subject] = []
    patroni_note = "not run in this invocation."
    rc = 0
    base = make_base_dir("hakeeper-bench-health-")
    cluster = LocalCluster(base, nodes=3, base_port=pick_base_port(3), scope="benchhealth")
    try:
        cluster.start()
        leader = cluster.wait_ready(180)
        pid = cluster.agents[leader].pid
        assert pid is not None
        subjects.append(measure("hakeeper", cluster.nodes[leader].api_url + "/primary", pid, args.reps, log))
    except KeyboardInterrupt:
        rc = 130
    finally:
        cluster.stop()
        if list(cluster.processes()):
            log(f"left running: {list(cluster.processes())}")
            rc = rc or 1
        shutil.rmtree(base, ignore_errors=True)
    if args.patroni and rc == 0:
        from bench.patroni_cluster import PatroniCluster, patroni_version

        ver = patroni_version()
        if ver is None:
            patroni_note = "not measured: no Patroni in $PATRONI_VENV (see bench/README.md)."
        else:
            facts["patroni"] = ver
            pbase = make_base_dir("patroni-bench-health-")
            pc = PatroniCluster(pbase, pick_base_port(3))
            try:
                pc.start()
                lead = pc.leader()
                assert lead is not None
                ppid = pc.agent_pid(lead)
                assert ppid is not None
                subjects.append(measure("patroni", pc.nodes[lead].api_url + "/primary", ppid, args.reps, log))
                patroni_note = (
                    f"{ver}, 3 nodes with its defaults (`bench/patroni_cluster.py`), same wrk command "
                    "against the leader's REST `/primary` (which runs one SQL query on PostgreSQL per "
                    "request; that PostgreSQL is not pinned).  Same idle-connection procedure."
                )
            except KeyboardInterrupt:
                rc = 130
            finally:
                pc.stop()
                if pc.leftovers():
                    log(f"left running: {pc.leftovers()}")
                    rc = rc or 1
                pc.wipe()
    facts["load_avg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if subjects:
        write_section(args.out, MARK_START, MARK_END, render(facts, subjects, command, patroni_note))
        log(f"wrote the health section of {args.out}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "facts": facts,
                    "command": command,
                    "patroni_note": patroni_note,
                    "subjects": [asdict(s) for s in subjects],
                },
                indent=1,
            )
        )
    return rc if subjects else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())
