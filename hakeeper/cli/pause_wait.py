"""``pause --wait`` / ``resume --wait``: wait until every member's agent reports that it runs
under the new maintenance state.

A pause is a flag in the dynamic configuration; each agent publishes in its member record
(``paused``) what its last cycle decided under.  A member whose record says so has stopped (or
resumed) automatic failover; until every member does, a failover could still start somewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from hakeeper.core.cluster import ClusterView
from hakeeper.core.keys import Keys
from hakeeper.dcs.etcd import EtcdClient
from hakeeper.dcs.store import ClusterStore

POLL_S = 0.5


def pause_laggards(view: ClusterView, paused: bool) -> dict[str, str]:
    """The members that do not report ``paused`` yet, each with what it reports instead.
    Pure."""
    want = "paused" if paused else "not paused"
    laggards = {}
    for m in sorted(view.members.values(), key=lambda m: m.name):
        if m.paused is None:
            laggards[m.name] = "its agent does not report whether it is paused (an older version?)"
        elif m.paused != paused:
            laggards[m.name] = f"still reports {'paused' if m.paused else 'not paused'}, not {want}"
    return laggards


async def wait_for_pause_state(
    make_client: Callable[[], EtcdClient], prefix: str, paused: bool, timeout: float
) -> tuple[ClusterView, dict[str, str]]:
    """Re-read the cluster until every member reports ``paused`` or ``timeout`` seconds pass;
    the last view and the members that had not followed (empty: all did).  Raises
    :class:`~hakeeper.dcs.etcd.EtcdError` when etcd cannot be read."""
    client = make_client()
    store = ClusterStore(client, Keys(prefix))
    deadline = time.monotonic() + timeout
    try:
        while True:
            view = await store.read_view()
            laggards = pause_laggards(view, paused)
            if (view.members and not laggards) or time.monotonic() >= deadline:
                return view, laggards
            await asyncio.sleep(POLL_S)
    finally:
        await client.close()
