"""`tdm-r1 eval`: score a model checkpoint on a split or a word file, at one or several seeds."""

from __future__ import annotations

import argparse
import json

from tdm_r1.commands.common import (
    add_sampling_args,
    load_checkpoint_run,
    read_prompt_items,
    sampling_settings,
    writable_output,
)
from tdm_r1.config import ConfigError
from tdm_r1.evaluate import eval_items, eval_metric, eval_reward, evaluate, evaluate_seeds
from tdm_r1.report import save_grid


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a checkpoint on a split or a prompt file",
        description="Sample one image per item (word, prompt), score it and write {ocr_mean, ocr_exact, n, ...} (the "
        "OCR world) or {reward_mean, reward_exact, n, ...} (any other world: its train.rewards, weighted) as JSON "
        "plus a sample grid PNG next to it.",
    )
    add_sampling_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split", choices=["train", "heldout"], default="heldout")
    group.add_argument(
        "--prompts", help="file with one item per line (UTF-8; a word of the world's alphabet, a prompt of its grammar)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="evaluate at eval.seed, eval.seed + 1, ...: pooled mean, each seed's mean and their standard error",
    )
    p.add_argument("--out", required=True, help="output JSON path; the grid goes to the same path with .png")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError(f"eval: --seeds must be >= 1, got {args.seeds}")
    out = writable_output(args.out)
    model, world, cfg, _ = load_checkpoint_run(args, need_splits=not args.prompts)
    items = read_prompt_items(args.prompts, world) if args.prompts else eval_items(world, args.split, cfg.eval)
    nfe, guidance, shift, solver = sampling_settings(args, cfg)
    reward, metric = eval_reward(cfg, world, {}), eval_metric(cfg)
    result, images = evaluate_seeds(
        lambda ecfg: evaluate(model, world, reward, items, nfe, guidance, shift, ecfg, solver, metric=metric),
        cfg.eval,
        args.seeds,
        metric,
    )
    result |= {"checkpoint": str(args.checkpoint), "split": args.prompts or args.split, "seed": cfg.eval.seed}
    out.write_text(json.dumps(result, indent=2) + "\n")
    grid = out.with_suffix(".png")
    save_grid(images[: cfg.eval.grid_rows * cfg.eval.grid_cols], grid, cols=cfg.eval.grid_cols)
    print(json.dumps(result))
    print(f"eval: wrote {out} and {grid}")
    return 0
