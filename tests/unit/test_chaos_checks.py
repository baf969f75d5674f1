"""The chaos checkers on hand-made histories: they must flag what is unsafe and only that."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from chaos import checks
from chaos.report import BEGIN, END, summarize, write_summary
from chaos.workload import Attempt


def ok(
    node: str, tli: int, send: float, done: float, ident: int = 0, lsn: int = 0, src: str = "writer"
) -> Attempt:
    return Attempt(src, ident, send, done, "ok", node=node, tli=tli, lsn=lsn)


def test_clean_failover_has_no_dual_primary_window() -> None:
    atts = [ok("n1", 1, t / 10, t / 10 + 0.01) for t in range(30)]  # n1 until 2.9 s
    atts += [ok("n2", 2, 5 + t / 10, 5 + t / 10 + 0.01) for t in range(30)]  # n2 from 5 s
    atts.append(Attempt("writer", 0, 3.0, 8.0, "unknown"))  # never answered: proves nothing
    assert checks.dual_primary_windows(atts) == []


def test_old_primary_acknowledging_after_the_new_one_is_a_window() -> None:
    atts = [ok("n1", 1, 0.0, 0.1), ok("n2", 2, 1.0, 1.1), ok("n1", 1, 1.5, 1.6)]
    [w] = checks.dual_primary_windows(atts)
    assert (w.old.node, w.new.node) == ("n1", "n2")
    assert abs(w.seconds - 0.4) < 1e-9


def test_overlapping_in_flight_writes_are_not_proof_of_two_primaries() -> None:
    # n1's last write was sent before n2's first acknowledgement: it may have committed earlier.
    atts = [ok("n1", 1, 0.9, 1.5), ok("n2", 2, 0.5, 1.0)]
    assert checks.dual_primary_windows(atts) == []


def test_two_nodes_on_one_timeline_always_count() -> None:
    atts = [ok("n1", 2, 0.0, 0.1), ok("n2", 2, 5.0, 5.1)]
    assert len(checks.dual_primary_windows(atts)) == 1


def test_same_node_across_timelines_is_fine() -> None:
    atts = [ok("n1", 1, 0.0, 0.1), ok("n1", 2, 0.2, 0.3), ok("n1", 1, 0.25, 0.26)]
    assert checks.dual_primary_windows(atts) == []


@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0, 1)), min_size=1, max_size=30), st.floats(0, 100))
def test_sequential_primaries_never_flagged(times: list[tuple[float, float]], cut: float) -> None:
    """Writes to n1 all answered before any write to n2 was sent: never a window."""
    atts = []
    for send, dur in times:
        if send + dur < cut:
            atts.append(ok("n1", 1, send, send + dur))
        elif send > cut:
            atts.append(ok("n2", 2, send, send + dur))
    assert checks.dual_primary_windows(atts) == []


def test_lost_ids_only_counts_acknowledged() -> None:
    atts = [ok("n1", 1, 0, 1, ident=1), ok("n1", 1, 0, 1, ident=2), Attempt("writer", 3, 0, 1, "unknown")]
    assert checks.lost_ids(atts, {1}) == [2]
    assert checks.lost_ids(atts, {1, 2}) == []


def test_timeline_audit() -> None:
    history = checks.parse_history("1\t0/3000000\tno recovery target specified\n\n2\t0/5000000\tx\n")
    assert history == {1: 0x3000000, 2: 0x5000000}
    atts = [
        ok("n1", 1, 0, 1, ident=1, lsn=0x2FFFF00),  # before the switch point: on the history
        ok("n1", 1, 0, 1, ident=2, lsn=0x3000010),  # past it: diverged
        ok("n2", 2, 0, 1, ident=3, lsn=0x4000000),
        ok("n3", 3, 0, 1, ident=4, lsn=0x6000000),  # the final timeline
        ok("n2", 4, 0, 1, ident=5, lsn=0x1),  # a timeline the final one does not descend from
    ]
    audit = checks.timeline_audit(atts, 3, history)
    assert [x["id"] for x in audit.off_history] == [2, 5]
    assert checks.lost_bytes([atts[1]], history) == 0x10


def test_rto_and_gap() -> None:
    atts = [ok("n1", 1, 0.0, 0.1), ok("n2", 2, 4.0, 4.5), ok("n2", 2, 4.6, 4.7, src="node2")]
    assert checks.first_ack_after(atts, 1.0) == 3.5
    assert checks.first_ack_after(atts, 5.0) is None
    assert abs(checks.longest_gap(atts) - 4.4) < 1e-9
    assert checks.acks_between(atts, 1.0, 10.0) == atts[1:]


def _report(scenario: str, mode: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "scenario": scenario,
        "mode": mode,
        "net": "netns",
        "rto_s": 4.0,
        "write_outage_s": 4.1,
        "lost_count": 0,
        "lost_bytes": 0,
        "dual_primary": [],
        "unknown": 1,
        "refusals": 0,
        "writer": {"ok": 10, "failed": 0, "unknown": 1},
        "probe_acks": 5,
        "passed": True,
    }
    base.update(kw)
    return base


def test_summary_totals_and_markers(tmp_path: Path) -> None:
    reports = [
        _report("kill-both", "sync"),
        _report("kill-both", "sync", rto_s=6.0),
        _report("kill-both", "async", lost_count=3, lost_bytes=400, passed=True),
        {"scenario": "partition-all", "mode": "sync", "skipped": "x", "passed": None},
    ]
    text = summarize(reports)
    assert "| kill-both | sync | netns | 2 | 2 | 5.00 |" in text
    assert "runs: **3** (2 in sync/quorum mode, 1 async)" in text
    assert "lost in sync/quorum mode: **0** (of 30 acknowledged)" in text
    assert "largest loss 400 bytes" in text
    assert "skipped (no network namespaces): partition-all (sync)" in text
    doc = tmp_path / "chaos.md"
    doc.write_text(f"# Chaos\n\nintro\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    write_summary(doc, reports)
    out = doc.read_text()
    assert "old" not in out and "intro" in out and "after" in out and "kill-both" in out


def test_selftests_stay_out_of_the_totals() -> None:
    reports = [_report("kill-both", "sync"), _report("selftest-rogue-promote", "sync", lost_count=7)]
    text = summarize(reports)
    assert "lost in sync/quorum mode: **0**" in text
    assert "runs: **1**" in text
    assert "self-tests (sabotage the checkers must report; not in the totals): 1 runs, 1 caught it" in text


def test_recovery_time_is_the_end_of_the_outage_the_fault_caused() -> None:
    acks = [ok("n1", 1, t / 10, t / 10 + 0.01) for t in range(40)]  # steady until 3.9 s
    acks += [ok("n2", 2, 9.0, 9.2), ok("n2", 2, 9.3, 9.4)]  # old primary fenced, new from 9.2 s
    first = checks.first_ack_after(acks, 3.0)
    assert first is not None and first < 0.1
    assert abs((checks.recovery_time(acks, 3.0) or 0) - 6.2) < 1e-9
    assert checks.recovery_time(acks, 20.0) is None


def test_no_outage_means_rto_is_the_first_ack() -> None:
    acks = [ok("n1", 1, t / 10, t / 10 + 0.01) for t in range(60)]  # never interrupted
    assert abs((checks.recovery_time(acks, 3.05) or 0) - 0.06) < 1e-9


def test_the_written_summary_names_the_postgresql_of_the_runs(tmp_path: Path) -> None:
    doc = tmp_path / "chaos.md"
    write_summary(doc, [{**_report("kill-both", "sync"), "pg_version": 17}, _report("kill-both", "sync")])
    out = doc.read_text()
    # the 17 run's server and, for the report without a major (written before it was recorded), 15's
    assert "PostgreSQL) 17." in out and "PostgreSQL) 15." in out and "PostgreSQL) 18." not in out
