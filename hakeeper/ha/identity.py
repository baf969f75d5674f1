"""One live agent per member name.

Two agents of the same name (a copied node file, a cloned VM) would trade the leader key while
both accept writes: each one's decision would say "the key names us under another lease: take
it over".  So a lease that a key naming us is under is classified before anything acts on it:

* one this node's agent held (:meth:`~hakeeper.ha.lease.LeaseKeeper.is_own`: the current one,
  an earlier one of this run, or the one persisted by the agent before a restart);
* expired: etcd says its time-to-live ran out (``TTL <= 0``; etcd truncates, so ``0`` is less
  than a second left, and the fence margin (> 1 s) means its holder's fence has fired by then);
* foreign: alive, and never ours: another agent runs under our name.

At start (:func:`refusal_at_start`), before PostgreSQL is started or anything is written to etcd
under our name, a member or leader key of our name under a foreign live lease makes the agent
refuse to start; so does a live member of another name whose replication slot name is ours
(``db-1`` and ``db.1`` both map to slot ``db_1``: they would share one slot).  While running,
the observe step classifies the leader key's lease when it names us under another lease (the
policy takes it over only if ours or expired) and notices our member key re-written under a
foreign lease (:func:`member_conflict`).
"""

from __future__ import annotations

from hakeeper.core.cluster import ClusterView, slot_name_clash, slot_name_for
from hakeeper.dcs.etcd import EtcdError
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.lease import LeaseKeeper
from hakeeper.ha.policy.decision import LeaseOwner
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.identity")

TTL_CHECK_TIMEOUT = 1.0  # s; an unanswered check is UNKNOWN (the policy then waits)


async def owner_of(store: ClusterStore, keeper: LeaseKeeper, lease: int) -> LeaseOwner:
    """Whose ``lease`` is, as far as this node can tell (one etcd request unless it is ours)."""
    if keeper.is_own(lease):
        return LeaseOwner.OURS
    try:
        ttl = await store.lease_ttl(lease, timeout=TTL_CHECK_TIMEOUT)
    except EtcdError as e:
        log.warning("lease_check_failed", lease=hex(lease), error=str(e))
        return LeaseOwner.UNKNOWN
    return LeaseOwner.FOREIGN if ttl > 0 else LeaseOwner.EXPIRED


async def leader_lease_owner(
    store: ClusterStore, keeper: LeaseKeeper, name: str, view: ClusterView
) -> LeaseOwner:
    """The observe step's fact: whose lease the leader key is under when it names us under a
    lease other than our current one (OURS when the question does not arise)."""
    leader = view.leader
    if leader is None or leader.name != name or leader.lease == keeper.lease:
        return LeaseOwner.OURS
    return await owner_of(store, keeper, leader.lease)


async def member_conflict(
    store: ClusterStore, keeper: LeaseKeeper, name: str, view: ClusterView
) -> int | None:
    """The foreign live lease our member key is under in ``view`` (None: no conflict).  Costs
    nothing while the key is under a lease of ours, which is always the case unless another
    agent writes it."""
    me = view.members.get(name)
    if me is None or me.lease == 0 or keeper.is_own(me.lease):
        return None
    owner = await owner_of(store, keeper, me.lease)
    return me.lease if owner == LeaseOwner.FOREIGN else None


async def refusal_at_start(store: ClusterStore, keeper: LeaseKeeper, name: str) -> str | None:
    """Why this agent must not start (None: it may): a key of our name -- the member key, or the
    leader key naming us -- lives on a lease that is alive and was never this node's; or a live
    member of another name has our replication slot name.  Raises
    :class:`~hakeeper.dcs.etcd.EtcdError` when etcd cannot tell (the caller retries: starting
    without knowing is what this check exists to prevent)."""
    member_lease, leader_lease = await store.name_leases(name)
    for what, lease in (("member key", member_lease), ("leader key", leader_lease)):
        if not lease or keeper.is_own(lease):
            continue
        ttl = await store.lease_ttl(lease, timeout=TTL_CHECK_TIMEOUT)
        if ttl > 0:
            return (
                f"member name {name!r} is in use: its {what} lives on lease {lease:x}, which is alive "
                f"({ttl} s left) and was never this node's, so another agent runs under this name "
                f"(a copied node file or a cloned host?); give this node a unique name, or stop "
                f"the other agent (if it is gone, its lease expires within {ttl + 1} s)"
            )
    # Member keys live on their agents' leases, so every member in the view is alive.  (Two
    # such agents started at the same moment can both pass; the names are an operator's
    # choice, so the check at start is where the mistake is caught.)
    view = await store.read_view()
    clash = slot_name_clash(name, view.members)
    if clash is not None:
        return (
            f"member name {name!r} maps to replication slot {slot_name_for(name)!r}, the slot of "
            f"live member {clash!r} (slot names keep only lower-case letters, digits and '_'), "
            f"so the two would share one slot; give this node a name whose slot differs"
        )
    return None
