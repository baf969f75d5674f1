"""Continuous WAL archiving on the primary (issue 5, item 2).

The agent runs one :class:`Archiver` task.  It watches ``pg_wal/archive_status/*.ready`` itself
(a directory scan every ``poll_interval``, 0.1 s by default), reads each file PostgreSQL wants
archived and stores it in every repository with ``put_unique`` (compressed, checksummed, never
overwritten), several files at once, timeline history files first.  PostgreSQL's
``archive_command`` is a tiny POSIX sh script in the spool directory that only *waits*: once
the file is durable the archiver creates ``<spool>/done/<file>``; the script removes that
marker and exits 0.  Without a marker within ``timeout`` it exits 1 and PostgreSQL retries
later.  So there is no Python process per segment, and PostgreSQL removes or recycles a
segment only after the archiver vouched for it.

A file is handed back (marker written) when it is durable in every repository, or durable in
at least one and durably queued in the spool for each of the others.  A repository that fails
(unreachable, or no answer within ``repo_timeout``) is *down*: live files skip it and are queued
for it, and it is probed again with exponential back-off (1 s .. 30 s), by pushing its oldest
queued file or, with an empty queue, by a ``stat``.  When it answers again its queue drains
(history files first, oldest first) while live archiving goes on.

Caps:

* ``max_queue_bytes``: beyond it, the oldest queued files are dropped (for every repository
  still waiting for them) and the gap is recorded: a JSON record in ``<spool>/gaps/`` (fsynced
  before anything is dropped) that is published as ``<scope>/wal-gaps/<id>.json`` to every
  repository as soon as it is reachable.
* ``max_pg_wal_bytes`` (default ``auto``: 25% of pg_wal's filesystem; None: never): when the
  ``.ready`` files in pg_wal exceed it, the ones that failed to archive are given up in
  PostgreSQL's order (history first, then oldest): gap record first, then the marker, so
  PostgreSQL can recycle them.  Warnings at 50% and 80% of it.

``put_unique`` raising :class:`ContentConflict` (an object of that name with other content; the
repository quarantined our copy) is a hard error for that file: logged, counted, shown in
:meth:`Archiver.status`, never retried by this process and never reported archived (unless the
pg_wal cap gives it up, recorded as a gap).

Only a node that is primary and holds the leader key archives: ``may_archive()`` is asked
before every push and every marker; while it is false nothing is pushed (not even the spool
queue), every marker is removed and the per-file state is forgotten (re-pushing an identical
file later is cheap and safe).  At start the markers of an earlier run are removed too: a
marker must only ever vouch for a file this process stored.

Modules, from the task that drives it all to the pieces it is made of:

* ``archiver``: :class:`~hakeeper.backup.archive.archiver.Archiver`, the task (set-up, the pass
  every ``poll_interval``, pushes, drains, probes, caps, ``status()``);
* ``dispatch``: which pushes, drains, probes and gap publications a pass starts;
* ``plan``: the pure planners (archive order, queue drops, give-ups, back-off);
* ``state``: per repository (:class:`RepoState`) and per ``.ready`` file (:class:`ReadyFile`);
* ``pgwal``: the scan of ``archive_status``; ``command``: the script and its markers;
* ``spool``: the local queue; ``gaps``: gap records; ``rpo``: the archive RPO;
* ``switch``: the check after a promotion; ``metrics``: Prometheus; ``permission``: may we?
"""

# Every module of the package logs under the name the archiver's log lines always had (log
# filters and dashboards may select on the ``logger`` field).
LOG_NAME = "hakeeper.backup.archiver"
