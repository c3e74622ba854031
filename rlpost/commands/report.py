"""`rlpost report`: one self-contained HTML page of what a run did (rlpost/report.py's `build_report`)."""

from __future__ import annotations

from rlpost.commands.common import error
from rlpost.report import build_report


def add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="write one self-contained HTML page (and PNGs) showing what a run did",
        description="Read RUN_DIR (metrics.jsonl, summary.json, config.yaml, rollouts.jsonl, profile/) and write "
                    "an HTML page with every figure embedded (no network needed to view it): reward and held-out "
                    "pass@1, KL / entropy / length / clipping, time per role, importance weights and log-prob "
                    "mismatch, gold vs proxy reward, sampled completions, the config. Needs matplotlib "
                    "(pip install 'rlpost[report]'). Works on finished, running and killed runs.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (rlpost train)")
    p.add_argument("--out", help="the HTML file (default RUN_DIR/report/index.html; the PNGs go beside it)")


def cmd_report(args) -> int:
    try:
        path = build_report(args.run_dir, args.out)
    except (ImportError, OSError) as e:
        return error(e, 1)
    print(f"rlpost report: {path}")
    return 0
