"""The demo's backup repositories: a filesystem repository under the demo directory and,
with ``--s3``, a bucket on a local SeaweedFS server."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from hakeeper.util.proc import RunAs

DEMO_BUCKET = "hakeeper-demo"
S3_PORT_OFFSET = 30  # SeaweedFS: P+30 .. P+39 (an HTTP and a gRPC port per component)


def prepare_fs_repository(path: Path, run_as: RunAs) -> None:
    """The demo's filesystem repository: written by the agents (root when the demo runs as
    root), read by PostgreSQL's OS user when a restored server fetches WAL, so the directory
    belongs to that user: objects are 0600 and directories 0700, and a repository written by
    root gives what it creates the owner of its root directory (see FilesystemRepository)."""
    path.mkdir(parents=True, exist_ok=True)
    if run_as.uid is not None and run_as.gid is not None:
        os.chown(path, run_as.uid, run_as.gid)
    os.chmod(path, 0o700)


def demo_s3_ports(base_port: int) -> dict[str, tuple[int, int]]:
    from hakeeper.util.s3local import COMPONENTS

    first = base_port + S3_PORT_OFFSET
    return {c: (first + 2 * i, first + 2 * i + 1) for i, c in enumerate(COMPONENTS)}


def demo_s3_credentials(base_dir: Path) -> tuple[str, str]:
    """Access and secret key of the demo's S3 server (generated once, kept in ``s3/keys``)."""
    path = base_dir / "s3" / "keys"
    try:
        access, secret = path.read_text().split()
        return access, secret
    except (OSError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    access, secret = "demo-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{access} {secret}\n")
    return access, secret


def demo_backup_section(
    base_dir: Path, s3_endpoint: str | None, keys: tuple[str, str] | None
) -> dict[str, Any]:
    """The `backup:` section of the demo's node configs: a filesystem repository under the demo
    directory, plus the local SeaweedFS bucket with ``--s3``.  Backups are compressed by
    hakeeper (``compress_on: client``): indexed, so that ``restore --jobs`` / ``--delta`` and
    ``reinit --delta`` can be tried on the demo (the extra CPU is nothing at the demo's size;
    a real node's default stays ``server``, the cheaper backup)."""
    repos: list[dict[str, Any]] = [{"name": "local", "type": "fs", "path": str(base_dir / "backups")}]
    if s3_endpoint is not None and keys is not None:
        repos.append(
            {
                "name": "s3",
                "type": "s3",
                "endpoint": s3_endpoint,
                "bucket": DEMO_BUCKET,
                "access_key": keys[0],
                "secret_key": keys[1],
            }
        )
    return {"repositories": repos, "compress_on": "client"}
