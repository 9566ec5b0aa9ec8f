"""The update phases of DESIGN section 5.4 on stored rollouts: the fake score (shared by `tdm-r1 distill` and
`tdm-r1 train`), the surrogate reward (group preference) and the generator (KL + CFG + learned reward)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tdm_r1.config import TDMConfig, TrainConfig
from tdm_r1.distributed import LOCAL, Dist, Shard, Split
from tdm_r1.losses import (
    fake_score_loss,
    generator_targets,
    generator_term_weights,
    group_preference,
    sample_tau,
    surrogate_loss,
    x0_from_velocity,
)
from tdm_r1.models.base import Cond
from tdm_r1.roles import Role, Roles
from tdm_r1.sampling import Trajectory
from tdm_r1_kernels import fused_renoise, fused_revised_x0_loss, fused_sampler_step, fused_velocity_target_mse


def fill_samples(value: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), float(value), device=like.device)


def fake_score_backward(
    fake: Role,
    reference: Role,
    cond: Cond,
    traj: Trajectory,
    j: int,
    tcfg: TDMConfig,
    gen: torch.Generator,
    scale: float,
    shard: Shard | None = None,
) -> dict[str, float]:
    """Fake-score loss at step j of a rollout (its stored output is the generator's x0_hat), backward. `shard`: these
    samples are rows of a larger micro-batch spread over ranks, for which the random draws are made."""
    x, v = traj.xs[j], traj.v[j]
    shard = shard or Shard(0, x.shape[0], x.shape[0], 0, 0)
    s, s_next = fill_samples(float(traj.s[j]), x), fill_samples(float(traj.s[j + 1]), x)
    tau = shard.take(sample_tau(shard.full(float(traj.s[j + 1]), x.device), tcfg.tau_margin, tcfg.shift, gen))
    n = shard.randn(tuple(x.shape[1:]), gen, x.device)
    with torch.no_grad():  # the generator's step from its stored output, re-noised to tau in the same pass
        _, x0_hat, x_tau, _, _ = fused_sampler_step(x, v, s, s_next, noise=n, tau=tau)
    with torch.no_grad():
        v_real = reference.velocity(x_tau, tau, cond)
    v_fake = fake.velocity(x_tau, tau, cond)
    loss, parts = fake_score_loss(x_tau, tau, x0_hat, v_fake, v_real, tcfg.fake_reg)
    fake.backward(loss * scale)
    return {"loss_fake": loss.item(), "fake_dsm": float(parts["dsm"].mean()), "fake_reg": float(parts["reg"].mean())}


# -- stored rollouts -------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One epoch's rollouts: P prompts x G samples (this rank's share of them), whole trajectories, rewards and
    advantages; or one micro-batch of them."""

    items: list[str]  # the world's item of each sample
    prompts: list[str]
    cond: Cond
    traj: Trajectory
    group_ids: Tensor  # [N] prompt group of each sample (within its micro-batch, for a micro-batch)
    rewards: Tensor  # [N], NaN = the scorer failed
    adv: Tensor  # [N]
    split: Split | None = None  # an epoch: which of the P x G samples this rank holds
    shard: Shard | None = None  # a micro-batch: its rows of the global micro-batch, for which draws are made
    pending: list | None = None  # an epoch: the scorer's futures not yet collected (rewards NaN until then)
    reward_parts: Tensor | None = None  # an epoch: [N, R] every reward's scores (rewards = their weighted sum)
    reward_names: list[str] | None = None
    reward_weights: list[float] | None = None

    @classmethod
    def of_rollout(cls, prompts: list[str], cond: Cond, traj: Trajectory, shard: Shard | None = None) -> Batch:
        """An unscored rollout (`distill`): each sample its own group; the draws made for these rows, or with `shard`
        for the whole batch of which they are this rank's rows."""
        n = traj.xs.shape[1]
        shard = shard or Shard(0, n, n, n, 0)
        zeros = torch.zeros(n)
        groups = torch.arange(shard.lo, shard.hi)  # one sample per group: its row in the whole batch
        return cls(prompts, prompts, cond, traj, groups, zeros, zeros, shard=shard)

    def select(self, rows: slice, shard: Shard) -> Batch:
        idx = torch.arange(rows.start, rows.stop)
        t = Trajectory(self.traj.xs[:, idx], self.traj.s, self.traj.v[:, idx])
        return Batch(
            [self.items[i] for i in idx.tolist()],
            [self.prompts[i] for i in idx.tolist()],
            self.cond[idx],
            t,
            self.group_ids[idx] - shard.first_group,
            self.rewards[idx],
            self.adv[idx],
            shard=shard,
        )


def group_noise(group_ids: Tensor, n_groups: int, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """Noise shared within each prompt group: [N, *shape] with rows of one group equal (drawn for all `n_groups`
    groups of the global micro-batch, so a group spread over ranks gets one noise)."""
    return torch.randn((n_groups, *shape), generator=gen)[group_ids]


def _tau(mb: Batch, s_lo: float, tdm: TDMConfig, gen: torch.Generator, device: torch.device) -> Tensor:
    """tau [B] above s_lo for this micro-batch's samples (drawn for the whole global micro-batch)."""
    return mb.shard.take(sample_tau(mb.shard.full(s_lo, device), tdm.tau_margin, tdm.shift, gen))


# -- 4b. surrogate reward -------------------------------------------------------------------------------


def draw_surrogate_step(k_steps: int, gen: torch.Generator) -> int:
    """k in 0..K-1 with P(k) proportional to k + 1."""
    p = torch.arange(1, k_steps + 1, dtype=torch.float64)
    return int(torch.multinomial(p / p.sum(), 1, generator=gen))


def surrogate_backward(
    roles: Roles,
    mb: Batch,
    k: int,
    tc: TrainConfig,
    tdm: TDMConfig,
    gen: torch.Generator,
    scale: float,
    dist: Dist = LOCAL,
) -> dict[str, float]:
    """Group preference loss of the surrogate at the stored state x_{s_{k+1}}, backward. Group scores and the
    reference gate's batch drift are summed over the ranks that share the micro-batch."""
    x = mb.traj.xs[k + 1]
    s_val = float(mb.traj.s[k + 1])
    s = fill_samples(s_val, x)
    tau = _tau(mb, max(s_val, tc.t_min_surrogate), tdm, gen, x.device)
    n = group_noise(mb.group_ids, mb.shard.groups, tuple(x.shape[1:]), gen).to(x.device)
    x_tau, _, _ = fused_renoise(x, n, s, tau)
    v_sur = roles.surrogate.velocity(x_tau, tau, mb.cond)
    reference = roles.reference if tc.surrogate_reference == "teacher" else roles.slow_surrogate
    with torch.no_grad():
        v_ref = reference.velocity(x_tau, tau, mb.cond)
        v_old = roles.slow_surrogate.velocity(x_tau, tau, mb.cond)
        l_ref = fused_velocity_target_mse(x, n, s, tau, v_ref)
        l_old = fused_velocity_target_mse(x, n, s, tau, v_old)
    l = fused_velocity_target_mse(x, n, s, tau, v_sur)
    drift = (v_sur.float() - v_ref.float()).square().mean()
    pref = group_preference(
        l,
        l_ref,
        l_old,
        mb.adv,
        mb.group_ids,
        tc.group_size,
        tc.beta_dpo,
        tc.ppo_clip,
        dist.mean(drift.detach()),
        tc.ref_gate_threshold,
        group_score_sum=dist.group_score_sum(mb.shard.groups),
    )
    tw = (k + 1) / tdm.steps
    loss = surrogate_loss(l, mb.adv, pref, drift, tc.surrogate_beta, tw)
    roles.surrogate.backward(loss * scale)
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
    roles: Roles, mb: Batch, j: int, tc: TrainConfig | None, tdm: TDMConfig, gen: torch.Generator, scale: float
) -> dict[str, float]:
    """Revised-x0 losses of the generator at step j, backward: KL + CFG-as-reward + learned reward (`train`), or with
    tc None the reward term off, KL + CFG at w_tdm (`distill`, DESIGN section 5 without the surrogate)."""
    x = mb.traj.xs[j]
    s, s_next = fill_samples(float(mb.traj.s[j]), x), fill_samples(float(mb.traj.s[j + 1]), x)
    v = roles.generator.velocity(x, s, mb.cond)
    s_next_val = float(mb.traj.s[j + 1])
    tau = _tau(mb, s_next_val, tdm, gen, x.device)
    # the rollout's sampler step, now with grad, re-noised to tau with fresh noise in the same pass
    step = fused_sampler_step(x, v, s, s_next, noise=mb.shard.randn(tuple(x.shape[1:]), gen, x.device), tau=tau)
    x0_hat, x_next, x_tau = step.x0_hat, step.x_next.detach(), step.x_tau.detach()
    with_reward = tc is not None
    if with_reward:  # the learned reward's re-noising (drawn before the forwards, for every generator_loss)
        tau2 = _tau(mb, max(s_next_val, tc.t_min_generator), tdm, gen, x.device)
        n2 = group_noise(mb.group_ids, mb.shard.groups, tuple(x.shape[1:]), gen).to(x.device)
    with torch.no_grad():
        v_c, v_u = roles.reference.velocity_cfg(x_tau, tau, mb.cond)
        v_f = roles.fake.velocity(x_tau, tau, mb.cond)
    x0 = lambda vel: x0_from_velocity(x_tau, tau, vel)  # noqa: E731
    weights = generator_term_weights(j, tdm.trunc_steps, tdm.w_tdm, with_reward=with_reward)
    rl_terms: dict[str, float] = {}
    if with_reward and tc.generator_loss == "tdm_r1":
        x_tau2, _, _ = fused_renoise(x_next, n2, s_next, tau2)
        with torch.no_grad():
            sc, su = roles.surrogate.velocity_cfg(x_tau2, tau2, mb.cond)
            v_ref2 = roles.reference.velocity(x_tau2, tau2, mb.cond)
        v_sur_cfg = su + tdm.rl_cfg * (sc - su)
        x0b = lambda vel: x0_from_velocity(x_tau2, tau2, vel)  # noqa: E731
        t = generator_targets(x0_hat, x0(v_c), x0(v_u), x0(v_f), tdm.cfg, x0b(v_sur_cfg), x0b(v_ref2))
        loss, terms = _revised_x0_loss(x0_hat, t, weights, tdm)
    else:  # distill, or the direct_rl ablation: KL + CFG here, its reward weight on a denoising term below
        t = generator_targets(x0_hat, x0(v_c), x0(v_u), x0(v_f), tdm.cfg)
        loss, terms = _revised_x0_loss(x0_hat, t, (weights[0], weights[1], 0.0), tdm)
        if with_reward and weights[2] > 0:
            direct = direct_rl_term(roles, mb, j, n2, s_next, tau2)
            loss = loss + weights[2] * direct
            rl_terms["gen_direct_rl"] = direct.item()
    roles.generator.backward(loss * scale)
    out = {"loss_gen": loss.item(), "gen_kl": float(terms[:, 0].mean()), "gen_cfg": float(terms[:, 1].mean())}
    if with_reward:
        out["gen_reward"] = float(terms[:, 2].mean())
    return out | rl_terms


def _revised_x0_loss(x0_hat: Tensor, t: dict, weights: tuple[float, float, float], tdm: TDMConfig):
    """The per-sample revised-x0 loss (mean over the micro-batch) and its [B, 3] terms."""
    per_sample, terms = fused_revised_x0_loss(
        x0_hat,
        t["target_kl"],
        t["target_cfg"],
        t.get("target_reward"),
        t["ref_real"],
        t.get("ref_reward"),
        weights,
        eps=tdm.normaliser_eps,
    )
    return per_sample.mean(), terms


def direct_rl_term(roles: Roles, mb: Batch, j: int, n2: Tensor, s_next: Tensor, tau2: Tensor) -> Tensor:
    """The direct_rl ablation's advantage-weighted denoising loss on the generator itself, at the stored next state
    re-noised with group noise like the surrogate's."""
    x_clean = mb.traj.xs[j + 1]
    x_tau2, _, _ = fused_renoise(x_clean, n2, s_next, tau2)
    v_gen = roles.generator.velocity(x_tau2, tau2, mb.cond)
    l_gen = fused_velocity_target_mse(x_clean, n2, s_next, tau2, v_gen)
    return (mb.adv * l_gen).mean()
