"""`tdm-r1 train`: the TDM-R1 epoch (DESIGN section 5), top to bottom.

rollout (grouped, deterministic K-step) -> rewards (non-differentiable, off the training thread) ->
group advantages -> per stored micro-batch and M drawn step indices: fake score -> surrogate reward
(group preference loss with PPO and reference gates) -> generator (KL + CFG-as-reward + learned reward)
-> one optimizer step per role per epoch -> generator EMA, slow surrogate -> log / eval / checkpoint.

The surrogate is a denoiser whose likelihood ratio to the reference is the learned reward: no reward
head, no reward gradient. No denoising loss ever touches the generator (except in the `direct_rl`
ablation, which exists to show why).
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from tdm_r1.advantages import group_advantages
from tdm_r1.config import Config, TDMConfig, TrainConfig
from tdm_r1.distill import PromptStream, fake_score_backward
from tdm_r1.losses import (
    generator_targets,
    generator_term_weights,
    group_preference,
    renoise,
    revised_x0_loss,
    sample_tau,
    surrogate_loss,
    velocity_target_mse,
    x0_from_velocity,
)
from tdm_r1.models.base import Cond
from tdm_r1.rewards.base import RewardFailureError, score_images
from tdm_r1.roles import Roles
from tdm_r1.sampling import Trajectory, euler_step, rollout

# Config keys that may change between a run and its resumption (how long it runs and what it writes).
RESUMABLE_CHANGES = (
    "run_dir",
    "threads",
    "train.epochs",
    "train.eval_every",
    "train.eval_baselines",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.tensorboard",
    "train.max_reward_failure",
    "eval.",
    "reward.threads",
)


@dataclass
class Batch:
    """One epoch's rollouts: P prompts x G samples, whole trajectories, rewards and advantages."""

    words: list[str]
    prompts: list[str]
    cond: Cond
    traj: Trajectory
    group_ids: Tensor  # [N] prompt group of each sample
    rewards: Tensor  # [N], NaN = the scorer failed
    adv: Tensor  # [N]

    def select(self, idx: Tensor) -> Batch:
        t = Trajectory(self.traj.xs[:, idx], self.traj.s, self.traj.v[:, idx])
        gid = self.group_ids[idx]
        return Batch(
            [self.words[i] for i in idx.tolist()],
            [self.prompts[i] for i in idx.tolist()],
            self.cond[idx],
            t,
            gid - gid.min(),
            self.rewards[idx],
            self.adv[idx],
        )


def _full(value: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), float(value), device=like.device)


def group_noise(group_ids: Tensor, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Noise shared within each prompt group: [N, *shape] with rows of one group equal."""
    n_groups = int(group_ids.max()) + 1
    return torch.randn((n_groups, *shape), generator=gen)[group_ids]


# -- 1. rollout + 2. rewards ----------------------------------------------------------------------------


class RewardScorer:
    """Weighted sum of rewards, computed on a worker thread so OCR of one chunk overlaps sampling the next."""

    def __init__(self, rewards: list[tuple[object, float]]):
        self.rewards = rewards
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    def _score(self, images: Tensor, prompts: list[str]) -> Tensor:
        total = torch.zeros(images.shape[0])
        for reward, weight in self.rewards:
            total += weight * score_images(reward, images, prompts)
        return total

    def submit(self, images: Tensor, prompts: list[str]) -> Future:
        return self.pool.submit(self._score, images.detach().cpu(), list(prompts))

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def rollout_phase(
    roles: Roles,
    world,
    stream: PromptStream,
    scorer: RewardScorer,
    tc: TrainConfig,
    tdm: TDMConfig,
    gen: torch.Generator,
) -> Batch:
    """P prompts x G samples through the generator's K-step sampler; rewards scored chunk by chunk."""
    words = stream.next(tc.prompts_per_epoch)
    words_rep = [w for w in words for _ in range(tc.group_size)]
    prompts = [world.prompt(w) for w in words_rep]
    group_ids = torch.arange(len(words)).repeat_interleave(tc.group_size)
    cond = roles.generator.encode_prompts(prompts)
    c = world.cfg
    noise = torch.randn((len(prompts), *roles.generator.latent_shape(c.height, c.width)), generator=gen)
    chunk = tc.micro_batch_groups * tc.group_size
    trajs, futures = [], []
    for i in range(0, len(prompts), chunk):
        sl = slice(i, i + chunk)
        t = rollout(roles.generator, cond[sl], noise[sl], steps=tdm.steps, shift=tdm.shift, eta=tc.eta, generator=gen)
        trajs.append(t)
        futures.append(scorer.submit(roles.generator.decode(t.sample), prompts[sl]))
    traj = Trajectory(torch.cat([t.xs for t in trajs], 1), trajs[0].s, torch.cat([t.v for t in trajs], 1))
    rewards = torch.cat([f.result() for f in futures])
    return Batch(words_rep, prompts, cond, traj, group_ids, rewards, torch.zeros_like(rewards))


# -- 3. advantages --------------------------------------------------------------------------------------


def advantage_phase(batch: Batch, tc: TrainConfig) -> dict[str, float]:
    failed = int(torch.isnan(batch.rewards).sum())
    rate = failed / batch.rewards.numel()
    if rate > tc.max_reward_failure:
        raise RewardFailureError(
            f"{failed} of {batch.rewards.numel()} samples could not be scored ({rate:.0%} > "
            f"train.max_reward_failure={tc.max_reward_failure:.0%})"
        )
    batch.adv = group_advantages(batch.rewards, batch.group_ids, tc.adv_eps, tc.adv_clip)
    ok = ~torch.isnan(batch.rewards)
    r = batch.rewards[ok]
    return {
        "reward_mean": float(r.mean()) if ok.any() else math.nan,
        "reward_std": float(r.std(unbiased=False)) if ok.sum() > 1 else 0.0,
        "reward_exact": float((r == 1.0).float().mean()) if ok.any() else math.nan,
        "reward_failed": failed,
        "adv_abs_mean": float(batch.adv.abs().mean()),
    }


# -- 4b. surrogate reward -------------------------------------------------------------------------------


def draw_surrogate_step(k_steps: int, gen: torch.Generator) -> int:
    """k in 0..K-1 with P(k) proportional to k + 1."""
    p = torch.arange(1, k_steps + 1, dtype=torch.float64)
    return int(torch.multinomial(p / p.sum(), 1, generator=gen))


def surrogate_backward(
    roles: Roles, mb: Batch, k: int, tc: TrainConfig, tdm: TDMConfig, gen: torch.Generator, scale: float
) -> dict[str, float]:
    """Group preference loss of the surrogate at the stored state x_{s_{k+1}}, backward."""
    x = mb.traj.xs[k + 1]
    s_val = float(mb.traj.s[k + 1])
    s = _full(s_val, x)
    tau = sample_tau(_full(max(s_val, tc.t_min_surrogate), x), tdm.tau_margin, tdm.shift, gen)
    n = group_noise(mb.group_ids, tuple(x.shape[1:]), gen)
    x_tau, a, b = renoise(x, n, s, tau)
    v_sur = roles.surrogate.velocity(x_tau, tau, mb.cond)
    reference = roles.reference if tc.surrogate_reference == "teacher" else roles.slow_surrogate
    with torch.no_grad():
        v_ref = reference.velocity(x_tau, tau, mb.cond)
        v_old = roles.slow_surrogate.velocity(x_tau, tau, mb.cond)
        l_ref = velocity_target_mse(x, n, s, tau, a, b, v_ref)
        l_old = velocity_target_mse(x, n, s, tau, a, b, v_old)
    l = velocity_target_mse(x, n, s, tau, a, b, v_sur)
    drift = (v_sur.float() - v_ref.float()).square().mean()
    pref = group_preference(
        l, l_ref, l_old, mb.adv, mb.group_ids, tc.group_size, tc.beta_dpo, tc.ppo_clip, drift, tc.ref_gate_threshold
    )
    tw = (k + 1) / tdm.steps
    loss = surrogate_loss(l, mb.adv, pref, drift, tc.surrogate_beta, tw)
    (loss * scale).backward()
    return {
        "loss_sur": loss.item(),
        "sur_l_minus_ref": float((l.detach() - l_ref).mean()),
        "sur_drift": drift.item(),
        "sur_weight": float(pref["weight"].mean()),
        "gate_ppo": float(pref["ppo_gate"].float().mean()),
        "gate_ref": float(pref["ref_gate"].float().mean()),
        "gate_keep": float(pref["keep"].float().mean()),
    }


# -- 4c. generator --------------------------------------------------------------------------------------


def generator_backward(
    roles: Roles, mb: Batch, j: int, tc: TrainConfig, tdm: TDMConfig, gen: torch.Generator, scale: float
) -> dict[str, float]:
    """Revised-x0 KL + CFG-as-reward + learned-reward losses of the generator at step j, backward."""
    x = mb.traj.xs[j]
    s, s_next = _full(float(mb.traj.s[j]), x), _full(float(mb.traj.s[j + 1]), x)
    v = roles.generator.velocity(x, s, mb.cond)
    x_next, x0_hat = euler_step(x, v, s, s_next)
    x_next = x_next.detach()
    tau = sample_tau(s_next, tdm.tau_margin, tdm.shift, gen)
    x_tau, _, _ = renoise(x_next, torch.randn(x.shape, generator=gen), s_next, tau)
    lo = torch.clamp(s_next, min=tc.t_min_generator)
    tau2 = sample_tau(lo, tdm.tau_margin, tdm.shift, gen)
    n2 = group_noise(mb.group_ids, tuple(x.shape[1:]), gen)
    with torch.no_grad():
        v_c, v_u = roles.reference.velocity_cfg(x_tau, tau, mb.cond)
        v_f = roles.fake.velocity(x_tau, tau, mb.cond)
    x0 = lambda vel: x0_from_velocity(x_tau, tau, vel)  # noqa: E731
    rl_terms: dict[str, float] = {}
    if tc.generator_loss == "tdm_r1":
        x_tau2, _, _ = renoise(x_next, n2, s_next, tau2)
        with torch.no_grad():
            sc, su = roles.surrogate.velocity_cfg(x_tau2, tau2, mb.cond)
            v_ref2 = roles.reference.velocity(x_tau2, tau2, mb.cond)
        v_sur_cfg = su + tdm.rl_cfg * (sc - su)
        x0b = lambda vel: x0_from_velocity(x_tau2, tau2, vel)  # noqa: E731
        t = generator_targets(x0_hat, x0(v_c), x0(v_u), x0(v_f), tdm.cfg, x0b(v_sur_cfg), x0b(v_ref2))
        weights = generator_term_weights(j, tdm.trunc_steps, tdm.w_tdm, with_reward=True)
        per_sample, terms = revised_x0_loss(
            x0_hat,
            t["target_kl"],
            t["target_cfg"],
            t["target_reward"],
            t["ref_real"],
            t["ref_reward"],
            weights,
            tdm.normaliser_eps,
        )
        loss = per_sample.mean()
    else:  # direct_rl ablation: advantage-weighted denoising loss on the generator itself
        t = generator_targets(x0_hat, x0(v_c), x0(v_u), x0(v_f), tdm.cfg)
        w_kl, w_cfg, w_rl = generator_term_weights(j, tdm.trunc_steps, tdm.w_tdm, with_reward=True)
        per_sample, terms = revised_x0_loss(
            x0_hat,
            t["target_kl"],
            t["target_cfg"],
            None,
            t["ref_real"],
            None,
            (w_kl, w_cfg, 0.0),
            tdm.normaliser_eps,
        )
        loss = per_sample.mean()
        if w_rl > 0:
            x_clean = mb.traj.xs[j + 1]  # the stored next state, re-noised with group noise like the surrogate's
            x_tau2, a2, b2 = renoise(x_clean, n2, s_next, tau2)
            l_gen = velocity_target_mse(
                x_clean, n2, s_next, tau2, a2, b2, roles.generator.velocity(x_tau2, tau2, mb.cond)
            )
            direct = (mb.adv * l_gen).mean()
            loss = loss + w_rl * direct
            rl_terms["gen_direct_rl"] = direct.item()
    (loss * scale).backward()
    return {
        "loss_gen": loss.item(),
        "gen_kl": float(terms[:, 0].mean()),
        "gen_cfg": float(terms[:, 1].mean()),
        "gen_reward": float(terms[:, 2].mean()),
        **rl_terms,
    }


# -- 4. the update loop over stored micro-batches -------------------------------------------------------


def draw_steps(k_steps: int, m: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, k_steps, (m,), generator=gen).tolist()


def micro_batches(batch: Batch, tc: TrainConfig) -> list[Batch]:
    """Whole prompt groups per micro-batch, so each group's preference score is complete."""
    size = tc.micro_batch_groups * tc.group_size
    n = batch.rewards.numel()
    return [batch.select(torch.arange(i, min(i + size, n))) for i in range(0, n, size)]


def update_phase(
    roles: Roles,
    opts: dict,
    batch: Batch,
    tc: TrainConfig,
    tdm: TDMConfig,
    cfg: Config,
    epoch: int,
    gen: torch.Generator,
) -> dict[str, float]:
    """fake -> surrogate -> generator for every micro-batch and M drawn steps; gradients accumulate
    into `tc.optimizer_steps_per_epoch` optimizer steps per role."""
    from tdm_r1.distill import optimizer_step

    mbs = micro_batches(batch, tc)
    n_steps = max(1, min(tc.optimizer_steps_per_epoch, len(mbs)))
    bounds = [round(i * len(mbs) / n_steps) for i in range(n_steps + 1)]
    sums: dict[str, float] = {}
    count = 0
    slow_decay = min(tc.slow_decay_max, tc.slow_decay_base + tc.slow_decay_rate * epoch)
    for step in range(n_steps):
        chunk = mbs[bounds[step] : bounds[step + 1]]
        scale = 1.0 / (len(chunk) * tdm.steps_per_batch)
        for mb in chunk:
            for j in draw_steps(tdm.steps, tdm.steps_per_batch, gen):
                if step > 0:  # the generator moved since the rollout: its stored output is stale
                    with torch.no_grad():
                        mb.traj.v[j] = roles.generator.velocity(
                            mb.traj.xs[j], _full(float(mb.traj.s[j]), mb.traj.xs[j]), mb.cond
                        )
                parts = fake_score_backward(roles.fake, roles.reference, mb.cond, mb.traj, j, tdm, gen, scale)
                k = draw_surrogate_step(tdm.steps, gen)
                parts |= surrogate_backward(roles, mb, k, tc, tdm, gen, scale)
                parts |= generator_backward(roles, mb, j, tc, tdm, gen, scale)
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + v
                count += 1
        trainable = roles.trainable()
        for role in ("fake", "surrogate", "generator"):
            norm = optimizer_step(opts[role], trainable[role], cfg.optim.grad_clip)
            sums[f"grad_norm_{role}"] = sums.get(f"grad_norm_{role}", 0.0) + norm * count / n_steps
        roles.update_shadow("generator_ema", cfg.optim.generator_ema_decay)
        roles.update_shadow("slow_surrogate", slow_decay)
    out = {k: v / count for k, v in sums.items()}
    out["slow_decay"] = slow_decay
    return out


# -- the run: setup, epochs, eval, checkpoints, report --------------------------------------------------


def evaluate_role(
    role, world, cfg: Config, words: list[str], nfe: int, guidance: float, state: dict
) -> tuple[dict, Tensor]:
    from tdm_r1.evaluate import build_eval_reward, evaluate

    if "reward" not in state:
        state["reward"] = build_eval_reward(cfg.reward, world)
    return evaluate(role, world, state["reward"], words, nfe, guidance, cfg.tdm.shift, cfg.eval)


def baseline_evals(cfg: Config, roles: Roles, world, words: list[str], state: dict) -> dict:
    """Teacher at sample.nfe + CFG and at K steps, and the starting generator at K steps (cached per run)."""
    import json
    from pathlib import Path

    path = Path(cfg.run_dir) / "baselines.json"
    key = {
        "teacher": cfg.roles.teacher,
        "generator_init": cfg.roles.generator_init,
        "words": len(words),
        "seed": cfg.eval.seed,
    }
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["results"]
    results = {
        "teacher_32nfe_cfg": evaluate_role(roles.reference, world, cfg, words, cfg.sample.nfe, cfg.sample.cfg, state)[
            0
        ],
        "teacher_4nfe": evaluate_role(roles.reference, world, cfg, words, cfg.tdm.steps, 1.0, state)[0],
        "tdm_4nfe": evaluate_role(roles.generator_ema, world, cfg, words, cfg.tdm.steps, 1.0, state)[0],
    }
    path.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
    return results


def _save_state(cfg: Config, progress, roles: Roles, opts: dict, teacher_sha: str):
    from tdm_r1 import checkpoint as ckpt
    from tdm_r1.config import to_dict
    from tdm_r1.distill import capture_state

    path = ckpt.state_path(cfg.run_dir, progress.step)
    info = {"command": "train", "config": to_dict(cfg), "teacher_sha256": teacher_sha, "epoch": progress.step}
    ckpt.save_train_state(path, capture_state(progress, roles, opts), info)
    ckpt.prune_train_states(cfg.run_dir, cfg.train.keep_checkpoints)
    return path


def _export_generator(cfg: Config, roles: Roles, epoch: int, minutes: float):
    from pathlib import Path

    from tdm_r1 import checkpoint as ckpt

    info = {
        "kind": "tdm_r1",
        "epoch": epoch,
        "nfe": cfg.tdm.steps,
        "shift": cfg.tdm.shift,
        "minutes": minutes,
        "teacher": cfg.roles.teacher,
        "generator_init": cfg.roles.generator_init,
    }
    out = Path(cfg.run_dir) / "generator.safetensors"
    ckpt.save_model(out, roles.export("generator_ema"), cfg.model, cfg.world, **info)
    return out


def train(cfg: Config, resume: str | None = None) -> dict:
    """Run TDM-R1; returns the summary written to <run_dir>/summary.json."""
    import json
    import time
    from pathlib import Path

    from tqdm import tqdm

    from tdm_r1.config import save_config
    from tdm_r1.distill import (
        Progress,
        _truncate_log,
        build_optimizers,
        file_sha256,
        load_generator_init,
        load_resume,
        load_teacher,
        resolve_resume,
    )
    from tdm_r1.evaluate import eval_words
    from tdm_r1.report import RunReporter
    from tdm_r1.rewards import build_reward
    from tdm_r1.roles import build_roles
    from tdm_r1.worlds.ocr import build_world

    tc, run = cfg.train, Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    world = build_world(cfg.world)
    teacher = load_teacher(cfg)
    teacher_sha = file_sha256(cfg.roles.teacher)
    roles = build_roles(cfg.roles, teacher, surrogate=True, fake=True, generator_init=load_generator_init(cfg))
    opts = build_optimizers(roles, cfg.optim)
    progress = Progress(0, PromptStream(world.words("train"), cfg.seed), torch.Generator().manual_seed(cfg.seed))
    if resume is not None:
        path = resolve_resume(resume, run)
        load_resume(path, cfg, progress, roles, opts, teacher_sha, command="train", resumable=RESUMABLE_CHANGES)
        _truncate_log(run / "metrics.jsonl", progress.step, key="epoch")
        print(f"train: resumed from {path} at epoch {progress.step}")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    scorer = RewardScorer([(build_reward(r.name, cfg=cfg.reward, word_of=world.word_of), r.weight) for r in tc.rewards])
    heldout = eval_words(world, "heldout", cfg.eval.n_train, cfg.eval.seed)
    eval_state: dict = {}
    reporter = RunReporter(run, tensorboard=tc.tensorboard)
    baselines = baseline_evals(cfg, roles, world, heldout, eval_state) if tc.eval_baselines else {}
    if progress.step == 0:
        start = evaluate_role(roles.generator_ema, world, cfg, heldout, cfg.tdm.steps, 1.0, eval_state)
        reporter.grid(start[1], "samples_start.png")
    n_train = {k: sum(p.numel() for p in v) for k, v in roles.trainable().items()}
    print(
        f"train: {cfg.roles.mode} roles, trainable {n_train}, {tc.epochs} epochs of "
        f"{tc.prompts_per_epoch}x{tc.group_size} samples -> {run}"
    )
    t_start = time.time()
    bar = tqdm(range(progress.step + 1, tc.epochs + 1), desc="train", dynamic_ncols=True)
    try:
        for epoch in bar:
            rec: dict = {"epoch": epoch}
            t0 = time.time()
            batch = rollout_phase(roles, world, progress.stream, scorer, tc, cfg.tdm, progress.gen)
            t1 = time.time()
            try:
                rec |= advantage_phase(batch, tc)
            except RewardFailureError as e:
                path = _save_state(cfg, progress, roles, opts, teacher_sha)
                raise RewardFailureError(f"epoch {epoch}: {e}; state saved at {path} (resume with --resume)") from e
            rec |= update_phase(roles, opts, batch, tc, cfg.tdm, cfg, epoch, progress.gen)
            t2 = time.time()
            progress.step = epoch
            if tc.eval_every > 0 and epoch % tc.eval_every == 0 and epoch != tc.epochs:
                ev, _ = evaluate_role(roles.generator_ema, world, cfg, heldout, cfg.tdm.steps, 1.0, eval_state)
                rec |= {"heldout_ocr_mean": ev["ocr_mean"], "heldout_ocr_exact": ev["ocr_exact"]}
            rec |= {
                "sec_rollout_reward": round(t1 - t0, 2),
                "sec_update": round(t2 - t1, 2),
                "sec_eval": round(time.time() - t2, 2),
            }
            reporter.log(rec, step=epoch)
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", gen=f"{rec['loss_gen']:.3f}")
            if (tc.checkpoint_every > 0 and epoch % tc.checkpoint_every == 0) or epoch == tc.epochs:
                _save_state(cfg, progress, roles, opts, teacher_sha)
    finally:
        scorer.close()
    minutes = round((time.time() - t_start) / 60, 2)
    generator = _export_generator(cfg, roles, progress.step, minutes)
    final, images = evaluate_role(roles.generator_ema, world, cfg, heldout, cfg.tdm.steps, 1.0, eval_state)
    reporter.grid(images, "samples_end.png")
    summary = {
        **baselines,
        "tdm_r1_4nfe": final,
        "minutes": minutes,
        "checkpoint": str(generator),
        "epochs": progress.step,
    }
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    reporter.finish(summary)
    print(f"train: wrote {generator} after {minutes:.1f} min; held-out ocr_mean {final['ocr_mean']:.3f}")
    return summary
