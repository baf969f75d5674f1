"""What changed between two node files, and whether a running agent may take it.

``hakeeper reload MEMBER`` and SIGHUP re-read the node file.  Every field of
:class:`~hakeeper.core.config.NodeConfig` has a decision in :data:`POLICY`: either the running
agent applies a new value (``RUNTIME``), or the field was used to build something at start
that cannot be rebuilt under a running PostgreSQL (``RESTART``): a reload that changes such a
field is refused as a whole, with the reason, and nothing of that file is applied.

The decisions are made per field, not per section, so that a field added to the configuration
without a decision here fails tests/unit/test_config_diff.py (which walks the model) instead of
being silently ignored or silently applied.  An entry covers its whole subtree only where the
subtree is one thing to the agent (a repository list, a TLS setting, a role's credentials).

Pure: no I/O.  Secret values never appear in what this module renders: a field holding a
secret anywhere below it is reported as "changed".
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, SecretStr

from hakeeper.core.config import NodeConfig


class Rule(StrEnum):
    RUNTIME = "runtime"  # a reload applies it
    RESTART = "restart"  # only an agent restart applies it: a reload changing it is refused


@dataclass(frozen=True, slots=True)
class Decision:
    rule: Rule
    why: str  # RESTART: why not at run time; RUNTIME: how it takes effect


def _rt(why: str) -> Decision:
    return Decision(Rule.RUNTIME, why)


def _restart(why: str) -> Decision:
    return Decision(Rule.RESTART, why)


_ETCD = "the etcd client, its session and the lease are built from it at start"
_API_SOCKET = "the API's listening socket and TLS context are set up at start"
_API_ADMISSION = "the API's connection limits are set up at start"
_PG_IDENTITY = "it names this node's PostgreSQL server, which a reload does not move"
_ROLE = (
    "the role's password in PostgreSQL and every member's connections use it: change it in "
    "PostgreSQL and every node file, then restart the agents one by one"
)
_AT_BOOTSTRAP = "read only when this node initializes a cluster"
_ARCHIVER = (
    "the WAL archiver and PostgreSQL's archive_command are built from it at start; PostgreSQL "
    "archives through them while the agent runs"
)

POLICY: dict[str, Decision] = {
    "scope": _restart("the cluster this agent belongs to (its etcd keys and lease)"),
    "namespace": _restart("the etcd prefix this agent's keys live under"),
    "name": _restart("this member's name (its etcd keys, slot and lease)"),
    "etcd.hosts": _restart(_ETCD),
    "etcd.request_timeout": _restart(_ETCD + " (the fence margin is checked against it)"),
    "etcd.cacert": _restart(_ETCD),
    "etcd.cert": _restart(_ETCD),
    "etcd.key": _restart(_ETCD),
    "etcd.username": _restart(_ETCD),
    "etcd.password": _restart(_ETCD),
    "api.listen": _restart(_API_SOCKET),
    "api.connect_address": _restart("others are told where the API is from it at start"),
    "api.username": _rt("the API checks the next request against it"),
    "api.password": _rt("the API checks the next request against it"),
    "api.token": _rt("the API checks the next request against it"),
    "api.allowlist": _rt("the API checks the next request against it"),
    "api.certfile": _restart(_API_SOCKET),
    "api.keyfile": _restart(_API_SOCKET),
    "api.cafile": _restart(_API_SOCKET),
    "api.verify_client": _restart(_API_SOCKET),
    "api.max_connections": _restart(_API_ADMISSION),
    "api.max_connections_per_client": _restart(_API_ADMISSION),
    "api.health_reserve": _restart(_API_ADMISSION),
    "api.health_reserve_allowlist": _restart(_API_ADMISSION),
    "api.request_timeout": _rt("the next request's deadline"),
    "api.client": _rt("read by the CLI only"),
    "postgresql.data_dir": _restart(_PG_IDENTITY),
    "postgresql.bin_dir": _restart("the PostgreSQL programs the agent runs are found at start"),
    "postgresql.bin_dirs": _restart("the binaries of each major are looked up at start (and by an upgrade)"),
    "postgresql.listen": _restart(_PG_IDENTITY),
    "postgresql.connect_address": _restart(_PG_IDENTITY + " (other members connect there)"),
    "postgresql.superuser": _restart(_ROLE),
    "postgresql.replication": _restart(_ROLE),
    "postgresql.parameters": _rt(
        "written to postgresql.conf and reloaded; a parameter that needs a restart becomes "
        "pending_restart (hakeeper restart applies it)"
    ),
    "postgresql.pg_hba": _rt("written to pg_hba.conf and reloaded"),
    "postgresql.os_user": _restart("PostgreSQL runs as this user; it is not switched under a running server"),
    "postgresql.tls": _restart(
        "the certificate copies and every member connection's TLS are set up at start"
    ),
    "postgresql.use_pg_rewind": _rt("used at the next rejoin"),
    "postgresql.remove_data_directory_on_rewind_failure": _rt("used at the next rejoin"),
    "tags.nofailover": _rt("published in the member record at once; the next failover obeys it"),
    "tags.failover_priority": _rt("published in the member record at once; the next failover obeys it"),
    "tags.noloadbalance": _rt("published at once; health checks use it"),
    "tags.nosync": _rt("published at once; the next choice of synchronous standbys obeys it"),
    "tags.sync_priority": _rt("published at once; the next choice of synchronous standbys obeys it"),
    "log.format": _rt("the next log line"),
    "log.level": _rt("the next log line"),
    "bootstrap.dcs": _restart(
        "the lease's ttl, keepalive and fence margin are taken from it at start "
        "(the cluster's own settings change with `hakeeper edit-config`)"
    ),
    "bootstrap.initdb": _rt(_AT_BOOTSTRAP),
    "bootstrap.from_backup": _rt(_AT_BOOTSTRAP),
    "backup.repositories": _restart(_ARCHIVER),
    "backup.archive": _restart(_ARCHIVER),
    "backup.row_counts": _rt("read by the next backup"),
    "backup.compress_on": _rt("read by the next backup"),
    "backup.verify": _rt("read by the next restore drill"),
    "backup.replica_from_backup": _rt("read at the next clone"),
    "backup.replica_from_backup_max_wal": _rt("read at the next clone"),
    "backup.schedules": _rt("the scheduler plans its next slots from it (a running job finishes)"),
    "backup.heartbeat_interval": _rt("the heartbeat restarts with it"),
}


def _model_type(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field typed ``Model`` or ``Model | None`` (else None)."""
    candidates = [annotation]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        candidates = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(candidates) == 1 and isinstance(candidates[0], type) and issubclass(candidates[0], BaseModel):
        return candidates[0]
    return None


def unclassified(model: type[BaseModel] = NodeConfig, prefix: str = "") -> Iterator[str]:
    """Fields of ``model`` (recursively) that :data:`POLICY` makes no decision for."""
    for name, info in model.model_fields.items():
        path = prefix + name
        if path in POLICY:
            continue
        sub = _model_type(info.annotation)
        if sub is None:
            yield path
        else:
            yield from unclassified(sub, path + ".")


@dataclass(frozen=True, slots=True)
class Change:
    field: str
    rule: Rule
    why: str
    old: str  # rendered; "(secret)" stands for a secret value
    new: str

    def describe(self) -> str:
        if self.old == self.new:  # secrets, or long values rendered alike
            return f"{self.field} changed"
        return f"{self.field} {self.old} -> {self.new}"


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    changes: tuple[Change, ...]

    @property
    def refused(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.rule == Rule.RESTART)

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(c.field for c in self.changes)

    def touches(self, prefix: str) -> bool:
        return any(f == prefix or f.startswith(prefix + ".") for f in self.fields)

    def summary(self) -> str:
        return "; ".join(c.describe() for c in self.changes) or "no change"

    def refusal(self) -> str:
        return "; ".join(f"{c.field} cannot change at run time: {c.why}" for c in self.refused)


_MAX_SHOWN = 60


def _has_secret(value: Any) -> bool:
    if isinstance(value, SecretStr):
        return True
    if isinstance(value, BaseModel):
        return any(_has_secret(getattr(value, n)) for n in type(value).model_fields)
    if isinstance(value, Mapping):
        return any(_has_secret(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_secret(v) for v in value)
    return False


def render(value: Any) -> str:
    """A short text for a configuration value; never a secret's value."""
    if _has_secret(value):
        return "(secret)"
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return f"({type(value).__name__})"
    if isinstance(value, list | tuple):
        text = "[" + ", ".join(render(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _get(cfg: BaseModel, path: str) -> Any:
    value: Any = cfg
    for part in path.split("."):
        if value is None:
            return None
        value = getattr(value, part)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, SecretStr) and isinstance(b, SecretStr):
        return a.get_secret_value() == b.get_secret_value()
    return bool(a == b)


def _field_changes(path: str, decision: Decision, old: Any, new: Any) -> Iterator[Change]:
    if isinstance(old, Mapping) and isinstance(new, Mapping) and not _has_secret(old) | _has_secret(new):
        # a dict of settings (postgresql.parameters): one change per key, so the answer says
        # which parameter changed
        for key in sorted(set(old) | set(new), key=str):
            if key not in old or key not in new or not _same(old[key], new[key]):
                yield Change(
                    f"{path}.{key}", decision.rule, decision.why, render(old.get(key)), render(new.get(key))
                )
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) != len(new):
        yield Change(path, decision.rule, decision.why, f"{len(old)} entries", f"{len(new)} entries")
        return
    yield Change(path, decision.rule, decision.why, render(old), render(new))


def diff(old: NodeConfig, new: NodeConfig) -> ConfigDiff:
    """Every field whose value differs, in :data:`POLICY` order."""
    out: list[Change] = []
    for path, decision in POLICY.items():
        a, b = _get(old, path), _get(new, path)
        if not _same(a, b):
            out.extend(_field_changes(path, decision, a, b))
    return ConfigDiff(tuple(out))
