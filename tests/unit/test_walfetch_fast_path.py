"""The restore_command script serves prefetched segments in the shell, and only while a prefetch
worker holds the lock (it follows `want`); anything else goes to the Python walfetch."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from hakeeper.backup.walfetch import PREFETCH_DIR, fast_path_script

SEG = "000000010000000000000005"


def _setup(tmp_path: Path) -> tuple[Path, Path]:
    conf = tmp_path / "conf.json"
    conf.write_text('{"scope": "x", "repositories": []}')
    script = tmp_path / "rc.sh"
    script.write_text(fast_path_script("echo PYTHON", conf, conf.read_bytes()))
    script.chmod(0o700)
    tag = hashlib.sha256(conf.read_bytes()).hexdigest()[:16]
    pdir = tmp_path / "pg_wal" / PREFETCH_DIR / tag
    pdir.mkdir(parents=True)
    (pdir / SEG).write_bytes(b"w" * 4096)
    (pdir / ".lock").touch()
    return script, pdir


def _run(script: Path, fname: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(script), fname, str(dest)], capture_output=True, text=True, timeout=10)


def test_without_a_worker_python_is_called(tmp_path: Path) -> None:
    script, pdir = _setup(tmp_path)
    r = _run(script, SEG, tmp_path / "pg_wal" / "RECOVERYXLOG")
    assert r.returncode == 0 and r.stdout.startswith("PYTHON --config ")
    assert (pdir / SEG).exists()  # left for Python, which also restarts the worker


def test_with_a_worker_the_segment_is_moved_and_the_worker_told(tmp_path: Path) -> None:
    script, pdir = _setup(tmp_path)
    dest = tmp_path / "pg_wal" / "RECOVERYXLOG"
    holder = subprocess.Popen(["flock", str(pdir / ".lock"), "sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while subprocess.run(["flock", "-n", str(pdir / ".lock"), "true"]).returncode == 0:
            assert time.monotonic() < deadline, "lock holder did not start"
            time.sleep(0.05)
        r = _run(script, SEG, dest)
        assert r.returncode == 0 and r.stdout == ""
        assert dest.read_bytes() == b"w" * 4096 and not (pdir / SEG).exists()
        assert json.loads((pdir / "want").read_text()) == {"file": SEG, "seg_size": 4096}
        assert (pdir / "hits").read_text().split() == [SEG]
        # not prefetched / not a segment: Python
        assert _run(script, "000000010000000000000006", dest).stdout.startswith("PYTHON")
        assert _run(script, "00000002.history", dest).stdout.startswith("PYTHON")
    finally:
        holder.kill()
        holder.wait()


def _hold(lock: Path) -> subprocess.Popen[bytes]:
    """flock and its sleep in a session of their own: killing the group releases the lock."""
    holder = subprocess.Popen(["flock", str(lock), "sleep", "30"], start_new_session=True)
    deadline = time.monotonic() + 5
    while subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0:
        assert time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.05)
    return holder


def test_a_segment_the_worker_is_fetching_is_waited_for_not_fetched_again(tmp_path: Path) -> None:
    script, pdir = _setup(tmp_path)
    nxt = "000000010000000000000006"
    later = "000000010000000000000009"
    (pdir / "window").write_text(f"{nxt}\n000000010000000000000007\n")
    dest = tmp_path / "pg_wal" / "RECOVERYXLOG"
    holder = _hold(pdir / ".lock")
    try:
        # the worker's download of `nxt` lands 0.4 s after the request
        writer = subprocess.Popen(["sh", "-c", f"sleep 0.4; printf n > {pdir}/.t; mv {pdir}/.t {pdir}/{nxt}"])
        t0 = time.monotonic()
        r = _run(script, nxt, dest)
        waited = time.monotonic() - t0
        writer.wait()
        assert r.returncode == 0 and r.stdout == "", r  # no Python
        assert dest.read_bytes() == b"n" and waited >= 0.35
        line = (pdir / "stats").read_text().split()
        assert line[:2] == [nxt, "0"] and float(line[2]) >= 0.35  # not a hit: replay waited
        # not in the window: Python fetches it, at once
        t0 = time.monotonic()
        assert _run(script, later, dest).stdout.startswith("PYTHON")
        assert time.monotonic() - t0 < 0.3
        # the worker leaves the window (gave it up): the waiting request goes to Python
        (pdir / "window").write_text("")
        assert _run(script, "000000010000000000000007", dest).stdout.startswith("PYTHON")
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # no worker: Python, even for a name in a (stale) window
    (pdir / "window").write_text("000000010000000000000007\n")
    t0 = time.monotonic()
    assert _run(script, "000000010000000000000007", dest).stdout.startswith("PYTHON")
    assert time.monotonic() - t0 < 0.3


def test_the_handover_answers_are_recorded_in_the_stats(tmp_path: Path) -> None:
    script, pdir = _setup(tmp_path)
    h = tmp_path / "pg_wal" / ".hakeeper-handover"
    for sub in ("req", "out"):
        (h / sub).mkdir(parents=True)
    (h / "pid").write_text(f"{os.getpid()}\n")  # a live serving process
    dest = tmp_path / "pg_wal" / "RECOVERYXLOG"
    ahead, asked = "000000010000000000000007", "000000010000000000000008"
    (h / "out" / ahead).write_bytes(b"a")  # written ahead of the request
    assert _run(script, ahead, dest).returncode == 0 and dest.read_bytes() == b"a"
    answer = subprocess.Popen(
        ["sh", "-c", f"sleep 0.3; printf b > {h}/out/.t; mv {h}/out/.t {h}/out/{asked}"]
    )
    r = _run(script, asked, dest)
    answer.wait()
    assert r.returncode == 0 and r.stdout == "" and dest.read_bytes() == b"b"
    assert (h / "req" / asked).exists() and (h / "req" / f"{ahead}.taken").exists()
    lines = [ln.split() for ln in (pdir / "stats").read_text().splitlines()]
    assert lines[0] == [ahead, "1", "0"]
    assert lines[1][:2] == [asked, "0"] and float(lines[1][2]) >= 0.25
