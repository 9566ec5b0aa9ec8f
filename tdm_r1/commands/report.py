"""`tdm-r1 report`: rewrite a train run's report.md, with ablation runs as extra rows."""

from __future__ import annotations

import argparse

from tdm_r1.config import ConfigError
from tdm_r1.report import write_report


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="rewrite a train run's report.md, adding ablation runs as rows",
        description="Reads RUN/summary.json and RUN/metrics.jsonl (and each ablation's summary.json) and "
        "writes RUN/report.md and RUN/reward_curve.png.",
    )
    p.add_argument("--run", required=True, help="run directory of the main `tdm-r1 train` run")
    p.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="another train run to list as an ablation row (repeatable)",
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ablations = {}
    for item in args.ablation:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--ablation expects NAME=RUN_DIR, got {item!r}")
        ablations[name] = path
    out = write_report(args.run, ablations)
    print(f"report: wrote {out}")
    return 0
