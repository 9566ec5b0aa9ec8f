"""The best-of-k ceiling of a generator: how far could a perfect reward tilt take it, without learning anything new?

Samples G images of each of P held-out words (different noise per sample) from a checkpoint, scores them by OCR and
prints the mean score, the mean of each word's best of the first k samples (k = 1, 2, 4, ... G), and the fraction
of words with at least one exact reading. A KL-regularised RL objective such as TDM-R1's tilts the generator towards
its better samples; a held-out target above the best-of-G value asks it to render what it does not yet produce.

    python tools/best_of_k.py --checkpoint checkpoints/toy_ocr_student.safetensors --nfe 4 --words 64 --samples 16
"""

from __future__ import annotations

from tdm_r1.diagnostics import best_of_k, checkpoint_tool_parser, load_checkpoint_tool
from tdm_r1.evaluate import eval_items, generate
from tdm_r1.rewards.base import score_images
from tdm_r1.rewards.scorer import build_eval_reward


def main() -> None:
    ap = checkpoint_tool_parser(__doc__)
    ap.add_argument("--words", type=int, default=64, help="the first N held-out words")
    ap.add_argument("--samples", type=int, default=16, help="G samples per word")
    args = ap.parse_args()

    model, world, cfg = load_checkpoint_tool(args)
    words = eval_items(world, "heldout", cfg.eval)[: args.words]
    rep = [w for w in words for _ in range(args.samples)]
    images = generate(model, world, rep, args.nfe, args.cfg, cfg.tdm.shift, args.seed, cfg.eval.batch_size)
    r = score_images(build_eval_reward(cfg), images, [world.prompt(w) for w in rep], world.targets(rep))
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
