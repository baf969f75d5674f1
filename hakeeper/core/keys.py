"""Every etcd key hakeeper reads or writes, in one table.

Keys under ``<namespace>/<scope>/`` (the cluster's *prefix*):

=====================  ======================================================================
``initialize``         system identifier of the cluster (created once, ``create_revision == 0``)
``config``             dynamic settings (JSON, CAS on mod_revision)
``leader``             leader member name, attached to the leader's lease; create_revision = term
``members/<name>``     member state (JSON), attached to that member's lease
``status``             leader LSN and timeline (JSON), written by the leader under its term
``history``            promotions (JSON list), appended by the new leader under its term
``switchover``         a pending switchover or manual failover request (JSON, CAS on mod_revision)
``sync``               the synchronous standbys (JSON), written by the leader under its term
``slots``              the permanent slots hakeeper manages (JSON), written by the leader under its term
``schedules/<name>``   the last run of a backup schedule (JSON), claimed by the leader under its term
``upgrade``            a major upgrade in progress (JSON): the cluster counts as paused while it exists
``verify/last``        the summary of the newest restore drill (JSON)
``verify/last_success``  the summary of the newest restore drill that passed (JSON)
=====================  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    @classmethod
    def of(cls, namespace: str, scope: str) -> Keys:
        return cls(f"{namespace}/{scope}")

    @property
    def all(self) -> str:
        """The prefix of every key of the cluster (for a range read or a watch)."""
        return f"{self.prefix}/"

    @property
    def initialize(self) -> str:
        return f"{self.prefix}/initialize"

    @property
    def config(self) -> str:
        return f"{self.prefix}/config"

    @property
    def leader(self) -> str:
        return f"{self.prefix}/leader"

    @property
    def members(self) -> str:
        return f"{self.prefix}/members/"

    def member(self, name: str) -> str:
        return f"{self.prefix}/members/{name}"

    @property
    def status(self) -> str:
        return f"{self.prefix}/status"

    @property
    def history(self) -> str:
        return f"{self.prefix}/history"

    @property
    def switchover(self) -> str:
        return f"{self.prefix}/switchover"

    @property
    def upgrade(self) -> str:
        return f"{self.prefix}/upgrade"

    @property
    def sync(self) -> str:
        return f"{self.prefix}/sync"

    @property
    def slots(self) -> str:
        return f"{self.prefix}/slots"

    @property
    def schedules(self) -> str:
        return f"{self.prefix}/schedules/"

    def schedule(self, name: str) -> str:
        return f"{self.prefix}/schedules/{name}"

    @property
    def verify_last(self) -> str:
        return f"{self.prefix}/verify/last"

    @property
    def verify_last_success(self) -> str:
        return f"{self.prefix}/verify/last_success"
