"""The progress display of long commands (issue 16, item 5): rich on a terminal, compact lines
off it, nothing with --quiet (hakeeper/cli/progress.py)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from hakeeper.cli.progress import Label, Reporter, choose_mode, phase_line, running_line

MiB = 1 << 20
GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter(mode: str = "lines") -> tuple[Reporter, list[str], Clock]:
    lines: list[str] = []
    clock = Clock()
    labels = {"fetch": Label("fetch"), "wal": Label("WAL archived", "segments")}
    rep = Reporter("restore", labels, mode, lines.append, clock=clock)  # type: ignore[arg-type]
    return rep, lines, clock


def test_mode() -> None:
    assert choose_mode("table", quiet=False, terminal=True) == "rich"
    assert choose_mode("table", quiet=False, terminal=False) == "lines"
    assert choose_mode("json", quiet=False, terminal=False) == "none"  # stdout is the JSON only
    assert choose_mode("json", quiet=False, terminal=True) == "rich"  # on stderr, beside the JSON
    assert choose_mode("table", quiet=True, terminal=True) == "none"
    assert choose_mode("table", quiet=True, terminal=False) == "none"


def test_a_line_when_a_phase_ends_and_every_ten_seconds_while_it_runs() -> None:
    rep, lines, clock = reporter()
    rep("fetch", 0, 2 * GiB)
    for i in range(1, 9):  # 2 GiB in 16 s: a line at 10 s, one at the end
        clock.now += 2
        rep("fetch", i * GiB // 4, 2 * GiB)
    assert lines == ["restore: fetch 1.2 GiB of 2.0 GiB (62%), 128.0 MiB/s, ETA 6.0 s, 10.0 s so far"]
    clock.now += 5  # the next phase begins later: the phase's time is to its last report
    rep("wal", 0, 4)
    assert lines[1] == "restore: fetch 2.0 GiB in 16.0 s (128.0 MiB/s)"
    rep("fetch", 2 * GiB, 2 * GiB)  # a repeat of the end: not a second end line
    rep.close()
    assert len(lines) == 3 and lines[2].startswith("restore: WAL archived 0 segments")


def test_a_total_that_was_an_estimate_does_not_end_the_phase() -> None:
    rep, lines, clock = reporter()
    rep("fetch", 0, 100)
    clock.now += 1
    rep("fetch", 100, 100)
    clock.now += 1
    rep("fetch", 150, 100)  # more than the estimate
    rep.close()
    assert lines == ["restore: fetch 150 B in 2.0 s (75 B/s)"]


def test_a_new_phase_ends_the_one_before_and_close_ends_the_rest() -> None:
    rep, lines, clock = reporter()
    rep("fetch", 0, None)
    clock.now += 3.1
    rep("fetch", 2300 * MiB, None)  # total unknown: ends when the next phase begins
    rep("wal", 0, 4)
    assert lines == ["restore: fetch 2.2 GiB in 3.1 s (741.9 MiB/s)"]
    clock.now += 2
    rep("wal", 3, 4)
    rep.close()
    assert lines[1] == "restore: WAL archived 3 segments in 2.0 s (1.5 segments/s)"
    assert rep.observed()["fetch"].bytes == 2300 * MiB
    assert rep.observed()["wal"].bytes is None  # not bytes


def test_a_phase_reported_again_from_zero() -> None:
    rep, lines, clock = reporter()
    for _ in range(2):  # a chain: each link's copy reports "fetch" from zero, one stretch
        rep("fetch", 0, 100)
        clock.now += 1
        rep("fetch", 100, 100)
    rep("wal", 1, 1)
    assert lines == ["restore: fetch 200 B in 2.0 s (100 B/s)"]
    clock.now += 1
    rep("fetch", 0, 50)  # after another phase: a stretch of its own, its own line
    clock.now += 1
    rep("fetch", 50, 50)
    rep.close()
    assert lines[1:] == ["restore: WAL archived 1 segments in 0.0 s", "restore: fetch 50 B in 1.0 s (50 B/s)"]
    assert rep.observed()["fetch"].bytes == 250


def test_quiet_and_json_write_nothing() -> None:
    rep, lines, clock = reporter("none")
    rep("fetch", 0, 10)
    clock.now += 20
    rep("fetch", 10, 10)
    rep.close()
    assert lines == [] and rep.phases == {}


def test_line_formats() -> None:
    assert phase_line("backup create", Label("copy"), 5 * GiB, 125.0) == (
        "backup create: copy 5.0 GiB in 2m05s (41.0 MiB/s)"
    )
    assert (
        phase_line("restore", Label("end of recovery", "time"), 0, 0.3) == "restore: end of recovery in 0.3 s"
    )
    assert running_line("restore", Label("end of recovery", "time"), 0, None, 12.0) == (
        "restore: end of recovery, 12.0 s so far"
    )
    assert (
        running_line("verify", Label("WAL replay"), 0, None, 12.0)
        == "verify: WAL replay 0 B, 0 B/s, 12.0 s so far"  # stalled: said
    )


SCRIPT = textwrap.dedent(
    """
    import time
    from hakeeper.cli.progress import Label, progress_display

    labels = {"fetch": Label("fetch + decompress"), "wal_replay": Label("WAL replay")}
    with progress_display("restore", labels) as p:
        for i in range(1, 6):
            time.sleep(0.12)
            p("fetch", i * 64 * 2**20, 320 * 2**20)
        for i in range(1, 4):
            time.sleep(0.12)
            p("wal_replay", i * 16 * 2**20, None)
    print("RESULT-ON-STDOUT")
    """
)


def _run_on_a_pty(script: str) -> str:
    """Run ``script`` with stdout and stderr on a pseudo-terminal; everything it wrote."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color", "COLUMNS": "140"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(timeout=30) == 0
    return b"".join(chunks).decode(errors="replace")


def test_rich_display_on_a_pseudo_terminal() -> None:
    text = _run_on_a_pty(SCRIPT)
    assert "\x1b[" in text  # a live display (cursor movement and colours), not plain lines
    assert "fetch + decompress" in text and "WAL replay" in text  # the phase names
    assert "320.0 MiB / 320.0 MiB" in text  # bytes done / total
    assert "MiB/s" in text  # a rate
    assert "done in" in text  # the ended phase
    assert "RESULT-ON-STDOUT" in text
    assert "restore: fetch" not in text  # no compact lines on a terminal


def test_compact_lines_off_a_terminal() -> None:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    assert r.stdout == "RESULT-ON-STDOUT\n"
    lines = r.stderr.splitlines()
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("restore: fetch + decompress 320.0 MiB in ") and lines[0].endswith("MiB/s)")
    assert lines[1].startswith("restore: WAL replay 48.0 MiB in ")
    assert "\x1b[" not in r.stderr


def test_restore_flag_misuse_is_a_usage_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import hakeeper.cli.backup_cmds  # noqa: F401  (registers restore)
    from hakeeper.cli.app import app

    conf = tmp_path / "node.yml"  # never read: the flags are refused first
    base = ["restore", "-c", str(conf), "-D", str(tmp_path / "d")]
    runner = CliRunner()
    for extra, why in (
        (["--target-lsn", "0/3000000", "--include-current-wal"], "--include-current-wal goes with --latest"),
        (["--latest", "--include-current-wal", "--no-switch-wal"], "contradict each other"),
        (["--latest", "--rehash"], "--rehash goes with --delta"),
    ):
        res = runner.invoke(app, base + extra)
        assert res.exit_code == 2, res.output
        assert why in res.output and "Traceback" not in res.output
