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
never set up), by the first primary that archives into it: *bind on first use*.  It is never
overwritten: rebinding is an operator's decision (move or delete ``<scope>/`` and run
``repo create`` again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hakeeper.backup.errors import CorruptObject, NotFound, RepoError
from hakeeper.backup.repo import Repository
from hakeeper.core.timefmt import iso
from hakeeper.util.log import get_logger

log = get_logger(__name__)

BINDING_FORMAT = 1
BINDING_NAME = "hakeeper-cluster.json"


def binding_key(scope: str) -> str:
    return f"{scope}/{BINDING_NAME}"


class BindingMismatch(RepoError):
    """The repository's ``<scope>/`` belongs to a cluster with another system identifier."""

    def __init__(self, repo: str, scope: str, bound: str, ours: str) -> None:
        self.repo = repo
        self.scope = scope
        self.bound = bound
        self.ours = ours
        super().__init__(
            f"repository {repo}: {scope}/ belongs to the cluster with system identifier {bound}, "
            f"not this one ({ours}): a cluster re-created under the same scope needs a new repository "
            f"(or prefix), or the old {scope}/ moved away and `hakeeper repo create` run again"
        )


@dataclass(frozen=True, slots=True)
class Binding:
    scope: str
    system_identifier: str
    created_at: str
    created_by: str  # "repo create" or "archiver <node>": who bound it

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": BINDING_FORMAT,
            "scope": self.scope,
            "system_identifier": self.system_identifier,
            "created_at": self.created_at,
            "created_by": self.created_by,
        }
        return json.dumps(doc, sort_keys=True).encode() + b"\n"

    @classmethod
    def parse(cls, raw: bytes, repo: str, scope: str) -> Binding:
        try:
            doc = json.loads(raw)
            return cls(
                scope=str(doc["scope"]),
                system_identifier=str(doc["system_identifier"]),
                created_at=str(doc.get("created_at") or ""),
                created_by=str(doc.get("created_by") or ""),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptObject(f"{repo}: {binding_key(scope)}", f"unreadable binding: {e}") from None


async def read_binding(repo: Repository, scope: str) -> Binding | None:
    """The binding of ``scope`` in ``repo``, None if it has none (RepoError if unreadable)."""
    try:
        raw = await repo.get(binding_key(scope))
    except NotFound:
        return None
    return Binding.parse(raw, repo.name, scope)


async def bind(
    repo: Repository, scope: str, system_identifier: str, by: str, now: float
) -> tuple[Binding, bool]:
    """Bind ``scope`` in ``repo`` to ``system_identifier`` unless it is bound already: the
    binding and whether this call wrote it.  :class:`BindingMismatch` if it is bound to another
    system identifier (logged with the reason)."""
    for _ in range(3):
        found = await read_binding(repo, scope)
        if found is None:
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
            e = BindingMismatch(repo.name, scope, found.system_identifier, system_identifier)
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
