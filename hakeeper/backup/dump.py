"""Logical dumps (``hakeeper dump create|list|restore|expire``): pg_dump and pg_dumpall
--globals-only into the same repositories as base backups.

A dump lives below ``<scope>/dump/<id>/`` in one repository:

* ``dump.json``: the :class:`DumpRecord`, written ``running`` first (refreshed every
  :data:`~hakeeper.backup.catalog.HEARTBEAT_S` while pg_dump runs, so expire never removes a dump
  in progress) and last ``complete`` or ``failed``.  Only a complete record makes a dump usable.
* ``globals.sql``: ``pg_dumpall --globals-only`` (roles, tablespaces), unless skipped.
* ``db000/``, ``db001/``, ...: one directory per database, in the order of the record's
  ``databases`` (database names can hold characters object names cannot, so the record maps
  them).  Inside: ``archive.dump`` (custom format), ``dump.sql`` (plain) or ``dir/<file>``
  (directory format: ``toc.dat`` and one ``NNNN.dat`` per table, as pg_dump wrote them).

Every file is one repository object: zstd-compressed and SHA-256 checked like every other
object (pg_dump itself runs with ``--compress=0`` so that its output is compressed once).
pg_dump writes to a local temporary directory first (``-f``; the custom format needs a seekable
file for its data offsets, the directory format is a directory), then ``pg_restore -l`` reads
the table of contents back: a dump whose TOC does not read is failed, not stored as complete.
A plain dump must end with pg_dump's "dump complete" line.

Ids are ``D`` and the UTC start time, ``D20261124T071500Z``: distinct from base backup ids
(which start with a digit), sortable, one per second and repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from psycopg import sql as psql_sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hakeeper.backup import catalog
from hakeeper.backup.catalog import SourceInfo, StoredObject
from hakeeper.backup.errors import NotFound, RepoError
from hakeeper.backup.phases import PhaseStats, collect, phase, phases_dict
from hakeeper.backup.repo import CHUNK, ListEntry, Repository
from hakeeper.core import timefmt
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, run

if TYPE_CHECKING:
    from hakeeper.backup.basebackup import Endpoint
    from hakeeper.core.config import NodeConfig

log = get_logger(__name__)

FORMAT_VERSION = 1
RECORD_NAME = "dump.json"
GLOBALS_NAME = "globals.sql"
ID_PREFIX = "D"
ID_FORMAT = "D%Y%m%dT%H%M%SZ"
FILE_NAMES = {"custom": "archive.dump", "plain": "dump.sql"}
DIR_PREFIX = "dir/"
PLAIN_END = b"-- PostgreSQL database dump complete"
GLOBALS_END = b"-- PostgreSQL database cluster dump complete"
ORPHAN_AFTER = dt.timedelta(hours=1)

DumpFormat = Literal["custom", "directory", "plain"]
FORMATS: tuple[str, ...] = ("custom", "directory", "plain")
ProgressFn = Callable[[str, int, int | None], None]


class DumpError(Exception):
    """A dump or a dump restore failed or was refused; the message says why."""


class DumpStatus(StrEnum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# A record comes from the repository, which a restore must not trust for local paths: the
# names that become files below the restore's temporary directory are checked when the record is
# loaded (fullmatch: ``$`` with re.match would accept a trailing newline), before any file is made.
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}")


def _safe_relative(name: str, *, max_parts: int) -> str:
    """``name`` if it is 1..``max_parts`` plain components (no ``..``, no leading ``.`` or
    ``/``, no empty part), else ValueError."""
    parts = name.split("/")
    if len(parts) > max_parts or not all(_SAFE_COMPONENT.fullmatch(p) for p in parts):
        raise ValueError(f"unsafe name {name!r} in a dump record")
    return name


class DumpedDatabase(_Model):
    name: str
    key: str  # the database's directory below the dump's prefix: db000, db001, ...
    objects: list[StoredObject] = Field(default_factory=list)  # names relative to <id>/<key>/
    toc_entries: int | None = None  # pg_restore -l entries (None for the plain format)
    size: int = 0
    stored_size: int = 0
    seconds: float | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return _safe_relative(v, max_parts=1)

    @field_validator("objects")
    @classmethod
    def _objects(cls, v: list[StoredObject]) -> list[StoredObject]:
        for o in v:  # archive.dump, dump.sql or dir/<file>
            _safe_relative(o.name, max_parts=2)
        return v


class DumpOptions(_Model):
    tables: list[str] = Field(default_factory=list)
    schema_only: bool = False
    data_only: bool = False
    jobs: int = 1
    globals: bool = True


class DumpRecord(_Model):
    format: int = FORMAT_VERSION
    kind: Literal["dump"] = "dump"
    id: str
    status: DumpStatus
    error: str | None = None
    scope: str
    repository: str
    dump_format: DumpFormat
    all_databases: bool = False
    options: DumpOptions = Field(default_factory=DumpOptions)
    source: SourceInfo | None = None
    pg_version: int | None = None
    pg_dump_version: str | None = None
    start_time: dt.datetime
    stop_time: dt.datetime | None = None
    updated_at: dt.datetime
    databases: list[DumpedDatabase] = Field(default_factory=list)
    globals_object: StoredObject | None = None
    size: int = 0
    stored_size: int = 0
    created_on: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    schedule: str | None = None  # the backup schedule that took it (None: by hand)
    label: str | None = None
    # "dump <database>": pg_dump, compression and upload of each (one pipeline, one wall time)
    phases: dict[str, PhaseStats] = Field(default_factory=dict)

    def usable(self) -> bool:
        return self.status is DumpStatus.COMPLETE and self.stop_time is not None

    def abandoned(self, now: dt.datetime) -> bool:
        return self.status is DumpStatus.RUNNING and now - self.updated_at > catalog.STALE_AFTER

    def effective_status(self, now: dt.datetime) -> str:
        return "abandoned" if self.abandoned(now) else str(self.status)

    def group(self) -> str:
        """What was dumped, for retention: ``all`` or the database names, and the options that
        make a dump no substitute for another (schema-only, data-only, a table list)."""
        what = "all" if self.all_databases else ",".join(d.name for d in self.databases)
        o = self.options
        flags = [f for f, on in (("schema-only", o.schema_only), ("data-only", o.data_only)) if on]
        if o.tables:
            flags.append("tables " + ",".join(o.tables))
        return what + (f" ({'; '.join(flags)})" if flags else "")

    def retention_group(self) -> str:
        """:meth:`group`, and the schedule that took the dump: each schedule's dumps form their own
        groups, so one schedule's retention never counts or ages another's (nor a manual dump)."""
        return self.group() + (f" [schedule {self.schedule}]" if self.schedule is not None else "")

    def to_json(self) -> bytes:
        return (self.model_dump_json(indent=1) + "\n").encode()

    def object_names(self) -> list[str]:
        """Every data object, relative to the dump's prefix (the record not included)."""
        names = [GLOBALS_NAME] if self.globals_object is not None else []
        for d in self.databases:
            names.extend(f"{d.key}/{o.name}" for o in d.objects)
        return names

    def summary(self, now: dt.datetime | None = None) -> dict[str, object]:
        now = now or catalog.utcnow()
        return {
            "id": self.id,
            "repository": self.repository,
            "status": self.effective_status(now),
            "format": self.dump_format,
            "databases": [d.name for d in self.databases],
            "all": self.all_databases,
            "globals": self.globals_object is not None,
            "tables": self.options.tables,
            "schema_only": self.options.schema_only,
            "data_only": self.options.data_only,
            "source": self.source.member if self.source else None,
            "from_standby": self.source.standby if self.source else None,
            "start_time": timefmt.iso(self.start_time),
            "stop_time": timefmt.iso(self.stop_time) if self.stop_time else None,
            "size": self.size,
            "stored_size": self.stored_size,
            "error": self.error,
            "schedule": self.schedule,
            "label": self.label,
        }


# ============================================================================ names


def dump_prefix(scope: str, dump_id: str | None = None) -> str:
    return f"{scope}/dump/" if dump_id is None else f"{scope}/dump/{dump_id}/"


def record_key(scope: str, dump_id: str) -> str:
    return dump_prefix(scope, dump_id) + RECORD_NAME


def make_dump_id(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime(ID_FORMAT)


def is_dump_id(text: str) -> bool:
    try:
        dt.datetime.strptime(text, ID_FORMAT)
    except ValueError:
        return False
    return True


def db_key(index: int) -> str:
    return f"db{index:03d}"


# ============================================================================ pg_restore -l


@dataclass(frozen=True, slots=True)
class TocEntry:
    dump_id: int
    desc: str  # TABLE, TABLE DATA, INDEX, FK CONSTRAINT, ...
    schema: str  # "-" when the object has none
    tag: str  # the object's name; "table name" for constraints, triggers, defaults, policies
    owner: str
    line: str


# Multi-word descriptions first: the description is followed by the schema, the tag and the owner.
_TOC_DESCS = sorted(
    (
        "TABLE DATA",
        "FK CONSTRAINT",
        "CHECK CONSTRAINT",
        "SEQUENCE SET",
        "SEQUENCE OWNED BY",
        "DEFAULT ACL",
        "MATERIALIZED VIEW DATA",
        "MATERIALIZED VIEW",
        "ROW SECURITY",
        "INDEX ATTACH",
        "LARGE OBJECT",
        "BLOB",
        "BLOBS",
        "TABLE ATTACH",
        "EVENT TRIGGER",
        "FOREIGN TABLE",
        "TEXT SEARCH CONFIGURATION",
        "TEXT SEARCH DICTIONARY",
        "OPERATOR CLASS",
        "OPERATOR FAMILY",
        "STATISTICS",
    ),
    key=len,
    reverse=True,
)
_TOC_LINE = re.compile(r"^(\d+); \d+ \d+ (.+)$")


def parse_toc(text: str) -> list[TocEntry]:
    """The entries of a ``pg_restore -l`` listing (comment lines skipped)."""
    out: list[TocEntry] = []
    for line in text.splitlines():
        m = _TOC_LINE.match(line.strip())
        if m is None:
            continue
        rest = m.group(2)
        desc = next((d for d in _TOC_DESCS if rest.startswith(d + " ")), rest.split(" ", 1)[0])
        fields = rest[len(desc) :].strip().split(" ")
        if len(fields) < 2:
            schema, tag, owner = "-", " ".join(fields), ""
        else:
            schema, owner, tag = fields[0], fields[-1], " ".join(fields[1:-1])
        out.append(TocEntry(int(m.group(1)), desc, schema, tag, owner, line.strip()))
    return out


_IDENT = r'(?:"(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_$]*)'
_CREATE_INDEX = re.compile(
    rf"^CREATE (?:UNIQUE )?INDEX ({_IDENT}) ON (?:ONLY )?(?:({_IDENT})\.)?({_IDENT})", re.MULTILINE
)
_OWNED_BY = re.compile(
    rf"^ALTER SEQUENCE (?:({_IDENT})\.)?({_IDENT}) OWNED BY (?:({_IDENT})\.)?({_IDENT})\.", re.MULTILINE
)


def _unquote(ident: str | None) -> str:
    if ident is None:
        return ""
    if ident.startswith('"'):
        return ident[1:-1].replace('""', '"')
    return ident.lower()


def split_table(name: str) -> tuple[str | None, str]:
    """``schema.table`` or ``table`` (as ``pg_restore -t`` takes it: no quoting)."""
    schema, sep, table = name.rpartition(".")
    return (schema if sep else None), table


def related_entries(toc: Sequence[TocEntry], schema_sql: str, tables: Sequence[str]) -> list[TocEntry]:
    """The TOC entries that restore ``tables`` *with* their indexes, constraints, triggers,
    defaults, policies, comments and owned sequences (``pg_restore -t`` brings only the table and
    its data).  Indexes and owned sequences are matched to their table through the schema SQL
    (``pg_restore -s -f -``): the TOC does not name an index's table."""
    wanted = [split_table(t) for t in tables]

    def is_wanted(schema: str, table: str) -> bool:
        return any(table == t and (s is None or s == schema) for s, t in wanted)

    index_of: set[tuple[str, str]] = set()
    for m in _CREATE_INDEX.finditer(schema_sql):
        idx, sch, tab = _unquote(m.group(1)), _unquote(m.group(2)), _unquote(m.group(3))
        if is_wanted(sch, tab):
            index_of.add((sch, idx))
    sequences: set[tuple[str, str]] = set()
    for m in _OWNED_BY.finditer(schema_sql):
        s_sch, seq, t_sch, tab = (_unquote(m.group(i)) for i in (1, 2, 3, 4))
        if is_wanted(t_sch, tab):
            sequences.add((s_sch, seq))
    picked: list[TocEntry] = []
    for e in toc:
        first = e.tag.split(" ", 1)[0]
        if e.desc in ("TABLE", "TABLE DATA") and is_wanted(e.schema, e.tag):
            picked.append(e)
        elif e.desc == "INDEX" and (e.schema, e.tag) in index_of:
            picked.append(e)
        elif e.desc in ("SEQUENCE", "SEQUENCE SET", "SEQUENCE OWNED BY") and (e.schema, e.tag) in sequences:
            picked.append(e)
        elif e.desc in (
            "CONSTRAINT",
            "FK CONSTRAINT",
            "CHECK CONSTRAINT",
            "TRIGGER",
            "DEFAULT",
            "POLICY",
            "RULE",
        ) and is_wanted(e.schema, first):
            picked.append(e)
        elif e.desc in ("COMMENT", "ACL") and e.tag.startswith("TABLE ") and is_wanted(e.schema, e.tag[6:]):
            picked.append(e)
    return picked


# ============================================================================ SQL and programs


def with_dbname(conninfo: str, dbname: str) -> str:
    """``conninfo`` (key=value or URI) connecting to ``dbname`` instead."""
    return make_conninfo(conninfo, dbname=dbname)


def conninfo_dbname(conninfo: str) -> str | None:
    try:
        name = conninfo_to_dict(conninfo).get("dbname")
    except psycopg.ProgrammingError:
        return None
    return None if name is None else str(name)


def check_conninfo(conninfo: str) -> str:
    """``conninfo`` if libpq can parse it, else DumpError."""
    try:
        conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as e:
        raise DumpError(f"invalid connection string: {e}") from None
    return conninfo


async def sql(
    conninfo: str, password: str | None, query: str | psql_sql.Composed, timeout: float = 30.0
) -> list[tuple[Any, ...]]:
    kw: dict[str, Any] = {"autocommit": True}
    if password is not None and "password" not in conninfo_to_dict(conninfo):
        kw["password"] = password
    try:
        async with asyncio.timeout(timeout):
            async with await psycopg.AsyncConnection.connect(conninfo, **kw) as conn:
                cur = await conn.execute(query.encode() if isinstance(query, str) else query)
                return await cur.fetchall() if cur.description is not None else []
    except (psycopg.Error, OSError) as e:
        raise DumpError(f"{_where(conninfo)}: {str(e).strip()}") from e
    except TimeoutError as e:
        raise DumpError(f"{_where(conninfo)}: no answer within {timeout:.0f}s") from e


def _where(conninfo: str) -> str:
    try:
        d = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "server"
    host = d.get("host") or "local socket"
    return f"{host}:{d.get('port') or 5432}" + (f"/{d['dbname']}" if d.get("dbname") else "")


def _env(password: str | None) -> dict[str, str]:
    extra = {"LC_ALL": "C", "LC_MESSAGES": "C", "PGAPPNAME": "hakeeper-dump", "PGCONNECT_TIMEOUT": "10"}
    if password is not None:
        extra["PGPASSWORD"] = password
    return extra


async def _tool(
    argv: Sequence[str | Path], password: str | None, what: str, timeout: float | None = None
) -> str:
    """Run a client program as ourselves; its stdout, or DumpError with its last lines."""
    res = await run(argv, run_as=RunAs(), env=_env(password), timeout=timeout, check=False)
    if not res.ok:
        tail = "\n".join(res.stderr.strip().splitlines()[-8:])
        raise DumpError(f"{what} failed (exit {res.returncode}):\n{tail}")
    return res.stdout


async def all_or_first_error(aws: Iterable[Awaitable[None]]) -> None:
    """Run ``aws`` concurrently; on the first error cancel the others and raise that error
    itself (not an ExceptionGroup: callers catch RepoError, DumpError, CopyError)."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass
class _Run:
    repo: Repository
    scope: str
    record: DumpRecord

    async def save(self) -> None:
        self.record.updated_at = catalog.utcnow()
        await self.repo.put(record_key(self.scope, self.record.id), self.record.to_json())


# (scope, id) of every dump id this process handed out: two dumps started in the same second
# (two schedules on one slot) get different ids, in every repository (a scheduled dump is copied
# under its id).  Dumps started by other processes are seen in the repository only.
_IDS_TAKEN: set[tuple[str, str]] = set()


async def _new_id(repo: Repository, scope: str, now: dt.datetime) -> str:
    for i in range(120):
        did = make_dump_id(now + dt.timedelta(seconds=i))
        if (scope, did) in _IDS_TAKEN:
            continue
        _IDS_TAKEN.add((scope, did))  # before the await: a concurrent task skips it
        if not await repo.list_objects(dump_prefix(scope, did)):
            return did
    raise DumpError("cannot find a free dump id")


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            yield chunk
    finally:
        f.close()


async def _file_ends_with(path: Path, marker: bytes) -> bool:
    def tail() -> bytes:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            return f.read()

    return marker in await asyncio.to_thread(tail)


@dataclass(frozen=True, slots=True)
class DumpRequest:
    """What ``dump create`` dumps: ``conninfo`` names the server (its dbname is replaced per
    database); ``databases`` empty with ``all_databases`` means every connectable database."""

    conninfo: str
    password: str | None
    bin_dir: Path
    source: SourceInfo
    databases: tuple[str, ...] = ()
    all_databases: bool = False
    dump_format: DumpFormat = "custom"
    jobs: int = 1
    tables: tuple[str, ...] = ()
    schema_only: bool = False
    data_only: bool = False
    globals: bool = True
    tmp_dir: Path | None = None
    parallel_uploads: int = 4
    schedule: str | None = None  # set by the scheduler: retention selects its dumps by it
    label: str | None = None


def node_conninfo(cfg: NodeConfig, ep: Endpoint) -> str:
    """libpq connection string of database ``postgres`` on ``ep`` as the node config's superuser
    (the password goes through the environment, see :func:`_env`)."""
    from hakeeper.pg.conf import build_conninfo

    return build_conninfo(
        host=ep.host,
        port=ep.port,
        user=cfg.postgresql.superuser.username,
        dbname="postgres",
        gssencmode="disable",
    )


def node_dump_request(cfg: NodeConfig, ep: Endpoint, bin_dir: Path, **fields: Any) -> DumpRequest:
    """A :class:`DumpRequest` for the member ``ep`` with the node config's superuser;
    ``fields`` are the request's others (databases, all_databases, dump_format, schedule, ...)."""
    from hakeeper.core.config import secret_value

    return DumpRequest(
        conninfo=node_conninfo(cfg, ep),
        password=secret_value(cfg.postgresql.superuser.password),
        bin_dir=bin_dir,
        source=SourceInfo(member=ep.name, host=ep.host, port=ep.port, standby=False),
        **fields,
    )


def _pg_dump_argv(req: DumpRequest, conninfo: str, dest: Path) -> list[str]:
    fmt = {"custom": "c", "directory": "d", "plain": "p"}[req.dump_format]
    argv = [str(req.bin_dir / "pg_dump"), "-d", conninfo, f"-F{fmt}", "-f", str(dest), "--no-password"]
    if req.dump_format != "plain":
        argv.append("--compress=0")  # stored objects are zstd-compressed once, by the repository
    if req.dump_format == "directory" and req.jobs > 1:
        argv += ["-j", str(req.jobs)]
    for t in req.tables:
        argv += ["-t", t]
    if req.schema_only:
        argv.append("--schema-only")
    if req.data_only:
        argv.append("--data-only")
    return argv


async def create_dump(
    repo: Repository, scope: str, req: DumpRequest, progress: ProgressFn | None = None
) -> DumpRecord:
    """Dump into ``repo`` and return the complete record (DumpError otherwise; the record then
    says ``failed`` and the data objects are removed)."""
    if req.schema_only and req.data_only:
        raise DumpError("--schema-only and --data-only exclude each other")
    if req.jobs > 1 and req.dump_format != "directory":
        raise DumpError("--jobs needs --format directory (pg_dump dumps in parallel only in that format)")
    if not req.all_databases and not req.databases:
        raise DumpError("no database to dump")
    check_conninfo(req.conninfo)
    admin = with_dbname(req.conninfo, conninfo_dbname(req.conninfo) or "postgres")
    rows = await sql(
        admin,
        req.password,
        "SELECT current_setting('server_version_num')::int, pg_is_in_recovery(),"
        " ARRAY(SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate"
        "       ORDER BY datname)",
    )
    version, in_recovery, existing = rows[0]
    names = list(existing) if req.all_databases else list(req.databases)
    missing = [n for n in names if n not in existing]
    if missing:
        raise DumpError(f"no database {', '.join(map(repr, missing))} on {_where(admin)}")
    tool_version = (await _tool([req.bin_dir / "pg_dump", "--version"], None, "pg_dump --version")).strip()
    now = catalog.utcnow()
    did = await _new_id(repo, scope, now)
    source = req.source.model_copy(update={"standby": bool(in_recovery)})
    record = DumpRecord(
        id=did,
        status=DumpStatus.RUNNING,
        scope=scope,
        repository=repo.name,
        dump_format=req.dump_format,
        all_databases=req.all_databases,
        options=DumpOptions(
            tables=list(req.tables),
            schema_only=req.schema_only,
            data_only=req.data_only,
            jobs=req.jobs,
            globals=req.globals,
        ),
        source=source,
        pg_version=int(version),
        pg_dump_version=tool_version,
        start_time=now,
        updated_at=now,
        databases=[DumpedDatabase(name=n, key=db_key(i)) for i, n in enumerate(names)],
        schedule=req.schedule,
        label=req.label,
    )
    run_ = _Run(repo, scope, record)
    await run_.save()
    log.info("dump_started", id=did, repo=repo.name, databases=names, format=req.dump_format)

    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(catalog.HEARTBEAT_S)
            with contextlib.suppress(RepoError):
                await run_.save()

    beat = asyncio.create_task(heartbeat())
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hakeeper-dump-", dir=req.tmp_dir))
    try:
        if req.globals:
            record.globals_object = await _dump_globals(run_, req, admin, tmp)
        for db in record.databases:
            await _dump_one(run_, req, db, tmp, progress)
    except BaseException as e:
        beat.cancel()
        msg = str(e) if isinstance(e, DumpError | RepoError) else f"{type(e).__name__}: {e}"
        if isinstance(e, asyncio.CancelledError | KeyboardInterrupt):
            msg = "interrupted"
        await asyncio.shield(_fail(run_, msg))
        if isinstance(e, DumpError):
            raise
        if isinstance(e, RepoError):
            raise DumpError(f"dump {did}: {e}") from e
        raise
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    record.status = DumpStatus.COMPLETE
    record.stop_time = catalog.utcnow()
    record.size = sum(d.size for d in record.databases) + (
        record.globals_object.size if record.globals_object else 0
    )
    record.phases = collect(**{f"dump {d.name}": phase(d.seconds, d.size) for d in record.databases})
    record.stored_size = sum(d.stored_size for d in record.databases) + (
        record.globals_object.stored_size if record.globals_object else 0
    )
    await run_.save()
    log.info("dump_complete", id=did, size=record.size, stored=record.stored_size)
    return record


async def _fail(run_: _Run, msg: str) -> None:
    rec = run_.record
    rec.status = DumpStatus.FAILED
    rec.error = msg
    log.error("dump_failed", id=rec.id, error=msg)
    with contextlib.suppress(RepoError):
        for e in await run_.repo.list_objects(dump_prefix(run_.scope, rec.id)):
            if not e.name.endswith("/" + RECORD_NAME):
                await run_.repo.delete(e.name)
    rec.globals_object = None
    for d in rec.databases:
        d.objects = []
        d.stored_size = 0
    with contextlib.suppress(RepoError):
        await run_.save()


async def _store_file(run_: _Run, name: str, path: Path, meta: dict[str, str]) -> StoredObject:
    key = dump_prefix(run_.scope, run_.record.id) + name
    r = await run_.repo.put_stream(key, _file_chunks(path), meta=meta)
    return StoredObject(name=name, size=r.size, stored_size=r.stored_size, sha256=r.sha256)


async def _dump_globals(run_: _Run, req: DumpRequest, admin: str, tmp: Path) -> StoredObject:
    path = tmp / GLOBALS_NAME
    argv: list[str | Path] = [
        req.bin_dir / "pg_dumpall",
        "-d",
        admin,
        "--globals-only",
        "-f",
        path,
        "--no-password",
    ]
    await _tool(argv, req.password, "pg_dumpall --globals-only")
    if not await _file_ends_with(path, GLOBALS_END):
        raise DumpError("pg_dumpall --globals-only wrote an incomplete file")
    return await _store_file(run_, GLOBALS_NAME, path, {"dump": run_.record.id, "kind": "globals"})


async def _dump_one(
    run_: _Run, req: DumpRequest, db: DumpedDatabase, tmp: Path, progress: ProgressFn | None
) -> None:
    t0 = time.monotonic()
    fmt = req.dump_format
    dest = tmp / db.key / ("dir" if fmt == "directory" else FILE_NAMES[fmt])
    dest.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:  # the phase begins (pg_dump says nothing until it is done)
        progress(f"pg_dump {db.name}", 0, None)
    await _tool(
        _pg_dump_argv(req, with_dbname(req.conninfo, db.name), dest), req.password, f"pg_dump of {db.name!r}"
    )
    if fmt == "plain":
        if not await _file_ends_with(dest, PLAIN_END):
            raise DumpError(f"pg_dump of {db.name!r} wrote an incomplete plain dump")
        db.toc_entries = None
    else:
        listing = await _tool(
            [req.bin_dir / "pg_restore", "-l", dest], None, f"pg_restore -l of the dump of {db.name!r}"
        )
        db.toc_entries = len(parse_toc(listing))
    if fmt == "directory":
        files = sorted(p for p in dest.iterdir() if p.is_file())
        names = [(DIR_PREFIX + p.name, p) for p in files]
    else:
        names = [(dest.name, dest)]
    total = sum(p.stat().st_size for _, p in names)
    done = 0
    if progress is not None:
        progress(f"upload {db.name}", 0, total)
    sem = asyncio.Semaphore(max(1, req.parallel_uploads))
    stored: dict[str, StoredObject] = {}
    meta = {"dump": run_.record.id, "database": db.key}

    async def up(rel: str, path: Path) -> None:
        nonlocal done
        async with sem:
            o = await _store_file(run_, f"{db.key}/{rel}", path, meta)
            stored[rel] = StoredObject(name=rel, size=o.size, stored_size=o.stored_size, sha256=o.sha256)
            done += o.size
            if progress is not None:
                progress(f"upload {db.name}", done, total)

    await all_or_first_error(up(rel, path) for rel, path in names)
    db.objects = [stored[rel] for rel, _ in names]
    db.size = sum(o.size for o in db.objects)
    db.stored_size = sum(o.stored_size for o in db.objects)
    db.seconds = round(time.monotonic() - t0, 3)
    await run_.save()
    log.info("dump_database_stored", id=run_.record.id, database=db.name, size=db.size, toc=db.toc_entries)


# ============================================================================ catalog


@dataclass
class DumpCatalog:
    repository: str
    records: list[DumpRecord] = field(default_factory=list)
    objects: dict[str, list[ListEntry]] = field(default_factory=dict)
    orphans: dict[str, list[ListEntry]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def get(self, dump_id: str) -> DumpRecord | None:
        return next((r for r in self.records if r.id == dump_id), None)

    def complete(self) -> list[DumpRecord]:
        """Usable dumps, newest first."""
        done = [r for r in self.records if r.usable()]
        return sorted(done, key=lambda r: (r.stop_time, r.id), reverse=True)


async def read_record(repo: Repository, scope: str, dump_id: str) -> DumpRecord:
    raw = await repo.get(record_key(scope, dump_id))
    try:
        return DumpRecord.model_validate_json(raw)
    except ValidationError as e:
        raise ValueError(f"{repo.name}: dump {dump_id}: unreadable {RECORD_NAME}: {e}") from e


async def load_dumps(repo: Repository, scope: str) -> DumpCatalog:
    cat = DumpCatalog(repo.name)
    prefix = dump_prefix(scope)
    for e in await repo.list_objects(prefix):
        did, sep, _ = e.name[len(prefix) :].partition("/")
        if sep and did:
            cat.objects.setdefault(did, []).append(e)

    async def one(did: str) -> None:
        if record_key(scope, did) not in {e.name for e in cat.objects[did]}:
            cat.orphans[did] = cat.objects[did]
            return
        try:
            cat.records.append(await read_record(repo, scope, did))
        except NotFound:
            cat.orphans[did] = cat.objects[did]
        except (ValueError, RepoError) as e:
            cat.problems.append(str(e))

    await asyncio.gather(*(one(d) for d in sorted(cat.objects)))
    cat.records.sort(key=lambda r: r.id)
    return cat


# ============================================================================ restore


@dataclass(frozen=True, slots=True)
class RestoreRequest:
    """``conninfo``: the target server and database.  With ``create_db`` the database is created
    there first (connecting to ``conninfo``'s database) and restored into."""

    conninfo: str
    password: str | None
    bin_dir: Path
    database: str | None = None  # which database of the dump (needed when it holds several)
    create_db: str | None = None
    tables: tuple[str, ...] = ()
    with_related: bool = False
    jobs: int = 1
    globals: bool = False
    no_owner: bool = False
    tmp_dir: Path | None = None


@dataclass
class DumpRestoreResult:
    dump_id: str
    repository: str
    database: str  # the dumped database
    target: str  # where it went (host:port/dbname)
    dump_format: str
    created: bool
    tables: list[str]
    entries: int | None  # TOC entries restored (None: the whole plain script)
    seconds: float
    notes: list[str] = field(default_factory=list)
    phases: dict[str, PhaseStats] = field(default_factory=dict)  # fetch, restore (backup/phases.py)

    def to_dict(self) -> dict[str, object]:
        return {
            "dump": self.dump_id,
            "repository": self.repository,
            "database": self.database,
            "target": self.target,
            "format": self.dump_format,
            "created_database": self.created,
            "tables": self.tables,
            "entries": self.entries,
            "seconds": round(self.seconds, 3),
            "phases": phases_dict(self.phases),
            "notes": self.notes,
        }


TABLE_ONLY_NOTE = (
    "a table-only restore (--table) brings the table definition (with its NOT NULL and CHECK "
    "constraints) and its rows, not its indexes, primary/unique/foreign keys, triggers, column "
    "defaults or sequences (pg_restore -t); add --with-related for those"
)


def _pick_database(rec: DumpRecord, name: str | None) -> DumpedDatabase:
    if name is None:
        if len(rec.databases) == 1:
            return rec.databases[0]
        raise DumpError(
            f"dump {rec.id} holds {len(rec.databases)} databases "
            f"({', '.join(d.name for d in rec.databases)}): choose one with --db"
        )
    for d in rec.databases:
        if d.name == name:
            return d
    raise DumpError(f"dump {rec.id} has no database {name!r} ({', '.join(d.name for d in rec.databases)})")


def _local_path(tmp: Path, rel: str) -> Path:
    """``tmp/rel``, refused (DumpError) unless it stays below ``tmp`` -- the names were checked
    on load; this is the second line, before anything is created."""
    dest = Path(os.path.normpath(tmp / rel))
    if not dest.is_relative_to(tmp) or dest == tmp:
        raise DumpError(f"refusing to write {rel!r} outside the restore's directory {tmp}")
    return dest


async def _fetch(repo: Repository, key: str, tmp: Path, rel: str, expected: StoredObject | None) -> None:
    """Download ``key`` to ``tmp/rel`` (a new file: never through a link, never over one) and
    check it against the SHA-256 and size its record holds (``expected``)."""
    dest = _local_path(tmp, rel)

    def create() -> int:
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not dest.parent.resolve().is_relative_to(tmp.resolve()):
            raise DumpError(f"refusing to write {rel!r} outside the restore's directory {tmp}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(dest, flags, 0o600)

    fd = await asyncio.to_thread(create)
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as f:
        async for chunk in repo.get_stream(key):
            digest.update(chunk)
            size += len(chunk)
            await asyncio.to_thread(f.write, chunk)
    if expected is not None and (digest.hexdigest() != expected.sha256 or size != expected.size):
        raise DumpError(
            f"{key}: the object is not what the dump's record says (sha256 {digest.hexdigest()[:16]}.., "
            f"size {size}; recorded {expected.sha256[:16]}.., size {expected.size}): refusing to use it"
        )


async def restore_dump(
    repo: Repository, scope: str, dump_id: str, req: RestoreRequest, progress: ProgressFn | None = None
) -> DumpRestoreResult:
    t0 = time.monotonic()
    check_conninfo(req.conninfo)
    rec = await _restorable_record(repo, scope, dump_id)
    db = _pick_database(rec, req.database)
    fmt = rec.dump_format
    if fmt == "plain" and (req.tables or req.jobs > 1):
        raise DumpError(
            "a plain-format dump is one SQL script: --table and --jobs need a custom or directory dump"
        )
    if req.globals and rec.globals_object is None:
        raise DumpError(f"dump {dump_id} was taken without globals")
    notes: list[str] = []
    target = with_dbname(req.conninfo, req.create_db) if req.create_db else req.conninfo
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="hakeeper-dump-restore-", dir=req.tmp_dir))
    created = False
    try:
        t_fetch = time.monotonic()
        if progress is not None:  # the phase begins before the first object arrives
            progress("fetch", 0, db.size)
        await _fetch_dump(repo, dump_prefix(scope, rec.id), rec, db, req, tmp, progress)
        t_fetched = time.monotonic()
        fetched = db.size + (rec.globals_object.size if req.globals and rec.globals_object else 0)
        if progress is not None:  # the next phase, without a measure of its own until it ends
            progress("restore", 0, None)
        if fmt == "directory":
            archive = tmp / db.key / "dir"
        else:
            archive = tmp / db.key / FILE_NAMES[fmt]
        if req.globals:
            notes.extend(await _restore_globals(req, tmp / GLOBALS_NAME))
        if req.create_db:
            await _create_database(req, req.create_db)
            created = True
        entries: int | None = None
        if fmt == "plain":
            psql: list[str | Path] = [
                req.bin_dir / "psql",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                target,
                "-f",
                archive,
                "--no-password",
            ]
            await _tool(psql, req.password, "psql (plain dump)")
        else:
            entries = await _pg_restore(req, rec, db, archive, target, tmp, notes)
    except BaseException:
        if created and req.create_db:
            notes.append(f"database {req.create_db!r} was created and left as it is")
        raise
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)
    log.info("dump_restored", id=rec.id, database=db.name, target=_where(target), tables=list(req.tables))
    if progress is not None:
        progress("restore", db.size, db.size)
    phases = collect(
        fetch=phase(t_fetched - t_fetch, fetched),
        restore=phase(time.monotonic() - t_fetched, db.size),  # globals, psql or pg_restore
    )
    return DumpRestoreResult(
        rec.id,
        repo.name,
        db.name,
        _where(target),
        fmt,
        created,
        list(req.tables),
        entries,
        time.monotonic() - t0,
        notes,
        phases,
    )


async def _restorable_record(repo: Repository, scope: str, dump_id: str) -> DumpRecord:
    """The record of a complete dump, or why it cannot be restored."""
    try:
        rec = await read_record(repo, scope, dump_id)
    except NotFound:
        raise DumpError(f"{repo.name}: no dump {dump_id!r}") from None
    except ValueError as e:
        raise DumpError(str(e)) from None
    if not rec.usable():
        raise DumpError(
            f"dump {dump_id} is {rec.effective_status(catalog.utcnow())}"
            + (f" ({rec.error})" if rec.error else "")
            + "; only complete dumps can be restored"
        )
    return rec


async def _fetch_dump(
    repo: Repository,
    prefix: str,
    rec: DumpRecord,
    db: DumpedDatabase,
    req: RestoreRequest,
    tmp: Path,
    progress: ProgressFn | None,
) -> None:
    """Download the objects of database ``db`` (and the globals when asked) into ``tmp``, four
    at a time."""
    sem = asyncio.Semaphore(4)
    done = 0

    async def get(rel: str, o: StoredObject) -> None:
        nonlocal done
        async with sem:
            await _fetch(repo, prefix + rel, tmp, rel, o)
        done += o.size
        if progress is not None:
            progress("fetch", done, db.size)

    # Every object is checked against its recorded SHA-256 before anything runs it: globals.sql
    # and a plain dump.sql are replayed by psql, whose meta-commands can run shell commands.
    fetches = [get(f"{db.key}/{o.name}", o) for o in db.objects]
    if req.globals and rec.globals_object is not None:
        fetches.append(get(GLOBALS_NAME, rec.globals_object))
    await all_or_first_error(fetches)


async def _create_database(req: RestoreRequest, name: str) -> None:
    """``CREATE DATABASE name``, refused when it exists already."""
    exists = await sql(
        req.conninfo,
        req.password,
        psql_sql.SQL("SELECT 1 FROM pg_database WHERE datname = {}").format(psql_sql.Literal(name)),
    )
    if exists:
        raise DumpError(f"database {name!r} exists already on {_where(req.conninfo)}")
    await sql(
        req.conninfo,
        req.password,
        psql_sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(psql_sql.Identifier(name)),
    )


async def _pg_restore(
    req: RestoreRequest,
    rec: DumpRecord,
    db: DumpedDatabase,
    archive: Path,
    target: str,
    tmp: Path,
    notes: list[str],
) -> int:
    """Restore a custom or directory dump (all of it, or the tables asked for); the number of
    entries of its table of contents restored."""
    argv: list[str | Path] = [
        req.bin_dir / "pg_restore",
        "-d",
        target,
        "--exit-on-error",
        "--no-password",
    ]
    if req.jobs > 1:
        argv += ["-j", str(req.jobs)]
    if req.no_owner:
        argv.append("--no-owner")
    toc = parse_toc(await _tool([req.bin_dir / "pg_restore", "-l", archive], None, "pg_restore -l"))
    entries = len(toc)
    if req.tables:
        entries = await _select_tables(req, archive, toc, tmp, argv, notes)
        found = {e.tag for e in toc if e.desc == "TABLE"}
        absent = [t for t in req.tables if split_table(t)[1] not in found]
        if absent:
            raise DumpError(f"dump {rec.id} has no table {', '.join(map(repr, absent))} in {db.name!r}")
    argv.append(archive)
    await _tool(argv, req.password, "pg_restore")
    return entries


async def _select_tables(
    req: RestoreRequest,
    archive: Path,
    toc: list[TocEntry],
    tmp: Path,
    argv: list[str | Path],
    notes: list[str],
) -> int:
    """Add to pg_restore's ``argv`` what restores only the tables asked for (with what they need
    when ``with_related``); the number of entries that restores."""
    if req.with_related:
        schema_sql = await _tool(
            [req.bin_dir / "pg_restore", "-s", "-f", "-", archive], None, "pg_restore -s"
        )
        chosen = related_entries(toc, schema_sql, req.tables)
        listfile = tmp / "restore.list"
        listfile.write_text("".join(e.line + "\n" for e in chosen))
        argv += ["-L", listfile]
        return len(chosen)
    for t in req.tables:
        argv += ["-t", split_table(t)[1]]
        if split_table(t)[0]:
            argv += ["-n", str(split_table(t)[0])]
    notes.append(TABLE_ONLY_NOTE)
    return sum(
        1
        for e in toc
        if e.desc in ("TABLE", "TABLE DATA")
        and any(e.tag == split_table(t)[1] and split_table(t)[0] in (None, e.schema) for t in req.tables)
    )


# The only psql meta-commands pg_dumpall --globals-only writes (\restrict/\unrestrict since the
# 2025 minor releases).  Any other backslash in globals.sql -- \! runs a shell command as the
# user running the restore, often root -- refuses the file before psql sees it.
_GLOBALS_META = re.compile(r"\\(?:connect|restrict|unrestrict)(?: [^\\]*)?")


def check_globals(text: str) -> None:
    """DumpError if globals.sql holds a backslash anywhere but in the meta-commands above."""
    for n, line in enumerate(text.splitlines(), 1):
        if "\\" in line and not _GLOBALS_META.fullmatch(line):
            raise DumpError(
                f"{GLOBALS_NAME} line {n} holds a psql meta-command or a backslash pg_dumpall does "
                f"not write ({line[:80]!r}): refusing to run it"
            )


async def _restore_globals(req: RestoreRequest, path: Path) -> list[str]:
    """Apply globals.sql; roles that exist already are errors psql reports and passes over
    (so no ON_ERROR_STOP here: ``CREATE ROLE postgres`` fails on every target).  The file was
    checked against its recorded SHA-256 when fetched and is checked for meta-commands here."""
    check_globals(await asyncio.to_thread(path.read_text))
    argv: list[str | Path] = [
        req.bin_dir / "psql",
        "-X",
        "-q",
        "-d",
        req.conninfo,
        "-f",
        path,
        "--no-password",
    ]
    res = await run(argv, run_as=RunAs(), env=_env(req.password), timeout=None, check=False)
    errors = [ln for ln in res.stderr.splitlines() if "ERROR:" in ln]
    if res.returncode != 0:
        raise DumpError(f"psql (globals) failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    if errors:
        return [
            f"globals: {len(errors)} statements failed (usually roles that exist already): "
            + errors[0].strip()
        ]
    return []


# ============================================================================ retention


@dataclass
class ExpiredDump:
    id: str
    status: str
    reason: str
    objects: list[str]
    stored_size: int


@dataclass
class DumpExpirePlan:
    repository: str
    dry_run: bool = False
    dumps: list[ExpiredDump] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "repository": self.repository,
            "dry_run": self.dry_run,
            "dumps": [
                {
                    "id": d.id,
                    "status": d.status,
                    "reason": d.reason,
                    "objects": d.objects,
                    "stored_size": d.stored_size,
                }
                for d in self.dumps
            ],
            "kept": self.kept,
            "running": self.running,
            "notes": self.notes,
        }


def keep_dumps(
    done: list[DumpRecord], count: int | None, days: float | None, now: dt.datetime
) -> tuple[set[str], dict[str, str]]:
    """Complete dumps to keep, per group of what was dumped and by which schedule
    (:meth:`DumpRecord.retention_group`; ``done`` newest first): the newest ``count``, and every
    one younger than ``days``; the newest of each group always.  Neither rule: every complete
    dump is kept."""
    if count is None and days is None:
        return {d.id for d in done}, {}
    keep: set[str] = set()
    why: dict[str, str] = {}
    groups: dict[str, list[DumpRecord]] = {}
    for d in done:
        groups.setdefault(d.retention_group(), []).append(d)
    for members in groups.values():
        keep.add(members[0].id)  # never the newest, so never the only one
        if count is not None:
            keep |= {d.id for d in members[:count]}
        if days is not None:
            cutoff = now - dt.timedelta(days=days)
            keep |= {d.id for d in members if d.stop_time is not None and d.stop_time >= cutoff}
        for i, d in enumerate(members):
            if d.id in keep:
                continue
            parts = []
            if count is not None:
                parts.append(f"not among the newest {count} of {d.retention_group()} (number {i + 1})")
            if days is not None:
                parts.append(f"older than {days:g} days")
            why[d.id] = "; ".join(parts)
    return keep, why


def plan_dump_expire(
    cat: DumpCatalog,
    scope: str,
    count: int | None = None,
    days: float | None = None,
    now: dt.datetime | None = None,
    schedule: str | None = None,
) -> DumpExpirePlan:
    """What :func:`expire_dumps` removes.  With ``schedule``, only that schedule's dumps are
    looked at (kept, expired, failed or abandoned); objects without a record are left alone."""
    now = now or catalog.utcnow()
    plan = DumpExpirePlan(cat.repository)
    records = cat.records if schedule is None else [d for d in cat.records if d.schedule == schedule]
    done = [d for d in cat.complete() if d in records]
    keep, why = keep_dumps(done, count, days, now)
    plan.kept = [d.id for d in done if d.id in keep]

    def objects_of(did: str) -> list[str]:
        names = [e.name for e in cat.objects.get(did, [])]
        rec = record_key(scope, did)
        return ([rec] if rec in names else []) + sorted(n for n in names if n != rec)

    def stored(did: str) -> int:
        return sum(e.stored_size for e in cat.objects.get(did, []))

    for d in records:
        if d.id in keep:
            continue
        if d.status is DumpStatus.RUNNING and not d.abandoned(now):
            plan.running.append(d.id)
            continue
        if d.usable():
            reason = why.get(d.id, "retention")
        elif d.abandoned(now):
            reason = f"abandoned: running, but not updated since {timefmt.iso(d.updated_at)}"
        else:
            reason = f"failed: {d.error or 'unknown error'}"
        plan.dumps.append(ExpiredDump(d.id, d.effective_status(now), reason, objects_of(d.id), stored(d.id)))
    for did, entries in sorted(cat.orphans.items()):
        if schedule is not None:
            plan.notes.append(f"{did}: objects without a record: left to an expire of every dump")
        elif now - max(e.modified for e in entries) > ORPHAN_AFTER:
            plan.dumps.append(
                ExpiredDump(did, "orphan", f"objects without a {RECORD_NAME}", objects_of(did), stored(did))
            )
        else:
            plan.notes.append(f"{did}: objects without a record, newer than an hour: left alone")
    plan.notes.extend(cat.problems)
    return plan


async def expire_dumps(
    repo: Repository,
    scope: str,
    count: int | None = None,
    days: float | None = None,
    dry_run: bool = False,
    *,
    schedule: str | None = None,
) -> DumpExpirePlan:
    """Remove the dumps of ``scope`` in ``repo`` that retention no longer keeps (see
    :func:`keep_dumps`), failed and abandoned ones, and old objects without a record.  Never a
    running dump, never the newest complete one of what it dumped (per schedule).

    ``schedule`` selects: only the dumps that schedule took are considered, so the retention of
    one schedule (a daily dump kept 30 days) never removes another's (a monthly export kept a
    year) or a manual dump.  Without it every dump of ``scope`` is, as before."""
    if count is not None and count < 1:
        raise ValueError("count must be at least 1")
    if days is not None and days <= 0:
        raise ValueError("days must be positive")
    plan = plan_dump_expire(await load_dumps(repo, scope), scope, count, days, schedule=schedule)
    plan.dry_run = dry_run
    if dry_run:
        return plan
    for d in plan.dumps:
        for name in d.objects:  # the record first: from then on the dump is not usable
            await repo.delete(name)
        log.info("dump_expired", repo=repo.name, id=d.id, reason=d.reason, objects=len(d.objects))
    return plan
