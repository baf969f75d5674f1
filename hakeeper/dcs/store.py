"""The one place that knows how hakeeper talks to etcd about a cluster.

Every read and write of the cluster's keys (:mod:`hakeeper.core.keys`) is a named operation of
:class:`ClusterStore`, so each etcd transaction is written once, with the invariant its guard
protects next to it.  The guards, in one paragraph:

* the leader key is created with ``create_revision == 0`` (nobody holds it) and carries the
  leader's lease; its create revision is the **term**, the fencing token.  A key deleted and
  created again gets a new create revision, so a compare on the term fails for a leader that
  lost the key even if the same member took it back later;
* every leader-only write (status, sync set, history, switchover bookkeeping, a schedule claim)
  is a transaction that compares the leader key's create revision with the writer's term:
  a deposed leader's write is refused by etcd, whatever its local clock believes;
* shared records that several writers update (history, config, the switchover request, a
  schedule record) are compare-and-swap on their own ``mod_revision``: nobody's update is lost.

Operations raise :class:`~hakeeper.dcs.etcd.EtcdError` when etcd cannot be reached; a refused
guard is an ordinary answer (``False`` or ``None``), never an exception.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from hakeeper.core.cluster import (
    ClusterView,
    HistoryEntry,
    Member,
    Status,
    Switchover,
    SyncState,
    Upgrade,
    build_view,
    parse_history_strict,
)
from hakeeper.core.config import DynamicConfig
from hakeeper.core.keys import Keys
from hakeeper.core.records import InvalidRecord
from hakeeper.dcs.etcd import KV, TxnResult, cmp_create, cmp_lease, cmp_mod, cmp_value, op_delete, op_put
from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from hakeeper.dcs.etcd import EtcdClient

__all__ = ["ClusterStore", "EtcdLike"]

log = get_logger(__name__)


class EtcdLike(Protocol):
    """What the store and its users need of etcd: the subset of
    :class:`~hakeeper.dcs.etcd.EtcdClient` they call, with its signatures.

    ``tests/support/fake_etcd.FakeEtcd`` implements it in memory; ``tests/support/etcd_contract``
    holds the cases both must pass, so the fake cannot drift from etcd."""

    async def get(self, key: str, *, timeout: float | None = None) -> KV | None: ...

    async def get_prefix(self, prefix: str, *, timeout: float | None = None) -> tuple[list[KV], int]: ...

    async def put(
        self, key: str, value: bytes | str, *, lease: int = 0, timeout: float | None = None
    ) -> int: ...

    async def delete(self, key: str, *, prefix: bool = False, timeout: float | None = None) -> int: ...

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
        *,
        timeout: float | None = None,
    ) -> TxnResult: ...

    async def lease_grant(self, ttl: int, *, timeout: float | None = None) -> int: ...

    async def lease_keepalive(self, lease_id: int, *, timeout: float | None = None) -> int: ...

    async def lease_revoke(self, lease_id: int, *, timeout: float | None = None) -> None: ...

    async def lease_time_to_live(self, lease_id: int, *, timeout: float | None = None) -> int: ...


if TYPE_CHECKING:

    def _etcd_client_is_etcd_like(client: EtcdClient) -> EtcdLike:
        return client  # mypy proves the real client satisfies the protocol


@dataclass(frozen=True, slots=True)
class ClusterStore:
    """Named, guarded operations on the keys of one cluster (``keys``) through ``client``."""

    client: EtcdLike
    keys: Keys

    # -- reading ----------------------------------------------------------------------------------

    def view_of(
        self,
        kvs: Mapping[str, KV],
        revision: int,
        fallback: DynamicConfig,
        fallback_source: str = "the local bootstrap values",
    ) -> ClusterView:
        """The view of the cluster's keys ``kvs`` (full key -> KV, e.g. a mirror's dict) read at
        ``revision``; ``fallback`` is the configuration while the config key is absent or invalid
        (``fallback_source`` names it in ``config_error``).  Pure: no etcd call."""
        raw = {k: (kv.value, kv.create_revision, kv.mod_revision, kv.lease) for k, kv in kvs.items()}
        return build_view(self.keys, raw, revision, fallback, fallback_source)

    async def read_keys(self) -> tuple[dict[str, KV], int]:
        """Every key of the cluster and the revision they were read at (one linearizable range
        read, so the keys are mutually consistent)."""
        kvs, revision = await self.client.get_prefix(self.keys.all)
        return {kv.key: kv for kv in kvs}, revision

    async def read_view(self, fallback: DynamicConfig | None = None) -> ClusterView:
        """A fresh view from one linearizable range read of every key of the cluster (a one-off
        reader has no last valid config: an invalid one reads as ``fallback`` or the defaults)."""
        kvs, revision = await self.read_keys()
        if fallback is None:
            source = "the built-in defaults here (the agents keep the last valid config they saw)"
            return self.view_of(kvs, revision, DynamicConfig(), source)
        return self.view_of(kvs, revision, fallback, "the given fallback")

    async def leader_term(self) -> int | None:
        """The term of the current leader (its key's create revision), None without a leader."""
        kv = await self.client.get(self.keys.leader)
        return kv.create_revision if kv is not None else None

    async def leader_member(self) -> Member | None:
        """The member record of whoever holds the leader key, None without a leader or a record.
        With ``Keys.of(namespace, scope)`` it reads another cluster registered in this etcd."""
        leader = await self.client.get(self.keys.leader)
        if leader is None or not leader.value:
            return None
        name = leader.value.decode(errors="replace")
        kv = await self.client.get(self.keys.member(name))
        if kv is None:
            return None
        return Member.from_json(name, kv.value, kv.lease)  # None for an invalid record

    async def name_leases(self, name: str) -> tuple[int | None, int | None]:
        """The leases ``name`` is held under now: its member key's and, when the leader key names
        it, the leader key's (None: no such key).  Used to tell whether another agent runs under
        ``name`` (:mod:`hakeeper.ha.identity`)."""
        member = await self.client.get(self.keys.member(name))
        leader = await self.client.get(self.keys.leader)
        named = leader is not None and leader.value == name.encode()
        return (member.lease if member is not None else None, leader.lease if named and leader else None)

    async def lease_ttl(self, lease: int, *, timeout: float | None = None) -> int:
        """Seconds ``lease`` has left (etcd truncates; -1: expired, revoked or never granted)."""
        return await self.client.lease_time_to_live(lease, timeout=timeout)

    # -- the initialize race ----------------------------------------------------------------------

    async def initialize(
        self, *, system_identifier: str, leader: str, lease: int, config: DynamicConfig
    ) -> int | None:
        """Claim the cluster for ``system_identifier``: only while neither the initialize nor the
        leader key exists, put both (the leader key on ``lease``) and the initial ``config`` in
        one transaction.  Exactly one member wins the race; it is then the leader, and the
        transaction's revision (= the leader key's create revision) is its term.  None: another
        member initialized the cluster (or holds the leader key) first."""
        k = self.keys
        res = await self.client.txn(
            [cmp_create(k.initialize, "=", 0), cmp_create(k.leader, "=", 0)],
            [
                op_put(k.initialize, system_identifier),
                op_put(k.leader, leader, lease=lease),
                op_put(k.config, config.model_dump_json().encode()),
            ],
        )
        return res.revision if res.succeeded else None

    async def undo_initialize(self, *, leader: str, term: int) -> bool:
        """Give a won initialize race back (the bootstrap failed after it): delete the initialize,
        config and leader keys, only while ``leader`` still holds the leader key of ``term``, so
        that a cluster somebody else initialized meanwhile is never touched."""
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", leader), cmp_create(k.leader, "=", term)],
            [op_delete(k.initialize), op_delete(k.config), op_delete(k.leader)],
        )
        return res.succeeded

    # -- the leader key ---------------------------------------------------------------------------

    async def take_leader(self, name: str, lease: int) -> int | None:
        """Campaign: create the leader key for ``name`` on ``lease`` if nobody holds it
        (``create_revision == 0``: one winner).  Returns the new term, None if the key is held."""
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", 0)], [op_put(k.leader, name, lease=lease)])
        return res.revision if res.succeeded else None

    async def reattach_leader(self, name: str, term: int, lease: int) -> bool:
        """Move our leader key of ``term`` onto ``lease`` (after the old lease was lost while the
        key survived): refused unless the key is still ``name``'s under the same term, so a key
        another member took meanwhile is never overwritten.  The term does not change."""
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", name), cmp_create(k.leader, "=", term)],
            [op_put(k.leader, name, lease=lease)],
        )
        return res.succeeded

    async def take_over_leader(self, name: str, term: int, old_lease: int, lease: int) -> bool:
        """:meth:`reattach_leader`, and only from ``old_lease``: the key is taken over from the
        lease the decision was taken on (ours from before a restart, or an expired one), never
        from one another agent of our name put it under meanwhile (a put keeps the term)."""
        k = self.keys
        res = await self.client.txn(
            [
                cmp_value(k.leader, "=", name),
                cmp_create(k.leader, "=", term),
                cmp_lease(k.leader, "=", old_lease),
            ],
            [op_put(k.leader, name, lease=lease)],
        )
        return res.succeeded

    async def release_leader(self, name: str, term: int) -> bool:
        """Delete our leader key of ``term`` (so others need not wait for the lease to expire);
        refused if the key is no longer ``name``'s under ``term``: never delete a successor's key."""
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.leader, "=", name), cmp_create(k.leader, "=", term)],
            [op_delete(k.leader)],
        )
        return res.succeeded

    async def hand_over(self, name: str, term: int, request: Switchover, handover: Switchover) -> bool:
        """Switchover: in one transaction, delete our leader key of ``term`` and replace
        ``request`` with ``handover`` (stage HANDOVER, naming the candidate, which alone may then
        campaign).  Refused if we no longer lead under ``term`` or the request changed (it was
        cancelled or replaced since we read it)."""
        k = self.keys
        res = await self.client.txn(
            [
                cmp_value(k.leader, "=", name),
                cmp_create(k.leader, "=", term),
                cmp_mod(k.switchover, "=", request.mod_revision),
            ],
            [op_delete(k.leader), op_put(k.switchover, handover.to_json())],
        )
        return res.succeeded

    # -- leader-only writes, guarded by the term --------------------------------------------------

    async def drop_switchover(self, term: int, request: Switchover) -> bool:
        """The leader of ``term`` removes ``request`` (carried out, refused or aborted); refused if
        the term is over or the request changed since it was read (a newer one is not lost)."""
        k = self.keys
        res = await self.client.txn(
            [cmp_create(k.leader, "=", term), cmp_mod(k.switchover, "=", request.mod_revision)],
            [op_delete(k.switchover)],
        )
        return res.succeeded

    async def write_status(self, term: int, status: Status) -> bool:
        """Publish the leader's LSN and timeline; only the leader of ``term`` may."""
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.status, status.to_json())])
        return res.succeeded

    async def write_sync(self, term: int, state: SyncState) -> bool:
        """Write the sync set; only the leader of ``term`` may, so a deposed primary can never
        claim that standbys it no longer waits for have every commit."""
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", term)], [op_put(k.sync, state.to_json())])
        return res.succeeded

    async def drop_sync(self, term: int) -> bool:
        """Delete the sync set (asynchronous replication); only the leader of ``term`` may."""
        k = self.keys
        res = await self.client.txn([cmp_create(k.leader, "=", term)], [op_delete(k.sync)])
        return res.succeeded

    async def append_history(self, term: int, entry: HistoryEntry, *, attempts: int = 3) -> bool:
        """Append ``entry`` to the history: read it, append, write it back while the leader key is
        still of ``term`` and the history has not changed since the read (compare-and-swap on its
        mod revision; 0 while it does not exist).  Retried ``attempts`` times on a concurrent
        write; False when every attempt was refused (lost the term, or kept racing)."""
        k = self.keys
        for _ in range(attempts):
            cur = await self.client.get(k.history)
            try:
                items = [e.to_dict() for e in parse_history_strict(cur.value if cur is not None else None)]
            except InvalidRecord as e:
                # Whatever is there cannot be read by anyone: replace it rather than never
                # recording a promotion again (still compare-and-swap on what was read).
                log.warning("history_replaced", key=k.history, reason=str(e))
                items = []
            items.append(entry.to_dict())
            res = await self.client.txn(
                [cmp_create(k.leader, "=", term), cmp_mod(k.history, "=", cur.mod_revision if cur else 0)],
                [op_put(k.history, json.dumps(items))],
            )
            if res.succeeded:
                return True
        return False

    # -- a major upgrade --------------------------------------------------------------------------

    @property
    def upgrades(self) -> UpgradeKeys:
        """The ``upgrade`` key and the system identifier's replacement (``hakeeper upgrade``)."""
        return UpgradeKeys(self.client, self.keys)

    # -- members ----------------------------------------------------------------------------------

    async def put_member(self, member: Member, lease: int) -> None:
        """Publish ``member``'s record on its lease: it disappears when the member stops renewing."""
        await self.client.put(self.keys.member(member.name), member.to_json(), lease=lease)

    async def delete_member(self, name: str) -> None:
        await self.client.delete(self.keys.member(name))

    # -- operator requests ------------------------------------------------------------------------

    async def write_request(self, current: Switchover | None, request: Switchover) -> Switchover | None:
        """Write a switchover or failover ``request`` over ``current`` (what the caller validated
        against; None: there was no request).  Compare-and-swap: on its mod revision, or on the key
        not existing, so two operators never both believe their request was accepted.  Returns
        the request as stored (with its mod revision), None when another write came first."""
        k = self.keys
        guard = (
            cmp_mod(k.switchover, "=", current.mod_revision)
            if current is not None
            else cmp_create(k.switchover, "=", 0)
        )
        res = await self.client.txn([guard], [op_put(k.switchover, request.to_json())])
        if not res.succeeded:
            return None
        return Switchover.from_json(request.to_json(), res.revision) or request

    async def cancel_request(self, request: Switchover) -> bool:
        """Delete ``request`` if it is still the one read (not replaced or handed over since)."""
        k = self.keys
        res = await self.client.txn(
            [cmp_mod(k.switchover, "=", request.mod_revision)], [op_delete(k.switchover)]
        )
        return res.succeeded

    # -- dynamic configuration --------------------------------------------------------------------

    async def read_config(self) -> tuple[bytes, int] | None:
        """The stored configuration (raw JSON) and its mod revision; None before initialization."""
        kv = await self.client.get(self.keys.config)
        return None if kv is None else (kv.value, kv.mod_revision)

    async def write_config(self, config: DynamicConfig, mod_revision: int) -> int | None:
        """Replace the configuration read at ``mod_revision`` (compare-and-swap: a concurrent
        change is never overwritten).  The new revision, or None if it changed meanwhile."""
        k = self.keys
        res = await self.client.txn(
            [cmp_mod(k.config, "=", mod_revision)], [op_put(k.config, config.model_dump_json())]
        )
        return res.revision if res.succeeded else None

    # -- backup schedule records ------------------------------------------------------------------

    async def read_schedule(self, name: str) -> KV | None:
        """The record of schedule ``name`` (raw, with its mod revision)."""
        return await self.client.get(self.keys.schedule(name))

    async def read_schedules(self) -> list[KV]:
        """Every schedule record, sorted by key."""
        kvs, _ = await self.client.get_prefix(self.keys.schedules)
        return kvs

    async def write_schedule(self, name: str, record: str, mod_revision: int, term: int | None) -> int | None:
        """Put schedule ``name``'s ``record`` (JSON) if the record is still at ``mod_revision``
        (0: absent), so a slot is claimed once; with ``term``, also only while the leader key is
        of ``term``: only the current leader claims a slot.  A finished run's result is written
        without ``term`` (the truth about a run is worth recording, whoever leads now).  Returns
        the new revision, None when refused."""
        key = self.keys.schedule(name)
        cmps = [cmp_mod(key, "=", mod_revision)]
        if term is not None:
            cmps.append(cmp_create(self.keys.leader, "=", term))
        res = await self.client.txn(cmps, [op_put(key, record)])
        return res.revision if res.succeeded else None

    # -- removing the cluster ---------------------------------------------------------------------

    async def remove_cluster(self, revision: int, *, while_running: bool = False) -> bool:
        """Delete every key of the cluster (``hakeeper remove``), in one transaction guarded so
        that it deletes exactly what the operator was shown: no key under the prefix may have
        been written after ``revision`` (the read the confirmation was given on; a key created or
        updated since fails the compare, one expired since does not matter).  Unless
        ``while_running``, also only while no leader key and no member key exists: both live on
        the leases of running agents, and wiping the keys under them takes the leader key from a
        serving primary (a new election follows) and drops the history and the dynamic
        configuration the agents run on.  False: refused, nothing was deleted."""
        k = self.keys
        compare = [cmp_mod(k.all, "<", revision + 1, prefix=True)]
        if not while_running:
            compare += [cmp_create(k.leader, "=", 0), cmp_create(k.members, "=", 0, prefix=True)]
        res = await self.client.txn(compare, [op_delete(k.all, prefix=True)])
        if res.succeeded:
            log.warning(
                "cluster_keys_removed", prefix=k.all, revision=res.revision, while_running=while_running
            )
        else:
            log.warning(
                "cluster_removal_refused",
                prefix=k.all,
                reason="a key changed after the read the removal was confirmed on"
                + ("" if while_running else ", or an agent holds a leader or member key"),
            )
        return res.succeeded


class UpgradeKeys:
    """What a major upgrade writes: the ``upgrade`` key (the cluster counts as paused while it
    exists) and the ``initialize`` key's new system identifier."""

    def __init__(self, client: EtcdLike, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def write(self, current: Upgrade | None, record: Upgrade) -> Upgrade | None:
        """Create the ``upgrade`` key (``current`` None: only if there is none) or replace
        ``current`` (only if unchanged since read): the record as stored, None when another
        write came first."""
        k = self.keys
        guard = cmp_mod(k.upgrade, "=", current.mod_revision) if current else cmp_create(k.upgrade, "=", 0)
        res = await self.client.txn([guard], [op_put(k.upgrade, record.to_json())])
        if not res.succeeded:
            return None
        return replace(record, mod_revision=res.revision)

    async def delete(self, upgrade_id: str) -> bool:
        """Delete the ``upgrade`` key if it is the upgrade ``upgrade_id`` (the cluster resumes)."""
        k = self.keys
        cur = await self.client.get(k.upgrade)
        if cur is None:
            return True
        try:
            found = Upgrade.parse(cur.value, cur.mod_revision)
        except InvalidRecord:
            found = None
        if found is not None and found.id != upgrade_id:
            return False
        res = await self.client.txn([cmp_mod(k.upgrade, "=", cur.mod_revision)], [op_delete(k.upgrade)])
        return res.succeeded

    async def replace_initialize(self, old: str, new: str, *, term: int) -> bool:
        """The cluster's system identifier becomes ``new`` (a major upgrade made a new cluster of
        the old one's data): only while it is ``old`` and the leader key is still of ``term``."""
        k = self.keys
        res = await self.client.txn(
            [cmp_value(k.initialize, "=", old), cmp_create(k.leader, "=", term)],
            [op_put(k.initialize, new)],
        )
        return res.succeeded
