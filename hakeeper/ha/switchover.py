"""Switchover hand-over, run by the leader (``Action.SWITCHOVER``) and request rejection.

The leader stops writes, waits until the candidate has received all of its WAL, releases the
leader key to the candidate in one term-guarded txn and follows it.  The candidate's side is an
ordinary campaign (``decide()`` lets only the named candidate campaign during a hand-over).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import psycopg

from hakeeper.core.cluster import ClusterView, Member, SwitchoverStage
from hakeeper.core.config import secret_value
from hakeeper.core.lsn import parse_lsn
from hakeeper.dcs.etcd import cmp_create, cmp_mod, cmp_value, op_delete, op_put
from hakeeper.ha.decide import Decision, LocalFacts
from hakeeper.pg.conf import build_conninfo
from hakeeper.pg.errors import PgError
from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from hakeeper.ha.agent import Agent

log = get_logger("hakeeper.agent")


async def reject_switchover(agent: Agent, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    sw = view.switchover
    assert view.leader is not None and sw is not None
    log.warning("switchover_refused", reason=d.why, kind=sw.kind.value, candidate=sw.candidate)
    k = agent.keys
    await agent.client.txn(
        [cmp_create(k.leader, "=", view.leader.term), cmp_mod(k.switchover, "=", sw.mod_revision)],
        [op_delete(k.switchover)],
    )
    await agent.mirror.resync()


async def switchover(agent: Agent, view: ClusterView, facts: LocalFacts, d: Decision) -> None:
    """Planned hand-over: stop writes, wait until the candidate has all our WAL, release the
    leader key to it, and follow it.  Nothing acknowledged is lost and no rewind is needed:
    the candidate has received everything up to our shutdown checkpoint."""
    sw = view.switchover
    assert view.leader is not None and sw is not None and d.target is not None
    cand = view.members[d.target]
    k = agent.keys
    term = view.leader.term
    t0 = time.monotonic()
    log.info("switchover_started", candidate=d.target, kind=sw.kind.value, force=sw.force)
    with contextlib.suppress(PgError):
        await agent.pg.checkpoint(timeout=60)  # makes the shutdown checkpoint short
    t_ckpt = time.monotonic()
    await agent.pg.stop("fast", timeout=60)  # terminates sessions, writes the shutdown checkpoint
    t_stopped = time.monotonic()
    ctl = await agent.pg.controldata()
    final_lsn = parse_lsn(ctl.get("Latest checkpoint location"))
    caught_up = await wait_received(agent, cand, final_lsn, timeout=max(5.0, view.config.ttl))
    if not caught_up and not sw.force:
        log.error(
            "switchover_aborted",
            reason="candidate did not receive our final WAL in time; restarting as primary",
            candidate=d.target,
            final_lsn=ctl.get("Latest checkpoint location"),
        )
        await agent.client.txn(
            [cmp_create(k.leader, "=", term), cmp_mod(k.switchover, "=", sw.mod_revision)],
            [op_delete(k.switchover)],
        )
        return  # next cycle: we still hold the key, postgres is down -> restart in place
    handover = replace(sw, stage=SwitchoverStage.HANDOVER, candidate=d.target, handover_at=time.time())
    res = await agent.client.txn(
        [
            cmp_value(k.leader, "=", agent.name),
            cmp_create(k.leader, "=", term),
            cmp_mod(k.switchover, "=", sw.mod_revision),
        ],
        [op_delete(k.leader), op_put(k.switchover, handover.to_json())],
    )
    if not res.succeeded:
        log.error("switchover_aborted", reason="leader key or request changed under us")
        return
    agent.fence.disarm()
    agent.metrics.handovers.inc()
    t_released = time.monotonic()
    log.info(
        "leader_released_to_candidate",
        candidate=d.target,
        final_lsn=ctl.get("Latest checkpoint location"),
        checkpoint_s=round(t_ckpt - t0, 3),
        stop_s=round(t_stopped - t_ckpt, 3),
        catch_up_s=round(t_released - t_stopped, 3),
    )
    agent.needs_rewind = not caught_up
    agent.pg_down_since = None
    await agent._start_as_replica(view, d.target)
    await agent.mirror.resync()


async def wait_received(agent: Agent, cand: Member, lsn: int | None, *, timeout: float) -> bool:
    """Poll the candidate directly until it has received WAL past ``lsn``."""
    if lsn is None:
        return False
    pgc = agent.cfg.postgresql
    deadline = time.monotonic() + timeout
    conninfo = build_conninfo(
        host=cand.host,
        port=cand.port,
        user=pgc.superuser.username,
        password=secret_value(pgc.superuser.password),
        dbname="postgres",
        connect_timeout=2,
        application_name="hakeeper-switchover",
    )
    while time.monotonic() < deadline:
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                while time.monotonic() < deadline:
                    cur = await conn.execute(
                        "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text"
                    )
                    row = await cur.fetchone()
                    got = max((parse_lsn(x) or 0) for x in (row or (None, None)))
                    if got > lsn:
                        return True
                    await asyncio.sleep(0.01)
        except psycopg.Error as e:
            log.warning("switchover_candidate_unreachable", candidate=cand.name, error=str(e).strip())
            await asyncio.sleep(0.1)
    return False
