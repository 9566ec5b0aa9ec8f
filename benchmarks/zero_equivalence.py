"""DeepSpeed engines vs the plain single-process trainer, per roles mode and ZeRO stage.

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 benchmarks/zero_equivalence.py full:3 lora:3 full:2:bf16 ...

Each MODE:STAGE[:bf16][:persist] runs `train.epochs` epochs of the same config twice in this process group: once with
the roles as DeepSpeed engines on all ranks, once as plain modules with torch AdamW (what `tdm-r1 train` does in one
process, run here on every rank alike), from the same seeds; it prints the largest difference of any role tensor
and the per-epoch generator loss and gradient norm of both. `persist` keeps every tensor gathered between uses
(stage3_param_persistence_threshold 1e5). Default config: configs/toy_ocr_r1_tiny_ds.yaml, whose teacher is used.
"""

from __future__ import annotations

import argparse

import torch

from tdm_r1 import distributed
from tdm_r1.config import load_config, to_dict
from tdm_r1.phases import advantage_phase, rollout_phase, update_phase
from tdm_r1.rewards.scorer import build_scorer
from tdm_r1.run import build_run


def run(cfg, dist: distributed.Dist, engines: bool) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Per-epoch metrics and the whole role tensors after cfg.train.epochs epochs."""
    on = dist if engines else distributed.LOCAL
    r = build_run(cfg, dist=on)
    roles, opts, world, tc, split = r.roles, r.opts, r.world, cfg.train, r.split
    stream, gen = r.progress.stream, r.progress.gen
    scorer = build_scorer(cfg)
    recs = []
    for epoch in range(1, tc.epochs + 1):
        batch = rollout_phase(roles, world, stream, scorer, tc, cfg.tdm, gen, split)
        advantage_phase(batch, tc, on)
        recs.append(update_phase(roles, opts, batch, tc, cfg.tdm, cfg, epoch, gen, on))
    scorer.close()
    return recs, {k: distributed.full_state([(k, p)])[k].float() for k, p in roles.state_params().items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="+", metavar="MODE:STAGE[:bf16][:persist]")
    p.add_argument("--config", default="configs/toy_ocr_r1_tiny_ds.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    from tdm_r1.checkpoint import read_model

    model = to_dict(read_model(load_config(args.config, args.overrides).roles.teacher)[1])
    for case in args.cases:
        mode, stage, *flags = case.split(":")
        sets = [f"roles.mode={mode}", f"distributed.zero_stage={stage}", f"distributed.bf16={'bf16' in flags}"]
        sets += ["distributed.param_persistence_threshold=100000"] if "persist" in flags else []
        cfg = load_config(args.config, [*args.overrides, *sets], base={"model": model})
        torch.set_num_threads(max(1, cfg.threads))
        dist = distributed.init(cfg.distributed, cfg.optim)
        (plain, a), (ds, b) = run(cfg, dist, engines=False), run(cfg, dist, engines=True)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        dist.print(
            f"{case} on {dist.world} rank(s): max |role tensor diff| {worst:.2e}; loss_gen "
            f"{[round(r['loss_gen'], 6) for r in plain]} vs {[round(r['loss_gen'], 6) for r in ds]}; "
            f"grad_norm_generator {[round(r['grad_norm_generator'], 6) for r in plain]} vs "
            f"{[round(r['grad_norm_generator'], 6) for r in ds]}"
        )


if __name__ == "__main__":
    distributed.run_script(main)
