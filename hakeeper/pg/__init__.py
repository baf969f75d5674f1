"""The local PostgreSQL instance: binaries, configuration files and lifecycle."""

from hakeeper.pg.bins import find_bin_dir
from hakeeper.pg.errors import PgError
from hakeeper.pg.postgres import LocalState, Postgres, ReplicaInfo, Role, SlotInfo, Upstream

__all__ = [
    "LocalState",
    "PgError",
    "Postgres",
    "ReplicaInfo",
    "Role",
    "SlotInfo",
    "Upstream",
    "find_bin_dir",
]
