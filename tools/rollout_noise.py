"""How much of a stochastic few-step rollout's reward its starting noise already decides (the eta ablation's premise).

TDM-R1 rolls out deterministically, so a sample's final reward is the exact reward of every state on its way and one
advantage serves every step. With eta > 0 every step but the last re-noises, and the reward credited to a state is one
draw of what it may become. This samples one starting noise per held-out item (the eval noise of --seed), its
deterministic rollout and --draws stochastic ones at --eta from that same start, scores all of them with the world's
evaluation reward and prints the share of the stochastic rewards' variance between starts (`start_share`: 1 means the
re-noising never changes a reward), how often a stochastic reward equals its start's deterministic one, and the
correlation of the two over starts.

    python tools/rollout_noise.py --checkpoint checkpoints/toy_counting_teacher.safetensors \\
        --adapter checkpoints/toy_counting_student_adapter.safetensors --items 64 --draws 8
    python tools/rollout_noise.py --checkpoint checkpoints/toy_ocr_blot_teacher.safetensors \\
        --adapter checkpoints/toy_ocr_blot_student_adapter.safetensors --items 64 --draws 8
"""

from __future__ import annotations

import json

import torch

from tdm_r1.diagnostics import checkpoint_tool_parser, load_checkpoint_tool, start_noise_share


def main() -> None:
    ap = checkpoint_tool_parser(__doc__)
    ap.add_argument("--adapter", help="a LoRA adapter (tdm-r1 distill / train) applied on --checkpoint as its base")
    ap.add_argument("--items", type=int, default=64, help="the first N held-out items (one starting noise each)")
    ap.add_argument("--draws", type=int, default=8, help="stochastic rollouts per starting noise")
    ap.add_argument("--eta", type=float, default=1.0, help="the stochastic rollouts' eta (train.eta)")
    args = ap.parse_args()
    if args.items < 2 or args.draws < 1:
        ap.error("--items must be >= 2 and --draws >= 1")

    from tdm_r1.evaluate import eval_items, eval_reward
    from tdm_r1.rewards.base import score_images
    from tdm_r1.sampling import rollout

    model, world, cfg = load_checkpoint_tool(args)
    items = eval_items(world, "heldout", cfg.eval)[: args.items]
    reward = eval_reward(cfg, world, {})
    start = torch.randn((len(items), *model.latent_shape(world.height, world.width)),
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    renoise = torch.Generator().manual_seed(args.seed + 1)
    bs = cfg.eval.batch_size

    def scores(eta: float) -> torch.Tensor:
        out = []
        for i in range(0, len(items), bs):
            part = items[i : i + bs]
            cond = model.encode_prompts([world.prompt(w) for w in part])
            x = rollout(model, cond, start[i : i + bs], steps=args.nfe, shift=cfg.tdm.shift, cfg=args.cfg, eta=eta,
                        generator=renoise)  # fmt: skip
            out.append(score_images(reward, model.decode(x.sample).cpu(), [world.prompt(w) for w in part],
                                    world.targets(part)))  # fmt: skip
        return torch.cat(out)

    det = scores(0.0)
    stoch = torch.stack([scores(args.eta) for _ in range(args.draws)], dim=1)
    out = {"checkpoint": args.checkpoint, "adapter": args.adapter, "nfe": args.nfe, "cfg": args.cfg, "eta": args.eta}
    print(json.dumps(out | start_noise_share(det, stoch)))


if __name__ == "__main__":
    main()
