"""The README quotes measured times; each must be one docs/benchmarks.md reports (issue 13, item 15:
the README's figures had gone stale against the benchmarks)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A measured time as the README quotes it: two decimals and seconds ("4.62 s").
FIGURE = re.compile(r"(?<![\d.])(\d+\.\d\d) s\b")


def test_every_time_the_readme_quotes_is_in_the_benchmarks() -> None:
    readme = (ROOT / "README.md").read_text()
    bench = (ROOT / "docs" / "benchmarks.md").read_text()
    quoted = FIGURE.findall(readme)
    # failover p50/p95, switchover window, backup/PITR/newest-restore pairs against pgBackRest
    assert len(quoted) >= 9, quoted
    missing = [f for f in quoted if not re.search(rf"(?<![\d.]){re.escape(f)}(?!\d)", bench)]
    assert missing == [], f"README quotes times docs/benchmarks.md does not report: {missing}"


def test_the_readme_has_no_unquoted_approximate_timing_claims() -> None:
    """Figures like "~0.3 s" escaped the check above; only the walkthrough's "~5 s" remains,
    and it is the rounded failover median."""
    readme = (ROOT / "README.md").read_text()
    approx = re.findall(r"~\d+(?:\.\d+)? s\b", readme)
    assert approx == ["~5 s"], approx
