"""`tdm-r1 bench`: the trainer's epochs timed phase by phase on the reference, fused and fast loop paths."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tdm_r1.bench import PATHS, bench, markdown_table, random_init_config, write_results
from tdm_r1.commands.common import add_config_args, config_from_teacher, setup_threads

DESCRIPTION = (
    "Run whole TDM-R1 epochs of a config on several loop paths in one process, interleaved (reference: the release's "
    "loop structure with the eager reference ops; fused: the fused kernels; fast: the trainer's defaults), and "
    "report per phase the wall seconds, "
    "images/s, counted forward-equivalents per image, FLOPs and peak memory, with the paths' ratios. Writes "
    "<out>.json, .csv, .md and .png."
)


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="time the trainer's phases on the reference, fused and fast paths", description=DESCRIPTION
    )
    add_config_args(p, required=True)
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)} (default: all)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per path (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs per path first (default 1)")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="diffusers configs: the architecture with random weights and stub text encoders, at the recipe's per-GPU "
        "batch (no weights needed; see tdm_r1/models/random_init.py)",
    )
    p.add_argument(
        "--micro-batches", type=int, default=None, help="with --random-init: epochs of this many per-GPU micro-batches"
    )
    p.add_argument("--out", default=None, help="output stem (default: benchmarks/results/train_<config name>)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_teacher(args)
    setup_threads(cfg)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    with tempfile.TemporaryDirectory(prefix="tdm_r1_bench_") as tmp:
        if args.random_init:
            cfg = random_init_config(cfg, tmp, args.micro_batches)
        result = bench(cfg, paths, args.epochs, args.warmup)
    suffix = "_random_init" if args.random_init else ""
    stem = args.out or Path("benchmarks/results") / f"train_{Path(args.config).stem}{suffix}"
    files = write_results(result, stem)
    print(markdown_table(result))
    print(json.dumps({"agreement": result["agreement"]}))
    print("bench: wrote " + ", ".join(str(f) for f in files))
    return 0
