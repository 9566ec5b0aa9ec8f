"""`tdm-r1 export`: one role of a training state as a model checkpoint or a diffusers pipeline folder."""

from __future__ import annotations

import argparse

from tdm_r1.checkpoint.export import ROLES, export_checkpoint

DESCRIPTION = (
    "Consolidate a role of a training-state checkpoint into a model checkpoint loadable by `tdm-r1 eval`: the ranks' "
    "ZeRO-3 partitions of a distributed state are stitched together (no launcher needed); in lora mode the role's "
    "adapter is merged into the teacher. For a diffusers model (model.kind sd3 / zimage) the output is a diffusers "
    "pipeline folder that DiffusionPipeline.from_pretrained loads; its tdm_r1_export.json holds the pipeline call of "
    "the few-step sampler."
)


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="one role of a training state (single-process or distributed) as a model checkpoint or diffusers folder",
        description=DESCRIPTION,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="state_*.safetensors, a distributed state_*.shards directory, or a run directory (its newest state)",
    )
    p.add_argument("--role", choices=ROLES, default="generator_ema", help="default: the EMA generator")
    p.add_argument(
        "--out", required=True, help="output model checkpoint (.safetensors), or folder for a diffusers model"
    )
    p.add_argument(
        "--lora",
        choices=["merge", "adapter"],
        default="merge",
        help="diffusers models in lora mode: merge the adapter into the transformer (default), or keep it as "
        "pytorch_lora_weights.safetensors for pipe.load_lora_weights",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.role, args.out, lora=args.lora, overwrite=args.overwrite)
    print(f"export: wrote {args.role} of {args.checkpoint} to {out}")
    return 0
