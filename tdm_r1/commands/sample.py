"""`tdm-r1 sample`: render words with a model checkpoint into a PNG grid."""

from __future__ import annotations

import argparse

from tdm_r1.commands.common import (
    add_sampling_args,
    load_checkpoint_run,
    read_prompt_items,
    sampling_settings,
    writable_output,
)
from tdm_r1.config import ConfigError
from tdm_r1.evaluate import generate
from tdm_r1.report import save_grid
from tdm_r1.worlds.ocr import PromptFileError


def register(sub) -> None:
    p = sub.add_parser("sample", help="render words with a checkpoint into a PNG grid")
    add_sampling_args(p)
    p.add_argument("words", nargs="*", help="words to render, e.g. HELLO CAT")
    p.add_argument("--prompts", help="file with one word per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    writable_output(args.out)
    model, world, cfg, _ = load_checkpoint_run(args, need_splits=False)
    words = list(args.words) + (read_prompt_items(args.prompts, world) if args.prompts else [])
    if not words:
        raise ConfigError("sample: give words as arguments or --prompts FILE")
    for lineno, w in enumerate(words, 1):
        bad = sorted({c for c in w if c not in world.cfg.alphabet})
        if bad or not w or len(w) > world.cfg.max_word_len:
            raise PromptFileError(
                f"word {lineno} {w!r}: must be 1..{world.cfg.max_word_len} characters of {world.cfg.alphabet}"
            )
    nfe, guidance, shift, solver = sampling_settings(args, cfg)
    images = generate(model, world, words, nfe, guidance, shift, args.seed, cfg.eval.batch_size, solver)
    save_grid(images, args.out, cols=min(len(words), args.cols), scale=4)
    print(f"sample: wrote {len(words)} images to {args.out}")
    return 0
