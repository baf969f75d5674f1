"""Which cluster a repository's ``<scope>/`` belongs to: the binding object
``<scope>/hakeeper-cluster.json`` (pgBackRest calls the equivalent a stanza).

A cluster re-created under the same scope (new ``initdb``, new system identifier) starts its WAL
again at ``000000010000000000000001``..: every name it archives already exists in the repository
with the old cluster's content, so every push would be a :class:`ContentConflict`, nothing would
be archived and pg_wal would grow.  The binding records the system identifier of the cluster
that owns ``<scope>/`` in that repository; the archiver and ``backup create`` check it before
their first write and refuse a repository bound to another system identifier, with a reason
that says what to do, instead of jamming.

The object is written by ``hakeeper repo create`` (an exclusive create: of two concurrent
writers exactly one wins), or, for a repository that has none (made before bindings existed, or
never set up), by the first primary that archives into it: *bind on first use*.  It is not
overwritten by a re-created cluster: rebinding to an unrelated cluster is an operator's decision
(move or delete ``<scope>/`` and run ``repo create`` again).

The one exception is a major-version upgrade (``hakeeper upgrade``): ``pg_upgrade`` makes a new
cluster (a new system identifier) of the old one's data, and :func:`rebind_after_upgrade` moves
the binding to it, the old cluster appended to the binding's ``history`` (its system identifier,
major, end time and final checkpoint LSN).  The old cluster's backups stay in ``<scope>/`` and
restorable up to that end (:mod:`hakeeper.backup.lineage`); both clusters' WAL share
``<scope>/wal/`` (the new cluster starts on the old final timeline + 1, so no name collides).

A ``<scope>/`` without a binding that already holds WAL or backups (a repository from before
bindings existed) is bound only if what it holds is this cluster's: the system identifier in the
long page header of its newest archived segment, and those of its backup records, must match.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import struct
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from hakeeper.backup import layout
from hakeeper.backup.catalog import load_catalog
from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.lineage import BINDING_NAME, ClusterEra, Lineage, LineageError, parse_binding_doc
from hakeeper.backup.repo import FilesystemRepository, Repository
from hakeeper.backup.repos import make_repository
from hakeeper.core.backup_config import RepositoryConfig
from hakeeper.core.cluster import Succession
from hakeeper.core.lsn import format_lsn
from hakeeper.core.timefmt import iso
from hakeeper.util.log import get_logger

log = get_logger(__name__)

# Format 1 still: ``history`` is an added key, which readers of the first version ignore (they
# read system_identifier only), and an object without it is a binding without upgrades.
BINDING_FORMAT = 1
__all__ = ["BINDING_FORMAT", "BINDING_NAME", "Binding", "BindingMismatch", "ClusterEra"]


def binding_key(scope: str) -> str:
    return f"{scope}/{BINDING_NAME}"


class BindingMismatch(RepoError):
    """The repository's ``<scope>/`` belongs to a cluster with another system identifier."""

    def __init__(self, repo: str, scope: str, bound: str, ours: str, evidence: str = "") -> None:
        self.repo = repo
        self.scope = scope
        self.bound = bound
        self.ours = ours
        super().__init__(
            f"repository {repo}: {scope}/ belongs to the cluster with system identifier {bound}"
            f"{evidence}, "
            f"not this one ({ours}): a cluster re-created under the same scope needs a new repository "
            f"(or prefix), or the old {scope}/ moved away and `hakeeper repo create` run again"
        )


@dataclass(frozen=True, slots=True)
class Binding:
    scope: str
    system_identifier: str
    created_at: str
    created_by: str  # "repo create", "archiver <node>", or "upgrade <node>": who bound it
    history: tuple[ClusterEra, ...] = ()  # earlier clusters of the scope, oldest first

    def lineage(self) -> Lineage:
        return Lineage(self.system_identifier, self.history)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": BINDING_FORMAT,
            "scope": self.scope,
            "system_identifier": self.system_identifier,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }
        if self.history:
            doc["history"] = [e.to_doc() for e in self.history]
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, raw: bytes, repo: str, scope: str) -> Binding:
        """The binding object (from a repository: untrusted); CorruptObject naming what is wrong."""
        try:
            doc, current, history = parse_binding_doc(raw)
            return cls(
                scope=str(doc["scope"]),
                system_identifier=current,
                created_at=str(doc.get("created_at") or ""),
                created_by=str(doc.get("created_by") or ""),
                history=history,
            )
        except (LineageError, KeyError, TypeError) as e:
            raise CorruptObject(f"{repo}: {binding_key(scope)}", f"unreadable binding: {e}") from None


async def read_binding(repo: Repository, scope: str) -> Binding | None:
    """The binding of ``scope`` in ``repo``, None if it has none (RepoError if unreadable)."""
    try:
        raw = await repo.get(binding_key(scope))
    except NotFound:
        return None
    return Binding.parse(raw, repo.name, scope)


_XLP_LONG_HEADER = 0x0002


def wal_system_identifier(head: bytes) -> str | None:
    """The system identifier in the long page header that starts every WAL segment (None if
    ``head`` does not start with one): xlp_magic, xlp_info, xlp_tli, xlp_pageaddr, xlp_rem_len,
    padding, then xlp_sysid, xlp_seg_size, xlp_xlog_blcksz (little-endian, as written on x86/ARM)."""
    if len(head) < 40:
        return None
    magic, info = struct.unpack_from("<HH", head, 0)
    sysid, seg_size, blcksz = struct.unpack_from("<QII", head, 24)
    plausible = (
        magic & 0xFF00 == 0xD100  # XLOG_PAGE_MAGIC of PostgreSQL 10 .. 17
        and info & _XLP_LONG_HEADER
        and seg_size & (seg_size - 1) == 0
        and 1 << 20 <= seg_size <= 1 << 30
        and blcksz in (1024, 2048, 4096, 8192, 16384, 32768)
    )
    return str(sysid) if plausible and sysid else None


async def found_system_identifier(repo: Repository, scope: str) -> tuple[str, str] | None:
    """(system identifier, where it was read) of what ``<scope>/`` already holds: its newest
    archived segment, else its newest backup record; None if it holds neither."""
    segments = []
    for e in await repo.list_objects(layout.wal_prefix(scope)):
        parsed = layout.parse_segment_name(e.name.rpartition("/")[2])
        if parsed is not None:
            segments.append((parsed[1], parsed[0], e.name))
    if segments:
        name = max(segments)[2]
        head = b""
        async with aclosing(repo.get_stream(name)) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                head += chunk
                if len(head) >= 40:
                    break
        found = wal_system_identifier(head)
        if found is not None:
            return found, f"the newest archived segment {name.rpartition('/')[2]}"
    records = [
        r for r in (await load_catalog(repo, scope, wal=False, lineage=False)).records if r.system_identifier
    ]
    if records:
        return str(records[-1].system_identifier), f"backup {records[-1].id}"
    return None


async def bind(
    repo: Repository, scope: str, system_identifier: str, by: str, now: float
) -> tuple[Binding, bool]:
    """Bind ``scope`` in ``repo`` to ``system_identifier`` unless it is bound already: the
    binding and whether this call wrote it.  :class:`BindingMismatch` if it is bound to another
    system identifier (logged with the reason)."""
    # The key first: with the wrong key the binding object cannot be read, and the marker's
    # refusal says what is wrong ("encrypted with another key") where the object's would not.
    await repo.check_marker()
    for _ in range(3):
        found = await read_binding(repo, scope)
        if found is None:
            prior = await found_system_identifier(repo, scope)
            if prior is not None and prior[0] != system_identifier:
                e = BindingMismatch(repo.name, scope, prior[0], system_identifier, f" (from {prior[1]})")
                log.error(
                    "repository_binding_refused",
                    repo=repo.name,
                    scope=scope,
                    bound_to=prior[0],
                    ours=system_identifier,
                    reason=str(e),
                )
                raise e
            new = Binding(scope, system_identifier, iso(now) or "", by)
            if await repo.create(binding_key(scope), new.to_json()):
                log.info(
                    "repository_bound",
                    repo=repo.name,
                    scope=scope,
                    system_identifier=system_identifier,
                    by=by,
                )
                return new, True
            continue  # written by someone else meanwhile: compare with theirs
        if found.system_identifier != system_identifier:
            era = found.lineage().era_of(system_identifier)
            evidence = (
                f" (the cluster {system_identifier} was upgraded to PostgreSQL {era.upgraded_to_major} "
                f"at {era.end_text()}; its old-major server must not run any more)"
                if era is not None
                else ""
            )
            e = BindingMismatch(repo.name, scope, found.system_identifier, system_identifier, evidence)
            log.error(
                "repository_binding_refused",
                repo=repo.name,
                scope=scope,
                bound_to=found.system_identifier,
                ours=system_identifier,
                reason=str(e),
            )
            raise e
        return found, False
    raise RepoError(f"{repo.name}: {binding_key(scope)}: appears and disappears; giving up")


async def _last_timeline(repo: Repository, scope: str) -> int | None:
    """The newest timeline archived in ``<scope>/wal/`` (a segment or a history file)."""
    tlis: set[int] = set()
    for e in await repo.list_objects(layout.wal_prefix(scope)):
        name = e.name.rpartition("/")[2]
        seg = layout.parse_segment_name(name[:24]) if len(name) >= 24 else None
        tli = seg[0] if seg is not None else layout.parse_history_name(name)
        if tli is not None:
            tlis.add(tli)
    return max(tlis, default=None)


def _refuse_rebind(repo: Repository, scope: str, bound: str, new: str, old: str, evidence: str = "") -> None:
    e = BindingMismatch(repo.name, scope, bound, new, evidence)
    log.error(
        "repository_rebind_refused",
        repo=repo.name,
        scope=scope,
        bound_to=bound,
        old_system_identifier=old,
        new_system_identifier=new,
        reason=f"{scope}/ belongs neither to the upgraded cluster {old} nor to its successor {new}: {e}",
    )
    raise e


async def rebind_after_upgrade(
    repo: Repository,
    scope: str,
    succession: Succession,
    *,
    by: str,
) -> Binding:
    """Move ``scope``'s binding in ``repo`` from the cluster ``pg_upgrade`` replaced to the one
    it made, the old one appended to the binding's history (its end: ``upgraded_at`` and
    ``old_end_lsn``, its final checkpoint; ``old_timeline``: its last timeline, read from the
    archive when not given -- the new cluster has archived nothing yet).

    Idempotent: bound to the new cluster with that history entry already, the binding is
    returned as it is.  Bound to the old cluster: rewritten.  Unbound: bound to the new cluster
    (with the history entry) unless ``<scope>/`` holds another cluster's WAL or backups.  Bound
    to any other cluster: :class:`BindingMismatch` (logged with the reason)."""
    old, new = succession.old_system_identifier, succession.new_system_identifier
    old_major, new_major = succession.old_major, succession.new_major
    upgraded_at, old_end_lsn, old_timeline = (
        succession.upgraded_at,
        succession.old_end_lsn,
        succession.old_timeline,
    )
    if old == new:
        raise ValueError(f"old and new system identifier are the same ({old}): pg_upgrade makes a new one")
    await repo.check_marker()  # the key first, as bind() does
    for _ in range(3):
        found = await read_binding(repo, scope)
        if found is not None and found.system_identifier == new and found.lineage().era_of(old) is not None:
            return found  # done before (a retried upgrade step)
        if found is None:
            prior = await found_system_identifier(repo, scope)
            if prior is not None and prior[0] not in (old, new):
                _refuse_rebind(repo, scope, prior[0], new, old, f" (from {prior[1]})")
        elif found.system_identifier not in (old, new):
            _refuse_rebind(repo, scope, found.system_identifier, new, old)
        tli = old_timeline if old_timeline is not None else await _last_timeline(repo, scope)
        era = ClusterEra(
            system_identifier=old,
            pg_major=old_major,
            until=dt.datetime.fromtimestamp(upgraded_at, dt.UTC),
            until_lsn=old_end_lsn,
            upgraded_to_major=new_major,
            until_timeline=tli,
        )
        earlier = tuple(e for e in (found.history if found else ()) if e.system_identifier != new)
        binding = Binding(scope, new, iso(upgraded_at) or "", by, (*earlier, era))
        key = binding_key(scope)
        if found is None:
            # Nobody else may bind it meanwhile: an exclusive create, compared again if it lost.
            if not await repo.create(key, binding.to_json()):
                continue
        else:
            # No compare-and-swap in the repository API: an atomic overwrite (a rename on a
            # filesystem, one PUT on S3), then read back.  Nothing else writes a bound
            # binding: the old cluster is stopped, and bind() never overwrites.
            await repo.put(key, binding.to_json())
            back = await read_binding(repo, scope)
            if back is None or back.system_identifier != new or back.lineage().era_of(old) is None:
                continue
        log.info(
            "repository_rebound",
            repo=repo.name,
            scope=scope,
            old_system_identifier=old,
            new_system_identifier=new,
            old_major=old_major,
            new_major=new_major,
            until=iso(upgraded_at),
            until_lsn=None if old_end_lsn is None else format_lsn(old_end_lsn),
            until_timeline=tli,
            was_bound=found is not None,
            by=by,
        )
        return binding
    raise RepoError(f"{repo.name}: {binding_key(scope)}: changes while it is rebound; giving up")


@dataclass(frozen=True, slots=True)
class Rebound:
    """What :func:`rebind_all` did to one repository."""

    repository: str
    ok: bool
    binding: Binding | None
    error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "ok": self.ok,
            "system_identifier": self.binding.system_identifier if self.binding else None,
            "history": [e.to_doc() for e in self.binding.history] if self.binding else [],
            "error": self.error,
        }


async def rebind_all(
    repos: Sequence[Repository],
    scope: str,
    succession: Succession,
    *,
    by: str,
) -> list[Rebound]:
    """:func:`rebind_after_upgrade` on every repository at once; one result per repository (in
    the order given), a failure of one (down, foreign, wrong key) never stops the others."""

    async def one(repo: Repository) -> Rebound:
        try:
            b = await rebind_after_upgrade(repo, scope, succession, by=by)
        except Exception as e:
            text = str(e) or type(e).__name__
            log.error("repository_rebind_failed", repo=repo.name, scope=scope, reason=text)
            return Rebound(repo.name, False, None, text)
        return Rebound(repo.name, True, b, None)

    return list(await asyncio.gather(*(one(r) for r in repos)))


async def rebind_configured(
    configs: Sequence[RepositoryConfig],
    scope: str,
    succession: Succession,
    *,
    by: str,
) -> list[Rebound]:
    """:func:`rebind_all` over repository configurations (opened and closed here)."""
    repos: list[Repository] = []
    out: list[Rebound] = []
    try:
        for rc in configs:
            try:
                repos.append(make_repository(rc))
            except Exception as e:
                out.append(Rebound(rc.name, False, None, str(e) or type(e).__name__))
        out.extend(await rebind_all(repos, scope, succession, by=by))
    finally:
        for r in repos:
            await r.close()
    order = {rc.name: i for i, rc in enumerate(configs)}
    return sorted(out, key=lambda r: order.get(r.repository, len(order)))


@dataclass(frozen=True, slots=True)
class Created:
    """What ``hakeeper repo create`` did to one repository."""

    repository: str
    binding: Binding
    bound_now: bool  # False: it was bound to this cluster already (idempotent)
    root_created: bool  # fs: the directory did not exist
    owner: str | None  # fs, as root: the user the directory was given to
    marker_written: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "scope": self.binding.scope,
            "system_identifier": self.binding.system_identifier,
            "bound_at": self.binding.created_at,
            "bound_by": self.binding.created_by,
            "bound_now": self.bound_now,
            "root_created": self.root_created,
            "owner": self.owner,
            "marker_written": self.marker_written,
        }


def _own_root(repo: FilesystemRepository, owner: tuple[int, int]) -> str | None:
    """As root: give a root-owned repository directory to PostgreSQL's OS user (mode 0700), so
    that what the agent and PostgreSQL's restore_command write and read there is theirs (the
    repository gives new files the root directory's owner).  A directory owned by another user
    is left alone (someone chose that)."""
    if os.geteuid() != 0:
        return None
    st = os.stat(repo.root)
    if st.st_uid == 0:
        os.chown(repo.root, *owner)
        os.chmod(repo.root, 0o700)
        return f"{owner[0]}:{owner[1]}"
    if st.st_uid != owner[0]:
        log.warning(
            "repository_owner_kept",
            repo=repo.name,
            path=str(repo.root),
            owner_uid=st.st_uid,
            agent_uid=owner[0],
            reason="the directory belongs to another user; left as it is",
        )
    return f"{st.st_uid}:{st.st_gid}"


async def create_repository(
    repo: Repository, scope: str, system_identifier: str, *, owner: tuple[int, int] | None, now: float
) -> Created:
    """Set ``repo`` up for the cluster ``system_identifier`` of ``scope`` (``hakeeper repo
    create``): its root (directory, given to ``owner`` when run as root, or bucket), its marker,
    and the binding of ``<scope>/``.  Idempotent; :class:`BindingMismatch` if ``<scope>/`` there
    belongs to another cluster."""
    root_created = False
    given: str | None = None
    if isinstance(repo, FilesystemRepository):
        root_created = not repo.root.is_dir()
        await repo.initialize()
        if owner is not None:
            given = await asyncio.to_thread(_own_root, repo, owner)
    else:
        await repo.initialize()  # the bucket; the prefix needs no creating
    marker = await repo.ensure_marker()
    binding, bound_now = await bind(repo, scope, system_identifier, "repo create", now)
    log.info(
        "repository_created",
        repo=repo.name,
        scope=scope,
        system_identifier=system_identifier,
        bound_now=bound_now,
        root_created=root_created,
        owner=given,
    )
    return Created(repo.name, binding, bound_now, root_created, given, marker)
