"""Operator requests that change the cluster: switchover, manual failover, pause, config.

The API (and through it the CLI) calls these.  Each validates against a fresh, linearizable
read of the cluster's keys and writes with compare-and-swap, both through a
:class:`~hakeeper.dcs.store.ClusterStore`; a refusal raises
:class:`~hakeeper.core.errors.Refused` with the kind that fits and a message saying why (the API
turns the kind into an HTTP status).  The agents carry a written request out (``decide()`` /
``Agent.do_switchover``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hakeeper.core.cluster import (
    ClusterView,
    Switchover,
    SwitchoverKind,
    SwitchoverStage,
    parse_config,
    slot_name_for,
)
from hakeeper.core.config import ConfigError, DynamicConfig, parse_dynamic_config
from hakeeper.core.errors import RefusalKind, Refused
from hakeeper.core.records import InvalidRecord
from hakeeper.dcs.etcd import EtcdError
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.policy.candidates import assess
from hakeeper.ha.policy.slots import slot_refusal
from hakeeper.ha.policy.switchover import switchover_live, switchover_target
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.requests")


async def read_view(store: ClusterStore, fallback: DynamicConfig | None = None) -> ClusterView:
    """A fresh view of the cluster from one range read (linearizable)."""
    try:
        return await store.read_view(fallback)
    except EtcdError as e:
        raise Refused(RefusalKind.UNAVAILABLE, f"etcd unavailable: {e}") from e


def _pending(view: ClusterView, now: float) -> Switchover | None:
    sw = view.switchover
    return sw if sw is not None and switchover_live(sw, view, now) else None


async def _write_request(store: ClusterStore, view: ClusterView, req: Switchover) -> Switchover:
    try:
        written = await store.write_request(view.switchover, req)
    except EtcdError as e:
        raise Refused(RefusalKind.UNAVAILABLE, f"etcd unavailable: {e}") from e
    if written is None:
        raise Refused(RefusalKind.CONFLICT, "another switchover or failover request was written concurrently")
    return written


async def request_switchover(
    store: ClusterStore,
    *,
    leader: str | None,
    candidate: str | None,
    scheduled_at: float | None = None,
    now: float | None = None,
    allow_unsynced_slots: bool = False,
) -> Switchover:
    """Ask the current leader to hand over (now, or at ``scheduled_at``, epoch seconds).

    A switchover now to a candidate without a synced copy of every failover slot of the leader
    is refused unless ``allow_unsynced_slots`` (:func:`~hakeeper.ha.policy.slots.slot_refusal`);
    a scheduled one is checked by the leader when it becomes due (the flag is recorded)."""
    now = time.time() if now is None else now
    view = await read_view(store)
    if view.leader is None:
        raise Refused(
            RefusalKind.PRECONDITION, "switchover is not possible: the cluster has no leader (use failover)"
        )
    current = view.leader.name
    if leader is not None and leader != current:
        raise Refused(
            RefusalKind.PRECONDITION, f"switchover is not possible: the leader is {current}, not {leader}"
        )
    if candidate is not None and candidate == current:
        raise Refused(RefusalKind.INVALID, f"candidate {candidate} is already the leader")
    if scheduled_at is not None:
        if scheduled_at < now - 1:
            raise Refused(RefusalKind.INVALID, "scheduled_at is in the past")
        if view.paused:
            raise Refused(RefusalKind.INVALID, "cannot schedule a switchover while the cluster is paused")
    if _pending(view, now) is not None:
        raise Refused(RefusalKind.CONFLICT, "a switchover or failover is already pending (cancel it first)")
    req = Switchover(
        kind=SwitchoverKind.SWITCHOVER,
        leader=current,
        candidate=candidate,
        requested_at=now,
        scheduled_at=scheduled_at,
        allow_unsynced_slots=allow_unsynced_slots,
    )
    if scheduled_at is None or scheduled_at <= now:
        target, refusal = switchover_target(view, req, current)
        if target is None:
            raise Refused(RefusalKind.PRECONDITION, f"switchover is not possible: {refusal}")
        _check_slots(view, target, allow_unsynced_slots, "switchover")
    elif candidate is not None and candidate not in view.members:
        raise Refused(
            RefusalKind.PRECONDITION, f"switchover is not possible: candidate {candidate} is not a member"
        )
    return await _write_request(store, view, req)


async def request_failover(
    store: ClusterStore,
    *,
    candidate: str,
    allow_data_loss: bool = False,
    now: float | None = None,
    allow_unsynced_slots: bool = False,
) -> Switchover:
    """Promote ``candidate``, also when the cluster has no healthy leader.

    A candidate that is not eligible (lagging, wrong timeline, not running, nofailover) is refused
    unless ``allow_data_loss``: data acknowledged by the old primary may then be lost, and the
    override is recorded in the history ("(data loss accepted)").  For an eligible candidate
    the flag changes nothing (and is not recorded)."""
    now = time.time() if now is None else now
    view = await read_view(store)
    m = view.members.get(candidate)
    if m is None:
        raise Refused(
            RefusalKind.PRECONDITION, f"failover is not possible: candidate {candidate} is not a member"
        )
    if view.leader is not None and view.leader.name == candidate:
        raise Refused(RefusalKind.INVALID, f"candidate {candidate} is already the leader")
    if _pending(view, now) is not None:
        raise Refused(RefusalKind.CONFLICT, "a switchover or failover is already pending (cancel it first)")
    c = assess(m, view)
    if not c.eligible and not allow_data_loss:
        raise Refused(
            RefusalKind.PRECONDITION,
            f"failover to {candidate} refused: {c.reason}; data could be lost (allow_data_loss accepts that)",
            reason=c.reason,
        )
    if view.leader is not None:
        # With a leader to hand over from, the same slot guard as a switchover; without one
        # there is nothing to compare with (and no better choice than the candidate).
        _check_slots(view, candidate, allow_unsynced_slots, "failover")
    req = Switchover(
        kind=SwitchoverKind.FAILOVER,
        leader=view.leader.name if view.leader else None,
        candidate=candidate,
        requested_at=now,
        force=allow_data_loss and not c.eligible,
        allow_unsynced_slots=allow_unsynced_slots,
    )
    return await _write_request(store, view, req)


def _check_slots(view: ClusterView, candidate: str, allow: bool, what: str) -> None:
    refusal = slot_refusal(view, candidate)
    if refusal is None:
        return
    if allow:
        log.warning(f"{what}_slot_guard_overridden", candidate=candidate, reason=refusal)
        return
    log.warning(f"{what}_refused", candidate=candidate, reason=refusal)
    raise Refused(RefusalKind.PRECONDITION, f"{what} to {candidate} refused: {refusal}", reason=refusal)


async def cancel_switchover(store: ClusterStore) -> Switchover:
    view = await read_view(store)
    sw = view.switchover
    if sw is None:
        raise Refused(RefusalKind.NOT_FOUND, "no switchover is pending")
    if sw.stage == SwitchoverStage.HANDOVER:
        raise Refused(RefusalKind.CONFLICT, "the switchover is already handing over; it cannot be cancelled")
    try:
        cancelled = await store.cancel_request(sw)
    except EtcdError as e:
        raise Refused(RefusalKind.UNAVAILABLE, f"etcd unavailable: {e}") from e
    if not cancelled:
        raise Refused(RefusalKind.CONFLICT, "the request changed while cancelling it")
    return sw


async def wait_for_new_leader(
    store: ClusterStore, *, old_leader: str | None, candidate: str | None, timeout: float
) -> str | None:
    """Poll until a leader other than ``old_leader`` (``candidate`` if given) holds the key and
    the request is gone.  Returns the new leader, or None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            view = await read_view(store)
        except Refused:
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


async def read_config(store: ClusterStore) -> tuple[DynamicConfig, int]:
    cfg, rev, _ = await read_stored_config(store, repairing=False)
    return cfg, rev


async def read_stored_config(
    store: ClusterStore, *, last_valid: tuple[DynamicConfig, int] | None = None, repairing: bool = True
) -> tuple[DynamicConfig, int, tuple[str, ...]]:
    """The stored config, its revision, and the fields of it this version does not know (a
    newer agent's: ignored, as the agents do, docs/decisions.md).

    ``last_valid``: the last valid config this agent saw (and its revision).  Given, an invalid
    stored config reads as that one under the invalid record's revision, so that a patch repairs
    it from what the agents actually run on (they keep the last valid config, never their own
    bootstrap values); without it, an invalid stored config is UNAVAILABLE."""
    try:
        stored = await store.read_config()
    except EtcdError as e:
        raise Refused(RefusalKind.UNAVAILABLE, f"etcd unavailable: {e}") from e
    if stored is None:
        raise Refused(
            RefusalKind.UNAVAILABLE, "the cluster has no dynamic configuration yet (not initialized)"
        )
    raw, mod_revision = stored
    try:
        cfg, ignored = parse_config(raw)
    except InvalidRecord as e:
        if not repairing:
            raise Refused(
                RefusalKind.UNAVAILABLE,
                f"the stored configuration (revision {mod_revision}) is invalid: {e}; the agents keep "
                f"running on the last valid one, and PATCH /config (hakeeper edit-config) repairs it",
            ) from e
        if last_valid is None:
            raise Refused(
                RefusalKind.UNAVAILABLE,
                f"the stored configuration (revision {mod_revision}) is invalid: {e}; this agent has "
                f"seen no valid one since it started, so it cannot repair it (ask another member, "
                f"or rewrite the key with etcdctl)",
            ) from e
        log.warning(
            "config_invalid_patched_from_last_valid",
            invalid_revision=mod_revision,
            last_valid_revision=last_valid[1],
            error=str(e),
        )
        return last_valid[0], mod_revision, ()
    return cfg, mod_revision, ignored


async def patch_config(
    store: ClusterStore,
    patch: dict[str, Any],
    *,
    expected_revision: int | None = None,
    last_valid: tuple[DynamicConfig, int] | None = None,
) -> tuple[DynamicConfig, int]:
    """Apply a JSON merge patch to the dynamic config with compare-and-swap.

    ``expected_revision``: the config revision the caller last read (CONFLICT if it moved on);
    without it, the patch applies to whatever is current (retried on a concurrent write).
    ``last_valid``: see :func:`read_stored_config` (an invalid stored config is repaired from it)."""
    if not isinstance(patch, dict):
        raise Refused(RefusalKind.INVALID, "the patch must be a JSON object")
    for _ in range(5):
        cfg, rev, ignored = await read_stored_config(store, last_valid=last_valid)
        if ignored:
            # writing back what this version knows would silently drop a newer agent's settings
            raise Refused(
                RefusalKind.PRECONDITION,
                f"the stored configuration has settings this version does not know "
                f"({', '.join(ignored)}); change it through an upgraded node",
            )
        if expected_revision is not None and expected_revision != rev:
            raise Refused(
                RefusalKind.CONFLICT, f"the configuration changed (revision {rev}, not {expected_revision})"
            )
        merged = merge_patch(cfg.model_dump(mode="json"), patch)
        try:
            new = parse_dynamic_config(merged, source="patched config")
        except ConfigError as e:
            raise Refused(RefusalKind.INVALID, str(e), errors=e.errors) from e
        if new.slots:
            _check_slot_names(new, await read_view(store))
        try:
            revision = await store.write_config(new, rev)
        except EtcdError as e:
            raise Refused(RefusalKind.UNAVAILABLE, f"etcd unavailable: {e}") from e
        if revision is not None:
            return new, revision
        if expected_revision is not None:
            raise Refused(RefusalKind.CONFLICT, "the configuration changed concurrently")
    raise Refused(RefusalKind.CONFLICT, "the configuration kept changing; try again")


def _check_slot_names(cfg: DynamicConfig, view: ClusterView) -> None:
    """A permanent slot may not take a member's physical slot name (the member slots are kept,
    and dropped, by their own rule)."""
    for name in sorted(cfg.slots):
        member = next((m for m in sorted(view.members) if slot_name_for(m) == name), None)
        if member is not None:
            msg = f"slots.{name}: is the replication slot of member {member}; choose another name"
            raise Refused(RefusalKind.INVALID, f"patched config: {msg}", errors=[(f"slots.{name}", msg)])


async def set_pause(store: ClusterStore, paused: bool) -> DynamicConfig:
    cfg, _ = await patch_config(store, {"pause": paused})
    return cfg
