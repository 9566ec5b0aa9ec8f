"""The best-of-k ceiling of a generator: how far could a perfect reward tilt take it, without learning anything new?

Samples G images of each of P held-out words (different noise per sample) from a checkpoint, scores them by OCR and
prints the mean score, the mean of each word's best of the first k samples (k = 1, 2, 4, ... G), and the fraction
of words with at least one exact reading. A KL-regularised RL objective such as TDM-R1's tilts the generator towards
its better samples; a held-out target above the best-of-G value asks it to render what it does not yet produce.

    python tools/best_of_k.py --checkpoint checkpoints/toy_ocr_student.safetensors --nfe 4 --words 64 --samples 16
"""

from __future__ import annotations

import argparse

import torch

from tdm_r1.checkpoint import load_model
from tdm_r1.config import load_config, to_dict
from tdm_r1.diagnostics import best_of_k
from tdm_r1.evaluate import build_eval_reward, eval_words, generate
from tdm_r1.rewards.base import score_images
from tdm_r1.worlds.ocr import build_world


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a model checkpoint (teacher, student, generator.safetensors)")
    ap.add_argument("--nfe", type=int, default=4)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--words", type=int, default=64, help="the first N held-out words")
    ap.add_argument("--samples", type=int, default=16, help="G samples per word")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    model, world_cfg, _ = load_model(args.checkpoint)
    cfg = load_config(None, args.overrides, base={"world": to_dict(world_cfg)})
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    world = build_world(cfg.world)
    words = eval_words(world, "heldout", cfg.eval.n_train, cfg.eval.seed)[: args.words]
    rep = [w for w in words for _ in range(args.samples)]
    images = generate(model, world, rep, args.nfe, args.cfg, cfg.tdm.shift, args.seed, cfg.eval.batch_size)
    r = score_images(build_eval_reward(cfg.reward, world), images, [world.prompt(w) for w in rep])
    r = r.view(len(words), args.samples)
    print(f"{args.checkpoint}: {len(words)} held-out words x {args.samples} samples, {args.nfe} NFE, cfg {args.cfg}")
    print(
        f"mean {float(r.nanmean()):.3f}, exact {float((r == 1).float().mean()):.3f}, "
        f"words with an exact sample {float((r == 1).any(1).float().mean()):.3f}"
    )
    for k, v in best_of_k(r).items():
        print(f"best of {k:3d}: {v:.3f}")


if __name__ == "__main__":
    main()
