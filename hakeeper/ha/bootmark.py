"""The bootstrap marker: what this node's agent was doing while it created the cluster.

An agent killed (SIGKILL, a power cut) while it bootstraps runs no ``except`` or ``finally``: it
leaves a data directory of its own (half made by initdb, or complete but beaten in the
initialize race) or a primary whose roles were never created.  A restarted agent cannot tell
such a directory from real data by looking at it, and must never remove real data; so the agent
writes down, durably and *before* each step, what it is about to do:

* ``initdb``: before initdb starts (the data directory may be half made from here on);
* ``race``: initdb made the system identifier it records; the initialize race is next;
* ``won``: the race was won (the initialize key holds that system identifier): PostgreSQL is
  started as primary next, then the roles are created and the history entry recorded.

The marker is removed once the bootstrap finished, or once its data directory was removed.
A restarted agent that finds it knows the data directory is its own abandoned bootstrap when
the marker names it (phase ``initdb`` or ``race``, with no system identifier or the directory's
own) and the cluster's initialize key is not that system identifier; and that it only has to
finish the bootstrap when the initialize key is (docs/decisions.md).

The file lives in the agent's runtime directory (never in PGDATA: the PostgreSQL user must not be
able to forge it), mode 0600, owned by the agent's user, like the persisted lease.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from hakeeper.ha.policy.decision import BootstrapLeft
from hakeeper.util.fsutil import fsync_dir, open_regular, write_atomic
from hakeeper.util.log import get_logger
from hakeeper.util.proc import RunAs, pid_alive, proc_cmdline

log = get_logger("hakeeper.bootmark")

MARKER_NAME = "bootstrap.json"

# A directory made by the initdb a marker without a system identifier names has its PG_VERSION
# written this many seconds around the marker's start (initdb's own timeout is 300 s; the
# margin before allows for a small step of the wall clock).
INITDB_WINDOW = (-60.0, 900.0)


class Phase(StrEnum):
    INITDB = "initdb"  # initdb is about to run or runs: the data directory may be half made
    RACE = "race"  # initdb made `system_identifier`; the initialize race is next
    WON = "won"  # the initialize key holds `system_identifier`: the directory is the cluster's


@dataclass(frozen=True, slots=True)
class BootstrapMark:
    phase: Phase
    data_dir: str
    started_at: float  # wall clock (epoch s), when initdb was about to start
    system_identifier: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BootstrapMark:
        raw = json.loads(text)
        sysid = raw.get("system_identifier")
        return cls(
            phase=Phase(raw["phase"]),
            data_dir=str(raw["data_dir"]),
            started_at=float(raw["started_at"]),
            system_identifier=None if sysid is None else str(sysid),
        )

    def left(self) -> BootstrapLeft:
        """The fact the policy decides on."""
        return BootstrapLeft(system_identifier=self.system_identifier, won=self.phase == Phase.WON)


class BootstrapRecord(Protocol):
    """Where the marker is kept (a file; in memory for the simulation).  ``current`` is what
    was last saved, or what a predecessor left (read once, when the record is made)."""

    @property
    def current(self) -> BootstrapMark | None: ...

    def save(self, mark: BootstrapMark) -> None:
        """Durable when it returns (raises OSError otherwise: the step must then not start)."""
        ...

    def clear(self) -> None: ...


class BootstrapFile:
    """The marker in ``path`` (JSON, mode 0600).  Read on first use, which is after the agent
    took its runtime directory (``Node._take_lock``): by then nobody but the agent's user can
    have written there, and a marker that user does not own proves nothing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded = False
        self._current: BootstrapMark | None = None

    def _load(self) -> BootstrapMark | None:
        try:
            fd = open_regular(self.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("bootstrap_marker_unreadable", path=str(self.path), error=str(e))
            return None
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                log.warning(
                    "bootstrap_marker_ignored", path=str(self.path), reason="not owned by the agent's user"
                )
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return BootstrapMark.from_json(f.read().decode())
        except (OSError, ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            # An unreadable marker proves nothing: the data directory is then treated as any
            # other (the refusal to touch a foreign one stays).
            log.warning("bootstrap_marker_unreadable", path=str(self.path), error=str(e))
            return None
        finally:
            os.close(fd)

    @property
    def current(self) -> BootstrapMark | None:
        if not self._loaded:
            self._current, self._loaded = self._load(), True
        return self._current

    def save(self, mark: BootstrapMark) -> None:
        write_atomic(self.path, mark.to_json(), mode=0o600, run_as=RunAs())
        fsync_dir(self.path.parent)  # the rename too: the marker must outlive a power cut
        self._current, self._loaded = mark, True

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        fsync_dir(self.path.parent)
        self._current, self._loaded = None, True


def begin(record: BootstrapRecord, data_dir: Path) -> BootstrapMark:
    mark = BootstrapMark(Phase.INITDB, str(data_dir), time.time())
    record.save(mark)
    return mark


def advance(record: BootstrapRecord, mark: BootstrapMark, phase: Phase, sysid: str) -> BootstrapMark:
    mark = replace(mark, phase=phase, system_identifier=sysid)
    record.save(mark)
    return mark


def leftover(record: BootstrapRecord, data_dir: Path) -> BootstrapLeft | None:
    """The policy's fact: the marker, when it names ``data_dir`` (a marker naming another
    directory proves nothing about this one)."""
    mark = record.current
    if mark is None or mark.data_dir != str(data_dir):
        return None
    return mark.left()


def made_during(data_dir: Path, started_at: float) -> bool:
    """Whether ``data_dir``'s PG_VERSION (a regular file, not followed if a link) was written
    while the initdb begun at ``started_at`` could have run: the proof a marker without a system
    identifier has that the directory is that initdb's, not one put there later (a restored
    backup).  Reads the file system: call it in a thread."""
    try:
        st = os.lstat(data_dir / "PG_VERSION")
    except OSError:
        return False
    lo, hi = INITDB_WINDOW
    return stat.S_ISREG(st.st_mode) and started_at + lo <= st.st_mtime <= started_at + hi


def initdb_running(data_dir: Path) -> int | None:
    """The PID of an initdb still working on ``data_dir`` (None: none).  A killed agent's initdb
    runs on in its own session (and ignores SIGPIPE): removing the directory under it, or a new
    initdb beside it, would have the two fight over one directory.  Reads /proc: call it in a
    thread."""
    target = str(data_dir)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        argv = proc_cmdline(int(entry))
        if not argv or os.path.basename(argv[0]) != "initdb":
            continue
        if any(a == target or a == f"--pgdata={target}" for a in argv[1:]) and pid_alive(int(entry)):
            return int(entry)
    return None
