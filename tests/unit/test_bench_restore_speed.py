"""bench/restore_speed.py's pure parts: reading hakeeper's ``-o json``, the issue-16 verdicts,
the disk-space estimate and pgBackRest's S3 configuration (the measurements themselves run only
as the benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import pgbr
from bench.backup import Results
from bench.restore_speed import (
    MARK_END,
    MARK_START,
    flatten,
    idle_share,
    need_bytes,
    parse_args,
    pick,
    render_section,
    verdicts,
)
from bench.switchover import write_section


def _restore_json() -> dict[str, Any]:
    # The shape the issue-16 restore prints: phases, bytes, prefetch statistics.
    return {
        "id": "20261207T160000Z",
        "delta": True,
        "phases": {"fetch": {"seconds": 2.5, "bytes": 100}, "wal_replay": {"seconds": 40.0}},
        "bytes": {"fetched": 50 * 2**20, "written": 60, "total": 1000},
        "prefetch": {"requests": 128, "hits": 120, "seconds_waiting": 3.0},
    }


def _row(rec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**{f"hk.{k}": v for k, v in flatten(rec).items()}, **extra}


def test_flatten_keeps_numbers_only() -> None:
    flat = flatten(_restore_json())
    assert flat["phases.fetch.seconds"] == 2.5
    assert flat["prefetch.seconds_waiting"] == 3.0
    assert "delta" not in flat and "id" not in flat  # booleans and strings are no figures


def test_idle_share_prefers_the_log_replay_time() -> None:
    row = _row(_restore_json(), replay_s=60.0)
    assert idle_share(row) == pytest.approx(3.0 / 60.0)
    # without the log's replay time: hakeeper's own replay phase
    assert idle_share(_row(_restore_json())) == pytest.approx(3.0 / 40.0)
    # no prefetch statistics: not measured, never 0
    rec = _restore_json()
    del rec["prefetch"]
    assert idle_share(_row(rec, replay_s=60.0)) is None


def test_pick_finds_delta_bytes() -> None:
    row = _row(_restore_json())
    assert pick(row, r"bytes", "fetched") == 50 * 2**20
    assert pick(row, r"bytes", "total") == 1000
    assert pick(row, r"nothing") is None


def _res(rows: dict[str, list[float]], key: str = "total_s") -> Results:
    res = Results()
    for k, vals in rows.items():
        field = "s" if k.startswith("backup|") or k.endswith("|raw") else key
        res.rows[k] = [{"run": i, field: v} for i, v in enumerate(vals, 1)]
    return res


def test_verdicts_ratios_and_outcomes() -> None:
    res = _res(
        {
            "backup|fs|warm|hk": [4.0, 5.0, 6.0],
            "backup|fs|warm|pgbr": [10.0, 11.0, 9.0],  # 5 / 10 = 0.5: met (<=)
            "restore|fs|warm|hk": [9.0, 9.0, 9.0],
            "restore|fs|warm|pgbr": [10.0, 10.0, 10.0],  # 0.9: missed
            "restore|local|warm|raw": [8.0, 8.0, 8.0],  # 9 / 8 = 1.125: met
            "delta|fs|warm|hk": [3.0, 3.0, 3.0],  # 3 / 9 = 0.33: missed
        }
    )
    text = "\n".join(verdicts(res))
    assert "backup vs pgBackRest (fs, warm): **0.50x** (target <= 0.5x" in text
    assert "met" in text.split("backup vs pgBackRest")[1].splitlines()[0]
    assert "restore to first write vs pgBackRest (fs, warm): **0.90x**" in text
    line = next(x for x in text.splitlines() if "vs pgBackRest (fs, warm): **0.90x**" in x)
    assert line.endswith("**missed**.")
    line = next(x for x in text.splitlines() if "vs raw" in x)
    assert "**1.12x**" in line and line.endswith("**met**.")
    line = next(x for x in text.splitlines() if "delta restore vs full" in x)
    assert "**0.33x**" in line and line.endswith("**missed**.")


def test_verdicts_pitr_idle_share() -> None:
    res = Results()
    res.rows["pitr|s3|warm|hk"] = [_row(_restore_json(), total_s=50.0, replay_s=60.0)]
    res.rows["pitr|s3|warm|pgbr"] = [{"run": 1, "total_s": 100.0}]
    text = "\n".join(verdicts(res))
    assert "**5.0 %** (target < 10 %): **met**" in text
    assert "hakeeper 50.00 s, pgBackRest 100.00 s (0.50x)" in text
    res.rows["pitr|s3|warm|hk"] = [{"run": 1, "total_s": 50.0, "replay_s": 60.0}]
    assert "not measured" in "\n".join(verdicts(res))


def test_need_bytes_at_scale_600() -> None:
    need = need_bytes(600, 2048, pitr=True)
    # five ~9 GiB data directories plus 8 GiB of WAL and the margin: more than 50 GiB
    assert 50 * 2**30 < need < 70 * 2**30
    assert need_bytes(600, 2048, pitr=False) < need


def test_parse_args_rejects_unknown_values() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--repos", "fs,gcs"])
    a = parse_args(["--scale", "5", "--runs", "1", "--cache", "warm", "--repos", "fs,s3"])
    assert a.repo_list == ["fs", "s3"] and a.cache_list == ["warm"]


def test_pgbackrest_s3_repository_config() -> None:
    lines = pgbr.s3_repo_lines(2, host="127.0.0.1", port=8443, bucket="b", key="k", secret="s", ca_file=None)
    text = pgbr.conf_text(
        Path("/x"),
        "st",
        Path("/d"),
        5000,
        process_max=2,
        compress_level=3,
        extra_global=lines,
        extra_sections=["[global:archive-get]", "archive-async=y"],
    )
    glob, stanza = text.split("[st]")
    assert "repo2-type=s3" in glob and "repo2-storage-port=8443" in glob
    assert "repo2-storage-verify-tls=n" in glob and "repo2-s3-uri-style=path" in glob
    assert stanza.index("pg1-path=/d") < stanza.index("[global:archive-get]")
    with_ca = pgbr.s3_repo_lines(2, host="h", port=1, bucket="b", key="k", secret="s", ca_file=Path("/ca"))
    assert "repo2-storage-ca-file=/ca" in with_ca and not any("verify-tls" in x for x in with_ca)


def test_section_written_once_and_replaced(tmp_path: Path) -> None:
    facts = {k: "x" for k in ("date_utc", "nproc", "cpu_model", "memory", "kernel", "postgresql")}
    facts.update(load_avg_start="0.1 0.1 0.1", hakeeper="abc")
    res = _res({"restore|fs|warm|hk": [4.0], "restore|fs|warm|pgbr": [5.0]})
    res.facts = facts
    args = parse_args(["--scale", "5"])
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nother text\n")
    for _ in range(2):
        write_section(out, MARK_START, MARK_END, render_section(res, args, "cmd", "none", None))
    text = out.read_text()
    assert text.count(MARK_START) == 1 and text.count(MARK_END) == 1
    assert "other text" in text and "**0.80x** (target <= 0.8x" in text


def test_delta_shares_compare_like_with_like() -> None:
    # written / total are file bytes; fetched is stored (compressed) bytes, set against the
    # stored size of the backup the delta restored
    res = Results()
    res.rows["delta|fs|warm|hkc"] = [_row(_restore_json(), total_s=1.0)]
    res.rows["delta-backup|fs|warm|hkc"] = [{"run": 1, "s": 1.0, "bytes": 100 * 2**20}]
    text = "\n".join(verdicts(res))
    assert "wrote a median 6.0 % of the backup's file bytes" in text
    assert "fetched 50.0 MiB of the backup's 100.0 MiB stored (50 %)" in text
