"""Permanent replication slots and logical slot failover: the pure rules (docs/slots.md).

* :func:`plan_permanent` -- which permanent slots the primary creates and drops.  A slot is
  dropped only when it is in the *managed* set (the ``slots`` key: every permanent slot a
  primary of this cluster created or adopted) and no longer in a *valid* config.  A config that
  did not validate (the agent runs on a fallback), an unreadable managed set, or a slot that is
  merely absent from one view drop nothing; a slot hakeeper never managed (a user's own) is
  never dropped.
* :func:`standby_slot_names` -- ``synchronized_standby_slots`` of a 17+ primary: the physical
  slots of its failover candidates, so that a logical consumer never receives a change a
  promotable standby lacks.
* :func:`slot_refusal` -- the switchover guard: a candidate whose copy of a failover slot is not
  synced would lose the consumers' positions.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from hakeeper.core.cluster import ClusterView, slot_name_for
from hakeeper.core.config import PermanentSlot
from hakeeper.core.slots import SlotState, failover_slots


@dataclass(frozen=True, slots=True)
class SlotPlan:
    record: frozenset[str]  # the managed set to write *before* creating anything
    create: tuple[str, ...]  # sorted
    drop: tuple[str, ...]  # removed from the config, present and inactive: drop, then forget
    forget: tuple[str, ...]  # removed from the config and already gone: forget
    conflicts: tuple[tuple[str, str], ...] = ()  # (slot, why it is left alone)


def _mismatch(spec: PermanentSlot, have: SlotState) -> str | None:
    if spec.type != have.type:
        return f"a {have.type} slot of that name exists (the config asks for {spec.type}); left alone"
    if spec.type == "logical" and (have.database, have.plugin) != (spec.database, spec.plugin):
        return (
            f"exists for database {have.database} with plugin {have.plugin} (the config asks for "
            f"{spec.database}/{spec.plugin}); left alone, drop it to have it re-created"
        )
    return None


def plan_permanent(
    wanted: Mapping[str, PermanentSlot],
    *,
    config_valid: bool,
    managed: frozenset[str] | None,
    existing: Mapping[str, SlotState],
    members: Collection[str],
) -> SlotPlan:
    """One step towards the permanent slots of the config on the primary.

    ``managed``: the names in the ``slots`` key (None: unknown, e.g. unreadable); ``existing``:
    the server's non-temporary slots; ``members``: the member names (their slots are the member
    slots' business, never permanent ones)."""
    member_slots = {slot_name_for(m): m for m in members}
    conflicts: list[tuple[str, str]] = []
    ok: dict[str, PermanentSlot] = {}
    for name, spec in sorted(wanted.items()):
        if name in member_slots:
            conflicts.append(
                (name, f"is the physical slot of member {member_slots[name]}; not managed as permanent")
            )
            continue
        have = existing.get(name)
        problem = _mismatch(spec, have) if have is not None else None
        if problem is not None:
            conflicts.append((name, problem))
            continue
        ok[name] = spec
    record = frozenset(managed or ()) | frozenset(ok)
    create = tuple(sorted(n for n in ok if n not in existing))
    if not config_valid or managed is None:
        return SlotPlan(record, create, (), (), tuple(conflicts))
    removed = managed - set(wanted)
    drop = tuple(sorted(n for n in removed if n in existing and not existing[n].active))
    forget = tuple(sorted(n for n in removed if n not in existing))
    return SlotPlan(record, create, drop, forget, tuple(conflicts))


def standby_slot_names(
    view: ClusterView, leader: str, streaming: Collection[str], physical: Collection[str]
) -> tuple[str, ...]:
    """``synchronized_standby_slots`` for the primary ``leader``: the physical slots (that exist:
    ``physical``) of the members that may be promoted and stream from us now (``streaming``:
    application names in pg_stat_replication that replied within a ttl); in synchronous and
    quorum mode, of those in this leader's sync set while it has one.

    A member that vanished (its key expired with its agent's lease) or stopped streaming is
    left out at the next cycle: logical decoding waits for a dead standby for about a ttl, not
    forever."""
    names = [
        m.name
        for m in view.members.values()
        if m.name != leader and not m.nofailover and m.failover_priority > 0 and m.name in streaming
    ]
    sync = view.sync
    if (
        view.config.replication_mode != "async"
        and sync is not None
        and sync.leader == leader
        and sync.members
    ):
        names = [n for n in names if n in sync.members]
    return tuple(sorted(s for s in (slot_name_for(n) for n in names) if s in physical))


def unsynced(view: ClusterView, candidate: str) -> list[str] | None:
    """The leader's failover slots of which ``candidate`` has no synced copy (None: no leader
    or the leader publishes no slots, so nothing to check)."""
    leader = view.leader_member
    if leader is None or leader.slots is None:
        return None
    needed = failover_slots(leader.slots)
    if not needed:
        return []
    m = view.members.get(candidate)
    report = m.slots if m is not None else None
    missing = []
    for s in needed:
        mine = report.get(s.name) if report is not None else None
        if mine is None or not mine.synced:
            missing.append(s.name)
    return missing


def slot_refusal(view: ClusterView, candidate: str) -> str | None:
    """Why a switchover (or a failover while a leader exists) to ``candidate`` must not happen
    without an explicit override: a failover slot of the leader is not synced there, so a
    logical consumer would find its slot missing or behind on the new primary."""
    missing = unsynced(view, candidate)
    if not missing:
        return None
    return (
        f"candidate {candidate} has no synced copy of failover slot(s) {', '.join(missing)}: its "
        "logical consumers would lose their position (wait for the slot sync worker, or override "
        "with allow_unsynced_slots)"
    )
