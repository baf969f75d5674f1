"""Names, ports and errors of a local cluster (the layout and port plan are in the package
docstring)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE_PORT = 25000
MAX_NODES = 9
SUPERUSER = "postgres"
REPLICATION_USER = "replicator"
API_USER = "hakeeper"  # basic-auth user of the REST API
HOST = "127.0.0.1"


class LocalClusterError(RuntimeError):
    """Something the user can fix (a port in use, a missing program, an unusable directory)."""


class PortInUseError(LocalClusterError):
    def __init__(self, port: int, purpose: str) -> None:
        self.port = port
        self.purpose = purpose
        super().__init__(
            f"port {port} ({purpose}) on {HOST} is already in use; "
            "pick another base port, or stop whatever uses it (a previous demo still running?)"
        )


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """Where one node lives and which ports it uses."""

    name: str
    index: int
    pg_port: int
    api_port: int
    node_dir: Path
    data_dir: Path
    config_path: Path
    log_path: Path

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR: a socket in TIME_WAIT is no conflict, a listener is.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
