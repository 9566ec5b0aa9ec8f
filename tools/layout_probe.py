"""Where a generator puts its text: ink columns of its held-out samples and their OCR score, split by whether the ink
reaches the right edge (a word that does not fit is cut off there).

One sample per held-out word at eval seed --seed. The ink threshold is halfway between the world's mean background and
text levels. On a world with horizontal jitter (`world.jitter_x`) this shows whether a reward moved the text left.

    python tools/layout_probe.py --checkpoint checkpoints/toy_ocr_student.safetensors
"""

from __future__ import annotations

import json

from tdm_r1.diagnostics import checkpoint_tool_parser, ink_layout, score_heldout_samples, split_scores


def main() -> None:
    ap = checkpoint_tool_parser(__doc__)
    ap.add_argument("--edge", type=int, default=2, help="columns at the right edge that count as cut off")
    args = ap.parse_args()

    images, scores, threshold = score_heldout_samples(args)
    lay = ink_layout(images[:, 0], threshold, args.edge)
    out = {
        "checkpoint": args.checkpoint,
        "n": len(scores),
        "ocr_mean": float(scores.mean()),
        "ink_left_mean": float(lay["left"].float().mean()),
        "ink_right_mean": float(lay["right"].float().mean()),
        **split_scores(scores, lay["at_edge"], "at_edge", "inside"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
