"""Does a TDM-R1 surrogate prefer the better of fresh samples? A probe of the learned reward's generalisation.

Loads a `tdm-r1 train` training state (toy OCR world), rolls out P fresh held-out prompts x G samples with the
generator, scores them, and for each stored state and re-noising level tau compares the surrogate's velocity loss l
with the reference's l_ref on the same group-shared noise. A surrogate that learned a preference that carries over
has l - l_ref lower for the better samples of a group: corr(A, l - l_ref) < 0 (its standard error is about
1/sqrt(P*G)). mean(l - l_ref) well below 0 at low tau means the surrogate learned the generator's own samples rather
than a preference, and the learned-reward term then pulls the generator against the KL term.
(`tdm_r1.diagnostics.preference_probe`; tools/surrogate_fit.py trains a surrogate offline and probes it per pass.)

    python tools/surrogate_probe.py --run runs/demo --state runs/demo/checkpoints/state_000012.safetensors
"""

from __future__ import annotations

import argparse

import torch

from tdm_r1 import checkpoint as ckpt
from tdm_r1.config import load_config
from tdm_r1.diagnostics import format_probe, preference_probe
from tdm_r1.phases import advantage_phase, rollout_phase
from tdm_r1.rewards.scorer import build_scorer
from tdm_r1.run import build_run
from tdm_r1.worlds.stream import PromptStream

TAUS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="the train run directory (its config.yaml)")
    ap.add_argument("--state", required=True, help="a training-state checkpoint of that run")
    ap.add_argument("--prompts", type=int, default=32, help="fresh held-out prompts (x train.group_size samples)")
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()

    cfg = load_config(f"{args.run}/config.yaml")
    torch.set_num_threads(cfg.threads)
    cfg.train.prompts_per_epoch = args.prompts
    run = build_run(cfg)
    world, roles = run.world, run.roles
    state, _ = ckpt.read_train_state(args.state)
    roles.load_state_tensors(state["roles"])
    scorer = build_scorer(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        stream = PromptStream(world.items("heldout"), args.seed)
        batch = rollout_phase(roles, world, stream, scorer, cfg.train, cfg.tdm, gen)
        scorer.close()
        advantage_phase(batch, cfg.train)
    print(f"{batch.adv.numel()} fresh samples, reward mean {float(batch.rewards.nanmean()):.3f}")
    print(format_probe(preference_probe(roles, batch, TAUS, gen)))


if __name__ == "__main__":
    main()
