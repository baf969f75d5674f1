"""SlotKeeper: permanent replication slots and logical slot failover (docs/slots.md).

Every cycle, on every member: read the server's slots (:meth:`SlotKeeper.refresh`) for the
member record (``Member.slots``: ``hakeeper list``, ``GET /cluster``, the switchover guard).
On the primary (:meth:`SlotKeeper.manage`, from the leader's cycle): create the permanent slots
of the dynamic config, drop the ones removed from it (:mod:`hakeeper.ha.policy.slots` decides),
and compute ``synchronized_standby_slots``.  The PostgreSQL parameters slot failover needs come
from :meth:`SlotKeeper.params`, which :class:`~hakeeper.ha.pgconfig.PgConfigurator` merges in.

The rules live in the pure module; this class carries them out and remembers what it logged."""

from __future__ import annotations

import time
from collections.abc import Callable

from hakeeper.core.cluster import ClusterView
from hakeeper.core.config import ParamValue
from hakeeper.core.pgtypes import LocalState, Role
from hakeeper.core.records import MAX_REPORTED_SLOTS
from hakeeper.core.slots import SlotReport, SlotState
from hakeeper.dcs.slotkey import read_managed_slots, write_managed_slots
from hakeeper.dcs.store import ClusterStore
from hakeeper.ha.policy.slots import plan_permanent, standby_slot_names
from hakeeper.pg import slots as sql
from hakeeper.pg.errors import PgError
from hakeeper.pg.session import SqlSession
from hakeeper.util.log import get_logger

log = get_logger("hakeeper.slots")

FAILOVER_MAJOR = 17  # the first major with failover slots and the slot sync worker
CREATE_RETRY_S = 30.0  # a permanent slot whose creation failed is tried again after this

NOT_FAILOVER_SAFE_15 = (
    "PostgreSQL {major} has no failover slots: the slot exists on the primary only; after a "
    "failover the new primary re-creates it at its own position and changes between the old "
    "slot's position and then are never delivered to its consumer"
)
NOT_FAILOVER_SAFE_17 = (
    "created without failover: the standbys do not sync it, a failover loses it (declare it in "
    "the config's slots, or create it with failover => true)"
)


class SlotKeeper:
    def __init__(
        self,
        name: str,
        store: ClusterStore,
        session: SqlSession,
        binaries_major: Callable[[], int | None],
    ) -> None:
        self.name = name
        self.store = store
        self.session = session
        # The major of this node's binaries (hakeeper.pg.version, read once at the agent's start,
        # which also refused a data directory of another major): what the parameters are
        # written for before the server runs.
        self._binaries_major = binaries_major
        self.major: int | None = None  # of the running server (its probe's server_version), once seen
        self.report: SlotReport | None = None  # what the member record publishes
        self.existing: dict[str, SlotState] = {}  # every non-temporary slot, by name
        self.standby_slots: tuple[str, ...] = ()  # the primary's synchronized_standby_slots
        self.managed: frozenset[str] | None = None  # the `slots` key, as last read or written
        self.managed_term: int | None = None  # the term it was read under
        self._warned: set[tuple[str, str]] = set()  # (slot, reason) logged once
        # slot -> monotonic time before which a failed creation is not tried again: creating a
        # logical slot waits (up to its 10 s timeout) for the transactions running then, and
        # the HA cycle that tries it waits with it; not every cycle while one stays open
        self._create_after: dict[str, float] = {}

    # -- parameters --------------------------------------------------------------------------------

    def server_major(self) -> int | None:
        """The major the parameters are written for: the running server's, else the binaries'
        (the same, as the agent's start checked the data directory's PG_VERSION against them)."""
        return self.major if self.major is not None else self._binaries_major()

    def params(self, role: Role, wal_level: str) -> dict[str, ParamValue]:
        """What slot failover needs, per role, on 17+ (none before: the parameters do not exist
        there and PostgreSQL would refuse to start).  On 17+ whenever ``wal_level`` is logical,
        rather than only while permanent logical slots exist: a slot added later (or a user's
        own failover slot) is synced without rewriting every replica's configuration, and an
        idle slot sync worker costs one query per cycle of its own.  Not below logical: there
        can be no logical slot to sync, and the postmaster would retry (and log) starting a
        sync worker that refuses to run several times a second."""
        major = self.server_major()
        if major is None or major < FAILOVER_MAJOR:
            return {}
        if role is Role.REPLICA:
            if wal_level != "logical":
                return {}
            # The slot sync worker refuses to run without hot_standby_feedback (the primary must
            # not remove rows the synced slots' catalog_xmin still needs).
            return {"sync_replication_slots": True, "hot_standby_feedback": True}
        return {"synchronized_standby_slots": ",".join(self.standby_slots)}

    # -- every member, every cycle -------------------------------------------------------------

    async def refresh(self, probe: LocalState, view: ClusterView) -> None:
        """Read the server's slots for the member record; on a primary, warn (once per slot)
        about logical slots a failover would lose."""
        if not probe.running:
            self.report = None
            self.existing = {}
            return
        major = probe.server_major or self.server_major()
        if major is None:
            log.debug("slots_read_failed", error="the server's major is not known yet")
            return
        self.major = major
        try:
            slots = await sql.list_slots(self.session, major)
        except PgError as e:
            log.debug("slots_read_failed", error=str(e))
            return
        self.existing = {s.name: s for s in slots}
        wanted = view.config.slots
        shown = [s for s in slots if s.type == "logical" or s.name in wanted][:MAX_REPORTED_SLOTS]
        self.report = SlotReport(major, tuple(shown))
        if probe.in_recovery is False:
            self._warn_unsafe(shown)
        else:
            self.standby_slots = ()  # a primary's list, recomputed from scratch after a promotion
            if major >= FAILOVER_MAJOR:
                await self._drop_stale_copies(slots, view)

    async def _drop_stale_copies(self, slots: list[SlotState], view: ClusterView) -> None:
        """A 17+ replica's own (not synced) logical slot named like a permanent one is a leftover
        of its time as primary (a rewound old primary keeps its slots): the slot sync worker
        refuses to overwrite a slot it did not create, so the permanent slot would never be
        synced here.  Dropped, so that the next sync copies the primary's."""
        for s in slots:
            if s.type != "logical" or s.synced is not False or s.active or s.name not in view.config.slots:
                continue
            try:
                await sql.drop_slot(self.session, s.name)
            except PgError as e:
                self._once("stale_slot_drop_failed", s.name, reason=str(e))
                continue
            self.existing.pop(s.name, None)
            log.warning(
                "stale_slot_dropped",
                slot=s.name,
                confirmed_flush_lsn=s.confirmed_flush_lsn,
                reason="a copy this replica kept from its time as primary; the slot sync worker "
                "replaces it with the primary's",
            )

    def _warn_unsafe(self, slots: list[SlotState]) -> None:
        major = self.major or 0
        for s in slots:
            if s.type != "logical" or s.failover:
                continue
            reason = (
                NOT_FAILOVER_SAFE_15.format(major=major) if major < FAILOVER_MAJOR else NOT_FAILOVER_SAFE_17
            )
            self._once("slot_not_failover_safe", s.name, reason=reason, database=s.database, plugin=s.plugin)

    def _once(self, event: str, slot: str, **facts: object) -> None:
        key = (slot, f"{event}:{facts.get('reason')}")
        if key not in self._warned:
            self._warned.add(key)
            log.warning(event, slot=slot, **facts)

    # -- the primary ---------------------------------------------------------------------------

    async def manage(self, view: ClusterView, term: int, probe: LocalState | None) -> None:
        """One step of the leader's cycle: synchronized_standby_slots, then the permanent slots."""
        if probe is None or not probe.running or probe.in_recovery is not False:
            return
        ttl = view.config.ttl
        streaming = {
            r.application_name
            for r in probe.replication
            if r.state == "streaming" and (r.reply_age is None or r.reply_age <= ttl)
        }
        physical = {n for n, s in self.existing.items() if s.type == "physical"}
        standby = standby_slot_names(view, self.name, streaming, physical)
        if standby != self.standby_slots:
            log.info(
                "standby_slots_changed",
                synchronized_standby_slots=list(standby),
                before=list(self.standby_slots),
            )
            self.standby_slots = standby  # PgConfigurator applies it after this cycle's action
        if not view.config.slots and self.managed_term == term and not self.managed:
            return
        if self.managed_term != term:
            self.managed = await read_managed_slots(self.store)
            self.managed_term = term
        await self._permanent(view, term)

    async def _permanent(self, view: ClusterView, term: int) -> None:
        before = self.managed
        plan = plan_permanent(
            view.config.slots,
            config_valid=view.config_error is None,
            managed=before,
            existing=self.existing,
            members=view.members.keys(),
        )
        for name, why in plan.conflicts:
            self._once("permanent_slot_skipped", name, reason=why)
        # Recorded before anything is created: a primary that dies between the two leaves a name
        # in the key whose slot may not exist (harmless), never a slot nobody would drop.
        if plan.record != before and not await self._record(term, plan.record):
            return
        for name in plan.create:
            if time.monotonic() < self._create_after.get(name, 0.0):
                continue
            await self._create(view, name, was_managed=before is not None and name in before)
        dropped: set[str] = set()
        for name in plan.drop:
            try:
                await sql.drop_slot(self.session, name)
            except PgError as e:
                # 55006: became active; 42704: gone meanwhile.  Kept managed: retried next cycle.
                log.warning("permanent_slot_drop_failed", slot=name, error=str(e), sqlstate=e.sqlstate)
                continue
            dropped.add(name)
            self.existing.pop(name, None)
            log.info("permanent_slot_dropped", slot=name, reason="removed from the config's slots")
        after = plan.record - dropped - set(plan.forget)
        if after != plan.record:
            await self._record(term, after)

    async def _record(self, term: int, names: frozenset[str]) -> bool:
        if not await write_managed_slots(self.store, term, names):
            log.warning("managed_slots_write_refused", reason="the leader key changed (term over)")
            self.managed_term = None  # read again under the next term
            return False
        self.managed = names
        return True

    async def _create(self, view: ClusterView, name: str, *, was_managed: bool) -> None:
        spec = view.config.slots[name]
        major = self.major or 0
        failover = major >= FAILOVER_MAJOR
        try:
            if spec.type == "physical":
                await sql.create_physical(self.session, name)
            else:
                assert spec.database is not None and spec.plugin is not None  # validated
                await sql.create_logical(
                    self.session, name, database=spec.database, plugin=spec.plugin, failover=failover
                )
        except PgError as e:
            if e.sqlstate == "42710":  # duplicate_object: created concurrently
                return
            self._once("permanent_slot_create_failed", name, reason=str(e), sqlstate=e.sqlstate)
            self._create_after[name] = time.monotonic() + CREATE_RETRY_S
            return
        self._create_after.pop(name, None)
        log.info(
            "permanent_slot_created",
            slot=name,
            type=spec.type,
            database=spec.database,
            plugin=spec.plugin,
            failover=failover if spec.type == "logical" else None,
        )
        if was_managed and spec.type == "logical":
            # A previous primary had it: its consumers' position did not come along.
            log.warning(
                "permanent_slot_recreated",
                slot=name,
                reason="the slot was not on this primary (not synced before the failover"
                + (f", PostgreSQL {major} has no failover slots)" if not failover else ")")
                + ": re-created at this primary's current position; changes between the old "
                "slot's confirmed position and now are not delivered to its consumer",
            )
        elif was_managed:
            log.warning(
                "permanent_slot_recreated",
                slot=name,
                reason="physical slots are not synced to standbys: re-created on this primary, "
                "reserving WAL from now on",
            )
