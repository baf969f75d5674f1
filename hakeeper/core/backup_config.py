"""The ``backup:`` section of a node's YAML: repositories, WAL archiving, schedules.

Schemas only: :func:`hakeeper.backup.repos.make_repository` builds a repository from one entry.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from hakeeper.core.validation import Loc, raw_list, raw_names, validate_collecting

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")  # fullmatch: "$" accepts a trailing newline


def _check_name(v: str) -> str:
    if not _NAME_RE.fullmatch(v):
        raise ValueError("must be 1-63 letters, digits, '_', '.' or '-', not starting with '.' or '-'")
    return v


# a repository's or schedule's name (it becomes part of metric labels and etcd keys)
Name = Annotated[str, AfterValidator(_check_name)]
_FS_ONLY = ("path",)
_S3_ONLY = ("endpoint", "bucket", "access_key", "secret_key", "ca_file")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class RetentionConfig(_Strict):
    """How many full backups a repository keeps (``hakeeper backup expire``).  With neither
    setting, no complete backup is expired (failed ones and WAL older than the oldest backup
    still are)."""

    full_count: int | None = Field(None, ge=1, description="Keep the newest N complete full backups.")
    full_days: float | None = Field(
        None,
        gt=0,
        description="Keep every complete full backup younger than this many days, plus the newest "
        "older one (so any moment of the window can be restored).",
    )
    wal_days: float | None = Field(
        None,
        gt=0,
        description="Point-in-time recovery window: keep all archived WAL from the newest kept "
        "backup that ended before the last N days on; of older kept backups only the WAL each needs "
        "to be restored to its end.  Not set: all WAL from the oldest kept backup on.",
    )


class RowCountConfig(_Strict):
    """Row counts recorded with every base backup ``hakeeper backup create`` takes, for restore
    drills (``hakeeper verify``, docs/verify.md): an exact ``count(*)`` of every permanent user
    table of every database, on the primary, and a restore point created with them."""

    enabled: bool = Field(True, description="Record row counts and a restore point with each backup.")
    max_bytes: int = Field(
        1024**3,
        ge=0,
        description="Skip the counts (recorded as skipped, with the reason) when the tables to count "
        "hold more than this many bytes in all: counting reads every table on the primary, after "
        "the copy (about a second per GB here), while the backup command waits.",
    )
    timeout: float = Field(
        600.0, gt=0, le=86400, description="Limit of the counting (s); beyond it the counts are skipped."
    )


class VerifyConfig(_Strict):
    """Restore drills (``hakeeper verify``, docs/verify.md)."""

    scratch_dir: Path | None = Field(
        None,
        description="Directory in which each drill creates (and always removes) its scratch data "
        "directory; it needs room for a restored copy of the cluster (default: $TMPDIR).",
    )
    timeout: float = Field(
        3600.0, gt=0, le=86400, description="Limit of the recovery of the restored copy (s)."
    )
    dump_check: bool = Field(
        True, description="Also restore the newest complete logical dump into a scratch database."
    )


class EncryptionConfig(_Strict):
    """Client-side encryption of everything a repository stores (AES-256-GCM, docs/backup.md).
    Exactly one key source.  The key never goes into the repository or etcd; lose it and the
    repository's backups cannot be read."""

    key_file: Path | None = Field(
        None,
        description="Absolute path of the key file: 32 random bytes, as base64 text (`hakeeper backup "
        "keygen`) or raw; it must not be accessible by group or others (mode 0600), and "
        "`restore_command` (PostgreSQL's OS user) must be able to read it.",
    )
    key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$",  # Rust regex: $ is only the very end
        description="Name of an environment variable holding the key as base64 text.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> EncryptionConfig:
        if (self.key_file is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_file and key_env")
        if self.key_file is not None and not self.key_file.is_absolute():
            raise ValueError(f"key_file {str(self.key_file)!r} must be absolute")
        if self.key_env is not None and self.key_env.upper().startswith(("HAKEEPER_", "PG")):
            # HAKEEPER_* are configuration overrides and, like PG*, never reach the programs
            # the agent starts, so restore_command (walfetch) would not find the key
            raise ValueError(f"key_env {self.key_env}: names starting with HAKEEPER_ or PG are not passed on")
        return self


class RepositoryConfig(_Strict):
    name: Name = Field(description="Repository name, unique among the node's repositories.")
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
    storage: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$",
        description="Storage type for the 3-2-1 policy check (`hakeeper backup policy`): copies on "
        "repositories of different types count as different media (default: `disk` for fs, `object` "
        "for s3; name others yourself, e.g. `nfs`, `tape`).",
    )
    encryption: EncryptionConfig | None = Field(
        None,
        description="Encrypt every stored object with a key from `key_file` or `key_env` (default: "
        "stored unencrypted).  A repository is encrypted or not from its first write on.",
    )
    compression_level: int = Field(3, ge=1, le=19, description="zstd level of stored objects.")
    compression_threads: int = Field(
        0, ge=-1, le=64, description="zstd worker threads per object (0: none, -1: one per CPU)."
    )
    timeout: float = Field(60.0, gt=0, le=3600, description="s3: limit of one request (s).")
    retention: RetentionConfig = Field(
        default_factory=RetentionConfig,
        description="Backups kept by `hakeeper backup expire` (both rules set: a backup either keeps "
        "is kept).",
    )

    @property
    def storage_type(self) -> str:
        """``storage``, else derived from the type: fs -> disk, s3 -> object."""
        return self.storage or ("disk" if self.type == "fs" else "object")

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


class ArchiveConfig(_Strict):
    """Continuous WAL archiving by the agent (:mod:`hakeeper.backup.archive`)."""

    enabled: bool = Field(
        True, description="Archive WAL continuously to every repository (when there is at least one)."
    )
    spool_dir: Path | None = Field(
        None,
        description="Local directory of the archiver: the archive_command script, its hand-over "
        "markers, the queue of WAL waiting for an unreachable repository and the local gap records "
        "(default: `<data_dir>/../<name>.spool`).",
    )
    max_queue_bytes: int = Field(
        2 * 1024**3,
        ge=0,
        description="Cap of that local queue; beyond it the oldest queued WAL of a repository that "
        "stays down is dropped for that repository and the gap recorded (the others stay complete).",
    )
    max_pg_wal_bytes: Annotated[int, Field(ge=0)] | Literal["auto"] | None = Field(
        "auto",
        description="When the WAL files waiting for archiving in pg_wal (`.ready`) exceed this, the "
        "oldest that failed to archive are given up (logged, recorded as a gap under "
        "`<scope>/wal-gaps/`) so the primary's disk does not fill.  `auto` (default): 25% of the size "
        "of the filesystem holding pg_wal, read when the archiver starts; a number: bytes; null: never "
        "give up (pg_wal grows until archiving works again or the disk is full).  Warnings at 50% "
        "and 80% of the cap (docs/backup.md).",
    )
    parallel: int = Field(4, ge=1, le=32, description="WAL files compressed and uploaded at once.")
    compression_level: int | None = Field(
        1,
        ge=1,
        le=19,
        description="zstd level of archived WAL (null: each repository's compression_level).  Level 1 "
        "costs about half the CPU of level 3 for ~30% larger objects: archiving must keep up with the "
        "primary's WAL on the primary's CPUs.",
    )
    timeout: float = Field(
        60.0, gt=0, le=3600, description="archive_command waits this long for the agent before failing (s)."
    )
    repo_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A repository that has not stored a WAL file within this many seconds is treated "
        "as down: the file is queued for it (once another repository has it) and it is retried later.",
    )
    queue_slow_after: float = Field(
        1.0,
        ge=0,
        le=3600,
        description="Once a WAL file is durable in one repository, a repository that has not confirmed "
        "it within this many seconds gets it through the local queue instead (its push goes on in the "
        "background), so a slow or failing repository does not delay the hand-back to PostgreSQL.",
    )
    poll_interval: float = Field(
        0.1, ge=0.01, le=5.0, description="How often the archiver looks for new `.ready` files (s)."
    )


ScheduleKind = Literal["full", "dump", "verify"]


class ScheduleRetention(_Strict):
    """What a schedule keeps of what its kind produces, per repository (see docs/schedules.md).
    Both set: an item either rule keeps is kept; neither: nothing is expired by the schedule."""

    count: int | None = Field(None, ge=1, description="Keep the newest N.")
    days: float | None = Field(None, gt=0, description="Keep everything younger than this many days.")
    wal_days: float | None = Field(
        None,
        gt=0,
        description="`full` only: the point-in-time recovery window (the repository's "
        "`retention.wal_days` when not set here).",
    )


class ScheduleConfig(_Strict):
    """One entry of ``backup.schedules``: a job the leader runs once per cron slot."""

    name: Name = Field(description="Schedule name, unique among the node's schedules (its etcd key).")
    kind: ScheduleKind = Field(
        description="`full`: a base backup; `dump`: a logical dump; `verify`: a restore drill."
    )
    cron: str = Field(
        description="Cron expression: five fields (minute hour day month weekday), or six where the "
        "sixth is seconds (`*/20 * * * * */10`: every 10 s, for tests and demos)."
    )
    timezone: str = Field("UTC", description="Time zone the cron expression is read in (IANA name).")
    repositories: list[str] | None = Field(
        None, description="Repositories the job runs for, one after another (default: every one)."
    )
    source: Literal["auto", "standby", "primary"] = Field(
        "auto", description="full: what to back up (auto: a streaming standby, else the primary)."
    )
    type: Literal["full", "incremental"] = Field(
        "full",
        description="full: the base backup's type (`hakeeper backup create --type`): `incremental` "
        "(PostgreSQL 17+) backs up what changed since the newest backup, or takes a full one when "
        "no backup can be its parent (after a promotion, say).  Mix kinds with two schedules: a "
        "weekly `full` and a daily `incremental`.",
    )
    retention: ScheduleRetention = Field(
        default_factory=ScheduleRetention,
        description="Applied per repository after each successful run (full: the repository's "
        "backups, like `hakeeper backup expire`; it replaces the repository's own `retention`; "
        "dump: this schedule's dumps only, like `hakeeper dump expire --schedule NAME`).",
    )
    databases: list[str] | None = Field(
        None,
        min_length=1,
        description="dump: the databases to dump (default: every database that accepts connections).",
    )
    format: Literal["custom", "directory", "plain"] = Field(
        "custom", description="dump: pg_dump's output format (`hakeeper dump create --format`)."
    )

    @model_validator(mode="after")
    def _dump_fields(self) -> ScheduleConfig:
        for f in ("databases", "format"):
            if f in self.model_fields_set and self.kind != "dump":
                raise ValueError(f"{f}: only for kind dump (this schedule's kind is {self.kind})")
        if "type" in self.model_fields_set and self.kind != "full":
            raise ValueError(f"type: only for kind full (this schedule's kind is {self.kind})")
        return self

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        v = " ".join(v.split())
        if len(v.split()) not in (5, 6) or not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a cron expression of 5 (or 6, with seconds) fields")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v


# The classic production schedule (used when backup.schedules is not given and there is at least
# one repository): WAL continuously (the archiver) kept 7 days, a logical dump daily kept 30 days,
# a base backup weekly kept 90 days, an export (a dump) monthly kept a year.  docs/schedules.md.
DEFAULT_SCHEDULES: tuple[dict[str, object], ...] = (
    {"name": "weekly-full", "kind": "full", "cron": "0 1 * * 0", "retention": {"days": 90, "wal_days": 7}},
    {"name": "daily-dump", "kind": "dump", "cron": "0 2 * * *", "retention": {"days": 30}},
    {"name": "monthly-export", "kind": "dump", "cron": "0 3 1 * *", "retention": {"days": 365}},
)


class BackupConfig(_Strict):
    repositories: list[RepositoryConfig] = Field(
        default_factory=list, description="Where WAL and backups go; each gets all of them."
    )
    archive: ArchiveConfig = Field(default_factory=ArchiveConfig)
    row_counts: RowCountConfig = Field(default_factory=RowCountConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig)
    compress_on: Literal["server", "client"] = Field(
        "server",
        description="Who compresses base backups (scheduled ones and `backup create` without "
        "--compress-on). server: PostgreSQL (15+, the fastest backup here); client: hakeeper "
        "compresses independent parts and writes a file index, which restore --jobs unpacks in "
        "parallel and restore --delta / reinit --delta need (docs/backup.md, docs/decisions.md).",
    )
    replica_from_backup: bool = Field(
        True,
        description="A replica that needs a full copy restores the newest complete backup of this "
        "cluster from the repositories (then replays archived WAL and streams) instead of running "
        "pg_basebackup against the leader; pg_basebackup remains the fallback on any failure.",
    )
    replica_from_backup_max_wal: int = Field(
        16 * 1024**3,
        ge=0,
        description="...but only when the leader is at most this many bytes of WAL past the backup's "
        "end (older backups would replay longer than a fresh copy takes).",
    )
    schedules: list[ScheduleConfig] | None = Field(
        None,
        description="Jobs the leader runs on cron slots (docs/schedules.md).  Not given: the classic "
        "schedule when there is a repository (weekly full kept 90 days, daily dump kept 30 days, "
        "monthly export kept a year); `[]`: none.",
    )
    heartbeat_interval: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="The leader upserts its row in `hakeeper.heartbeat` (database postgres) this "
        "often (s), so WAL flows and the archive RPO is measurable; 0: off.  Only with a repository.",
    )

    @model_validator(mode="wrap")
    @classmethod
    def _all_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        # Repeated names and schedules naming an unknown repository are reported together with
        # a field error elsewhere in the section, not after it is fixed.
        return validate_collecting(cls.__name__, data, handler, _raw_backup_problems)

    @model_validator(mode="after")
    def _unique(self) -> BackupConfig:
        counts = Counter(r.name for r in self.repositories)
        dup = sorted(n for n, c in counts.items() if c > 1)
        if dup:
            raise ValueError(f"repository names must be unique; repeated: {', '.join(dup)}")
        return self

    @model_validator(mode="after")
    def _schedules_valid(self) -> BackupConfig:
        scheds = self.schedules or []
        counts = Counter(s.name for s in scheds)
        dup = sorted(n for n, c in counts.items() if c > 1)
        if dup:
            raise ValueError(f"schedules: names must be unique; repeated: {', '.join(dup)}")
        known = {r.name for r in self.repositories}
        retained: dict[str, str] = {}
        if scheds and not known:
            raise ValueError("schedules: there is no repository to run them for (backup.repositories)")
        for i, s in enumerate(scheds):
            unknown = sorted(set(s.repositories or ()) - known)
            if unknown:
                raise ValueError(f"schedules.{i}.repositories: unknown repository {', '.join(unknown)}")
            if s.kind == "full" and (s.retention.count is not None or s.retention.days is not None):
                for r in s.repositories or sorted(known):
                    if r in retained:
                        raise ValueError(
                            f"schedules.{i}.retention: full schedules {retained[r]} and {s.name} both "
                            f"set the retention of repository {r}'s backups (set it on one)"
                        )
                    retained[r] = s.name
        return self

    def effective_schedules(self) -> list[ScheduleConfig]:
        """``schedules``, or the classic ones when not given and there is a repository."""
        if self.schedules is not None:
            return list(self.schedules)
        if not self.repositories:
            return []
        return [ScheduleConfig.model_validate(d) for d in DEFAULT_SCHEDULES]


def _repeated(names: list[str]) -> list[str]:
    return sorted(n for n, c in Counter(names).items() if c > 1)


def _raw_backup_problems(data: Any) -> list[tuple[Loc, str]]:
    """BackupConfig's cross-field checks on the raw section (see validate_collecting)."""
    out: list[tuple[Loc, str]] = []
    repos = raw_list(data, "repositories")
    known = set(raw_names(repos))
    dup = _repeated(raw_names(repos))
    if dup:
        out.append(((), f"repository names must be unique; repeated: {', '.join(dup)}"))
    scheds = raw_list(data, "schedules")
    dup = _repeated(raw_names(scheds))
    if dup:
        out.append(((), f"schedules: names must be unique; repeated: {', '.join(dup)}"))
    for i, s in enumerate(scheds):
        wanted = s.get("repositories") if isinstance(s, dict) else None
        if isinstance(wanted, list) and repos:
            unknown = sorted({r for r in wanted if isinstance(r, str)} - known)
            if unknown:
                out.append(((), f"schedules.{i}.repositories: unknown repository {', '.join(unknown)}"))
    return out


class WalToolConfig(_Strict):
    """The JSON file handed to ``archive_command`` / ``restore_command`` helpers
    (:mod:`hakeeper.backup.walpush`, :mod:`hakeeper.backup.walfetch`): which cluster and which
    repositories.  Written by the agent or by ``hakeeper restore``, mode 0600 (it may hold
    credentials)."""

    scope: str
    repositories: list[RepositoryConfig]
    prefetch: int = Field(
        16,
        ge=0,
        le=256,
        description="walfetch: segments fetched ahead of the one PostgreSQL asks for (0: no prefetch).",
    )
    prefetch_parallel: int = Field(4, ge=1, le=16, description="walfetch: prefetch downloads at once.")
    prefetch_max_bytes: int = Field(
        512 * 1024 * 1024,
        ge=0,
        description=(
            "walfetch: bytes the prefetch spool in pg_wal may hold, downloads being written included; "
            "the window shrinks to what fits (less than one segment: no prefetch)."
        ),
    )

    @classmethod
    def load(cls, path: Path) -> WalToolConfig:
        return cls.model_validate_json(path.read_text())

    def dump(self) -> str:
        data = self.model_dump(mode="json")
        for r, src in zip(data["repositories"], self.repositories, strict=True):
            if src.secret_key is not None:
                r["secret_key"] = src.secret_key.get_secret_value()
        import json

        return json.dumps(data, indent=1) + "\n"
