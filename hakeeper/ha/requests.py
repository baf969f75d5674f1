"""Operator requests that change the cluster: switchover, manual failover, pause, config.

The API (and through it the CLI) calls these.  Each validates against a fresh, linearizable
read of the cluster's keys and writes with compare-and-swap; a refusal raises
:class:`OperationError` with the HTTP status that fits and a message saying why.  The agents
carry a written request out (``decide()`` / ``Agent.do_switchover``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from hakeeper.core.cluster import ClusterView, Switchover, SwitchoverKind, SwitchoverStage, build_view
from hakeeper.core.config import ConfigError, DynamicConfig, parse_dynamic_config
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import EtcdClient, EtcdError, cmp_create, cmp_mod, op_delete, op_put
from hakeeper.ha.decide import assess, switchover_live, switchover_target


class OperationError(Exception):
    """A request that cannot be carried out; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, **facts: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.facts = facts


async def read_view(client: EtcdClient, keys: Keys, fallback: DynamicConfig | None = None) -> ClusterView:
    """A fresh view of the cluster from one range read (linearizable)."""
    try:
        kvs, rev = await client.get_prefix(keys.prefix + "/")
    except EtcdError as e:
        raise OperationError(503, f"etcd unavailable: {e}") from e
    raw = {kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.lease) for kv in kvs}
    return build_view(keys, raw, rev, fallback or DynamicConfig())


def _pending(view: ClusterView, now: float) -> Switchover | None:
    sw = view.switchover
    return sw if sw is not None and switchover_live(sw, view, now) else None


async def _write_request(client: EtcdClient, keys: Keys, view: ClusterView, req: Switchover) -> Switchover:
    cur = view.switchover
    guard = cmp_mod(keys.switchover, "=", cur.mod_revision) if cur else cmp_create(keys.switchover, "=", 0)
    try:
        res = await client.txn([guard], [op_put(keys.switchover, req.to_json())])
    except EtcdError as e:
        raise OperationError(503, f"etcd unavailable: {e}") from e
    if not res.succeeded:
        raise OperationError(409, "another switchover or failover request was written concurrently")
    return Switchover.from_json(req.to_json(), res.revision) or req


async def request_switchover(
    client: EtcdClient,
    keys: Keys,
    *,
    leader: str | None,
    candidate: str | None,
    scheduled_at: float | None = None,
    now: float | None = None,
) -> Switchover:
    """Ask the current leader to hand over (now, or at ``scheduled_at``, epoch seconds)."""
    now = time.time() if now is None else now
    view = await read_view(client, keys)
    if view.leader is None:
        raise OperationError(412, "switchover is not possible: the cluster has no leader (use failover)")
    current = view.leader.name
    if leader is not None and leader != current:
        raise OperationError(412, f"switchover is not possible: the leader is {current}, not {leader}")
    if candidate is not None and candidate == current:
        raise OperationError(400, f"candidate {candidate} is already the leader")
    if scheduled_at is not None:
        if scheduled_at < now - 1:
            raise OperationError(400, "scheduled_at is in the past")
        if view.paused:
            raise OperationError(400, "cannot schedule a switchover while the cluster is paused")
    if _pending(view, now) is not None:
        raise OperationError(409, "a switchover or failover is already pending (cancel it first)")
    req = Switchover(
        kind=SwitchoverKind.SWITCHOVER,
        leader=current,
        candidate=candidate,
        requested_at=now,
        scheduled_at=scheduled_at,
    )
    if scheduled_at is None or scheduled_at <= now:
        target, refusal = switchover_target(view, req, current)
        if target is None:
            raise OperationError(412, f"switchover is not possible: {refusal}")
    elif candidate is not None and candidate not in view.members:
        raise OperationError(412, f"switchover is not possible: candidate {candidate} is not a member")
    return await _write_request(client, keys, view, req)


async def request_failover(
    client: EtcdClient, keys: Keys, *, candidate: str, force: bool = False, now: float | None = None
) -> Switchover:
    """Promote ``candidate``, also when the cluster has no healthy leader.

    A candidate that is not eligible (lagging, wrong timeline, not running, nofailover) is refused
    unless ``force``: data acknowledged by the old primary may then be lost, and the override is
    recorded in the history."""
    now = time.time() if now is None else now
    view = await read_view(client, keys)
    m = view.members.get(candidate)
    if m is None:
        raise OperationError(412, f"failover is not possible: candidate {candidate} is not a member")
    if view.leader is not None and view.leader.name == candidate:
        raise OperationError(400, f"candidate {candidate} is already the leader")
    if _pending(view, now) is not None:
        raise OperationError(409, "a switchover or failover is already pending (cancel it first)")
    c = assess(m, view)
    if not c.eligible and not force:
        raise OperationError(
            412,
            f"failover to {candidate} refused: {c.reason}; data could be lost (use force to override)",
            reason=c.reason,
        )
    req = Switchover(
        kind=SwitchoverKind.FAILOVER,
        leader=view.leader.name if view.leader else None,
        candidate=candidate,
        requested_at=now,
        force=force and not c.eligible,
    )
    return await _write_request(client, keys, view, req)


async def cancel_switchover(client: EtcdClient, keys: Keys) -> Switchover:
    view = await read_view(client, keys)
    sw = view.switchover
    if sw is None:
        raise OperationError(404, "no switchover is pending")
    if sw.stage == SwitchoverStage.HANDOVER:
        raise OperationError(409, "the switchover is already handing over; it cannot be cancelled")
    try:
        res = await client.txn([cmp_mod(keys.switchover, "=", sw.mod_revision)], [op_delete(keys.switchover)])
    except EtcdError as e:
        raise OperationError(503, f"etcd unavailable: {e}") from e
    if not res.succeeded:
        raise OperationError(409, "the request changed while cancelling it")
    return sw


async def wait_for_new_leader(
    client: EtcdClient, keys: Keys, *, old_leader: str | None, candidate: str | None, timeout: float
) -> str | None:
    """Poll until a leader other than ``old_leader`` (``candidate`` if given) holds the key and
    the request is gone.  Returns the new leader, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            view = await read_view(client, keys)
        except OperationError:
            await asyncio.sleep(0.2)
            continue
        lead = view.leader.name if view.leader else None
        if lead is not None and lead != old_leader and (candidate is None or lead == candidate):
            if view.switchover is None or view.switchover.stage == SwitchoverStage.REQUESTED:
                return lead
        if view.switchover is None and lead == old_leader:
            return None  # the leader dropped the request (refused or aborted)
        await asyncio.sleep(0.05)
    return None


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, ``null`` deletes a key."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


async def read_config(client: EtcdClient, keys: Keys) -> tuple[DynamicConfig, int]:
    try:
        kv = await client.get(keys.config)
    except EtcdError as e:
        raise OperationError(503, f"etcd unavailable: {e}") from e
    if kv is None:
        raise OperationError(503, "the cluster has no dynamic configuration yet (not initialized)")
    try:
        return parse_dynamic_config(json.loads(kv.value)), kv.mod_revision
    except (ValueError, ConfigError) as e:
        raise OperationError(503, f"the stored configuration is invalid: {e}") from e


async def patch_config(
    client: EtcdClient, keys: Keys, patch: dict[str, Any], *, expected_revision: int | None = None
) -> tuple[DynamicConfig, int]:
    """Apply a JSON merge patch to the dynamic config with compare-and-swap.

    ``expected_revision``: the config revision the caller last read (409 if it moved on);
    without it, the patch applies to whatever is current (retried on a concurrent write)."""
    if not isinstance(patch, dict):
        raise OperationError(400, "the patch must be a JSON object")
    for _ in range(5):
        cfg, rev = await read_config(client, keys)
        if expected_revision is not None and expected_revision != rev:
            raise OperationError(409, f"the configuration changed (revision {rev}, not {expected_revision})")
        merged = merge_patch(cfg.model_dump(mode="json"), patch)
        try:
            new = parse_dynamic_config(merged, source="patched config")
        except ConfigError as e:
            raise OperationError(400, str(e), errors=e.errors) from e
        try:
            res = await client.txn(
                [cmp_mod(keys.config, "=", rev)], [op_put(keys.config, new.model_dump_json())]
            )
        except EtcdError as e:
            raise OperationError(503, f"etcd unavailable: {e}") from e
        if res.succeeded:
            return new, res.revision
        if expected_revision is not None:
            raise OperationError(409, "the configuration changed concurrently")
    raise OperationError(409, "the configuration kept changing; try again")


async def set_pause(client: EtcdClient, keys: Keys, paused: bool) -> DynamicConfig:
    cfg, _ = await patch_config(client, keys, {"pause": paused})
    return cfg
