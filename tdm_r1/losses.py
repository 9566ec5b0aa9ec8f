"""TDM losses (DESIGN section 5): tau draws, the fake-score loss, the generator's loss weights and targets,
the surrogate's group preference and loss.

Rectified flow: x_s = (1 - s) x0 + s eps, v = eps - x0, x0_hat = x - s v. Per-sample schedule values
(s, tau) are [B] tensors. The math of DESIGN section 6 runs only in the fused ops of `tdm_r1_kernels`, which the
trainers call directly: `fused_sampler_step`, `fused_renoise`, `fused_velocity_target_mse` (the surrogate's
per-sample loss), `fused_revised_x0_loss` (with the weights of `generator_term_weights`) and the group
preference kernels (through `group_preference` below). The fake-score target (x_tau - x0_hat) / tau is the
velocity of x_tau towards x0_hat. Every constant comes from `TDMConfig`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tdm_r1.sampling import shift_time
from tdm_r1_kernels import fused_group_preference_scores, fused_group_preference_weights


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    return c.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _per_sample_mean(t: Tensor) -> Tensor:
    return t.float().flatten(1).mean(1)


def unshift_time(s: Tensor, k: float) -> Tensor:
    """Inverse of `shift_time`: u = s / (k - (k - 1) s)."""
    return s / (k - (k - 1.0) * s)


def sample_tau(s_lo: Tensor, margin: float, shift: float, generator: torch.Generator | None = None) -> Tensor:
    """tau [B] in (s_lo, 1]: uniform in pre-shift time over (unshift(s_lo) + margin, 1], then shifted.
    A lower end past 1 (s_lo near 1) gives tau = 1."""
    lo = (unshift_time(s_lo.double(), shift) + margin).clamp(max=1.0)
    r = torch.rand(s_lo.shape, generator=generator, dtype=torch.float64, device=s_lo.device)
    u = 1.0 - (1.0 - lo) * r  # r in [0, 1) -> u in (lo, 1]
    return shift_time(u, shift).float()


def x0_from_velocity(x: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """x0_hat = x - s v."""
    return x - _bcast(s, x) * v


def fake_score_loss(
    x_tau: Tensor, tau: Tensor, x0_hat: Tensor, v_fake: Tensor, v_real: Tensor, reg: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """TDM fake-score loss: mean((x_tau - x0_hat)/tau - v_fake)^2 + reg * mean(v_real - v_fake)^2.

    x0_hat and v_real carry no gradient (the generator's prediction and the frozen teacher). Returns the
    batch-mean loss and the per-sample terms {"dsm": [B], "reg": [B]} (detached).
    """
    target = ((x_tau - x0_hat) / _bcast(tau, x_tau)).detach()
    dsm = _per_sample_mean((target - v_fake).square())
    regt = _per_sample_mean((v_real.detach() - v_fake).square())
    loss = (dsm + reg * regt).mean()
    return loss, {"dsm": dsm.detach(), "reg": regt.detach()}


def generator_term_weights(j: int, trunc_steps: int, w_tdm: float, with_reward: bool) -> tuple[float, float, float]:
    """(w_kl, w_cfg, w_reward) of L = w_kl L_kl + w_cfg L_cfg + w_reward L_reward at step index j, the weights
    `tdm_r1_kernels.fused_revised_x0_loss` applies.

    TDM-R1 (reward on): (1, w_tdm, 1 - w_tdm) for j < trunc_steps, else (w_tdm, w_tdm, 0).
    TDM distillation (reward off): w_tdm applies to CFG and KL only, (w_tdm, w_tdm, 0) at every step.
    The direct_rl ablation takes the TDM-R1 weights and moves w_reward to its own denoising term.
    """
    if not with_reward or j >= trunc_steps:
        return (w_tdm, w_tdm, 0.0)
    return (1.0, w_tdm, 1.0 - w_tdm)


@torch.no_grad()
def generator_targets(
    x0_hat: Tensor,
    x0_real_cond: Tensor,
    x0_real_uncond: Tensor,
    x0_fake: Tensor,
    cfg: float,
    x0_sur_cfg: Tensor | None = None,
    x0_ref: Tensor | None = None,
) -> dict[str, Tensor | None]:
    """Stop-gradient targets of the revised-x0 losses (all x0 predictions at the re-noised x_next).

    KL (TDM):       x0_hat + (x0_real_cond - x0_fake)
    CFG-as-reward:  x0_hat + (cfg - 1)(x0_real_cond - x0_real_uncond)
    learned reward: x0_hat + (x0_sur^cfg - x0_ref)        (TDM-R1 only; x0_sur_cfg, x0_ref at x_tau')
    plus the normaliser references x0_real^cfg = x0_real_uncond + cfg (x0_real_cond - x0_real_uncond)
    and x0_sur^cfg.
    """
    x0_hat = x0_hat.detach()
    guidance = x0_real_cond - x0_real_uncond
    out = {
        "target_kl": x0_hat + (x0_real_cond - x0_fake),
        "target_cfg": x0_hat + (cfg - 1.0) * guidance,
        "ref_real": x0_real_uncond + cfg * guidance,
        "target_reward": None,
        "ref_reward": None,
    }
    if (x0_sur_cfg is None) != (x0_ref is None):
        raise ValueError("x0_sur_cfg and x0_ref must be given together")
    if x0_sur_cfg is not None:
        out["target_reward"] = x0_hat + (x0_sur_cfg - x0_ref)
        out["ref_reward"] = x0_sur_cfg
    return out


# -- TDM-R1 surrogate reward (DESIGN section 5.4b) ----------------------------------------------------


def group_preference(
    l: Tensor,
    l_ref: Tensor,
    l_old: Tensor,
    adv: Tensor,
    group_ids: Tensor,
    group_size: int,
    beta_dpo: float,
    clip: float,
    ref_drift: Tensor,
    ref_drift_max: float,
    group_score_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Group weights and gates of the surrogate loss, all detached, from the fused group preference kernels.

    S_g = sum_{i in g} A_i beta_dpo (l_i - l_ref_i) / G (`fused_group_preference_scores`, then summed across
    ranks by `group_score_sum`, a callable on the [n_groups] partial sums), w_g = sigmoid(S_g). PPO gate
    (ratio = exp(l_old - l)): drop i when (A_i > 0 and ratio > 1 + c) or (A_i <= 0 and ratio < 1 - c).
    Reference gate: when the batch mean (v_sur - v_ref)^2 (`ref_drift`) exceeds `ref_drift_max`, drop samples
    that already moved past the reference in their advantage direction (A > 0 and l < l_ref, or A <= 0 and
    l > l_ref). Weights and gates: `fused_group_preference_weights`.
    Returns {"weight" [B], "keep" [B] bool, "ppo_gate" [B] bool, "ref_gate" [B] bool, "score" [B]}.
    """
    groups = group_ids.long()
    n_groups = int(groups.max()) + 1
    partial = fused_group_preference_scores(l, l_ref, adv, groups, n_groups, beta_dpo, group_size)
    scores = group_score_sum(partial) if group_score_sum is not None else partial
    weight, ppo_gate, ref_gate = fused_group_preference_weights(
        scores, l, l_ref, l_old, adv, groups, clip, ref_drift.detach(), ref_drift_max
    )
    keep = ~(ppo_gate | ref_gate)
    return {"weight": weight, "keep": keep, "ppo_gate": ppo_gate, "ref_gate": ref_gate, "score": scores[groups]}


def surrogate_loss(
    l_with_grad: Tensor, adv: Tensor, pref: dict[str, Tensor], drift: Tensor, beta: float, time_weight: float
) -> Tensor:
    """tw * (mean_i(w_g(i) * A_i * l_i * keep_i) + beta * mean (v_sur - v_ref)^2)."""
    per = pref["weight"] * adv.float() * l_with_grad * pref["keep"].float()
    return time_weight * (per.mean() + beta * drift)
