"""Summaries of chaos reports: a markdown table per scenario and mode, and the totals the goal
is judged on (0 lost acknowledged writes in sync and quorum modes, 0 dual-primary windows)."""

from __future__ import annotations

import contextlib
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from chaos.checks import OUTAGE
from hakeeper.localcluster import LocalClusterError, pgbuilds

BEGIN = "<!-- chaos-summary:begin -->"
END = "<!-- chaos-summary:end -->"


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _fmt(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def rto(r: dict[str, Any]) -> float | None:
    """A report's RTO (reports written before the outage threshold existed are corrected: with no
    gap of OUTAGE or more, the fault interrupted nothing and the RTO is the first acknowledgement)."""
    if r.get("rto_s") is None:
        return None
    if r.get("first_ack_s") is not None and float(r["write_outage_s"]) < OUTAGE:
        return float(r["first_ack_s"])
    return float(r["rto_s"])


def failures(reports: Iterable[dict[str, Any]]) -> list[str]:
    """A line per failed run (scenario, mode, major, run: its violations; where its cluster's logs
    were kept) and per skipped one, in a stable order."""
    out: list[str] = []
    for r in sorted(
        reports, key=lambda r: (r.get("pg_version") or 0, r["scenario"], r["mode"], r.get("run") or 0)
    ):
        where = f"{r['scenario']} [{r['mode']}] PostgreSQL {r.get('pg_version', '?')}"
        if r.get("passed") is None:
            out.append(f"SKIPPED {where}: {r.get('skipped', 'no reason given')}")
        elif not r["passed"]:
            kept = f" (logs: {r['cluster_dir']})" if r.get("cluster_dir") else ""
            out.append(f"FAILED {where} run {r.get('run')}: {'; '.join(r['violations'])}{kept}")
    return out


def summarize(reports: Iterable[dict[str, Any]]) -> str:
    reports = list(reports)
    ran = [r for r in reports if r.get("passed") is not None]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in ran:
        groups.setdefault((r["scenario"], r["mode"]), []).append(r)
    lines = [
        "| scenario | mode | net | runs | passed | RTO p50 s | RTO p95 s | RTO max s "
        "| longest write gap max s | lost acked | dual-primary windows | unknown | refusals |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (sc, mode), rs in sorted(groups.items()):
        rtos = [x for x in map(rto, rs) if x is not None]
        gaps = [float(r["write_outage_s"]) for r in rs]
        nets = ",".join(sorted({r["net"] for r in rs}))
        lines.append(
            f"| {sc} | {mode} | {nets} | {len(rs)} | {sum(1 for r in rs if r['passed'])} "
            f"| {_fmt(statistics.median(rtos) if rtos else None)} | {_fmt(_pct(rtos, 0.95))} "
            f"| {_fmt(max(rtos) if rtos else None)} | {_fmt(max(gaps) if gaps else None)} "
            f"| {sum(r['lost_count'] for r in rs)} | {sum(len(r['dual_primary']) for r in rs)} "
            f"| {sum(r['unknown'] for r in rs)} | {sum(r['refusals'] for r in rs)} |"
        )
    selftests = [r for r in ran if r["scenario"].startswith("selftest-")]
    ran = [r for r in ran if not r["scenario"].startswith("selftest-")]
    strict = [r for r in ran if r["mode"] in ("sync", "quorum")]
    asyn = [r for r in ran if r["mode"] == "async"]
    skipped = sorted({f"{r['scenario']} ({r['mode']})" for r in reports if r.get("passed") is None})
    lines += [
        "",
        f"- runs: **{len(ran)}** ({len(strict)} in sync/quorum mode, {len(asyn)} async), "
        f"passed {sum(1 for r in ran if r['passed'])}",
        f"- acknowledged writes lost in sync/quorum mode: **{sum(r['lost_count'] for r in strict)}**"
        f" (of {sum(r['writer']['ok'] + r['probe_acks'] for r in strict)} acknowledged)",
        f"- dual-primary windows, all modes: **{sum(len(r['dual_primary']) for r in ran)}**",
        f"- async mode: {sum(r['lost_count'] for r in asyn)} acknowledged writes lost in "
        f"{sum(1 for r in asyn if r['lost_count'])} runs; largest loss "
        f"{max((r['lost_bytes'] for r in asyn), default=0)} bytes of WAL",
    ]
    if selftests:
        lines.append(
            f"- checker self-tests (sabotage the checkers must report; not in the totals): "
            f"{len(selftests)} runs, {sum(1 for r in selftests if r['passed'])} caught it"
        )
    if skipped:
        lines.append(f"- skipped (no network namespaces): {', '.join(skipped)}")
    return "\n".join(lines)


def machine_facts(pg_majors: Iterable[int] = (15,)) -> str:
    """One line about this machine and the versions the runs used."""
    import os
    import platform
    import subprocess

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    versions = []
    programs = []
    for major in sorted(set(pg_majors)):
        with contextlib.suppress(LocalClusterError):
            programs.append([pgbuilds.pg_program("postgres", major), "--version"])
    for argv in (*programs, ["etcd", "--version"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.splitlines()
            if out:
                versions.append(out[0].strip())
    return f"{cpu} x {os.cpu_count()} cores{mem}, Linux {platform.release()}; " + "; ".join(versions)


def write_summary(path: Path, reports: Iterable[dict[str, Any]]) -> None:
    """Replace the text between the summary markers of ``path`` (append them if missing)."""
    reports = list(reports)
    stamps = sorted(str(r["started_at"]) for r in reports if r.get("started_at"))
    when = f"{stamps[0]} to {stamps[-1]}" if stamps else "unknown dates"
    # reports written before the runner recorded the major ran on 15
    majors = {int(r.get("pg_version") or 15) for r in reports}
    block = f"{BEGIN}\nRuns from {when} on {machine_facts(majors)}.\n\n{summarize(reports)}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
