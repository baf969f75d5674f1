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

The pieces: :mod:`.layout` (names, ports, errors), :mod:`.procs` (programs and processes by
PID), :mod:`.etcd` (the etcd member), :mod:`.agent` (one node's agent process),
:mod:`.cluster` (:class:`LocalCluster`), :mod:`.demo` (the demo's backup repositories),
:mod:`.pgbuilds` (which PostgreSQL major runs, and where its binaries are).
"""

from hakeeper.localcluster.agent import AgentProcess
from hakeeper.localcluster.cluster import LocalCluster, NodeState, ready_primary
from hakeeper.localcluster.demo import (
    DEMO_BUCKET,
    S3_PORT_OFFSET,
    demo_backup_section,
    demo_s3_credentials,
    demo_s3_ports,
    prepare_fs_repository,
)
from hakeeper.localcluster.etcd import EtcdService, LocalEtcd, etcd_argv
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
from hakeeper.localcluster.pgbuilds import SUPPORTED_MAJORS, default_major, pg_program
from hakeeper.localcluster.procs import etcd_program, fencer_pids, user_can

__all__ = [
    "API_USER",
    "DEFAULT_BASE_PORT",
    "DEMO_BUCKET",
    "HOST",
    "MAX_NODES",
    "REPLICATION_USER",
    "S3_PORT_OFFSET",
    "SUPERUSER",
    "SUPPORTED_MAJORS",
    "AgentProcess",
    "EtcdService",
    "LocalCluster",
    "LocalClusterError",
    "LocalEtcd",
    "NodeSpec",
    "NodeState",
    "PortInUseError",
    "default_major",
    "demo_backup_section",
    "demo_s3_credentials",
    "demo_s3_ports",
    "etcd_argv",
    "etcd_program",
    "fencer_pids",
    "pg_program",
    "port_is_free",
    "prepare_fs_repository",
    "ready_primary",
    "user_can",
]
