"""What the archiver knows about each repository (up or down, its back-off, counters, archive
RPO) and about each ``.ready`` file (where it is stored or queued, its failures, its marker)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hakeeper.backup.archive import LOG_NAME
from hakeeper.backup.archive.plan import backoff
from hakeeper.util.log import get_logger

if TYPE_CHECKING:
    from hakeeper.backup.repo import Repository

log = get_logger(LOG_NAME)


@dataclass(slots=True)
class RepoState:
    repo: Repository
    up: bool = True
    failures_in_row: int = 0
    next_probe: float = 0.0  # monotonic; when a down repository may be tried again
    archived: int = 0
    failures: int = 0
    conflicts: int = 0
    last_success_at: float | None = None  # wall clock
    last_archived: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    probing: bool = False
    draining: set[str] = field(default_factory=set)
    background: set[asyncio.Future[tuple[str, str | None]]] = field(default_factory=set)
    # archive RPO: stored WAL files (name -> when they became .ready) not yet folded into
    # durable_at, the .ready time of the newest file with every older one stored here too
    stored_ready: dict[str, float] = field(default_factory=dict)
    durable_at: float | None = None
    bound: bool = False  # the repository's binding was checked (or written) by this process
    binding_error: str | None = None  # why it refuses this cluster (BindingMismatch)

    @property
    def name(self) -> str:
        return self.repo.name

    def claim_probe(self, now: float) -> bool:
        """A down repository may be tried once its back-off has passed, by one task at a time."""
        if self.up:
            return True
        if self.probing or now < self.next_probe:
            return False
        self.probing = True
        return True

    def ok(self, name: str | None) -> None:
        if not self.up:
            log.info("archive_repository_back", repo=self.name, down_failures=self.failures_in_row)
        self.up = True
        self.probing = False
        self.failures_in_row = 0
        self.last_success_at = time.time()
        if name is not None:
            self.archived += 1
            self.last_archived = name

    def failed(self, error: str, now: float) -> None:
        was_up = self.up
        self.up = False
        self.probing = False
        self.failures += 1
        self.failures_in_row += 1
        self.last_error = error
        self.last_error_at = time.time()
        wait = backoff(self.failures_in_row)
        self.next_probe = now + wait
        (log.warning if was_up else log.info)(
            "archive_repository_down" if was_up else "archive_repository_still_down",
            repo=self.name,
            error=error,
            retry_in=wait,
        )


@dataclass(slots=True, eq=False)
class ReadyFile:
    name: str
    ready_at: float  # wall clock: mtime of the .ready file
    size: int
    stored: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    conflicts: dict[str, str] = field(default_factory=dict)
    in_flight: bool = False
    attempts: int = 0  # failed attempts in a row
    blocked: bool = False  # no repository could be tried (all down)
    next_try: float = 0.0
    last_error: str | None = None
    done: bool = False  # marker written (archived, or given up)
    given_up: bool = False
    marker_at: float = 0.0  # monotonic

    @property
    def failed(self) -> bool:
        return bool(self.conflicts) or self.attempts > 0 or self.blocked


class PushOutcome:
    """How one push of a file to one repository ended."""

    STORED = "stored"
    CONFLICT = "conflict"
    ERROR = "error"
    REFUSED = "refused"
