"""``python -m chaos``: run fault scenarios against a real 3-node hakeeper cluster.

    python -m chaos list
    python -m chaos run SCENARIO[,SCENARIO...]|all [--runs N] [--mode async|sync|quorum]
    python -m chaos smoke                 # what `make chaos-smoke` (part of `make test`) runs
    python -m chaos smoke --pg-version 17 --scenarios kill-both,partition-all
    python -m chaos full [--runs N]       # every scenario in every mode (`make chaos`)
    python -m chaos summarize DIR... [--write docs/chaos.md | --failures]
    python -m chaos cleanup               # namespaces left by a runner that was killed

--pg-version 15|17|18 picks the PostgreSQL major of every cluster (default: $TEST_PG_VERSION,
else 15); `make chaos-smoke` runs the whole smoke on 15, then kill-both and partition-all on 17
and 18.

Exit status: 0 when every run passed, 1 when one failed or a selected scenario was skipped
(e.g. a partition scenario without network namespaces; --allow-skips accepts that), 2 for a
usage error.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chaos.net import remove_stale_namespaces
from chaos.report import failures, summarize, write_summary
from chaos.runner import MODES, Runner, plans_for
from chaos.scenarios import SCENARIOS, SMOKE
from hakeeper.localcluster import LocalClusterError, pgbuilds

REPORTS = Path("chaos/reports")
ERROR_FILE = "error.txt"  # why a run could not go on (no report of its own), for `summarize --failures`


def _out_dir(args: argparse.Namespace, what: str) -> Path:
    if args.out:
        return Path(args.out)
    return REPORTS / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{what}"


def _log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _finish(reports: list[dict[str, Any]], out: Path, allow_skips: bool = False) -> int:
    """Print the summary; the exit status.  A skipped scenario fails the run unless
    ``allow_skips``: a smoke run that silently left out the split-brain partition scenario (no
    network namespaces, no iproute2) would otherwise go green having tested less."""
    ran = [r for r in reports if r.get("passed") is not None]
    failed = [r for r in ran if not r["passed"]]
    skipped = [r for r in reports if r.get("passed") is None]
    print()
    print(summarize(reports))
    majors = sorted({int(r["pg_version"]) for r in reports if r.get("pg_version") is not None})
    on = f" on PostgreSQL {', '.join(map(str, majors))}" if majors else ""
    print(f"\nreports: {out}/  ({len(ran)} runs{on}, {len(failed)} failed, {len(skipped)} skipped)")
    for r in skipped:
        print(
            f"skipped: {r['scenario']} ({r['mode']}): {r.get('skipped', 'no reason given')}", file=sys.stderr
        )
    if skipped and not allow_skips:
        print(
            f"chaos: {len(skipped)} selected scenario(s) did not run; fix the host (run as root with "
            "iproute2) or pass --allow-skips to accept a partial run",
            file=sys.stderr,
        )
        return 1
    return 1 if failed or not ran else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m chaos", description="hakeeper fault-injection suite")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the scenarios")
    for name in ("run", "smoke", "full"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("scenario", help="a scenario name, several joined by commas, or 'all'")
        p.add_argument("--runs", type=int, default=1, help="runs per scenario (default 1)")
        if name != "full":
            p.add_argument("--mode", choices=MODES, default="sync", help="replication mode (default sync)")
        else:
            p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
        if name == "smoke":
            p.add_argument(
                "--scenarios",
                help="only these smoke scenarios, joined by commas (default: every one of the smoke)",
            )
        p.add_argument(
            "--pg-version",
            type=int,
            choices=pgbuilds.SUPPORTED_MAJORS,
            help=f"PostgreSQL major of the clusters (default: ${pgbuilds.ENV_VAR}, "
            f"else {pgbuilds.DEFAULT_MAJOR})",
        )
        p.add_argument("--net", choices=("auto", "netns", "loopback"), default="auto")
        p.add_argument("--out", help="report directory (default chaos/reports/<time>-<what>)")
        p.add_argument("--keep", action="store_true", help="keep cluster directories (logs) after runs")
        p.add_argument(
            "--allow-skips",
            action="store_true",
            help="exit 0 even when a selected scenario was skipped (default: a skip fails the run)",
        )
    p = sub.add_parser("summarize")
    p.add_argument("dirs", nargs="+")
    p.add_argument("--write", help="replace the summary section of this markdown file")
    p.add_argument(
        "--failures",
        action="store_true",
        help="only the failed runs, each with its violations, and the runs that could not start "
        "(what `make chaos-smoke` prints last when it fails, so that a CI log's tail shows why)",
    )
    sub.add_parser("cleanup")
    return ap


def _list_scenarios(args: argparse.Namespace) -> int:
    for s in SCENARIOS.values():
        extra = " [netns]" if s.partition else ""
        extra += " [3 etcd]" if s.etcd_members == 3 else ""
        print(f"{s.name:26} {s.about}{extra}")
    return 0


def _cleanup(args: argparse.Namespace) -> int:
    gone = remove_stale_namespaces()
    print("removed: " + (", ".join(gone) if gone else "nothing"))
    return 0


def _summarize(args: argparse.Namespace) -> int:
    found: list[dict[str, Any]] = []
    for d in args.dirs:
        for f in sorted(Path(d).glob("*.json")):
            found.append(json.loads(f.read_text()))
    if args.failures:
        lines = failures(found)
        for d in args.dirs:
            err = Path(d) / ERROR_FILE
            if err.is_file():
                lines.append(f"{d}: did not run: {err.read_text().strip()}")
        print("\n".join(lines) if lines else "no failed run in " + ", ".join(args.dirs))
        return 0
    if args.write:
        write_summary(Path(args.write), found)
        print(f"wrote {args.write}")
    else:
        print(summarize(found))
    return 0


# The commands that run no scenario.
_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "list": _list_scenarios,
    "cleanup": _cleanup,
    "summarize": _summarize,
}


def _selection(ap: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], str, list[str]]:
    """(scenario names, what the report directory is named after, modes) for run, smoke or full."""
    if args.cmd == "run":
        names = list(SCENARIOS) if args.scenario == "all" else args.scenario.split(",")
        return names, args.scenario.replace(",", "+"), [args.mode]
    if args.cmd == "smoke":
        if not args.scenarios:
            return SMOKE, "smoke", [args.mode]
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        # Only the smoke's own scenarios: `run` is there for any other choice.
        outside = [n for n in names if n not in SMOKE]
        if outside or not names:
            ap.error(
                f"--scenarios {args.scenarios!r}: not in the smoke: {', '.join(outside) or '(none given)'}; "
                f"the smoke's scenarios are {', '.join(SMOKE)}"
            )
        return names, "smoke", [args.mode]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s): {', '.join(bad)}")
    return list(SCENARIOS), "full", modes


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (and SIGINT, which a shell ignores for background jobs) stop the run cleanly: the
    # cluster's processes are stopped and the namespaces removed by the runner's finally blocks.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    ap = _parser()
    args = ap.parse_args(argv)
    command = _COMMANDS.get(args.cmd)
    if command is not None:
        return command(args)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    names, what, modes = _selection(ap, args)
    try:
        plans = plans_for(names, args.runs)
    except KeyError as e:
        ap.error(f"unknown scenario(s): {e.args[0]}; see `python -m chaos list`")
    out = _out_dir(args, what)
    reports: list[dict[str, Any]] = []
    try:
        major = pgbuilds.check_major(
            args.pg_version if args.pg_version is not None else pgbuilds.default_major()
        )
        _log(f"PostgreSQL {major}: {', '.join(names)} in {', '.join(modes)} mode")
        for mode in modes:
            runner = Runner(mode, out, net_kind=args.net, log=_log, keep=args.keep, pg_version=major)
            reports += runner.execute(plans)
    except LocalClusterError as e:
        print(f"chaos: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"chaos: {e}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(f"{e}\n")
        return 1
    except KeyboardInterrupt:
        print("chaos: interrupted", file=sys.stderr)
        return 130
    return _finish(reports, out, allow_skips=args.allow_skips)


if __name__ == "__main__":
    sys.exit(main())
