"""Node.reconfigure over the simulation's real agents: a reloaded tag reaches the member record
and the next decision; a refused file changes nothing, not even its run-time fields."""

from __future__ import annotations

import pytest

from hakeeper.core.config import NodeConfig
from hakeeper.core.errors import RefusalKind, Refused
from tests.support.sim import Sim


def edited(cfg: NodeConfig, **sections: object) -> NodeConfig:
    """A copy of ``cfg`` as a re-read file would give it (fresh objects, validated)."""
    data = cfg.model_dump()
    for path, value in sections.items():
        *parents, field = path.split("__")
        target = data
        for p in parents:
            target = target[p]
        target[field] = value
    data["postgresql"]["superuser"]["password"] = cfg.postgresql.superuser.password.get_secret_value()
    data["postgresql"]["replication"]["password"] = cfg.postgresql.replication.password.get_secret_value()
    return NodeConfig.model_validate(data)


async def test_a_reloaded_nofailover_tag_is_published_and_obeyed(cluster: Sim) -> None:
    node = cluster["b"].node
    new = edited(node.cfg, tags__nofailover=True, postgresql__parameters={"work_mem": "8MB"})
    node.reread = lambda: new
    message = await node.operator.reload()
    assert message.startswith(
        "reloaded: postgresql.parameters.work_mem (unset) -> 8MB; tags.nofailover false -> true."
    )
    assert node.cfg.tags.nofailover is True
    assert node.cfg.postgresql.parameters == {"work_mem": "8MB"}
    assert node.pgconf.written is not None and node.pgconf.written["work_mem"] == "8MB"  # files rewritten
    assert node.loop.identity.nofailover is True
    assert node.snapshots.member().nofailover is True
    assert node.snapshots.snapshot().tags["nofailover"] is True
    facts = await node.loop.observe(node.loop.view())
    assert facts.nofailover is True
    # no change the second time
    assert (await node.operator.reload()).startswith("no change in the node file.")


async def test_a_restart_only_change_refuses_the_whole_file(cluster: Sim) -> None:
    node = cluster["b"].node
    before = node.cfg.model_dump()
    node.reread = lambda: edited(node.cfg, scope="elsewhere", tags__nofailover=True)
    with pytest.raises(Refused) as e:
        await node.operator.reload()
    assert e.value.kind == RefusalKind.CONFLICT
    assert "scope cannot change at run time" in e.value.message
    assert e.value.facts["errors"][0]["field"] == "scope"
    assert node.cfg.model_dump() == before
    assert node.loop.identity.nofailover is False
