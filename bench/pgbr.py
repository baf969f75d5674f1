"""pgBackRest pieces shared by the benchmarks (``bench/backup.py``, ``bench/incremental.py``).

Only text and JSON: no process is run here, so both scripts import this module without importing
each other's runner.  Debian 12's pgBackRest is 2.45: PostgreSQL up to 16, file-level
incrementals (block incremental came in 2.46)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hakeeper.localcluster import HOST, SUPERUSER

SUBDIRS = ("repo", "spool", "lock", "log", "sock")  # under the pgBackRest directory, owned by run_as


def conf_text(
    base: Path,
    stanza: str,
    data_dir: Path,
    port: int,
    *,
    process_max: int,
    compress_level: int,
    extra_global: Sequence[str] = (),
    extra_sections: Sequence[str] = (),
) -> str:
    """``pgbackrest.conf`` for one stanza whose repository, spool, lock and log directories are
    ``base``'s SUBDIRS (a posix repository; zstd at ``compress_level``; ``start-fast``);
    ``extra_global`` lines are added to ``[global]`` (e.g. a second repository,
    :func:`s3_repo_lines`), ``extra_sections`` after the stanza (e.g. ``[global:archive-get]``)."""
    return "\n".join(
        [
            "[global]",
            f"repo1-path={base / 'repo'}",
            "repo1-retention-full=100",
            *extra_global,
            f"process-max={process_max}",
            "compress-type=zst",
            f"compress-level={compress_level}",
            "start-fast=y",
            "archive-async=n",
            f"spool-path={base / 'spool'}",
            f"lock-path={base / 'lock'}",
            f"log-path={base / 'log'}",
            "log-level-console=warn",
            "log-level-file=info",
            "",
            f"[{stanza}]",
            f"pg1-path={data_dir}",
            f"pg1-port={port}",
            f"pg1-socket-path={base / 'sock'}",
            f"pg1-user={SUPERUSER}",
            "",
            *extra_sections,
        ]
    )


def s3_repo_lines(
    n: int, *, host: str, port: int, bucket: str, key: str, secret: str, ca_file: Path | None
) -> list[str]:
    """``[global]`` lines of repository ``n`` on an S3 server at https://host:port (path-style
    URIs, as SeaweedFS serves them).  pgBackRest speaks only https to S3; with ``ca_file`` None
    the certificate is not verified (a self-signed one on loopback)."""
    lines = [
        f"repo{n}-type=s3",
        f"repo{n}-path=/pgbackrest",
        f"repo{n}-retention-full=100",
        f"repo{n}-s3-bucket={bucket}",
        f"repo{n}-s3-endpoint={host}",
        f"repo{n}-storage-port={port}",
        f"repo{n}-s3-region=us-east-1",
        f"repo{n}-s3-key={key}",
        f"repo{n}-s3-key-secret={secret}",
        f"repo{n}-s3-uri-style=path",
    ]
    if ca_file is None:
        lines.append(f"repo{n}-storage-verify-tls=n")
    else:
        lines.append(f"repo{n}-storage-ca-file={ca_file}")
    return lines


def source_settings(conf: Path, stanza: str, port: int, sock: Path, why: str) -> str:
    """``postgresql.auto.conf`` lines that make a server pgBackRest's source: its own port and
    socket, and every WAL segment pushed by ``pgbackrest archive-push``."""
    archive_cmd = f"pgbackrest --config={conf} --stanza={stanza} archive-push %p"
    return (
        f"# {why}\n"
        f"port = {port}\n"
        f"listen_addresses = '{HOST}'\n"
        f"unix_socket_directories = '{sock}'\n"
        "archive_mode = on\n"
        "archive_library = ''\n"
        f"archive_command = '{archive_cmd}'\n"
    )


def backups(info_json: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The backups of the (only) stanza of ``pgbackrest info --output=json``, oldest first."""
    if not info_json:
        return []
    return list(info_json[0].get("backup", []))


def backup_row(b: dict[str, Any]) -> dict[str, Any]:
    """Label, type, references and sizes of one backup of ``pgbackrest info --output=json``:
    ``stored`` is what this backup added to the repository (compressed), ``size`` the whole
    database at that point, ``delta`` the uncompressed bytes this backup copied."""
    info = b.get("info", {})
    return {
        "label": b.get("label"),
        "type": b.get("type"),
        "prior": b.get("prior"),
        "references": b.get("reference") or [],
        "size": info.get("size"),
        "delta": info.get("delta"),
        "stored": info.get("repository", {}).get("delta"),
        "repo_size": info.get("repository", {}).get("size"),
    }
