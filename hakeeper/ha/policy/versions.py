"""One major per cluster: a replica never clones from, rewinds from or follows a leader of
another PostgreSQL major (docs/versions.md).

pg_basebackup from a server of another major fails ("incompatible server version") or, with
tools new enough to talk to it, copies files this node's binaries cannot run; streaming between
majors does not exist.  Retrying every cycle would only fill the logs and, for a clone, leave a
half-copied data directory behind each time.  So the node waits, says why in its member record
(``ineligible_reason``: ``hakeeper list`` shows it) and in one log line per leader and release.
"""

from __future__ import annotations

from hakeeper.core.cluster import ClusterView
from hakeeper.core.pgtypes import release_major


def leader_major_refusal(view: ClusterView, name: str, binaries_major: int | None) -> str | None:
    """Why node ``name``, whose binaries are PostgreSQL ``binaries_major``, must not clone from
    or follow the current leader; None when it may (same major, or either major unknown: a
    leader that does not run publishes no ``server_version``, and an agent of an earlier version
    publishes none at all -- the clone then fails as before, nothing is made worse)."""
    leader = view.leader_member
    if leader is None or leader.name == name or binaries_major is None:
        return None
    theirs = release_major(leader.server_version)
    if theirs is None or theirs == binaries_major:
        return None
    return (
        f"the leader {leader.name} runs PostgreSQL {leader.server_version}, this node's binaries "
        f"are PostgreSQL {binaries_major}"
    )
