"""Where a generator's renderings fail: OCR character errors by letter position and exact readings by word length.

Samples each of the held-out words `--samples` times (different noise per sample), reads them with the OCR reward's
engine, aligns each reading to its word and prints the error rate of the 1st, 2nd, ... letter and the exact rate per
word length, with the same OCR on the world's own renders of the same words as the reference.

    python tools/error_positions.py --checkpoint checkpoints/toy_ocr_student.safetensors --samples 2
"""

from __future__ import annotations

import numpy as np

from tdm_r1.diagnostics import checkpoint_tool_parser, error_positions, load_checkpoint_tool
from tdm_r1.evaluate import generate
from tdm_r1.rewards.ocr import normalise_text
from tdm_r1.rewards.scorer import build_eval_reward


def report(tag: str, words: list[str], readings: list[str]) -> None:
    by_pos, by_len = error_positions(words, [normalise_text(r) for r in readings])
    print(f"{tag}: {len(words)} samples")
    print("  error rate by letter position: " + " ".join(f"{i + 1}:{v:.2f}" for i, v in by_pos.items()))
    print("  exact rate by word length:     " + " ".join(f"{n}:{v:.2f}" for n, v in by_len.items()))


def main() -> None:
    ap = checkpoint_tool_parser(__doc__)
    ap.add_argument("--samples", type=int, default=2, help="samples per held-out word")
    args = ap.parse_args()

    model, world, cfg = load_checkpoint_tool(args)
    reward = build_eval_reward(cfg)
    words = [w for w in world.items("heldout") for _ in range(args.samples)]
    images = generate(model, world, words, args.nfe, args.cfg, cfg.tdm.shift, args.seed, cfg.eval.batch_size)
    report(f"{args.checkpoint} ({args.nfe} NFE, cfg {args.cfg})", words, reward.read(images))
    real = world.render_batch(words, np.random.default_rng(args.seed))
    report("the world's renders", words, reward.read(real.expand(-1, 3, -1, -1)))


if __name__ == "__main__":
    main()
