"""Repositories from their configuration."""

from __future__ import annotations

from hakeeper.backup.repo import FilesystemRepository, Repository
from hakeeper.core.backup_config import RepositoryConfig


def make_repository(cfg: RepositoryConfig) -> Repository:
    """The repository ``cfg`` describes (no I/O: connections open on first use)."""
    if cfg.type == "fs":
        assert cfg.path is not None  # checked by the model
        return FilesystemRepository(
            cfg.path,
            name=cfg.name,
            level=cfg.compression_level,
            threads=cfg.compression_threads,
            offsite=cfg.offsite,
        )
    # imported here: botocore costs ~50 ms of every CLI call that only uses filesystem repositories
    from hakeeper.backup.s3repo import S3Repository

    assert cfg.bucket is not None
    verify: bool | str = str(cfg.ca_file) if cfg.ca_file is not None else cfg.verify_tls
    return S3Repository(
        bucket=cfg.bucket,
        endpoint=cfg.endpoint,
        prefix=cfg.prefix,
        region=cfg.region,
        access_key=cfg.access_key,
        secret_key=cfg.secret_key.get_secret_value() if cfg.secret_key else None,
        verify=verify,
        timeout=cfg.timeout,
        name=cfg.name,
        level=cfg.compression_level,
        threads=cfg.compression_threads,
        offsite=cfg.offsite,
    )
