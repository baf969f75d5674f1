"""What the probe asks the local PostgreSQL in one round trip, and how the answer becomes a
:class:`~hakeeper.core.pgtypes.LocalState` (pure: no I/O, no driver)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hakeeper.core.lsn import parse_lsn
from hakeeper.core.pgtypes import LocalState, ReplicaInfo, hostport
from hakeeper.pg.version import server_version_text

PROBE_SQL = """
SELECT
  pg_is_in_recovery(),
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
  CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_walfile_name(pg_current_wal_lsn()) END,
  pg_last_wal_receive_lsn()::text,
  pg_last_wal_replay_lsn()::text,
  (SELECT timeline_id FROM pg_control_checkpoint()),
  (SELECT min_recovery_end_timeline FROM pg_control_recovery()),
  CASE WHEN pg_is_in_recovery() THEN
    (SELECT max(('x' || substr(name, 1, 8))::bit(32)::int) FROM pg_ls_waldir()
      WHERE name ~ '^[0-9A-F]{8}[.]history$') END,
  (SELECT json_build_object('status', status, 'tli', received_tli,
                            'host', sender_host, 'port', sender_port)
     FROM pg_stat_wal_receiver LIMIT 1),
  (SELECT coalesce(json_agg(json_build_object(
            'application_name', application_name, 'state', state, 'sync_state', sync_state,
            'sent_lsn', sent_lsn::text, 'write_lsn', write_lsn::text,
            'flush_lsn', flush_lsn::text, 'replay_lsn', replay_lsn::text,
            'replay_lag', extract(epoch FROM replay_lag), 'client_addr', client_addr::text,
            'reply_age', extract(epoch FROM now() - reply_time))
          ORDER BY application_name), '[]'::json)
     FROM pg_stat_replication),
  current_setting('data_directory'),
  (SELECT coalesce(array_agg(name::text ORDER BY name), '{}') FROM pg_settings WHERE pending_restart)
"""

# Names of pending-restart parameters kept in a state (and published in the member record):
# enough to say what a restart would apply; a longer list is cut (the flag stays exact).
MAX_PENDING_NAMES = 32


def state_from_row(
    row: tuple[Any, ...], *, data_dir: Path, port: int, server_version_num: int | None = None
) -> LocalState:
    """The state of the server whose data directory is ``data_dir``, from its answer to
    :data:`PROBE_SQL` on ``port`` ("down" when another server answered there);
    ``server_version_num``: what the server reported at connect (``170010``)."""
    (
        in_recovery,
        cur_lsn,
        walfile,
        recv,
        replay,
        ckpt_tli,
        minrec_tli,
        hist_tli,
        receiver,
        repl,
        served_dir,
        pending,
    ) = row
    if os.path.realpath(str(served_dir)) != os.path.realpath(data_dir):
        return LocalState.down(f"port {port} is served by another PostgreSQL (data_directory={served_dir})")
    # parameters changed in the files that only a restart applies (pg_settings.pending_restart)
    pending_restart = tuple(str(n) for n in (pending or ())[:MAX_PENDING_NAMES])
    version = server_version_text(server_version_num) if server_version_num else None
    if not in_recovery:
        replicas = tuple(
            ReplicaInfo(
                application_name=r["application_name"] or "",
                state=r["state"],
                sync_state=r["sync_state"],
                sent_lsn=parse_lsn(r["sent_lsn"]),
                write_lsn=parse_lsn(r["write_lsn"]),
                flush_lsn=parse_lsn(r["flush_lsn"]),
                replay_lsn=parse_lsn(r["replay_lsn"]),
                replay_lag=None if r["replay_lag"] is None else float(r["replay_lag"]),
                client_addr=r["client_addr"],
                reply_age=None if r.get("reply_age") is None else float(r["reply_age"]),
            )
            for r in (repl or [])
        )
        return LocalState(
            running=True,
            in_recovery=False,
            timeline=int(walfile[:8], 16) if walfile else None,
            wal_lsn=parse_lsn(cur_lsn),
            received_lsn=None,
            replayed_lsn=None,
            streaming_from=None,
            replication=replicas,
            pending_restart=pending_restart,
            server_version=version,
        )
    received = parse_lsn(recv)
    replayed = parse_lsn(replay)
    streaming_from = None
    # Timeline sources, the highest wins: the WAL receiver's (exact, but gone as soon as the
    # upstream dies, i.e. exactly during a failover); the newest timeline history file in
    # pg_wal (a standby fetches N.history when it follows timeline N, pg_rewind copies them,
    # a diverged old primary never has the newer one); and pg_control's restartpoint and
    # min-recovery timelines, which lag until the next restartpoint.
    tlis = [int(t) for t in (ckpt_tli, minrec_tli, hist_tli) if t]
    if receiver:
        if receiver.get("tli"):
            tlis.append(int(receiver["tli"]))
        if receiver.get("status") == "streaming" and receiver.get("host") is not None:
            streaming_from = hostport(str(receiver["host"]), int(receiver["port"] or 0))
    timeline = max(tlis) if tlis else None
    known = [x for x in (received, replayed) if x is not None]
    return LocalState(
        running=True,
        in_recovery=True,
        timeline=timeline,
        wal_lsn=max(known) if known else None,
        received_lsn=received,
        replayed_lsn=replayed,
        streaming_from=streaming_from,
        replication=(),
        pending_restart=pending_restart,
        server_version=version,
    )
