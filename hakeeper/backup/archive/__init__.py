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
* ``max_pg_wal_bytes`` (default None: never): when the ``.ready`` files in pg_wal exceed it, the
  ones that failed to archive are given up in PostgreSQL's order (history first, then oldest):
  gap record first, then the marker, so PostgreSQL can recycle them.

``put_unique`` raising :class:`ContentConflict` (an object of that name with other content; the
repository quarantined our copy) is a hard error for that file: logged, counted, shown in
:meth:`Archiver.status`, never retried by this process and never reported archived (unless the
pg_wal cap gives it up, recorded as a gap).

Only a node that is primary and holds the leader key archives: ``may_archive()`` is asked
before every push and every marker; while it is false nothing is pushed (not even the spool
queue), every marker is removed and the per-file state is forgotten (re-pushing an identical
file later is cheap and safe).  At start the markers of an earlier run are removed too: a
marker must only ever vouch for a file this process stored.
"""
