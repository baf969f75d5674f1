"""An agent killed (SIGKILL) in the middle of its bootstrap, restarted: over FakeEtcd +
FakePostgres with the bootstrap marker in memory (hakeeper/ha/bootmark.py).

A kill runs no ``except`` or ``finally``: :func:`kill_in_initialize` runs the real
``initialize`` up to a chosen call, then puts the data directory, PostgreSQL and the marker back
as they were at that moment (whatever the executor's error handling undid after it), and the
agent is gone.  ``restart_agent`` then starts a new agent on what is left."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from hakeeper.ha import bootmark
from hakeeper.ha.actions import bootstrap
from hakeeper.ha.bootmark import BootstrapMark, Phase
from hakeeper.ha.policy.decide import decide
from hakeeper.ha.policy.decision import Action, Decision
from tests.support.sim import Sim, SimNode, capture_events

INITIALIZE = Decision(Action.INITIALIZE, "cluster not initialized")


@pytest.fixture(autouse=True)
def made_by_that_initdb(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """FakePostgres has no files: whether a directory's PG_VERSION dates from the marker's initdb
    (bootmark.made_during, tested on real files in test_bootmark.py) is what this list says."""
    answer = [True]
    monkeypatch.setattr(bootmark, "made_during", lambda data_dir, started_at: answer[0])
    return answer


class Killed(BaseException):
    """SIGKILL: the agent stops at this call."""


async def kill_in_initialize(sim: Sim, name: str, at: str) -> None:
    """Run ``name``'s initialize until it calls ``at`` (``initdb``: half-way through it; ``race``:
    the initialize transaction, before etcd got it; ``won``: the marker's record of the race
    won, after etcd's; ``create_roles``), then leave everything as
    a SIGKILL there would: the agent dead, its PostgreSQL as it was (running, if started), the
    disk and the marker as they were."""
    n = sim[name]
    pg = n.pg
    view, facts = await n.observe()
    assert decide(view, facts).action == Action.INITIALIZE
    left: dict[str, Any] = {}

    def snapshot(patched: str) -> None:
        left["pg"] = {k: v for k, v in vars(pg).items() if k != patched}
        left["mark"] = n.marker.current

    async def half_initdb(extra_args: list[str]) -> None:
        pg.initialized = True  # PG_VERSION written, pg_control not yet
        pg.system_id = None
        snapshot("initdb")
        raise Killed

    async def killed(*args: object, **kw: object) -> None:
        snapshot(at)
        raise Killed

    real_advance = bootmark.advance

    def advance_until_won(record: Any, mark: BootstrapMark, phase: Phase, sysid: str) -> BootstrapMark:
        if phase == Phase.WON:  # etcd holds our initialize key; the marker does not say so yet
            snapshot(at)
            raise Killed
        return real_advance(record, mark, phase, sysid)

    # the race is the first etcd transaction of initialize: the one that creates the keys
    target: object = {"race": n.link, "won": bootmark}.get(at, pg)
    attribute = {"race": "txn", "won": "advance"}.get(at, at)
    replacements: dict[str, Callable[..., Any]] = {"initdb": half_initdb, "won": advance_until_won}
    replacement = replacements.get(at, killed)
    original = vars(target).get(attribute)
    setattr(target, attribute, replacement)
    try:
        with pytest.raises(Killed):
            await bootstrap.initialize(n.ctx, view, facts, INITIALIZE)
    finally:
        if original is not None:
            setattr(target, attribute, original)
        else:
            delattr(target, attribute)
    vars(pg).update(left["pg"])  # nothing the except/finally of the executor did happened
    n.marker.mark = left["mark"]
    n.agent_alive = False


async def steps_until(sim: Sim, done: Callable[[], bool], max_steps: int = 20) -> None:
    for _ in range(max_steps):
        await sim.step()
        if done():
            return
    raise AssertionError(f"not reached in {max_steps} steps: {list(sim.world.servers.values())}")


async def others_form_the_cluster(sim: Sim) -> SimNode:
    """b and c initialize and stream while a's agent is dead; b's or c's node, whichever leads."""

    def formed() -> bool:
        writable = sim.world.writable()
        return len(writable) == 1 and all(
            sim[n].pg.upstream_primary() is sim[writable[0]].pg for n in ("b", "c") if n != writable[0]
        )

    await steps_until(sim, formed)
    leader = sim.world.writable()[0]
    assert leader != "a"
    return sim[leader]


@pytest.mark.parametrize("at", ["initdb", "race"], ids=["killed in initdb", "killed before the race"])
async def test_an_abandoned_bootstrap_is_discarded_and_the_node_clones(
    monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    sim = Sim(monkeypatch)
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", at)
    a_pg = sim["a"].pg
    assert a_pg.is_initialized(), "the kill left a data directory"
    mark = sim["a"].marker.current
    assert mark is not None and mark.data_dir == str(a_pg.data_dir)
    assert mark.phase == (Phase.INITDB if at == "initdb" else Phase.RACE)
    assert mark.system_identifier == a_pg.system_id  # None when killed in initdb
    leader = await others_form_the_cluster(sim)
    cluster_sysid = (await sim.read_view()).initialized
    assert cluster_sysid == leader.pg.system_id != a_pg.system_id

    events = capture_events(monkeypatch, bootstrap)
    await sim.restart_agent("a")
    await steps_until(sim, lambda: a_pg.upstream_primary() is leader.pg)

    abandoned = [e for e in events if e["event"] == "bootstrap_abandoned"]
    assert len(abandoned) == 1
    assert abandoned[0]["cluster"] == cluster_sysid
    expected = "no readable pg_control" if at == "initdb" else "another member initialized the cluster"
    assert expected in abandoned[0]["reason"]
    assert a_pg.system_id == cluster_sysid and not a_pg.writable
    assert sim["a"].marker.current is None


async def test_without_the_marker_the_foreign_data_directory_is_never_touched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = Sim(monkeypatch)
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", "race")
    ours = sim["a"].pg.system_id
    await others_form_the_cluster(sim)
    sim["a"].marker.mark = None  # a runtime directory lost, or never written

    events = capture_events(monkeypatch, bootstrap)
    a = await sim.restart_agent("a")
    await sim.run(8)

    assert a.pg.is_initialized() and a.pg.system_id == ours, "the data directory is kept"
    assert not any(e["event"] == "bootstrap_abandoned" for e in events)
    assert a.node.state.decision is not None
    assert a.node.state.decision.why == "data directory belongs to another cluster; refusing to touch it"


async def test_a_marker_of_a_won_race_never_discards_the_data_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the race was won the directory is the cluster's data: even if the initialize key
    later holds another identifier (etcd wiped, the cluster made again by another member), the
    refusal stays."""
    sim = Sim(monkeypatch)
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", "race")
    ours = sim["a"].pg.system_id
    await others_form_the_cluster(sim)
    mark = sim["a"].marker.mark
    assert mark is not None and ours is not None
    sim["a"].marker.mark = type(mark)(Phase.WON, mark.data_dir, mark.started_at, ours)

    a = await sim.restart_agent("a")
    await sim.run(5)

    assert a.pg.system_id == ours
    assert a.node.state.decision is not None
    assert a.node.state.decision.action == Action.WAIT


async def test_killed_before_the_race_alone_the_node_races_again(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Sim(monkeypatch, names=("a",))
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", "race")
    first = sim["a"].pg.system_id
    assert (await sim.read_view()).initialized is None

    events = capture_events(monkeypatch, bootstrap)
    a = await sim.restart_agent("a")
    await steps_until(sim, lambda: a.pg.writable)

    assert [e["event"] for e in events if e["event"].startswith(("bootstrap_", "initialize_"))] == [
        "bootstrap_abandoned",
        "initialize_won",
    ]
    assert sim.world.initdbs == ["a", "a"]
    stored = await sim.read_view()
    assert stored.initialized == a.pg.system_id != first
    assert a.pg.roles_created and a.marker.current is None


async def test_killed_before_the_roles_existed_the_restarted_leader_creates_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = Sim(monkeypatch)
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", "create_roles")
    a_pg = sim["a"].pg
    assert a_pg.writable and not a_pg.roles_created, "a primary nobody can clone from"
    mark = sim["a"].marker.current
    assert mark is not None and mark.phase == Phase.WON
    await sim.run(3)  # b and c cannot clone: "password authentication failed"
    assert all(not sim[n].pg.is_initialized() for n in ("b", "c"))

    events = capture_events(monkeypatch, bootstrap)
    await sim.restart_agent("a")
    await steps_until(sim, lambda: sim.converged("a"))

    done = [e for e in events if e["event"] == "bootstrap_completed_after_restart"]
    assert len(done) == 1 and done[0]["history"] == "recorded"
    assert a_pg.roles_created and sim["a"].marker.current is None
    stored = await sim.read_view()
    assert [(h.reason, h.new_leader, h.timeline) for h in stored.history] == [("bootstrap", "a", 1)]
    assert stored.initialized == a_pg.system_id


async def test_a_bootstrap_that_finished_leaves_no_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Sim(monkeypatch)
    leader = await sim.bootstrap()
    marks = sim[leader].marker.saves
    assert [m.phase for m in marks] == [Phase.INITDB, Phase.RACE, Phase.WON]
    assert marks[1].system_identifier == marks[2].system_identifier == sim[leader].pg.system_id
    assert all(sim[n].marker.current is None for n in sim.nodes)


@pytest.mark.parametrize("made_then", [True, False], ids=["made by that initdb", "made later"])
async def test_a_marker_without_a_system_identifier_vouches_only_for_its_initdb_s_directory(
    monkeypatch: pytest.MonkeyPatch, made_by_that_initdb: list[bool], made_then: bool
) -> None:
    """Killed after initdb ended, before the marker recorded the identifier.  That marker proves
    the directory is ours only if its PG_VERSION was written while that initdb ran; one put
    there later (a restored backup) is refused as before, and the stale marker removed."""
    sim = Sim(monkeypatch)
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", "race")
    mark = sim["a"].marker.mark
    assert mark is not None
    sim["a"].marker.mark = BootstrapMark(Phase.INITDB, mark.data_dir, mark.started_at)
    ours = sim["a"].pg.system_id
    await others_form_the_cluster(sim)
    made_by_that_initdb[0] = made_then

    events = capture_events(monkeypatch, bootstrap)
    a = await sim.restart_agent("a")
    await sim.run(6)

    discarded = any(e["event"] == "bootstrap_abandoned" for e in events)
    assert discarded == made_then
    if made_then:
        assert a.pg.system_id == (await sim.read_view()).initialized
    else:
        assert a.pg.system_id == ours and a.marker.current is None
        assert a.node.state.decision is not None
        assert a.node.state.decision.why == "data directory belongs to another cluster; refusing to touch it"


async def test_killed_between_winning_the_race_and_its_record_the_node_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The initialize key holds our identifier, the marker still says "race": the restarted
    agent records that it won (so the directory can never be taken for an abandoned one), starts
    PostgreSQL as the leader and finishes the bootstrap."""
    sim = Sim(monkeypatch)
    await sim.pass_time(1)
    await kill_in_initialize(sim, "a", "won")
    a_pg = sim["a"].pg
    mark = sim["a"].marker.current
    assert mark is not None and mark.phase == Phase.RACE and not a_pg.running
    assert (await sim.read_view()).initialized == mark.system_identifier == a_pg.system_id

    events = capture_events(monkeypatch, bootstrap)
    a = await sim.restart_agent("a")
    await steps_until(sim, lambda: sim.converged("a"))

    assert Phase.WON in [m.phase for m in a.marker.saves[-2:]]
    assert [e["event"] for e in events if e["event"].startswith("bootstrap_")] == [
        "bootstrap_marker_updated",
        "bootstrap_completed_after_restart",
    ]
    assert a_pg.roles_created and a.marker.current is None
