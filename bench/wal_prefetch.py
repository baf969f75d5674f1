"""PITR from a SeaweedFS repository: how long recovery waits for restore_command (issue 16, item 3).

    PYTHONPATH=$PWD python -m bench.wal_prefetch [--wal-mb 300] [--old-root /work/main]

A standalone PostgreSQL (the major under test) archives ``--wal-mb`` MB of WAL to a local
SeaweedFS through the archiver; a base backup without WAL is then recovered to a restore point
at the end, once per mode, with ``hakeeper restore``'s restore script:

* ``off``: this checkout, ``prefetch`` 0 (every segment fetched when asked for);
* ``spool``: this checkout, the defaults (16 ahead, 512 MiB);
* ``old``: the walfetch of ``--old-root`` (another checkout, e.g. before this change) with its
  defaults, when given.

Every request is timed the same way in all modes by a wrapper around the script: whether the
segment was in the spool when asked for, and the seconds until the script returned (the time
replay waited).  Printed: requests, hits, seconds waiting, recovery seconds, waiting share.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hakeeper
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import python_command
from hakeeper.backup.walfetch import fast_path_script
from hakeeper.backup.walspool import parse_stats, prefetch_stats
from hakeeper.core.backup_config import WalToolConfig
from tests.integration.test_wal_archive import SCOPE, Primary, _archived_at_least, s3_config, s3_repo, until
from tests.integration.test_wal_prefetch import _base_backup, _batches, _copy, _promoted, _recover
from tests.support.pg import PgArea
from tests.support.s3_server import SeaweedS3

HERE = Path(hakeeper.__file__).resolve().parent.parent  # this checkout

WRAPPER = """#!/bin/sh
# bench: time each request the same way whatever answers it
f="$1"; p="$2"; d="$(dirname "$p")/.hakeeper-prefetch/{tag}"
hit=0; [ -f "$d/$f" ] && hit=1
t0="$(date +%s.%N)"
{script} "$f" "$p"; rc=$?
if [ "${{#f}}" -eq 24 ] && [ $rc -eq 0 ]; then
  echo "$f $hit $(echo "$t0 $(date +%s.%N)" | awk '{{printf "%.3f", $2 - $1}}')" >> {log}
fi
exit $rc
"""


def _script(root: Path, conf_path: Path, conf: bytes, ra_cmd: str) -> str:
    """The restore script of the checkout at ``root``."""
    code = (
        "import sys; from pathlib import Path; from hakeeper.backup.walfetch import fast_path_script as f; "
        "sys.stdout.write(f(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[2]).read_bytes()))"
    )
    if root == HERE:
        return fast_path_script(ra_cmd, conf_path, conf)
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-c", code, ra_cmd, str(conf_path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


async def _one(primary: Primary, base: Path, mode: str, root: Path, conf: WalToolConfig) -> None:
    ra = primary.pg.run_as
    data = _copy(primary, base, f"r-{mode}")
    conf_path = data.parent / "walfetch.json"
    text = conf.dump()
    if mode == "old":  # its config model knows neither the byte bound nor a default of 16
        raw = json.loads(text)
        raw.pop("prefetch_max_bytes", None)
        raw["prefetch"] = 8
        text = json.dumps(raw, indent=1) + "\n"
    conf_path.write_text(text)
    os.chmod(conf_path, 0o600)
    ra.chown(conf_path)
    cmd = f"PYTHONPATH={root} {python_command('hakeeper.backup.walfetch', ra)}"
    script = data.parent / "rc.sh"
    script.write_text(_script(root, conf_path, text.encode(), cmd))
    log = data.parent / "requests.log"
    log.touch()
    ra.chown(log)
    wrapper = data.parent / "wrapper.sh"
    tag = hashlib.sha256(text.encode()).hexdigest()[:16]
    wrapper.write_text(WRAPPER.format(tag=tag, script=script, log=log))
    for p in (script, wrapper):
        os.chmod(p, 0o755)
        ra.chown(p)
    t0 = time.monotonic()
    pg = await _recover(
        primary,
        data,
        f"r-{mode}",
        {"restore_command": f"{wrapper} %f %p", "recovery_target_name": "end"},
        wait=False,
    )
    try:
        await until(lambda: _promoted(pg), 1800, f"{mode}: promoted", 0.1)
        seconds = time.monotonic() - t0
    finally:
        await pg.stop(mode="immediate")
    text = log.read_text()
    own = prefetch_stats(data)  # what walfetch itself recorded (a shell hit counts 0 s)
    if own.requests:
        print(
            f"{mode:6} walfetch's own stats: {own.requests} requests, {own.hits} hits, "
            f"{own.seconds_waiting:.2f} s waiting"
        )
    s = parse_stats(text)
    slow = [ln for ln in text.splitlines() if len(ln.split()) == 3 and float(ln.split()[2]) >= 0.3]
    print(f"{mode:6} requests of 0.3 s or more: {'; '.join(slow) or 'none'}")
    print(
        f"{mode:6} requests {s.requests:4}  hits {s.hits:4} ({s.hit_ratio:4.0%})"
        f"  waiting {s.seconds_waiting:7.2f} s"
        f"  recovery {seconds:7.2f} s  waiting share {s.seconds_waiting / seconds:5.1%}",
        flush=True,
    )


async def main(wal_mb: int, old_root: Path | None) -> None:
    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="hk-bench-s3-")))
    await asyncio.to_thread(server.start)
    area = PgArea()
    primary = Primary(area)
    try:
        repo = await s3_repo(server, "hk-bench-prefetch")
        await primary.start([repo])
        base = await _base_backup(primary, "base")
        rows = 150_000  # about 16 MB of WAL per batch
        await _batches(primary.pg, max(1, wal_mb // 16), rows=rows)
        await primary.pg.session.execute("SELECT pg_create_restore_point('end')")
        last = await _batches(primary.pg, 1, rows=1)
        await until(lambda: _archived_at_least(primary, last), 600, "archived")
        await primary.stop_archiver()
        await primary.pg.stop()
        s3 = s3_config(server, "hk-bench-prefetch")
        here = HERE
        load = os.getloadavg()[0]
        print(f"PITR of ~{wal_mb} MB of WAL from SeaweedFS ({os.cpu_count()} CPUs, load {load:.2f})")
        await _one(primary, base, "off", here, WalToolConfig(scope=SCOPE, repositories=[s3], prefetch=0))
        await _one(primary, base, "spool", here, WalToolConfig(scope=SCOPE, repositories=[s3]))
        if old_root is not None:
            await _one(primary, base, "old", old_root, WalToolConfig(scope=SCOPE, repositories=[s3]))
    finally:
        await primary.stop_archiver()
        await primary.pg.session.close()
        area.cleanup()
        await asyncio.to_thread(server.stop)


# ====================================================================== restore --start (the handover)

RUNNER = """
import asyncio, json, sys
from pathlib import Path
from hakeeper.backup import walspool
from hakeeper.backup.catalog import Target
from hakeeper.backup.repos import make_repository
from hakeeper.backup.restore import RestoreOptions, restore
from hakeeper.core.backup_config import WalToolConfig
from hakeeper.core.config import Credentials
from hakeeper.util.proc import resolve_run_as
a = json.loads(sys.argv[1])
rc = WalToolConfig.load(Path(a["conf"])).repositories[0]
dest = Path(a["dest"])
async def go():
    async with make_repository(rc) as repo:
        opts = RestoreOptions(data_dir=dest, target=Target("name", name="end"), bin_dir=Path(a["bin"]),
            run_as=resolve_run_as(dest), superuser=Credentials(username="postgres", password="su-secret"),
            start=True, port=a["port"], switch_wal=False, start_timeout=1800)
        return await restore(repo, rc, a["scope"], opts)
res = asyncio.run(go())
d = res.to_dict()
if "wal_requests" not in d:  # a checkout before RestoreResult had them: the script's stats
    s = walspool.prefetch_stats(dest)
    d.update(wal_requests=s.requests, wal_prefetch_hits=s.hits, wal_fetch_wait_s=s.seconds_waiting)
print(json.dumps(d))
"""


def _restore_start(env: Any, mode: str, root: Path, run: int = 0) -> None:
    """``restore --start`` of the checkout at ``root`` in a child process (its handover)."""
    from tests.integration.test_backup_restore import BIN, stop_restored
    from tests.support.ports import free_ports

    dest = env.area.data_dir(f"r-{mode}-{run}")
    arg = {
        "conf": str(env.walconf),
        "dest": str(dest),
        "bin": str(BIN),
        "port": free_ports(1)[0],
        "scope": SCOPE2,
    }
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-c", RUNNER, json.dumps(arg)],
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        stop_restored(env.area, dest)
    wall = time.monotonic() - t0
    shutil.rmtree(dest, ignore_errors=True)  # a GB per run
    if r.returncode != 0:
        print(f"{mode:6} restore failed: {r.stderr[-2000:]}")
        return
    d = json.loads(r.stdout.strip().splitlines()[-1])
    replay = d["seconds"]["wal_replay"] or 0.0
    req, hits, wait = d["wal_requests"], d["wal_prefetch_hits"], d["wal_fetch_wait_s"] or 0.0
    print(
        f"{mode:6} requests {req:4}  written ahead {hits:4} ({hits / max(1, req):4.0%})"
        f"  waiting {wait:7.2f} s  recovery {replay:7.2f} s  waiting share {wait / max(replay, 1e-9):5.1%}"
        f"  (restore total {d['seconds']['total']:.1f} s, wall {wall:.1f} s)",
        flush=True,
    )


SCOPE2 = "bk"


def main_restore(wal_mb: int, old_root: Path | None, repeat: int = 1) -> None:
    from tests.integration.test_backup_restore import (
        STAGERS,
        backup,
        insert,
        make_env,
        sql,
        start_primary,
        wait,
    )

    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="hk-bench-s3-")))
    server.start()
    area = PgArea()
    try:

        async def bucket() -> None:
            await (await s3_repo(server, "hk-bench-handover")).close()

        asyncio.run(bucket())
        env = make_env(area, s3_config(server, "hk-bench-handover"), SCOPE2)
        start_primary(env, "p")
        p = env.port("p")
        backup(env, "p")
        for i in range(max(1, wal_mb // 16)):
            insert(p, f"b{i:04}", 150_000)  # about 16 MB of WAL
            sql(p, "SELECT pg_switch_wal()")
        sql(p, "SELECT pg_create_restore_point('end')")
        last = sql(p, "SELECT pg_walfile_name(pg_switch_wal())")[0][0]

        async def archived() -> bool:
            async with make_repository(env.repo_cfg) as repo:
                names = [e.name.rsplit("/", 1)[1] for e in await repo.list_objects(f"{SCOPE2}/wal/")]
            return any(n >= last for n in names if len(n) == 24)

        wait(lambda: asyncio.run(archived()), 900, "archived")
        load = os.getloadavg()[0]
        print(
            f"restore --start to a restore point after ~{wal_mb} MB of WAL from SeaweedFS (load {load:.2f})"
        )
        runs = [("new", HERE)] + ([("old", old_root)] if old_root is not None else [])
        for i in range(repeat):  # alternating which goes first: the page cache favours the second
            for mode, root in runs if i % 2 == 0 else runs[::-1]:
                _restore_start(env, mode, root, i)
    finally:
        while STAGERS:
            st = STAGERS.pop()
            st.stop.set()
            st.thread.join(10)
        area.cleanup()
        server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--wal-mb", type=int, default=300)
    ap.add_argument("--old-root", type=Path, default=None)
    ap.add_argument(
        "--path",
        choices=("walfetch", "restore"),
        default="walfetch",
        help="walfetch: the restore script with the prefetch spool; restore: restore --start (the handover)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="restore --start runs of each checkout")
    a = ap.parse_args()
    if a.path == "restore":
        main_restore(a.wal_mb, a.old_root, a.repeat)
    else:
        asyncio.run(main(a.wal_mb, a.old_root))
