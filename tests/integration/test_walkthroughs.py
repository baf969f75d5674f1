"""The README's two walkthroughs, run as written against `hakeeper demo` (issue 13, items 14/15).

The shell lines are read from README.md's "Try a failover" and "Try a point-in-time restore" code
blocks and run with bash; only what a reader fills in is substituted: the demo directory, the
`<...>` placeholders (from demo.json), the write DSN for `W=...`, and a free port and a scratch
directory for the restored copy.  `.venv/bin/hakeeper` becomes this checkout's hakeeper.  If the
README's steps change, this test runs the new ones; if they stop working, it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hakeeper.localcluster import LocalCluster, pg_program
from hakeeper.localcluster.procs import stop_postmaster
from hakeeper.util.proc import pid_alive, postmaster_pid
from tests.integration.test_ha import wait_for
from tests.support.cluster import cluster_tmpdir, free_base_port
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def readme_block(heading: str) -> list[str]:
    """The shell commands of the first ```bash block under ``## heading``: one per entry, with
    backslash continuations joined."""
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines: list[str] = []
    pending = ""
    for raw in block.splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


@dataclass
class Demo:
    dir: Path
    base: Path
    proc: subprocess.Popen[bytes]
    log: Path
    view: LocalCluster
    bin_dir: Path

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.dir / "demo.json").read_text())
        return data

    def bash(self, line: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """One README line, as a user would type it in a shell beside the demo."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HAKEEPER_", "PG"))}
        env["COLUMNS"] = "200"  # rich wraps table rows at 80 columns without a terminal
        env["PATH"] = f"{self.bin_dir}:{Path(pg_program('psql')).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        return subprocess.run(
            ["bash", "-c", line],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.base,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, line: str, timeout: float = 300) -> str:
        res = self.bash(line, timeout)
        assert res.returncode == 0, f"{line}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}"
        assert "Traceback" not in res.stdout + res.stderr
        return res.stdout


def fill(line: str, demo: Demo, **values: str) -> str:
    """What a reader substitutes: the demo's directory, `.venv/bin/hakeeper`, `<placeholders>`."""
    line = line.replace(".venv/bin/hakeeper", "hakeeper").replace("demo-data/", f"{demo.dir}/")
    for name, value in values.items():
        line = line.replace(f"<{name.replace('_', ' ')}>", value).replace(f"<{name}>", value)
    assert "<" not in line.replace("<<", ""), f"a placeholder the test does not know: {line}"
    return line


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    base = cluster_tmpdir("hakeeper-walk-")
    demo_dir = base / "demo-data"
    port = free_base_port(3)
    bin_dir = base / "bin"
    bin_dir.mkdir()
    # `hakeeper` on PATH is this checkout's (PYTHONPATH is passed on), as `.venv/bin/hakeeper` is.
    script = bin_dir / "hakeeper"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -m hakeeper "$@"\n')
    script.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    log = base / "demo.out"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hakeeper", "demo", "--dir", str(demo_dir), "--base-port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
    view: LocalCluster | None = None
    try:

        def ready() -> bool:
            assert proc.poll() is None, f"demo exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            path = demo_dir / "demo.json"
            return path.exists() and json.loads(path.read_text()).get("ready") is True

        wait_for(ready, 300, "demo.json says ready", interval=0.5)
        view = LocalCluster(demo_dir, nodes=3, base_port=port)
        yield Demo(demo_dir, base, proc, log, view, bin_dir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(150)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        (view or LocalCluster(demo_dir, nodes=3, base_port=port)).stop_leftovers()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(600)
def test_readme_failover_walkthrough(demo: Demo) -> None:
    steps = readme_block("Try a failover")
    assert [s.split()[0] for s in steps] == [
        ".venv/bin/hakeeper",
        "kill",
        ".venv/bin/hakeeper",
        ".venv/bin/hakeeper",
        ".venv/bin/hakeeper",
    ], steps
    listing, kill, listing2, history, agent = steps
    old = demo.view.primary()
    assert old is not None
    # "who is primary?": the listing names it as the leader
    shown = demo.ok(fill(listing, demo))
    assert re.search(rf"^\W*{old}\b.*\bprimary\b", shown, re.MULTILINE), shown

    agent_pid = next(n["agent_pid"] for n in demo.state()["nodes"] if n["name"] == old)
    postmaster = postmaster_pid(demo.view.nodes[old].data_dir)
    assert isinstance(agent_pid, int) and postmaster is not None
    demo.ok(fill(kill, demo, agent_pid=str(agent_pid), primary=old))
    wait_for(lambda: not pid_alive(agent_pid) and not pid_alive(postmaster), 10, "both killed")

    def new_primary() -> str | None:
        p = demo.view.primary()
        return p if p not in (None, old) else None

    t0 = time.monotonic()
    new = wait_for(new_primary, 60, "a replica takes over")
    print(f"walkthrough failover: {new} writable {time.monotonic() - t0:.1f}s after the kill was seen")
    # "a replica took over": the listing says so (the CLI reads etcd; the key may lag a moment)
    wait_for(
        lambda: re.search(rf"^\W*{new}\b.*\bprimary\b", demo.ok(fill(listing2, demo)), re.MULTILINE),
        30,
        "hakeeper list shows the new leader",
    )
    # "the promotion is recorded"
    recorded = demo.ok(fill(history, demo))
    assert new in recorded and old in recorded, recorded

    # "it rewinds and rejoins": the agent restarted by hand, in the foreground as written (here
    # in the background of the test; the demo's stop ends it, as the README says).
    line = fill(agent, demo, old_primary=old)
    assert f" -c {demo.dir}/{old}/node.yml" in line, line
    hand = subprocess.Popen(
        ["bash", "-c", f"exec {line}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")},
            "PATH": f"{demo.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        },
        cwd=demo.base,
        start_new_session=True,
    )
    # The demo's stop (the fixture's teardown) ends this agent too, as it does for the user.
    wait_for(lambda: demo.view.node_state(old).role == "replica", 120, "the old primary streams again")
    assert demo.view.primary() == new
    wait_for(lambda: f"{old}: agent running (pid {hand.pid})" in demo.log.read_text(), 15, "demo sees it")
    assert hand.poll() is None, f"the restarted agent exited {hand.returncode}"


@pytest.mark.timeout(600)
def test_readme_pitr_walkthrough(demo: Demo) -> None:
    steps = readme_block("Try a point-in-time restore")
    assert [s.split("=")[0].split()[0] for s in steps] == [
        "W",
        "psql",
        ".venv/bin/hakeeper",
        "T",
        "psql",
        ".venv/bin/hakeeper",
        "psql",
    ], steps
    wait_for(
        lambda: sorted(s.role for s in demo.view.states().values()) == ["primary", "replica", "replica"],
        120,
        "every node streaming again",
    )
    (port,) = free_ports(1)
    restored = demo.base / "restored"
    w_line, *rest = steps
    assert w_line.startswith("W='") and "target_session_attrs=read-write" in w_line
    script = [f"W='{demo.state()['write_dsn']}'"]
    for line in rest:
        line = fill(line, demo).replace("/tmp/restored", str(restored)).replace("25040", str(port))
        # the password a reader copies from the demo's output (the copy has the cluster's roles)
        script.append(line.replace("password=...", f"password={demo.view.superuser_password}"))
    # The block as one shell session (W and T carry over), stopping at the first failing step.
    out = demo.ok("set -e\n" + "\n".join(script), timeout=420)
    assert "writable" in out, out
    dsn = re.search(r"connect\s+(.+)", out)
    assert dsn is not None, out
    try:
        # The README's last line: the copy has the one row committed before T.
        assert re.search(r"count\s*\n-+\n\s*1\n\(1 row\)", out), out
        # "The copy holds exactly the rows committed up to T, has left recovery and is writable"
        conninfo = f"{dsn.group(1).strip()} password={demo.view.superuser_password}"
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            conn.execute("INSERT INTO t DEFAULT VALUES")
        with psycopg.connect(demo.state()["write_dsn"], autocommit=True, connect_timeout=5) as conn:
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)  # the cluster has both
    finally:
        stop_postmaster(restored, demo.view.run_as)
    assert postmaster_pid(restored) is None

    # show-config -o table against the same demo (docs/cli.md promises it)
    table = demo.ok(fill(".venv/bin/hakeeper show-config -c demo-data/node1/node.yml -o table", demo))
    assert re.search(r"\bttl\b\s*│?\s*5\b", table), table
