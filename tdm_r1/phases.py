"""The phases the commands loop over (DESIGN section 5).

`train`, one TDM-R1 epoch: rollout (grouped, deterministic K-step) -> rewards (non-differentiable, off the training
thread) -> group advantages -> per stored micro-batch and M drawn step indices: fake score -> surrogate reward (group
preference loss with PPO and reference gates) -> generator (KL + CFG-as-reward + learned reward) -> one optimizer step
per role per epoch -> generator EMA, slow surrogate.

`distill`, one TDM step: a fresh rollout of the generator, then for M drawn step indices the fake score and the
generator (KL + CFG, no reward term) -> one optimizer step per role -> generator EMA.

The surrogate is a denoiser whose likelihood ratio to the reference is the learned reward: no reward head, no reward
gradient. No denoising loss ever touches the generator (except in the `direct_rl` ablation, which exists to show why).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from tdm_r1.advantages import group_advantages, per_reward_advantages
from tdm_r1.config import Config, TDMConfig, TrainConfig
from tdm_r1.distributed import LOCAL, Dist, Split
from tdm_r1.models.base import Cond
from tdm_r1.optim import optimizer_step, update_shadow
from tdm_r1.rewards.base import RewardFailureError
from tdm_r1.rewards.scorer import RewardScorer, combine_sum
from tdm_r1.roles import Roles
from tdm_r1.sampling import Trajectory, rollout
from tdm_r1.timing import phase
from tdm_r1.updates import (
    Batch,
    draw_surrogate_step,
    fake_score_backward,
    fill_samples,
    generator_backward,
    surrogate_backward,
)
from tdm_r1.worlds.stream import PromptStream

# -- 1. rollout + 2. rewards ----------------------------------------------------------------------------


def rollout_phase(
    roles: Roles,
    world,
    stream: PromptStream,
    scorer: RewardScorer,
    tc: TrainConfig,
    tdm: TDMConfig,
    gen: torch.Generator,
    split: Split | None = None,
    encode_once: bool = True,
    wait: bool = True,
) -> Batch:
    """P prompts x G samples through the generator's K-step sampler; rewards scored chunk by chunk on the scorer's
    thread while the next chunk samples. With `split`, this rank rolls out its rows of each micro-batch; the prompts
    and noise are drawn for all of them. wait=False returns before the last rewards are in (`collect_rewards`)."""
    n = tc.prompts_per_epoch * tc.group_size
    split = split or Split(n, tc.micro_batch_groups * tc.group_size, tc.group_size)
    items = stream.next(tc.prompts_per_epoch)
    items_rep = split.take_list([w for w in items for _ in range(tc.group_size)])
    prompts, targets = [world.prompt(w) for w in items_rep], world.targets(items_rep)
    group_ids = split.take(torch.arange(len(items)).repeat_interleave(tc.group_size))
    with phase("encode"):
        if encode_once:
            cond = roles.generator.encode_prompts(prompts)
        else:  # per micro-batch, as the reference loop does
            cond = Cond.cat([roles.generator.encode_prompts(prompts[sl]) for sl, _ in split.micro_batches()])
    device = next(iter(cond.fields.values())).device
    noise = split.take(torch.randn((n, *roles.generator.latent_shape(world.height, world.width)), generator=gen))
    noise = noise.to(device)
    trajs, futures = [], []
    for sl, _ in split.micro_batches():
        with phase("rollout"):
            t = rollout(
                roles.generator, cond[sl], noise[sl], steps=tdm.steps, shift=tdm.shift, eta=tc.eta, generator=gen
            )
        trajs.append(t)
        with phase("decode"):
            images = roles.generator.decode(t.sample)
        futures.append(scorer.submit(images, prompts[sl], targets[sl]))
    traj = Trajectory(torch.cat([t.xs for t in trajs], 1), trajs[0].s, torch.cat([t.v for t in trajs], 1))
    nan = torch.full((traj.xs.shape[1],), math.nan)
    batch = Batch(items_rep, prompts, cond, traj, group_ids, nan, torch.zeros_like(nan), split=split, pending=futures)
    batch.reward_names, batch.reward_weights = scorer.names, scorer.weights
    if wait:
        collect_rewards(batch)
    return batch


def collect_rewards(batch: Batch) -> None:
    """Wait for the scorer's results of a rollout (`reward_wait`: what its thread did not finish behind other work)."""
    if batch.pending is None:
        return
    with phase("reward_wait"):
        parts = torch.cat([f.result() for f in batch.pending])
    batch.reward_parts, batch.pending = parts, None
    batch.rewards = combine_sum(parts, batch.reward_weights)


def train_epoch(run, scorer: RewardScorer, epoch: int) -> dict[str, float]:
    """One TDM-R1 epoch of a Run: rollout -> advantages -> updates, its metrics. With perf.overlap_reward the first
    micro-batch's fake-score update (it needs no advantages) runs before the last chunk's rewards are awaited; the
    wait then counts in sec_update, not sec_rollout_reward."""
    cfg, progress, tc = run.cfg, run.progress, run.cfg.train
    overlap = cfg.perf.overlap_reward
    t0 = time.time()
    scorer.begin_epoch(epoch, cfg.run_dir)
    batch = rollout_phase(
        run.roles, run.world, progress.stream, scorer, tc, cfg.tdm, progress.gen, run.split, cfg.perf.encode_once,
        wait=not overlap,
    )  # fmt: skip
    rec: dict[str, float] = {}

    def advantages() -> None:
        collect_rewards(batch)
        try:
            rec.update(advantage_phase(batch, tc, run.dist))
        except RewardFailureError as e:
            errors = scorer.last_errors()
            raise RewardFailureError(f"{e}; last failure: {'; '.join(errors)}" if errors else str(e)) from e

    if not overlap:
        advantages()
    t1 = time.time()
    rec |= update_phase(
        run.roles, run.opts, batch, tc, cfg.tdm, cfg, epoch, progress.gen, run.dist, advantages if overlap else None
    )
    rec |= scorer.take_stats()
    return rec | {"sec_rollout_reward": round(t1 - t0, 2), "sec_update": round(time.time() - t1, 2)}


# -- 3. advantages --------------------------------------------------------------------------------------


def advantage_phase(batch: Batch, tc: TrainConfig, dist: Dist = LOCAL) -> dict[str, float]:
    """Group advantages over the whole epoch: every rank gathers all rewards, so its advantages are exactly the
    single-process ones."""
    with phase("advantages"):
        return _advantages(batch, tc, dist)


def _advantages(batch: Batch, tc: TrainConfig, dist: Dist) -> dict[str, float]:
    rewards = dist.gather_rows(batch.rewards, batch.split)
    rewards = torch.where(torch.isfinite(rewards), rewards, torch.nan)  # +-inf is a failure to judge, as NaN is
    batch.rewards = batch.split.take(rewards)
    failed = int(torch.isnan(rewards).sum())
    rate = failed / rewards.numel()
    if rate > tc.max_reward_failure:
        raise RewardFailureError(
            f"{failed} of {rewards.numel()} samples could not be scored ({rate:.0%} > "
            f"train.max_reward_failure={tc.max_reward_failure:.0%})"
        )
    group_ids = dist.gather_rows(batch.group_ids, batch.split)
    parts = None if batch.reward_parts is None else dist.gather_rows(batch.reward_parts, batch.split)
    if tc.reward_combine == "per_reward" and parts is not None and parts.shape[1] > 1:
        adv = per_reward_advantages(parts, batch.reward_weights, group_ids, tc.adv_eps, tc.adv_clip)
    else:
        adv = group_advantages(rewards, group_ids, tc.adv_eps, tc.adv_clip)
    batch.adv = batch.split.take(adv)
    ok = ~torch.isnan(rewards)
    r = rewards[ok]
    out = {
        "reward_mean": float(r.mean()) if ok.any() else math.nan,
        "reward_std": float(r.std(unbiased=False)) if ok.sum() > 1 else 0.0,
        "reward_exact": float((r == 1.0).float().mean()) if ok.any() else math.nan,
        "reward_failed": failed,
        "adv_abs_mean": float(adv.abs().mean()),
    }
    if parts is not None and parts.shape[1] > 1:  # every reward's own statistics
        for name, col in zip(batch.reward_names, parts.unbind(1), strict=True):
            good = col[torch.isfinite(col)]
            out[f"reward_{name}_mean"] = float(good.mean()) if good.numel() else math.nan
            out[f"reward_{name}_std"] = float(good.std(unbiased=False)) if good.numel() > 1 else 0.0
            out[f"reward_{name}_failed"] = int(col.numel() - good.numel())
    return out


# -- 4. the update loop over stored micro-batches -------------------------------------------------------


def draw_steps(k_steps: int, m: int, gen: torch.Generator) -> list[int]:
    """M step indices j uniform in 0..K-1 (with replacement), in the order drawn."""
    return torch.randint(0, k_steps, (m,), generator=gen).tolist()


def micro_batches(batch: Batch) -> list[Batch]:
    """Whole prompt groups per global micro-batch, so each group's preference score is complete (its partial sums
    are all-reduced when the micro-batch spans ranks)."""
    return [batch.select(rows, shard) for rows, shard in batch.split.micro_batches()]


def update_phase(
    roles: Roles,
    opts: dict,
    batch: Batch,
    tc: TrainConfig,
    tdm: TDMConfig,
    cfg: Config,
    epoch: int,
    gen: torch.Generator,
    dist: Dist = LOCAL,
    advantages: Callable[[], None] | None = None,
) -> dict[str, float]:
    """fake -> surrogate -> generator for every micro-batch and M drawn steps; gradients accumulate
    into `tc.optimizer_steps_per_epoch` optimizer steps per role. Returns means over all ranks' samples.
    `advantages`: fills batch.rewards and batch.adv, called after the first fake-score step (the first that needs
    them is the surrogate's); None: they are there already."""

    mbs = micro_batches(batch)
    backwards_skipped = sum(r.skipped for r in roles.active().values())
    steps_skipped = 0
    n_steps = max(1, min(tc.optimizer_steps_per_epoch, len(mbs)))
    bounds = [round(i * len(mbs) / n_steps) for i in range(n_steps + 1)]
    sums: dict[str, float] = {}
    count = 0
    slow_decay = min(tc.slow_decay_max, tc.slow_decay_base + tc.slow_decay_rate * epoch)
    for step in range(n_steps):
        chunk = mbs[bounds[step] : bounds[step + 1]]
        scale = 1.0 / (len(chunk) * tdm.steps_per_batch)
        for mb in chunk:
            if not cfg.perf.encode_once:
                with phase("encode"):
                    mb.cond = roles.generator.encode_prompts(mb.prompts)
            for j in draw_steps(tdm.steps, tdm.steps_per_batch, gen):
                # the generator moved since the rollout (its stored output is stale), or the loop recomputes anyway
                if step > 0 or not cfg.perf.reuse_rollout_output:
                    with phase("recompute"), torch.no_grad():
                        mb.traj.v[j] = roles.generator.velocity(
                            mb.traj.xs[j], fill_samples(float(mb.traj.s[j]), mb.traj.xs[j]), mb.cond
                        )
                with phase("fake"):
                    parts = fake_score_backward(
                        roles.fake, roles.reference, mb.cond, mb.traj, j, tdm, gen, scale, mb.shard
                    )
                if advantages is not None:
                    advantages()
                    advantages = None
                    for m, (rows, _) in zip(mbs, batch.split.micro_batches(), strict=True):
                        m.rewards, m.adv = batch.rewards[rows], batch.adv[rows]
                with phase("surrogate"):
                    k = draw_surrogate_step(tdm.steps, gen)
                    parts |= surrogate_backward(roles, mb, k, tc, tdm, gen, scale, dist)
                with phase("generator"):
                    parts |= generator_backward(roles, mb, j, tc, tdm, gen, scale)
                for key, v in parts.items():
                    sums[key] = sums.get(key, 0.0) + v
                count += 1
        with phase("optimizer"):
            trainable = roles.trainable()
            for role in ("fake", "surrogate", "generator"):
                norm = optimizer_step(opts[role], trainable[role], cfg.optim.grad_clip)
                sums[f"grad_norm_{role}"] = sums.get(f"grad_norm_{role}", 0.0) + norm * count / n_steps
                steps_skipped += not math.isfinite(norm)
            update_shadow(roles, "generator_ema", cfg.optim.generator_ema_decay)
            update_shadow(roles, "slow_surrogate", slow_decay)
    out = dist.mean_metrics({k: v / count for k, v in sums.items()})
    out["slow_decay"] = slow_decay
    # non-finite losses (backward skipped) and gradient norms (optimizer step skipped): counted, never applied
    skipped = steps_skipped + sum(r.skipped for r in roles.active().values()) - backwards_skipped
    if skipped:
        out["nonfinite_skipped"] = skipped
    return out


# -- distill: one TDM step ------------------------------------------------------------------------------


def _distill_rollout(
    roles: Roles, world, stream: PromptStream, split: Split, tdm: TDMConfig, gen: torch.Generator
) -> Batch:
    """This rank's rows of one step's rollouts: the prompts and noise drawn for the whole batch (split.n)."""
    ((rows, shard),) = split.micro_batches()
    prompts = split.take_list([world.prompt(w) for w in stream.next(split.n)])
    cond = roles.generator.encode_prompts(prompts)
    device = next(iter(cond.fields.values())).device
    noise = split.take(torch.randn((split.n, *roles.generator.latent_shape(world.height, world.width)), generator=gen))
    traj = rollout(roles.generator, cond, noise.to(device), steps=tdm.steps, shift=tdm.shift)
    return Batch.of_rollout(prompts, cond, traj, shard)


def sample_std(x: torch.Tensor, dist: Dist = LOCAL) -> float:
    """The standard deviation of every value of `x` on all ranks (Bessel-corrected, as torch.std)."""
    if dist.world == 1:
        return float(x.std())
    x = x.double()
    n, s1, s2 = dist.all_reduce_sum(
        torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), x.pow(2).sum()])
    )
    return float(((s2 - s1 * s1 / n) / (n - 1)).clamp(min=0.0).sqrt())


def distill_step(
    roles: Roles,
    opts: dict,
    world,
    stream: PromptStream,
    cfg: Config,
    gen: torch.Generator,
    split: Split | None = None,
    dist: Dist = LOCAL,
) -> dict[str, float]:
    """One generator optimizer step (preceded by distill.fake_updates - 1 fake-only steps, each on a fresh rollout).
    The drawn step indices are visited in trajectory order (sorted), as the shipped students were made. With `split`
    (a distributed run), this rank's rows of each batch; the metrics are means over all ranks."""
    tdm, dcfg, ocfg = cfg.tdm, cfg.distill, cfg.optim
    split = split or Split(dcfg.batch_size, dcfg.batch_size, 1)
    fake_params = roles.trainable()["fake"]
    for _ in range(dcfg.fake_updates - 1):
        b = _distill_rollout(roles, world, stream, split, tdm, gen)
        for j in sorted(draw_steps(tdm.steps, tdm.steps_per_batch, gen)):
            scale = 1.0 / tdm.steps_per_batch
            fake_score_backward(roles.fake, roles.reference, b.cond, b.traj, j, tdm, gen, scale, b.shard)
        optimizer_step(opts["fake"], fake_params, ocfg.grad_clip)
    b = _distill_rollout(roles, world, stream, split, tdm, gen)
    js = sorted(draw_steps(tdm.steps, tdm.steps_per_batch, gen))
    rec: dict[str, float] = {}
    scale = 1.0 / len(js)
    for j in js:
        parts = fake_score_backward(roles.fake, roles.reference, b.cond, b.traj, j, tdm, gen, scale, b.shard)
        parts |= generator_backward(roles, b, j, None, tdm, gen, scale)
        for k, v in parts.items():
            rec[k] = rec.get(k, 0.0) + v * scale
    rec = dist.mean_metrics(rec)
    rec["grad_norm_fake"] = optimizer_step(opts["fake"], fake_params, ocfg.grad_clip)
    rec["grad_norm_generator"] = optimizer_step(opts["generator"], roles.trainable()["generator"], ocfg.grad_clip)
    update_shadow(roles, "generator_ema", ocfg.generator_ema_decay)
    rec["j_mean"] = float(np.mean(js))
    rec["sample_std"] = sample_std(b.traj.sample, dist)
    return rec
