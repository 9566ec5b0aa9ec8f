"""How often a generator draws a blot: the share of its held-out samples with a solid block over the text (a run of at
least --min-width columns inked in >= 90% of the ink rows; a letter's stem is one column), and the OCR score of the
samples with and without one.

One sample per held-out word at eval seed --seed. The ink threshold is halfway between the world's mean background and
text levels. On the blot world (`world.blot_prob`) this shows whether a reward taught the generator to stop smudging.

    python tools/blot_probe.py --checkpoint checkpoints/toy_ocr_blot_teacher.safetensors --nfe 32 --cfg 3
"""

from __future__ import annotations

import json

from tdm_r1.diagnostics import checkpoint_tool_parser, score_heldout_samples, solid_blocks, split_scores


def main() -> None:
    ap = checkpoint_tool_parser(__doc__)
    ap.add_argument("--min-width", type=int, default=4, help="columns a solid block needs to count as a blot")
    args = ap.parse_args()

    images, scores, threshold = score_heldout_samples(args)
    blotted = solid_blocks(images[:, 0], threshold, min_width=args.min_width)["blotted"]
    out = {
        "checkpoint": args.checkpoint,
        "n": len(scores),
        "ocr_mean": float(scores.mean()),
        **split_scores(scores, blotted, "blotted", "clean"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
