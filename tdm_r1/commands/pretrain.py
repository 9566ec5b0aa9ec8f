"""`tdm-r1 pretrain`: rectified-flow training of the teacher on the toy world.

Loss: mean (v(x_s, s, prompt) - (eps - x0))^2 with s ~ sigmoid(N(0, std)) (logit-normal, as SD3) and
prompt dropout to the empty prompt so CFG works. The EMA weights are what gets saved.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tdm_r1 import checkpoint as ckpt
from tdm_r1.checkpoint import read_model, save_model
from tdm_r1.checkpoint.resume import RESUMABLE_CHANGES, check_resume_info, resume_from, truncate_log
from tdm_r1.commands.common import add_config_args, add_resume_arg, setup_threads
from tdm_r1.config import Config, ConfigError, load_config, save_config, to_dict
from tdm_r1.config.validate import validate
from tdm_r1.models.tiny_dit import build_tiny_dit
from tdm_r1.report import JsonlLogger
from tdm_r1.run import check_prompt_lengths, open_run_dir, run_dir_lock
from tdm_r1.worlds import build_world


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="train the toy teacher with rectified flow",
        description="Rectified-flow training of the toy teacher. Writes config.yaml, metrics.jsonl, "
        "intermediate EMA checkpoints, training states (every pretrain.save_every steps; --resume continues one "
        "exactly) and teacher.safetensors into run_dir.",
    )
    add_config_args(p, required=True)
    add_resume_arg(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    setup_threads(cfg)
    pretrain(cfg, resume=args.resume)
    return 0


def flow_matching_loss(model, x0: torch.Tensor, prompts: list[str], s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (x0.dim() - 1)
    xs = (1.0 - s.view(shape)) * x0 + s.view(shape) * eps
    v = model.velocity(xs, s, model.encode_prompts(prompts))
    return (v.float() - (eps - x0)).square().mean()


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def init_weights(path: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The weights of the teacher checkpoint `pretrain.init`, checked against `model:`."""
    from dataclasses import asdict

    state, model_cfg, _, _ = read_model(path)
    if asdict(model_cfg) != asdict(cfg.model):
        diff = {k: (v, getattr(cfg.model, k)) for k, v in asdict(model_cfg).items() if getattr(cfg.model, k) != v}
        raise ConfigError(f"pretrain.init={path!r}: its model differs from model: (checkpoint, config) {diff}")
    return state


def pretrain(cfg: Config, resume: str | None = None) -> Path:
    """Train the teacher; returns <run_dir>/teacher.safetensors (a fresh run archives an earlier one in run_dir first;
    `resume` continues from a training state exactly)."""
    validate(cfg, "pretrain")
    world = build_world(cfg.world)  # the word lists read and checked before any file is touched
    check_prompt_lengths(cfg, world)
    init = init_weights(cfg.pretrain.init, cfg) if cfg.pretrain.init is not None else None
    with run_dir_lock(cfg.run_dir):
        if (moved := open_run_dir(cfg.run_dir, fresh=resume is None, command="pretrain")) is not None:
            print(f"pretrain: {cfg.run_dir} held an earlier run; its files were moved to {moved}")
        return pretrain_run(cfg, world, init, resume)


class Teacher:
    """What a pretrain run's training state holds: the model, its EMA, the optimizer, the data and noise streams."""

    def __init__(self, cfg: Config, init: dict | None):
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.model = build_tiny_dit(cfg.model, cfg.world).train()
        if init is not None:
            self.model.load_state_dict(init)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        pc = cfg.pretrain
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=pc.lr, betas=(0.9, 0.99), weight_decay=pc.weight_decay)
        self.step = 0

    def save_state(self, cfg: Config) -> Path:
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optim": self.opt.state_dict(),
            "rng": ckpt.rng_state({}, {"data": self.rng}),
        }
        path = ckpt.state_path(cfg.run_dir, self.step)
        info = {"command": "pretrain", "config": to_dict(cfg), "teacher_sha256": "", "step": self.step}
        ckpt.save_train_state(path, state, info)
        ckpt.prune_train_states(cfg.run_dir, 2)
        return path

    def load_state(self, path: Path, cfg: Config) -> None:
        state, info = ckpt.read_train_state(path)
        check_resume_info(path, info, cfg, "", "pretrain", RESUMABLE_CHANGES["pretrain"])
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optim"])
        ckpt.set_rng_state(state["rng"], {}, {"data": self.rng})
        self.step = int(state["step"])


def pretrain_lr(pc, step: int) -> float:
    """The learning rate of step `step` (1-based): linear warmup to `lr`, then `lr` or, with `final_lr`, a half cosine
    from `lr` down to `final_lr` at step `steps`."""
    if step <= pc.warmup_steps:
        return pc.lr * step / max(1, pc.warmup_steps)
    if pc.final_lr is None:
        return pc.lr
    done = (step - pc.warmup_steps) / max(1, pc.steps - pc.warmup_steps)
    return pc.final_lr + (pc.lr - pc.final_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def pretrain_run(cfg: Config, world, init: dict | None, resume: str | None = None) -> Path:
    pc = cfg.pretrain
    run = Path(cfg.run_dir)
    t = Teacher(cfg, init)
    if resume is not None:
        path = resume_from(resume, run, lambda p: t.load_state(p, cfg))
        truncate_log(run / "metrics.jsonl", t.step)
        print(f"pretrain: resumed from {path} at step {t.step}")
    save_config(cfg, run / "config.yaml")
    model, ema, opt, rng = t.model, t.ema, t.opt, t.rng
    log = JsonlLogger(run / "metrics.jsonl")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain: {n_params / 1e6:.2f}M parameters, {pc.steps} steps at batch {pc.batch_size} -> {run}")
    bar = tqdm(range(t.step + 1, pc.steps + 1), desc="pretrain", dynamic_ncols=True)
    t_start = time.time()
    for step in bar:
        images, prompts = world.sample(pc.batch_size, rng)
        drop = rng.random(pc.batch_size) < pc.cond_drop_prob
        prompts = ["" if d else p for p, d in zip(prompts, drop)]
        x0 = images * 2.0 - 1.0
        s = torch.sigmoid(torch.randn(pc.batch_size) * pc.logit_normal_std)
        loss = flow_matching_loss(model, x0, prompts, s, torch.randn_like(x0))
        for g in opt.param_groups:
            g["lr"] = pretrain_lr(pc, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), pc.grad_clip))
        opt.step()
        ema_update(ema, model, pc.ema_decay)
        if step % pc.log_every == 0 or step == pc.steps:
            rec = {
                "step": step,
                "loss": loss.item(),
                "grad_norm": grad_norm,
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.time() - t_start, 1),
            }
            log.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
        t.step = step
        if pc.save_every > 0 and step % pc.save_every == 0 and step != pc.steps:
            t.save_state(cfg)
            save_model(
                run / "checkpoints" / f"step_{step:06d}.safetensors",
                ema.state_dict(),
                cfg.model,
                cfg.world,
                step=step,
                kind="teacher",
                seed=cfg.seed,
            )
    final = run / "teacher.safetensors"
    save_model(
        final,
        ema.state_dict(),
        cfg.model,
        cfg.world,
        step=pc.steps,
        kind="teacher",
        seed=cfg.seed,
        minutes=round((time.time() - t_start) / 60, 2),
    )
    log.close()
    print(f"pretrain: saved {final} after {(time.time() - t_start) / 60:.1f} min")
    return final
