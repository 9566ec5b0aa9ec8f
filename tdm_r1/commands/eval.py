"""`tdm-r1 eval`: score a model (a toy checkpoint, a training state, a run, a diffusers folder) on a split or a prompt
file, at one or several seeds, optionally paired against a second model; multi-GPU under `deepspeed`."""

from __future__ import annotations

import argparse
import json

from tdm_r1.commands.common import (
    add_sampling_args,
    eval_world,
    load_sources,
    read_prompt_items,
    sampling_settings,
    writable_output,
)
from tdm_r1.config import ConfigError
from tdm_r1.evaluate import eval_items, eval_metric, eval_reward, evaluate, evaluate_seeds, read_and_score
from tdm_r1.report import paired_gain, sample_captions, sample_tiles, save_labelled_grid, save_start_end_grid


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="score a model on a split or a prompt file (optionally paired against another)",
        description="Sample one image per item (word, prompt), score it and write {ocr_mean, ocr_exact, n, ...} (the "
        "OCR world) or {reward_mean, reward_exact, n, ...} (any other world and diffusers models: its train.rewards, "
        "weighted) as JSON, plus a labelled grid PNG next to it. With --against, the second model is evaluated on the "
        "same items, noise and seeds, and the JSON adds its result and the paired comparison. Under `deepspeed` the "
        "items are split across ranks (each sampled once) and rank 0 writes.",
    )
    add_sampling_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split", choices=["train", "heldout"], default="heldout")
    group.add_argument(
        "--prompts",
        help="file with one item per line: a word of the toy world's alphabet, a prompt of its grammar, or for a "
        'diffusers model a .txt (one prompt per line) or .jsonl ("prompt" plus the metadata its reward reads) file',
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="evaluate at eval.seed, eval.seed + 1, ...: pooled mean, each seed's mean and their standard error",
    )
    p.add_argument(
        "--against",
        metavar="SOURCE",
        help="a second model (same kinds as --checkpoint) evaluated on the same items, noise and seeds; the JSON adds "
        "`against` and `paired` (checkpoint minus against, per seed and per item)",
    )
    p.add_argument("--against-role", default="generator_ema", help="role of --against when it is a training state")
    p.add_argument("--out", required=True, help="output JSON path; the grid goes to the same path with .png")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ConfigError(f"eval: --seeds must be >= 1, got {args.seeds}")
    out = writable_output(args.out)
    sources, cfg, dist = load_sources(args, [(args.checkpoint, args.role), (args.against, args.against_role)])
    world = eval_world(cfg, need_splits=not args.prompts)
    items = read_prompt_items(args.prompts, world) if args.prompts else eval_items(world, args.split, cfg.eval)
    if not items:
        raise ConfigError(f"eval: no items to evaluate in {args.prompts or args.split}")
    reward, metric = eval_reward(cfg, world, {}), eval_metric(cfg)
    results = []
    for loaded in sources:
        model = loaded.load()
        nfe, guidance, shift, solver = sampling_settings(args, cfg, loaded.source.sampler)

        def one(ecfg, model=model, nfe=nfe, guidance=guidance, shift=shift, solver=solver):
            return evaluate(
                model, world, reward, items, nfe, guidance, shift, ecfg, solver, metric, dist, per_item=True
            )

        result, images = evaluate_seeds(one, cfg.eval, args.seeds, metric)
        del model
        if args.seeds == 1:
            result["per_item"] = [result["per_item"]]
        result["checkpoint"] = str(loaded.source.path)
        result["model"] = loaded.source.label
        results.append((result, images))
    (result, images), against = results[0], (results[1] if len(results) > 1 else None)
    result |= {"split": args.prompts or args.split, "seed": cfg.eval.seed}
    if against is not None:
        result["against"] = against[0]
        result["paired"] = paired_gain(against[0], result, metric) | item_wins(result, against[0])
    if not dist.is_main:
        return 0
    out.write_text(json.dumps(result, indent=2) + "\n")
    grid = out.with_suffix(".png")
    n = min(len(images), sample_tiles(images), cfg.eval.grid_rows * cfg.eval.grid_cols)
    words = items[:n]
    readings, scores = read_and_score(reward, images[:n], words, world)
    caps = sample_captions(words, readings, scores)
    save_labelled_grid(images[:n], caps, grid, cols=min(cfg.eval.grid_cols, 4 if n > 16 else n), marks=_marks(scores))
    written = [str(out), str(grid)]
    if against is not None:
        other = against[1][:n]
        b_readings, b_scores = read_and_score(reward, other, words, world)
        pairs = out.with_name(out.stem + "_pairs.png")
        save_start_end_grid(
            other,
            images[:n],
            sample_captions(words, b_readings, b_scores),
            caps,
            pairs,
            marks=(_marks(b_scores), _marks(scores)),
            names=("against", "model"),
        )
        written.append(str(pairs))
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_item", "against")}))
    print(f"eval: wrote {', '.join(written)}")
    return 0


def _marks(scores: list[float]) -> list[bool]:
    return [s == 1.0 for s in scores]


def item_wins(model: dict, against: dict) -> dict:
    """Over every (seed, item) both scored: how often the model scored above, equal to and below the other."""
    pairs = [
        (a, b)
        for seed_a, seed_b in zip(model["per_item"], against["per_item"])
        for a, b in zip(seed_a, seed_b)
        if a == a and b == b  # NaN: a failed score
    ]
    return {
        "items_better": sum(a > b for a, b in pairs),
        "items_equal": sum(a == b for a, b in pairs),
        "items_worse": sum(a < b for a, b in pairs),
    }
