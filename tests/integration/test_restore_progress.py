"""Issue 16, items 4-6 on a real cluster: the phases of a backup and a restore (recorded,
plausible: bytes equal the sizes, seconds > 0), the progress off a terminal (a line per
phase), on a pseudo-terminal (rich) and with --quiet, ``-o json`` with the phases and nothing
else on stdout, and ``restore --latest`` that restores what is archived (no WAL switch) and
says which point it goes to before it copies."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hakeeper.localcluster import prepare_fs_repository
from hakeeper.util.proc import resolve_run_as
from tests.integration.test_backup_incremental import counts, q
from tests.integration.test_backup_restore import hk, ok
from tests.support.cluster import cluster_tmpdir, running_cluster
from tests.support.pg import PgArea
from tests.support.ports import free_ports

pytestmark = pytest.mark.integration


@pytest.fixture
def repo_and_area() -> Iterator[tuple[dict[str, Any], PgArea]]:
    repo_dir = cluster_tmpdir("hk-progress-repo-")
    area = PgArea()
    try:
        prepare_fs_repository(repo_dir, resolve_run_as(area.root / "x"))
        yield {"repositories": [{"name": "fs", "type": "fs", "path": str(repo_dir)}]}, area
    finally:
        area.cleanup()
        shutil.rmtree(repo_dir, ignore_errors=True)


def hk_on_a_pty(*args: str, timeout: float = 300.0) -> tuple[int, str]:
    """``hakeeper ARGS`` with stdout and stderr on a pseudo-terminal: (exit code, everything shown)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAKEEPER_")}
    env.update(TERM="xterm-256color", COLUMNS="160")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hakeeper", *args],
        stdout=slave,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child is gone
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def test_phases_progress_and_the_point_of_a_latest_restore(
    repo_and_area: tuple[dict[str, Any], PgArea],
) -> None:
    backup_cfg, area = repo_and_area
    with running_cluster(nodes=1, backup=backup_cfg, scope="progress") as c:
        p = c.primary()
        assert p is not None
        conf = str(c.nodes[p].config_path)
        q(c, p, "CREATE TABLE t (batch text, pad text)")
        q(c, p, "INSERT INTO t SELECT 'a', repeat(md5(i::text), 8) FROM generate_series(1, 50000) i")

        # off a terminal, table output: the phases as compact lines on stderr
        made = hk("backup", "create", "-c", conf, "--from", "primary")
        assert made.returncode == 0, made.stderr
        assert re.search(
            r"^backup create: copy [\d.]+ [KMG]iB in [\d.]+ s \([\d.]+ [KMG]iB/s\)$", made.stderr, re.M
        ), made.stderr
        assert re.search(r"^backup create: WAL archived \d+ segments in ", made.stderr, re.M), made.stderr
        assert "phases   copy " in made.stdout

        # -o json: nothing on stdout but the JSON, which has the phases; bytes are the backup's size
        js = hk("backup", "create", "-c", conf, "--from", "primary", "-o", "json")
        assert js.returncode == 0, js.stderr
        doc = json.loads(js.stdout)  # the whole of stdout is the document
        copy = doc["phases"]["copy"]
        assert copy["bytes"] == doc["size"] > 0 and copy["seconds"] > 0
        assert copy["rate"] == pytest.approx(copy["bytes"] / copy["seconds"], rel=0.01)
        assert doc["phases"]["wal_wait"]["seconds"] >= 0 and doc["phases"]["wal_wait"]["bytes"] is None
        assert "backup create:" not in js.stderr  # no progress lines off a terminal with -o json
        info = ok(hk("backup", "info", doc["id"], "-c", conf))
        assert "phases     copy " in info
        info_json = ok(hk("backup", "info", doc["id"], "-c", conf, "-o", "json"))
        assert info_json["phases"]["copy"]["bytes"] == doc["size"]

        q(c, p, "INSERT INTO t SELECT 'b', 'x' FROM generate_series(1, 10)")

        # --latest (no flag): no WAL switch on the primary, no wait; says the point first
        dest = area.data_dir("plain-latest")
        (port,) = free_ports(1)
        plain = hk("restore", "-c", conf, "-D", str(dest), "--latest", "--start", "--port", str(port))
        assert plain.returncode == 0, (plain.stdout, plain.stderr)
        first = plain.stderr.splitlines()[0]
        assert first.startswith(f"restoring backup {doc['id']} (full, ends at {doc['stop_lsn']}, "), first
        assert "to the end of the archived WAL (latest)" in first and "WAL replayed up to 0000000" in first, (
            first
        )
        said = " ".join(plain.stdout.split())  # the summary wraps long notes
        assert "WAL still in the primary's current segment is not restored (--include-current-wal" in said
        assert "switched WAL" not in said
        assert re.search(
            r"^restore: fetch \+ decompress [\d.]+ [KMG]iB in [\d.]+ s \(", plain.stderr, re.M
        ), plain.stderr
        assert re.search(r"^restore: WAL replay ", plain.stderr, re.M), plain.stderr
        assert re.search(r"^restore: end of recovery in [\d.]+ s$", plain.stderr, re.M), plain.stderr
        assert re.search(r"^  phases    plan [\d.]+ s; copy [\d.]+ [KMG]iB in ", plain.stdout, re.M), (
            plain.stdout
        )
        assert "end_of_recovery" in plain.stdout

        # --latest --include-current-wal -o json: every row, and the phases of the restore
        dest = area.data_dir("very-latest")
        (port,) = free_ports(1)
        argv = ["restore", "-c", conf, "-D", str(dest), "--latest", "--include-current-wal", "--start"]
        res = ok(hk(*argv, "--port", str(port), "-o", "json"))
        assert counts(port, c.superuser_password) == {"a": 50000, "b": 10}
        assert any("switched WAL on the primary" in n for n in res["notes"]), res["notes"]
        ph = res["phases"]
        assert ph["copy"]["bytes"] == res["size"] == doc["size"] and ph["copy"]["seconds"] > 0
        assert ph["fetch"]["overlaps"] == "copy" and ph["fetch"]["rate"] is None and ph["fetch"]["bytes"] > 0
        assert ph["decompress_write"]["overlaps"] == "copy"
        assert ph["wal_replay"]["seconds"] > 0 and ph["wal_replay"]["bytes"] > 0
        assert ph["end_of_recovery"]["seconds"] >= 0
        own = sum(v["seconds"] for v in ph.values() if v["overlaps"] is None)
        assert own == pytest.approx(res["seconds"]["total"], abs=0.5)

        # --quiet: no progress and no announcement
        # (--start: without it the restore_command runs hakeeper's Python as PostgreSQL's OS user,
        # which cannot reach a checkout in a 0700 directory, as CI's may be)
        q_port, t_port = free_ports(2)
        quiet = hk(
            "restore", "-c", conf, "-D", str(area.data_dir("quiet")), "--latest", "--quiet",
            "--start", "--port", str(q_port),
        )  # fmt: skip
        assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr

        # on a terminal: the rich display with the phase and a rate
        tty_dest = area.data_dir("tty")
        tty_argv = ["restore", "-c", conf, "-D", str(tty_dest), "--latest", "--start", "--port", str(t_port)]
        rc, shown = hk_on_a_pty(*tty_argv)
        assert rc == 0, shown
        assert "fetch + decompress" in shown and re.search(r"[\d.]+ [KMG]?i?B/s", shown), shown
        assert "done in" in shown and "restore: fetch" not in shown
        assert "restored backup" in shown and (tty_dest / "PG_VERSION").is_file()
