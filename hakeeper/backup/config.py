"""Configuration of the backup repositories (``backup.repositories`` in a node's YAML).

Not wired into :class:`hakeeper.config.NodeConfig` yet; :func:`make_repository` builds a
:class:`~hakeeper.backup.repo.Repository` from one entry.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from hakeeper.backup.repo import FilesystemRepository, Repository, S3Repository

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
_FS_ONLY = ("path",)
_S3_ONLY = ("endpoint", "bucket", "access_key", "secret_key", "ca_file")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RepositoryConfig(_Strict):
    name: str = Field(description="Repository name, unique among the node's repositories.")
    type: Literal["fs", "s3"] = Field(description="`fs`: a directory; `s3`: an S3-compatible bucket.")
    path: Path | None = Field(None, description="fs: absolute path of the repository directory.")
    endpoint: str | None = Field(
        None, description="s3: endpoint URL (http:// or https://); default: AWS for the region."
    )
    bucket: str | None = Field(None, description="s3: bucket name.")
    prefix: str = Field("", description="s3: key prefix inside the bucket (no leading or trailing /).")
    region: str = Field("us-east-1", description="s3: region (signing; bucket creation).")
    access_key: str | None = Field(
        None, description="s3: access key id (default: the AWS environment / instance credentials)."
    )
    secret_key: SecretStr | None = Field(None, description="s3: secret access key.")
    ca_file: Path | None = Field(None, description="s3: CA bundle to verify the endpoint's certificate.")
    verify_tls: bool = Field(True, description="s3: verify the endpoint's TLS certificate.")
    offsite: bool = Field(False, description="This repository is the off-site copy (3-2-1 rule).")
    compression_level: int = Field(3, ge=1, le=19, description="zstd level of stored objects.")
    compression_threads: int = Field(
        0, ge=-1, le=64, description="zstd worker threads per object (0: none, -1: one per CPU)."
    )
    timeout: float = Field(60.0, gt=0, le=3600, description="s3: limit of one request (s).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("must be 1-63 letters, digits, '_', '.' or '-', not starting with '.' or '-'")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {v!r} must start with http:// or https://")
        return v.rstrip("/") if v else v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        return v.strip("/")

    @model_validator(mode="after")
    def _per_type(self) -> RepositoryConfig:
        t = self.type
        wrong = _S3_ONLY if t == "fs" else _FS_ONLY
        given = [f for f in wrong if getattr(self, f) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} not allowed for a repository of type {t}")
        if t == "fs":
            if self.path is None:
                raise ValueError("type fs needs path")
            if not self.path.is_absolute():
                raise ValueError(f"path {str(self.path)!r} must be absolute")
        else:
            if not self.bucket:
                raise ValueError("type s3 needs bucket")
            if (self.access_key is None) != (self.secret_key is None):
                raise ValueError("access_key and secret_key must be given together")
            if self.ca_file is not None and not self.verify_tls:
                raise ValueError("ca_file given but verify_tls is false")
        return self


class BackupConfig(_Strict):
    repositories: list[RepositoryConfig] = Field(
        default_factory=list, description="Where WAL and backups go; each gets all of them."
    )

    @model_validator(mode="after")
    def _unique(self) -> BackupConfig:
        counts = Counter(r.name for r in self.repositories)
        dup = sorted(n for n, c in counts.items() if c > 1)
        if dup:
            raise ValueError(f"repository names must be unique; repeated: {', '.join(dup)}")
        return self


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
