"""Per-rank bytes of role parameters, gradients and optimizer states under DeepSpeed, at any number of ranks.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero_memory.py [--config C] [--set k=v ...]

Builds the roles of a `tdm-r1 train` config as a distributed run does (default: configs/toy_ocr_r1_tiny_ds.yaml,
full mode, ZeRO-3), runs one micro-batch of the fake / surrogate / generator backward, and counts this rank's bytes:
parameters (its partitions of every role, the frozen reference and EMA copies included) and gradients between
backward and step, optimizer states (fp32 master partitions + AdamW moments) after the step. Rank 0 prints a row
per rank and writes benchmarks/results/zero_memory_<world>rank.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from pathlib import Path

import torch

from tdm_r1 import distributed
from tdm_r1.config import Config, load_config
from tdm_r1.phases import advantage_phase, micro_batches, rollout_phase
from tdm_r1.rewards import build_reward
from tdm_r1.rewards.scorer import RewardScorer
from tdm_r1.run import build_run
from tdm_r1.updates import fake_score_backward, generator_backward, surrogate_backward
from tdm_r1.worlds.stream import PromptStream

ROOT = Path(__file__).resolve().parents[1]


def measure(cfg: Config) -> tuple[dict, object]:
    """(this rank's bytes, the roles) after one micro-batch of every backward and one step per role. Collective."""
    run = build_run(cfg)
    dist, roles, engines, world, tc, split = run.dist, run.roles, run.opts, run.world, cfg.train, run.split
    scorer = RewardScorer([(build_reward("dark_fraction"), 1.0)])
    gen = torch.Generator().manual_seed(0)
    batch = rollout_phase(roles, world, PromptStream(world.items("train"), 0), scorer, tc, cfg.tdm, gen, split)
    scorer.close()
    advantage_phase(batch, tc, dist)
    mb = micro_batches(batch)[0]
    fake_score_backward(roles.fake, roles.reference, mb.cond, mb.traj, 0, cfg.tdm, gen, 1.0, mb.shard)
    surrogate_backward(roles, mb, 1, tc, cfg.tdm, gen, 1.0, dist)
    generator_backward(roles, mb, 0, tc, cfg.tdm, gen, 1.0)
    held = distributed.memory_bytes(roles)  # gradients exist until the step
    for engine in set(engines.values()):
        engine.step()
    after = distributed.memory_bytes(roles)  # AdamW moments exist from the first step
    return held | {k: after[k] for k in ("optim", "whole_optim")}, roles


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/toy_ocr_r1_tiny_ds.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from tdm_r1.checkpoint import read_model
    from tdm_r1.config import to_dict

    first = load_config(args.config, args.overrides)
    model_cfg = read_model(first.roles.teacher)[1]
    cfg = load_config(args.config, args.overrides, base={"model": to_dict(model_cfg)})
    torch.set_num_threads(max(1, cfg.threads))
    mem, _ = measure(cfg)
    dist = distributed.init(cfg.distributed, cfg.optim)
    gathered = torch.tensor([mem[k] for k in sorted(mem)], dtype=torch.float64)
    rows = [dict(zip(sorted(mem), t.long().tolist())) for t in dist.all_gather(gathered)]
    if dist.is_main:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        header = {
            "device": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "git": sha.strip(),
            "world_size": dist.world,
            "config": args.config,
            "overrides": args.overrides,
            "zero_stage": dist.zero_stage,
            "roles_mode": cfg.roles.mode,
            "model": to_dict(cfg.model),
        }
        print(json.dumps(header))
        cols = ("params", "grads", "optim", "total", "whole", "ratio")
        print(f"{'rank':>4} " + " ".join(f"{c:>12}" for c in cols))
        for r, m in enumerate(rows):
            total = m["params"] + m["grads"] + m["optim"]
            whole = m["whole_params"] + m["whole_grads"] + m["whole_optim"]
            values = (m["params"], m["grads"], m["optim"], total, whole)
            print(f"{r:>4} " + " ".join(f"{v:>12}" for v in values) + f" {total / whole:>12.3f}")
        out = ROOT / "benchmarks" / "results" / f"zero_memory_{dist.world}rank.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"header": header, "ranks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    distributed.run_script(main)
