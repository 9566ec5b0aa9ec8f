"""`tdm-r1 plan`: memory per GPU, FLOPs and time per epoch of a config on N GPUs, and what to change when it does not
fit (tdm_r1/plan.py has the formulas)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdm_r1.commands.common import add_config_args, config_from_teacher
from tdm_r1.plan import GPUS, plan, render

DESCRIPTION = (
    "Predict a TDM-R1 run's memory per GPU by component (role weights, gradients, optimizer states, gathered ZeRO-3 "
    "parameters, activations, VAE, CUDA context; text encoders at the encode phase), its transformer FLOPs per "
    "epoch by phase and its epoch time at an MFU, from exact parameter counts of the model built on the meta device. "
    "When it does not fit: the layouts that would (LoRA, ZeRO stage, offload, micro-batch, checkpointing, GPUs)."
)


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory, FLOPs and time per epoch of a config on N GPUs", description=DESCRIPTION)
    add_config_args(p, required=True)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the run (the world size)")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS), help="the card (memory and bf16 peak)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOP utilisation for the time (default: 0.3, stated)")
    p.add_argument(
        "--published", action="store_true", help="diffusers models: the published architecture, no folder needed"
    )
    p.add_argument("--json", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.mfu is not None and not 0 < args.mfu <= 1:
        raise SystemExit(f"tdm-r1 plan: error: --mfu must be in (0, 1], got {args.mfu}")
    cfg = config_from_teacher(args)
    result = plan(cfg, args.gpus, args.gpu, args.mfu, args.published)
    print(render(result), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["fits"] else 1
