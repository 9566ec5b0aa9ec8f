"""`tdm-r1 distill`: TDM (trajectory distribution matching), teacher -> K-step student.

Each step: roll the generator out from pure noise (deterministic K-step Euler, no CFG), draw M step
indices j, and for each j
  fake:      x0_hat, x_next from the rollout at x_{s_j}; tau in (s_{j+1}, 1]; x_tau = renoise(x_next);
             loss (x_tau - x0_hat)/tau vs v_fake(x_tau), + fake_reg * (v_real - v_fake)^2
  generator: v = v_gen(x_{s_j}) with grad; x_next re-noised to a fresh tau; revised-x0 KL + CFG losses
             against the teacher (cond / uncond) and the fake score at x_tau.
Gradients of the M indices accumulate; then one AdamW step per role and the generator EMA update.
The reward term is off: this is DESIGN section 5 with w_tdm applied to CFG and KL only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tdm_r1 import checkpoint as ckpt
from tdm_r1.build import file_sha256, load_generator_init, load_teacher
from tdm_r1.checkpoint.resume import Progress, capture_state, load_resume, resolve_resume, truncate_log
from tdm_r1.config import Config, TDMConfig, save_config, to_dict
from tdm_r1.losses import generator_targets, generator_term_weights, sample_tau, x0_from_velocity
from tdm_r1.models.base import Cond
from tdm_r1.optim import build_optimizers, optimizer_step, update_shadow
from tdm_r1.report import JsonlLogger
from tdm_r1.roles import Roles, build_roles
from tdm_r1.sampling import Trajectory, rollout
from tdm_r1.updates import fake_score_backward, fill_samples
from tdm_r1.worlds.stream import PromptStream
from tdm_r1_kernels import fused_revised_x0_loss, fused_sampler_step

# Config keys that may differ between a run and its resumption (they do not change the trajectory of
# the training state, only how long it runs and what is written).
RESUMABLE_CHANGES = (
    "run_dir",
    "threads",
    "distill.steps",
    "distill.eval_every",
    "distill.eval_at_end",
    "distill.checkpoint_every",
    "distill.keep_checkpoints",
    "eval.",
    "reward.",
    "distributed.",
)


def generator_backward(
    roles: Roles, cond: Cond, traj: Trajectory, j: int, tcfg: TDMConfig, gen: torch.Generator, scale: float
) -> dict[str, float]:
    """Revised-x0 KL + CFG losses of the generator at step j (reward term off), backward."""
    x = traj.xs[j]
    s, s_next = fill_samples(float(traj.s[j]), x), fill_samples(float(traj.s[j + 1]), x)
    v = roles.generator.velocity(x, s, cond)
    tau = sample_tau(s_next, tcfg.tau_margin, tcfg.shift, gen)
    # the rollout's sampler step, now with grad, re-noised to tau with fresh noise in the same pass
    step = fused_sampler_step(x, v, s, s_next, noise=torch.randn(x.shape, generator=gen), tau=tau)
    x0_hat, x_tau = step.x0_hat, step.x_tau.detach()
    with torch.no_grad():
        v_c, v_u = roles.reference.velocity_cfg(x_tau, tau, cond)
        v_f = roles.fake.velocity(x_tau, tau, cond)
    x0 = lambda vel: x0_from_velocity(x_tau, tau, vel)
    t = generator_targets(x0_hat, x0(v_c), x0(v_u), x0(v_f), tcfg.cfg)
    weights = generator_term_weights(j, tcfg.trunc_steps, tcfg.w_tdm, with_reward=False)
    per_sample, terms = fused_revised_x0_loss(
        x0_hat, t["target_kl"], t["target_cfg"], None, t["ref_real"], None, weights, eps=tcfg.normaliser_eps
    )
    loss = per_sample.mean()
    roles.generator.backward(loss * scale)
    return {"loss_gen": loss.item(), "gen_kl": float(terms[:, 0].mean()), "gen_cfg": float(terms[:, 1].mean())}


def draw_steps(k: int, m: int, gen: torch.Generator) -> list[int]:
    """M step indices uniform in 0..K-1 (with replacement), sorted."""
    return sorted(torch.randint(0, k, (m,), generator=gen).tolist())


def _rollout(roles: Roles, world, stream: PromptStream, n: int, tcfg: TDMConfig, gen: torch.Generator):
    words = stream.next(n)
    cond = roles.generator.encode_prompts([world.prompt(w) for w in words])
    c = world.cfg
    noise = torch.randn((n, *roles.generator.latent_shape(c.height, c.width)), generator=gen)
    return cond, rollout(roles.generator, cond, noise, steps=tcfg.steps, shift=tcfg.shift)


def distill_step(
    roles: Roles, opts: dict, world, stream: PromptStream, cfg: Config, gen: torch.Generator
) -> dict[str, float]:
    """One generator optimizer step (preceded by distill.fake_updates - 1 fake-only steps)."""
    tcfg, dcfg, ocfg = cfg.tdm, cfg.distill, cfg.optim
    fake_params = roles.trainable()["fake"]
    rec: dict[str, float] = {}
    for _ in range(dcfg.fake_updates - 1):
        cond, traj = _rollout(roles, world, stream, dcfg.batch_size, tcfg, gen)
        for j in draw_steps(tcfg.steps, tcfg.steps_per_batch, gen):
            fake_score_backward(roles.fake, roles.reference, cond, traj, j, tcfg, gen, 1.0 / tcfg.steps_per_batch)
        optimizer_step(opts["fake"], fake_params, ocfg.grad_clip)
    cond, traj = _rollout(roles, world, stream, dcfg.batch_size, tcfg, gen)
    js = draw_steps(tcfg.steps, tcfg.steps_per_batch, gen)
    sums: dict[str, float] = {}
    for j in js:
        scale = 1.0 / len(js)
        parts = fake_score_backward(roles.fake, roles.reference, cond, traj, j, tcfg, gen, scale)
        parts |= generator_backward(roles, cond, traj, j, tcfg, gen, scale)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * scale
    rec |= sums
    rec["grad_norm_fake"] = optimizer_step(opts["fake"], fake_params, ocfg.grad_clip)
    rec["grad_norm_generator"] = optimizer_step(opts["generator"], roles.trainable()["generator"], ocfg.grad_clip)
    update_shadow(roles, "generator_ema", ocfg.generator_ema_decay)
    rec["j_mean"] = float(np.mean(js))
    rec["sample_std"] = float(traj.sample.std())
    return rec


# -- run: setup, checkpoints, eval, export ------------------------------------------------------------


def save_checkpoint(cfg: Config, progress: Progress, roles: Roles, opts: dict, teacher_sha: str) -> Path:
    path = ckpt.state_path(cfg.run_dir, progress.step)
    info = {"command": "distill", "config": to_dict(cfg), "teacher_sha256": teacher_sha, "step": progress.step}
    ckpt.save_train_state(path, capture_state(progress, roles, opts), info)
    ckpt.prune_train_states(cfg.run_dir, cfg.distill.keep_checkpoints)
    return path


def evaluate_generator(roles: Roles, world, cfg: Config, state: dict) -> dict:
    """Held-out OCR of the EMA generator at K steps, no CFG (the reward is built once, lazily)."""
    from tdm_r1.evaluate import build_eval_reward, eval_words, evaluate

    if "reward" not in state:
        state["reward"] = build_eval_reward(cfg.reward, world)
    words = eval_words(world, "heldout", cfg.eval.n_train, cfg.eval.seed)
    result, images = evaluate(
        roles.generator_ema, world, state["reward"], words, cfg.tdm.steps, 1.0, cfg.tdm.shift, cfg.eval
    )
    state["images"] = images
    return result


def export_student(cfg: Config, roles: Roles, step: int, minutes: float) -> Path:
    run = Path(cfg.run_dir)
    info = {"kind": "student", "step": step, "nfe": cfg.tdm.steps, "shift": cfg.tdm.shift, "minutes": minutes}
    info |= {"teacher": cfg.roles.teacher, "roles_mode": cfg.roles.mode}
    out = run / "student.safetensors"
    ckpt.save_model(out, roles.export("generator_ema"), cfg.model, cfg.world, **info)
    fake_info = info | {"kind": "student_fake"}  # the fake score, for TDM-R1's roles.fake_init
    if cfg.roles.mode == "lora":
        ckpt.save_adapter(run / "student_adapter.safetensors", roles.adapter_tensors("generator_ema"), cfg, **info)
        ckpt.save_adapter(run / "student_fake_adapter.safetensors", roles.adapter_tensors("fake"), cfg, **fake_info)
    else:
        ckpt.save_model(run / "student_fake.safetensors", roles.export("fake"), cfg.model, cfg.world, **fake_info)
    return out


def distill(cfg: Config, resume: str | None = None) -> dict:
    """Run TDM distillation; returns the summary written to <run_dir>/summary.json."""
    from tdm_r1.worlds.ocr import build_world

    dcfg, run = cfg.distill, Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    world = build_world(cfg.world)
    teacher = load_teacher(cfg)
    teacher_sha = file_sha256(cfg.roles.teacher)
    roles = build_roles(cfg.roles, teacher, surrogate=False, generator_init=load_generator_init(cfg))
    opts = build_optimizers(roles, cfg.optim)
    progress = Progress(0, PromptStream(world.words("train"), cfg.seed), torch.Generator().manual_seed(cfg.seed))
    if resume is not None:
        path = resolve_resume(resume, run)
        load_resume(path, cfg, progress, roles, opts, teacher_sha, command="distill", resumable=RESUMABLE_CHANGES)
        truncate_log(run / "metrics.jsonl", progress.step)
        print(f"distill: resumed from {path} at step {progress.step}")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    log = JsonlLogger(run / "metrics.jsonl")
    n_train = {k: sum(p.numel() for p in v) for k, v in roles.trainable().items()}
    print(
        f"distill: {cfg.roles.mode} roles, trainable {n_train}, {dcfg.steps} steps at batch {dcfg.batch_size} -> {run}"
    )
    eval_state: dict = {}
    t_start = time.time()
    bar = tqdm(range(progress.step + 1, dcfg.steps + 1), desc="distill", dynamic_ncols=True)
    for step in bar:
        t0 = time.time()
        rec = distill_step(roles, opts, world, progress.stream, cfg, progress.gen)
        progress.step = step
        rec |= {"step": step, "seconds_step": round(time.time() - t0, 3)}
        if dcfg.eval_every > 0 and step % dcfg.eval_every == 0 and step != dcfg.steps:
            ev = evaluate_generator(roles, world, cfg, eval_state)
            rec |= {"eval_ocr_mean": ev["ocr_mean"], "eval_ocr_exact": ev["ocr_exact"]}
        if step % dcfg.log_every == 0 or step == dcfg.steps or "eval_ocr_mean" in rec:
            log.log(rec)
        bar.set_postfix(gen=f"{rec['loss_gen']:.3f}", fake=f"{rec['loss_fake']:.3f}")
        if (dcfg.checkpoint_every > 0 and step % dcfg.checkpoint_every == 0) or step == dcfg.steps:
            save_checkpoint(cfg, progress, roles, opts, teacher_sha)
    log.close()
    minutes = round((time.time() - t_start) / 60, 2)
    student = export_student(cfg, roles, progress.step, minutes)
    summary = {"student": str(student), "steps": progress.step, "minutes": minutes}
    if dcfg.eval_at_end:
        from tdm_r1.report import save_grid

        ev = evaluate_generator(roles, world, cfg, eval_state)
        (run / "eval_student.json").write_text(json.dumps(ev, indent=2) + "\n")
        save_grid(eval_state["images"][:64], run / "eval_student.png", cols=8)
        summary["student_heldout"] = ev
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"distill: wrote {student} after {minutes:.1f} min; summary {json.dumps(summary)}")
    return summary
