"""The restore_command script serves prefetched segments in the shell, and only while a prefetch
worker holds the lock (it follows `want`); anything else goes to the Python walfetch."""

from __future__ import annotations

import hashlib
import json
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
