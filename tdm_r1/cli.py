"""`tdm-r1 <command>`: pretrain, distill, train, export, report, sample, eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import torch

from tdm_r1 import distributed
from tdm_r1.checkpoint import CheckpointError
from tdm_r1.config import Config, ConfigError, load_config
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.worlds.ocr import PromptFileError


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by dotted key, e.g. --set pretrain.steps=100 (repeatable)",
    )


def _add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CHECKPOINT",
        help="continue from a training-state checkpoint (default: the newest one under run_dir/checkpoints)",
    )


def _setup_threads(cfg: Config) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tdm_r1.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    _setup_threads(cfg)
    pretrain(cfg)
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from tdm_r1.distill import distill

    if distributed.launched_world_size() > 1:
        raise ConfigError("distill runs in one process; `deepspeed` / `torchrun` launches are for `train`")
    cfg = _config_from_teacher(args)
    if cfg.model.kind != "tiny_dit":
        raise ConfigError(
            f"distill runs on the toy model only (model.kind tiny_dit), not {cfg.model.kind}; `train` takes diffusers "
            "models, starting the generator from the folder itself or from roles.generator_init"
        )
    _setup_threads(cfg)
    distill(cfg, resume=args.resume)
    return 0


def _config_from_teacher(args: argparse.Namespace) -> Config:
    """The teacher checkpoint's model and world are the defaults; the YAML and --set override them. A diffusers model
    (model.kind sd3 / zimage) has no teacher checkpoint: its config is the YAML and --set alone."""
    from tdm_r1.build import is_diffusers
    from tdm_r1.checkpoint import read_model
    from tdm_r1.config import to_dict

    first = load_config(args.config, args.overrides)
    if is_diffusers(first):
        return first
    _, model_cfg, world_cfg, _ = read_model(first.roles.teacher)
    return load_config(args.config, args.overrides, base={"model": to_dict(model_cfg), "world": to_dict(world_cfg)})


def cmd_train(args: argparse.Namespace) -> int:
    from tdm_r1.trainer import train

    cfg = _config_from_teacher(args)
    _setup_threads(cfg)
    train(cfg, resume=args.resume)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tdm_r1.consolidate import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.role, args.out, lora=args.lora)
    print(f"export: wrote {args.role} of {args.checkpoint} to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tdm_r1.report import write_report

    ablations = {}
    for item in args.ablation:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--ablation expects NAME=RUN_DIR, got {item!r}")
        ablations[name] = path
    out = write_report(args.run, ablations)
    print(f"report: wrote {out}")
    return 0


def _eval_setup(args: argparse.Namespace):
    """Model from the checkpoint; config = checkpoint's world, then --config, then --set."""
    from tdm_r1.checkpoint import load_model
    from tdm_r1.config import to_dict
    from tdm_r1.worlds.ocr import build_world

    model, world_cfg, info = load_model(args.checkpoint)
    cfg = load_config(args.config, args.overrides, base={"world": to_dict(world_cfg)})
    _setup_threads(cfg)
    return model, build_world(cfg.world), cfg, info


def _read_prompt_words(path: str, world) -> list[str]:
    from tdm_r1.worlds.ocr import read_words

    return read_words(path, world.cfg.alphabet, world.cfg.max_word_len)


def cmd_eval(args: argparse.Namespace) -> int:
    from tdm_r1.evaluate import build_eval_reward, eval_words, evaluate, evaluate_seeds
    from tdm_r1.report import save_grid

    if args.seeds < 1:
        raise ConfigError(f"eval: --seeds must be >= 1, got {args.seeds}")
    model, world, cfg, info = _eval_setup(args)
    words = (
        _read_prompt_words(args.prompts, world)
        if args.prompts
        else eval_words(world, args.split, cfg.eval.n_train, cfg.eval.seed)
    )
    nfe = args.nfe if args.nfe is not None else cfg.sample.nfe
    guidance = args.cfg if args.cfg is not None else cfg.sample.cfg
    shift = args.shift if args.shift is not None else cfg.sample.shift
    reward = build_eval_reward(cfg.reward, world)
    result, images = evaluate_seeds(
        lambda ecfg: evaluate(model, world, reward, words, nfe, guidance, shift, ecfg, args.solver),
        cfg.eval,
        args.seeds,
    )
    result.update(
        {
            "checkpoint": str(args.checkpoint),
            "split": args.split if not args.prompts else args.prompts,
            "seed": cfg.eval.seed,
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    grid = out.with_suffix(".png")
    n = cfg.eval.grid_rows * cfg.eval.grid_cols
    save_grid(images[:n], grid, cols=cfg.eval.grid_cols)
    print(json.dumps(result))
    print(f"eval: wrote {out} and {grid}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from tdm_r1.evaluate import generate
    from tdm_r1.report import save_grid

    model, world, cfg, _ = _eval_setup(args)
    words = list(args.words) + (_read_prompt_words(args.prompts, world) if args.prompts else [])
    if not words:
        raise ConfigError("sample: give words as arguments or --prompts FILE")
    for lineno, w in enumerate(words, 1):
        bad = sorted({c for c in w if c not in world.cfg.alphabet})
        if bad or not w or len(w) > world.cfg.max_word_len:
            raise PromptFileError(
                f"word {lineno} {w!r}: must be 1..{world.cfg.max_word_len} characters of {world.cfg.alphabet}"
            )
    nfe = args.nfe if args.nfe is not None else cfg.sample.nfe
    guidance = args.cfg if args.cfg is not None else cfg.sample.cfg
    shift = args.shift if args.shift is not None else cfg.sample.shift
    images = generate(model, world, words, nfe, guidance, shift, args.seed, cfg.eval.batch_size, args.solver)
    save_grid(images, args.out, cols=min(len(words), args.cols), scale=4)
    print(f"sample: wrote {len(words)} images to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tdm-r1", description="Few-step flow models trained with TDM / TDM-R1.")
    # the `deepspeed` launcher passes --local_rank=N before the command; the rank is read from LOCAL_RANK instead
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pretrain",
        help="train the toy teacher with rectified flow",
        description="Rectified-flow training of the toy teacher. Writes config.yaml, metrics.jsonl, "
        "intermediate EMA checkpoints and teacher.safetensors into run_dir.",
    )
    _add_config_args(p, required=True)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "distill",
        help="TDM: distil the teacher into a few-step student",
        description="Trajectory distribution matching (teacher -> K-step student). Writes config.yaml, "
        "metrics.jsonl, training-state checkpoints, student.safetensors (EMA generator, loadable by "
        "`tdm-r1 eval`), eval_student.json and summary.json into run_dir.",
    )
    _add_config_args(p, required=True)
    _add_resume_arg(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser(
        "train",
        help="TDM-R1: improve a few-step generator with a non-differentiable reward",
        description="The TDM-R1 epoch: grouped rollouts, rewards, group advantages, then fake score, surrogate "
        "reward (group preference) and generator updates. Writes config.yaml, metrics.jsonl, tensorboard/, "
        "training-state checkpoints, generator.safetensors (EMA generator, loadable by `tdm-r1 eval`; for a "
        "diffusers model pipeline/, a diffusers folder), summary.json, report.md, reward_curve.png and same-seed "
        "sample grids into run_dir.",
    )
    _add_config_args(p, required=True)
    _add_resume_arg(p)
    p.set_defaults(func=cmd_train)

    from tdm_r1.consolidate import ROLES

    p = sub.add_parser(
        "export",
        help="one role of a training state (single-process or distributed) as a model checkpoint or diffusers folder",
        description="Consolidate a role of a training-state checkpoint into a model checkpoint loadable by "
        "`tdm-r1 eval`: the ranks' ZeRO-3 partitions of a distributed state are stitched together (no launcher "
        "needed); in lora mode the role's adapter is merged into the teacher. For a diffusers model (model.kind sd3 / "
        "zimage) the output is a diffusers pipeline folder that DiffusionPipeline.from_pretrained loads; its "
        "tdm_r1_export.json holds the pipeline call of the few-step sampler.",
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
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "report",
        help="rewrite a train run's report.md, adding ablation runs as rows",
        description="Reads RUN/summary.json and RUN/metrics.jsonl (and each ablation's summary.json) and "
        "writes RUN/report.md and RUN/reward_curve.png.",
    )
    p.add_argument("--run", required=True, help="run directory of the main `tdm-r1 train` run")
    p.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="NAME=RUN_DIR",
        help="another train run to list as an ablation row (repeatable)",
    )
    p.set_defaults(func=cmd_report)

    def add_sampling_args(p):
        p.add_argument("--checkpoint", required=True, help="model checkpoint (.safetensors)")
        _add_config_args(p, required=False)
        p.add_argument("--nfe", type=int, default=None, help="sampler steps (default: sample.nfe)")
        p.add_argument("--cfg", type=float, default=None, help="CFG scale; 1 disables CFG (default: sample.cfg)")
        p.add_argument("--shift", type=float, default=None, help="timestep shift k (default: sample.shift)")
        p.add_argument("--solver", choices=["euler", "dpmpp2m"], default="euler")

    p = sub.add_parser(
        "eval",
        help="OCR-score a checkpoint on a word split or file",
        description="Sample one image per word, OCR it, and write {ocr_mean, ocr_exact, n, ...} "
        "as JSON plus a sample grid PNG next to it.",
    )
    add_sampling_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--split", choices=["train", "heldout"], default="heldout")
    group.add_argument("--prompts", help="file with one word per line (UTF-8, the world's alphabet)")
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="evaluate at eval.seed, eval.seed + 1, ...: pooled mean, each seed's mean and their standard error",
    )
    p.add_argument("--out", required=True, help="output JSON path; the grid goes to the same path with .png")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="render words with a checkpoint into a PNG grid")
    add_sampling_args(p)
    p.add_argument("words", nargs="*", help="words to render, e.g. HELLO CAT")
    p.add_argument("--prompts", help="file with one word per line")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A process of a distributed launch ends here (distributed.finish: os._exit)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except (ConfigError, CheckpointError, PromptFileError, RewardFailureError, FileNotFoundError, FileExistsError) as e:
        print(f"tdm-r1 {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        if not distributed.launched():
            raise
        traceback.print_exc()
        code = 1
    return distributed.finish(code)


if __name__ == "__main__":
    sys.exit(main())
