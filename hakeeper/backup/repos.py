"""Repositories from their configuration."""

from __future__ import annotations

from functools import partial

from hakeeper.backup.repo import FilesystemRepository, KeySource, Repository
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.util.keyfile import load_key


def key_source(cfg: RepositoryConfig) -> KeySource:
    """How the repository gets its key (read on first use), or None: not encrypted."""
    enc = cfg.encryption
    return None if enc is None else partial(load_key, enc.key_file, enc.key_env)


def key_errors(repositories: list[RepositoryConfig]) -> list[tuple[str, str]]:
    """(field, message) for each repository whose encryption key cannot be loaded (missing,
    malformed, a key file accessible by group or others): the configuration loader refuses
    them, naming the field, rather than the first write failing later."""
    errors: list[tuple[str, str]] = []
    for i, r in enumerate(repositories):
        if r.encryption is None:
            continue
        field = "key_file" if r.encryption.key_file is not None else "key_env"
        try:
            load_key(r.encryption.key_file, r.encryption.key_env)
        except ValueError as e:
            errors.append((f"backup.repositories.{i}.encryption.{field} (repository {r.name})", str(e)))
    return errors


def make_repository(cfg: RepositoryConfig) -> Repository:
    """The repository ``cfg`` describes (no I/O: connections open and keys are read on first
    use)."""
    if cfg.type == "fs":
        assert cfg.path is not None  # checked by the model
        return FilesystemRepository(
            cfg.path,
            name=cfg.name,
            level=cfg.compression_level,
            threads=cfg.compression_threads,
            offsite=cfg.offsite,
            key=key_source(cfg),
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
        key=key_source(cfg),
    )
