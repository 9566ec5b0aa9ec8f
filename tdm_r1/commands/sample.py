"""`tdm-r1 sample`: render words or prompts with a model (a toy checkpoint, a training state, a run, a diffusers
folder) into a PNG grid; under `deepspeed` the prompts are split across ranks."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tdm_r1.commands.common import (
    add_sampling_args,
    eval_world,
    load_sources,
    read_prompt_items,
    sampling_settings,
    writable_output,
)
from tdm_r1.config import ConfigError, is_diffusers
from tdm_r1.evaluate import gather_share, generate, rank_share
from tdm_r1.report import save_grid
from tdm_r1.worlds.ocr import PromptFileError


def register(sub) -> None:
    p = sub.add_parser("sample", help="render words or prompts with a model into a PNG grid")
    add_sampling_args(p)
    p.add_argument("words", nargs="*", help='words (toy OCR world) or prompts to render, e.g. HELLO CAT, "a red cube"')
    p.add_argument("--prompts", help='file with one word or prompt per line (.jsonl: a "prompt" per line)')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--out", default="samples.png")
    p.add_argument("--images", default=None, metavar="DIR", help="also write every image as DIR/NNNN.png")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    writable_output(args.out)
    (loaded,), cfg, dist = load_sources(args, [(args.checkpoint, args.role)])
    world = eval_world(cfg, need_splits=False)
    words = list(args.words) + (read_prompt_items(args.prompts, world) if args.prompts else [])
    if not words:
        raise ConfigError("sample: give words as arguments or --prompts FILE")
    if not is_diffusers(cfg) and cfg.world.name == "ocr":
        for lineno, w in enumerate(words, 1):
            bad = sorted({c for c in w if c not in world.cfg.alphabet})
            if bad or not w or len(w) > world.cfg.max_word_len:
                raise PromptFileError(
                    f"word {lineno} {w!r}: must be 1..{world.cfg.max_word_len} characters of {world.cfg.alphabet}"
                )
    nfe, guidance, shift, solver = sampling_settings(args, cfg, loaded.source.sampler)
    idx = rank_share(len(words), dist) if dist.world > 1 else None
    model = loaded.load()
    images = generate(model, world, words, nfe, guidance, shift, args.seed, cfg.eval.batch_size, solver, indices=idx)
    if dist.world > 1:  # every rank's share, in prompt order (a grid's worth of images)
        images = gather_share(images.contiguous(), len(words), dist)
    if not dist.is_main:
        return 0
    scale = 4 if images.shape[-1] <= 128 else 1
    save_grid(images, args.out, cols=min(len(words), args.cols), scale=scale)
    if args.images:
        from PIL import Image

        folder = Path(args.images)
        folder.mkdir(parents=True, exist_ok=True)
        u8 = (images.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, img in enumerate(u8):
            Image.fromarray(img).save(folder / f"{i:04d}.png")
        (folder / "prompts.txt").write_text("".join(w + "\n" for w in words), encoding="utf-8")
    print(f"sample: wrote {len(words)} images ({nfe} NFE, CFG {guidance}) to {args.out}")
    return 0
