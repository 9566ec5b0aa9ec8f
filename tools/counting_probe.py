"""How a generator counts: one sample per held-out prompt at each of --seeds eval seeds, the objects the counting reward
finds in it, and by requested count the share of samples with the right number of objects (any kind), with exactly
the asked objects (strict) and the mean of found minus asked; overall, how often it draws one too many or too few.

    python tools/counting_probe.py --checkpoint checkpoints/toy_counting_teacher.safetensors --nfe 32 --cfg 3
    python tools/counting_probe.py --checkpoint checkpoints/toy_counting_teacher.safetensors \
        --adapter checkpoints/toy_counting_student_adapter.safetensors --seeds 4       # the shipped 4-step student
    python tools/counting_probe.py --checkpoint runs/counting/generator.safetensors --seeds 4

--markdown FILE --label NAME appends the table to FILE under a heading NAME.
"""

from __future__ import annotations

import json

from tdm_r1.diagnostics import checkpoint_tool_parser, count_profile, load_checkpoint_tool


def main() -> None:
    ap = checkpoint_tool_parser(__doc__)
    ap.add_argument("--seeds", type=int, default=1, help="eval seeds --seed, --seed + 1, ...")
    ap.add_argument("--adapter", help="a LoRA adapter (tdm-r1 distill / train) applied on --checkpoint as its base")
    ap.add_argument("--markdown", help="append the table to this file")
    ap.add_argument("--label", default="", help="the table's heading in --markdown")
    args = ap.parse_args()

    from tdm_r1.evaluate import generate
    from tdm_r1.rewards.counting import CountingOptions, find_objects

    model, world, cfg = load_checkpoint_tool(args)
    items = world.items("heldout")
    found, targets = [], []
    for seed in range(args.seed, args.seed + args.seeds):
        images = generate(model, world, items, args.nfe, args.cfg, cfg.tdm.shift, seed, cfg.eval.batch_size)
        found += [find_objects(x.permute(1, 2, 0).numpy(), CountingOptions()) for x in images]
        targets += world.targets(items)
    out = {"checkpoint": args.checkpoint, "nfe": args.nfe, "cfg": args.cfg, "seeds": args.seeds}
    out |= count_profile(found, targets)
    out["strict"] = sum(r["strict"] * r["n"] for r in out["by_count"].values()) / len(targets)
    print(json.dumps(out))
    lines = [f"### {args.label or args.checkpoint}", "", f"strict {out['strict']:.3f} over {len(targets)} samples "
             f"({args.nfe} NFE, CFG {args.cfg:g}, {args.seeds} seed(s) from {args.seed})", "",
             "| count asked | n | right count | strict | found - asked |", "|---|---|---|---|---|"]  # fmt: skip
    for c, r in out["by_count"].items():
        lines.append(f"| {c} | {r['n']} | {r['right_count']:.3f} | {r['strict']:.3f} | {r['bias']:+.2f} |")
    lines += ["", "found - asked: " + ", ".join(f"{d:+d}: {p:.1%}" for d, p in out["difference"].items()), ""]
    print("\n".join(lines))
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
