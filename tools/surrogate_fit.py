"""Can a TDM-R1 surrogate learn a preference that carries over to fresh samples? An offline learnability check.

Rolls out `--epochs` epochs of P x G samples from the run's starting generator (frozen; train words), scores them,
then trains the surrogate alone on them (the trainer's own surrogate loss, one optimizer step per stored micro-batch)
for `--passes` passes. After each pass it probes (`tdm_r1.diagnostics.preference_probe`) the samples it trained on
(in-sample: corr(A, l - l_ref) < 0 shows the loss can separate good from bad) and fresh held-out samples (transfer:
what the generator's learned-reward term can use). Same probe noise every pass, so the rows are comparable.

    python tools/surrogate_fit.py --config configs/toy_ocr_r1.yaml --epochs 4 --passes 5
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from tdm_r1.config import load_config
from tdm_r1.diagnostics import preference_probe
from tdm_r1.optim import optimizer_step, update_shadow
from tdm_r1.phases import advantage_phase, micro_batches, rollout_phase
from tdm_r1.rewards.scorer import build_scorer
from tdm_r1.run import build_run
from tdm_r1.updates import draw_surrogate_step, surrogate_backward
from tdm_r1.worlds.stream import PromptStream

TAUS = (0.1, 0.3, 0.5, 0.8)


def probe_line(tag: str, roles, batch, steps: int, seed: int) -> str:
    rows = preference_probe(roles, batch, TAUS, torch.Generator().manual_seed(seed), states=(steps - 1, steps))
    cells = [f"x{r['state']}/{r['tau']}:{r['corr']:+.3f}({r['mean_diff']:+.3f})" for r in rows]
    return f"{tag:9s} " + " ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="a train config (roles, tdm, train sections)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of P x G rollouts to train on")
    ap.add_argument("--passes", type=int, default=5, help="passes of surrogate training over them")
    ap.add_argument("--probe-prompts", type=int, default=32, help="fresh held-out prompts (x G samples)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = load_config(args.config, args.overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    tc, tdm = cfg.train, cfg.tdm
    run = build_run(cfg)
    world, roles, opt = run.world, run.roles, run.opts["surrogate"]
    scorer = build_scorer(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    with torch.no_grad():
        stream = PromptStream(world.items("train"), args.seed)
        data = [rollout_phase(roles, world, stream, scorer, tc, tdm, gen) for _ in range(args.epochs)]
        for b in data:
            advantage_phase(b, tc)
        tc_probe = copy.copy(tc)
        tc_probe.prompts_per_epoch = args.probe_prompts
        fresh = rollout_phase(roles, world, PromptStream(world.items("heldout"), args.seed), scorer, tc_probe, tdm, gen)
        advantage_phase(fresh, tc_probe)
    scorer.close()
    n = sum(b.rewards.numel() for b in data)
    print(
        f"{n} training samples (reward {float(torch.cat([b.rewards for b in data]).nanmean()):.3f}), "
        f"{fresh.rewards.numel()} fresh held-out samples; {time.time() - t0:.0f} s"
    )
    print("cells: x<state>/<tau>:corr(A, l - l_ref)(mean l - l_ref); corr < 0 = prefers the better samples")
    step = 0
    for p in range(args.passes):
        slow_decay = min(tc.slow_decay_max, tc.slow_decay_base + tc.slow_decay_rate * p)
        for b in data:
            for mb in micro_batches(b):
                surrogate_backward(roles, mb, draw_surrogate_step(tdm.steps, gen), tc, tdm, gen, 1.0)
                optimizer_step(opt, roles.trainable()["surrogate"], cfg.optim.grad_clip)
                update_shadow(roles, "slow_surrogate", slow_decay)
                step += 1
        print(f"pass {p + 1}: {step} surrogate steps, {time.time() - t0:.0f} s")
        print(probe_line("in-sample", roles, data[0], tdm.steps, args.seed + 1))
        print(probe_line("fresh", roles, fresh, tdm.steps, args.seed + 2), flush=True)


if __name__ == "__main__":
    main()
