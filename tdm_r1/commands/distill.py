"""`tdm-r1 distill`: TDM (trajectory distribution matching), teacher -> K-step student.

Each step (`tdm_r1.phases.distill_step`): roll the generator out from pure noise (deterministic K-step Euler, no CFG),
draw M step indices j, and for each j
  fake:      x0_hat, x_next from the rollout at x_{s_j}; tau in (s_{j+1}, 1]; x_tau = renoise(x_next);
             loss (x_tau - x0_hat)/tau vs v_fake(x_tau), + fake_reg * (v_real - v_fake)^2
  generator: v = v_gen(x_{s_j}) with grad; x_next re-noised to a fresh tau; revised-x0 KL + CFG losses
             against the teacher (cond / uncond) and the fake score at x_tau.
Gradients of the M indices accumulate; then one AdamW step per role and the generator EMA update.
The reward term is off: this is DESIGN section 5 with w_tdm applied to CFG and KL only.
"""

from __future__ import annotations

import argparse
import json
import time

from tdm_r1.checkpoint.export import export_student
from tdm_r1.checkpoint.resume import resume_from, resume_run_state, save_run_state, truncate_log
from tdm_r1.commands.common import add_config_args, add_resume_arg, config_from_teacher, setup_threads
from tdm_r1.config import Config, ConfigError, save_config
from tdm_r1.evaluate import eval_items, evaluate_role
from tdm_r1.phases import distill_step
from tdm_r1.report import JsonlLogger, save_grid
from tdm_r1.run import Run, RunStopped, StopRequests, build_run, open_run_dir, run_dir_lock, trainable_counts

DESCRIPTION = (
    "Trajectory distribution matching (teacher -> K-step student). Writes config.yaml, metrics.jsonl, "
    "training-state checkpoints, student.safetensors (EMA generator, loadable by `tdm-r1 eval`), eval_student.json "
    "and summary.json into run_dir."
)


def register(sub) -> None:
    p = sub.add_parser("distill", help="TDM: distil the teacher into a few-step student", description=DESCRIPTION)
    add_config_args(p, required=True)
    add_resume_arg(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_teacher(args)
    if cfg.diffusers.random_init:
        raise ConfigError("diffusers.random_init builds untrained weights for `tdm-r1 bench`; distill needs real ones")
    setup_threads(cfg)
    distill(cfg, resume=args.resume)
    return 0


def evaluate_student(run: Run, state: dict) -> dict:
    """Held-out score of the EMA generator at K steps, no CFG: OCR on the toy OCR world, the run's rewards on any other
    world and on diffusers models (the reward is built once, into `state`; the first seed's images in
    state["images"]). Distributed: every rank samples, rank 0 scores."""
    cfg = run.cfg
    items = eval_items(run.world, "heldout", cfg.eval)
    result, state["images"] = evaluate_role(
        run.roles.generator_ema, run.world, cfg, items, cfg.tdm.steps, 1.0, state, run.dist
    )
    return result


def distill(cfg: Config, resume: str | None = None) -> dict:
    """Run TDM distillation; returns the summary written to <run_dir>/summary.json. Under `deepspeed` / `torchrun`
    every rank runs this with its rows of each step's batch; rank 0 writes the run directory."""
    run = build_run(cfg, "distill")  # every value range-checked, the teacher loaded, before any file is touched
    with run_dir_lock(run.path, holder=run.dist.is_main), run.kernels(), StopRequests() as stop:
        return distill_run(run, resume, stop)


def distill_run(run: Run, resume: str | None, stop: StopRequests) -> dict:
    """The run's steps, from its state (or `resume`) to distill.steps; then the student is exported and evaluated."""
    from tqdm import tqdm

    cfg, dcfg, progress, dist = run.cfg, run.cfg.distill, run.progress, run.dist
    moved = open_run_dir(run.path, fresh=resume is None, command="distill") if dist.is_main else None
    if moved is not None:
        print(f"distill: {run.path} held an earlier run; its files were moved to {moved}")
    if resume is not None:

        def load(path):
            resume_run_state(path, cfg, progress, run.roles, run.opts, run.teacher_sha, "distill", dist)

        path = resume_from(resume, run.path, load, dist)
        if dist.is_main:
            truncate_log(run.path / "metrics.jsonl", progress.step)
        dist.print(f"distill: resumed from {path} at step {progress.step}")
    log = None
    if dist.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.path / "config.yaml")
        log = JsonlLogger(run.path / "metrics.jsonl")
    dist.print(
        f"distill: {cfg.roles.mode} roles, trainable {trainable_counts(run.roles)}, {dcfg.steps} steps at batch "
        f"{dcfg.batch_size} on {dist.world} rank(s) -> {run.path}"
    )
    eval_state: dict = {}
    t_start = time.time()
    bar = tqdm(range(progress.step + 1, dcfg.steps + 1), desc="distill", dynamic_ncols=True, disable=not dist.is_main)
    for step in bar:
        t0 = time.time()
        rec = distill_step(run.roles, run.opts, run.world, progress.stream, cfg, progress.gen, run.split, dist)
        progress.step = step
        rec |= {"step": step, "seconds_step": round(time.time() - t0, 3)}
        evaluated = dcfg.eval_every > 0 and step % dcfg.eval_every == 0 and step != dcfg.steps
        if evaluated:
            ev = evaluate_student(run, eval_state)
            rec |= {f"eval_{k}": ev[k] for k in ev if k.endswith(("_mean", "_exact"))}
        if log is not None and (step % dcfg.log_every == 0 or step == dcfg.steps or evaluated):
            log.log(rec)
        bar.set_postfix(gen=f"{rec['loss_gen']:.3f}", fake=f"{rec['loss_fake']:.3f}")
        stopping = stop.requested(dist)
        if (dcfg.checkpoint_every > 0 and step % dcfg.checkpoint_every == 0) or step == dcfg.steps or stopping:
            path = save_run_state(cfg, progress, run.roles, run.opts, run.teacher_sha, "distill", dist)
        if stopping and step < dcfg.steps:
            raise RunStopped(
                f"distill: stopped by {stop.signal or 'a signal'} after step {step}; state {path}; continue with the "
                "same command and --resume"
            )
    if log is not None:
        log.close()
    minutes = round((time.time() - t_start) / 60, 2)
    student = export_student(cfg, run.roles, progress.step, minutes, dist)
    summary = {"student": str(student), "steps": progress.step, "minutes": minutes}
    if dcfg.eval_at_end:
        ev = evaluate_student(run, eval_state)
        summary["student_heldout"] = ev
        if dist.is_main:
            (run.path / "eval_student.json").write_text(json.dumps(ev, indent=2) + "\n")
            save_grid(eval_state["images"][:64], run.path / "eval_student.png", cols=8)
    if dist.is_main:
        (run.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.print(f"distill: wrote {student} after {minutes:.1f} min; summary {json.dumps(summary)}")
    return summary
