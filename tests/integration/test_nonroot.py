"""The agent run as an unprivileged OS user end to end, as deploy/hakeeper-agent.service runs it
(``User=postgres``): the agent process itself -- not only PostgreSQL -- runs as the user the
harness gives PostgreSQL, started through ``runuser``.  A 2-node cluster bootstraps, the replica
clones and streams, the API answers, and every process of a node belongs to that user.

The harness runs as root (CI does): etcd stays root's; each node's file, and a copy of the etcd
client certificate, belong to the agent's user, as an installation would have them."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from hakeeper.localcluster import LocalCluster
from hakeeper.localcluster.certs import ensure_certificates
from hakeeper.util.proc import RunAs
from tests.integration.test_ha import sql, wait_for
from tests.support.cluster import cluster_tmpdir, free_base_port
from tests.support.probe import streams_from, writable_nodes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to the unprivileged user needs root"),
]

REPO = Path(__file__).resolve().parents[2]


def _importable(run_as: RunAs, python: str, paths: list[str]) -> bool:
    assert run_as.name is not None
    res = subprocess.run(
        ["runuser", "-u", run_as.name, "--", python, "-c", "import hakeeper, psycopg, aiohttp, pydantic"],
        env={**os.environ, "PYTHONPATH": ":".join(paths)},
        capture_output=True,
        timeout=60,
        check=False,
    )
    return res.returncode == 0


def _mirror(base: Path) -> list[str]:
    """A copy of this checkout's hakeeper package and of the virtualenv's site-packages under
    ``base`` (world-traversable): for a checkout the user cannot reach, such as a fresh clone in
    root's 0700 temporary directory.  Hard links where the filesystem allows (instant), copies
    otherwise."""
    base.mkdir(mode=0o755)
    base.chmod(0o755)
    shutil.copytree(REPO / "hakeeper", base / "src" / "hakeeper")
    paths = [str(base / "src")]
    for i, sp in enumerate(site.getsitepackages()):
        dst = base / f"site{i}"
        try:
            subprocess.run(["cp", "-al", sp, str(dst)], check=True, capture_output=True, timeout=300)
        except subprocess.CalledProcessError:
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(sp, dst, symlinks=True)
        paths.append(str(dst))
    for d in (base / "src", *(Path(p) for p in paths[1:])):
        d.chmod(0o755)
    return paths


def interpreter_for(run_as: RunAs, scratch: Path) -> tuple[str, str]:
    """(python, PYTHONPATH) with which ``run_as`` imports this checkout's hakeeper and its
    dependencies.  This interpreter, if that user may execute it; else (e.g. a pyenv build under
    root's 0700 home) the system's python of the same version with our site-packages, which the
    same C ABI loads; and if the checkout itself is out of that user's reach, the same with a
    copy of both under ``scratch``."""
    paths = [str(REPO), *site.getsitepackages()]
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"]
    candidates = [p for p in candidates if os.path.exists(p)]
    for python in candidates:
        if _importable(run_as, python, paths):
            return python, ":".join(paths)
    mirrored = _mirror(scratch)
    for python in candidates:
        if _importable(run_as, python, mirrored):
            return python, ":".join(mirrored)
    raise AssertionError(
        f"no python interpreter that OS user {run_as.name!r} can run and import hakeeper with "
        f"(tried {candidates}, also with a copy under {scratch})"
    )


class NonRootCluster(LocalCluster):
    """A LocalCluster whose agents run as ``run_as`` (the PostgreSQL user) through runuser."""

    def node_config(self, name: str) -> dict[str, Any]:
        cfg = super().node_config(name)
        sec = self.etcd_security
        if sec is not None:
            # The agent's own copy of the etcd client files: etcd's directory is root's 0700.
            tls = self.nodes[name].node_dir / "etcd-tls"
            cfg["etcd"] |= {"cacert": str(tls / "ca.crt"), "cert": str(tls / "client.crt")}
            cfg["etcd"]["key"] = str(tls / "client.key")
        return cfg

    def write_configs(self) -> None:
        super().write_configs()
        ra = self.run_as
        sec = self.etcd_security
        for n in self.nodes.values():
            if sec is not None:
                ensure_certificates(sec.tls)  # as etcd.start() would, so there is something to copy
                tls = n.node_dir / "etcd-tls"
                tls.mkdir(mode=0o700, exist_ok=True)
                for src, dst in (
                    (sec.tls.ca_cert, "ca.crt"),
                    (sec.tls.client_cert, "client.crt"),
                    (sec.tls.client_key, "client.key"),
                ):
                    shutil.copyfile(src, tls / dst)
                    os.chmod(tls / dst, 0o600)
                    ra.chown(tls / dst)
                ra.chown(tls)
            ra.chown(n.config_path)  # 0600, the agent's user's, as /etc/hakeeper/node.yml would be

    interpreter: tuple[str, str] | None = None

    def agent_argv(self, name: str) -> list[str]:
        if self.interpreter is None:
            self.interpreter = interpreter_for(self.run_as, self.base_dir / "py")
        python, pythonpath = self.interpreter
        assert self.run_as.name is not None
        return [
            "runuser",
            "-u",
            self.run_as.name,
            "--",
            "env",
            f"PYTHONPATH={pythonpath}",
            python,
            "-m",
            "hakeeper",
            "agent",
            "-c",
            str(self.nodes[name].config_path),
        ]


@contextmanager
def nonroot_cluster(nodes: int) -> Iterator[NonRootCluster]:
    base = cluster_tmpdir()
    c = NonRootCluster(base, nodes=nodes, base_port=free_base_port(nodes))
    try:
        with c:
            c.start()
            c.wait_ready(240)
            yield c
    finally:
        shutil.rmtree(base, ignore_errors=True)


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def api_roles(api_url: str) -> dict[str, str]:
    with urllib.request.urlopen(api_url + "/cluster", timeout=5) as r:
        assert r.status == 200
        doc = json.loads(r.read())
    return {m["name"]: m["role"] for m in doc["members"]}


def test_the_agent_as_the_postgres_user_bootstraps_clones_streams_and_serves_its_api() -> None:
    with nonroot_cluster(2) as c:
        ra = c.run_as
        assert ra.uid is not None and ra.uid != 0
        primary = c.primary()
        assert primary is not None
        replica = next(n for n in c.names if n != primary)
        assert writable_nodes(c) == [primary]
        wait_for(lambda: streams_from(c, replica, primary), 60, f"{replica} streams from {primary}")
        sql(c, primary, "CREATE TABLE nonroot (v int)")
        sql(c, primary, "INSERT INTO nonroot SELECT generate_series(1, 10)")
        wait_for(lambda: sql(c, replica, "SELECT count(*) FROM nonroot") == [(10,)], 30, "replicated")
        for name, n in c.nodes.items():
            # The agent process itself (its pid is in its lock file), its PostgreSQL and its
            # runtime files belong to the unprivileged user.
            agent_pid = int((n.node_dir / ".data.hakeeper" / "agent.lock").read_text())
            assert uid_of(agent_pid) == ra.uid, f"the agent of {name} runs as uid {uid_of(agent_pid)}"
            postmaster = c.postmaster_pid(name)
            assert postmaster is not None and uid_of(postmaster) == ra.uid
            assert (n.node_dir / ".data.hakeeper").stat().st_uid == ra.uid
            # The API answers (a read: no credentials needed), with both members in their roles
            # (the records follow within a loop_wait or so).
            wait_for(
                lambda url=n.api_url: api_roles(url) == {primary: "primary", replica: "replica"},
                30,
                f"{name}'s API shows the primary and the replica",
            )
        log = c.nodes[primary].log_path.read_text()
        assert "Permission denied" not in log and "Traceback" not in log, c.tail_log(primary, 60)
