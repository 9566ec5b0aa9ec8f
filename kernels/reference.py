"""fp32 PyTorch reference of every fused op: the spec the Triton and native kernels are tested against.

Convention (DESIGN section 3): x_s = (1 - s) * x0 + s * eps, v = eps - x0, x0_hat = x_s - s * v.
Per-sample tensors have shape [B]; per-element tensors [B, ...]. Every reference upcasts to fp32,
computes, and returns per-element outputs in the input dtype and per-sample values in fp32.
The `*_coefficients` helpers turn per-sample schedule values into per-sample fp32 coefficients (computed
in fp64); every backend uses them, so all backends apply identical coefficients.
float64 inputs run here on every device (`tdm_r1_kernels.dispatch`): `sampler_step` and `renoise` then compute in
float64 with float64 coefficients (exact samplers for numerical analysis); the loss ops still compute in fp32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "GroupPreference",
    "RevisedX0Weights",
    "elementwise_dtype",
    "group_preference_ref",
    "group_preference_scores_ref",
    "group_preference_weights_ref",
    "renoise_coefficients",
    "renoise_ref",
    "revised_x0_loss_ref",
    "revised_x0_weights",
    "sampler_step_coefficients",
    "sampler_step_ref",
    "velocity_target_coefficients",
    "velocity_target_mse_ref",
]

# Added to each per-sample normaliser w = mean|x0_hat - ref| of revised_x0_loss so that a sample whose
# prediction already equals the reference does not divide by zero.
REVISED_X0_EPS = 1e-6


def per_sample(value: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """Broadcast a python number, 0-d or [B] tensor to a contiguous fp64 [B] tensor on `device`."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"per-sample value must be a scalar or have shape [{batch}], got {tuple(t.shape)}")
    return t.contiguous()


def _bcast(c: Tensor, like: Tensor) -> Tensor:
    """View a [B] coefficient so it broadcasts against a [B, ...] tensor."""
    return c.view(-1, *([1] * (like.dim() - 1)))


def elementwise_dtype(*tensors: Tensor | None) -> torch.dtype:
    """Compute dtype of the per-element references: float64 when any input is float64, else float32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def _lam(u: Tensor) -> Tensor:
    """Half log-SNR of rectified flow, log((1 - u) / u), in fp64 (inf at the ends is handled by callers)."""
    return torch.log1p(-u) - torch.log(u)


def sampler_step_coefficients(
    s: Tensor | float,
    s_next: Tensor | float,
    batch: int,
    device: torch.device,
    s_prev: Tensor | float | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sample (s, dt, c2) for `sampler_step`, in `dtype` (fp32 for every kernel).

    dt = s - s_next (Euler/DDIM). c2 is the DPM-Solver++(2M) correction weight (None without s_prev):
    with lambda(u) = log((1-u)/u), h = lambda(s_next) - lambda(s), r = (lambda(s) - lambda(s_prev)) / h,
    the 2M update x_next = (s_next/s) x + (1 - s_next/s) D, D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev,
    rewrites exactly as the Euler step plus c2 * (x0_prev - x0_hat) with c2 = -(1 - s_next/s) / (2r).
    Where a lambda is infinite (s_prev >= 1, s_next <= 0: first/last step) the update is first order, c2 = 0.
    """
    s64 = per_sample(s, batch, device)
    sn64 = per_sample(s_next, batch, device)
    dt = (s64 - sn64).to(dtype)
    if s_prev is None:
        return s64.to(dtype), dt, None
    sp64 = per_sample(s_prev, batch, device)
    second = (sp64 < 1) & (sn64 > 0) & (s64 < 1) & (s64 > 0)
    safe = lambda u: torch.where(second, u, torch.full_like(u, 0.5))  # keeps log finite where masked
    s_, sn_, sp_ = safe(s64), safe(sn64), safe(sp64)
    h = _lam(sn_) - _lam(s_)
    r = (_lam(s_) - _lam(sp_)) / h
    c2 = -(1 - sn_ / s_) / (2 * r)
    c2 = torch.where(second, c2, torch.zeros_like(c2))
    return s64.to(dtype), dt, c2.to(dtype)


def renoise_coefficients(
    s: Tensor | float, tau: Tensor | float, batch: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Per-sample (a, b) in `dtype`: a = (1 - tau)/(1 - s), b = sqrt(tau^2 - (a s)^2), for 0 <= s <= tau <= 1.

    At s = 1 (only tau = 1 is valid) the limit a = 1, b = 0 is used; tau^2 - (a s)^2 is clamped at 0 so
    tau = s gives b = 0 exactly instead of a rounding-error NaN.
    """
    s64 = per_sample(s, batch, device)
    tau64 = per_sample(tau, batch, device)
    a = torch.where(s64 < 1, (1 - tau64) / (1 - s64).clamp_min(1e-300), torch.ones_like(s64))
    b = torch.sqrt((tau64 * tau64 - (a * s64) ** 2).clamp_min(0))
    return a.to(dtype), b.to(dtype)


def velocity_target_coefficients(
    s: Tensor | float, tau: Tensor | float, batch: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-sample fp32 (cx, cn) with v* = cx * x + cn * n, cx = -1/(1-s), cn = (tau + s^2 a/(1-s)) / b.

    Valid for 0 <= s < tau <= 1. At s = 0 the coefficients are set to exactly (-1, 1), so v* = n - x.
    """
    s64 = per_sample(s, batch, device)
    tau64 = per_sample(tau, batch, device)
    a = (1 - tau64) / (1 - s64)
    b = torch.sqrt((tau64 * tau64 - (a * s64) ** 2).clamp_min(0))
    cx = -1 / (1 - s64)
    cn = (tau64 + s64 * s64 * a / (1 - s64)) / b
    at_zero = s64 == 0
    cx = torch.where(at_zero, torch.full_like(cx, -1.0), cx)
    cn = torch.where(at_zero, torch.ones_like(cn), cn)
    return cx.float(), cn.float()


def sampler_step_ref(
    x: Tensor,
    v: Tensor,
    s: Tensor | float,
    s_next: Tensor | float,
    x0_prev: Tensor | None = None,
    s_prev: Tensor | float | None = None,
    noise: Tensor | None = None,
    tau: Tensor | float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One deterministic sampler step from s to s_next: (x_next, x0_hat, x_tau).

    Euler/DDIM: x0_hat = x - s v, x_next = x - (s - s_next) v. With x0_prev and s_prev (the previous step's
    x0_hat and s) the DPM-Solver++(2M) update adds c2 * (x0_prev - x0_hat), see `sampler_step_coefficients`.
    With noise and tau, x_tau = renoise(x_next) is computed from the unrounded x_next (fused re-noising).
    Computed in fp32, or in float64 (coefficients included) when an input is float64.
    """
    if (x0_prev is None) != (s_prev is None):
        raise ValueError("DPM-Solver++(2M) needs both x0_prev and s_prev")
    if (noise is None) != (tau is None):
        raise ValueError("re-noising needs both noise and tau")
    B = x.shape[0]
    ct = elementwise_dtype(x, v, x0_prev, noise)
    s_c, dt, c2 = sampler_step_coefficients(s, s_next, B, x.device, s_prev, ct)
    xf, vf = x.to(ct), v.to(ct)
    x0_hat = xf - _bcast(s_c, xf) * vf
    x_next = xf - _bcast(dt, xf) * vf
    if x0_prev is not None:
        x_next = x_next + _bcast(c2, xf) * (x0_prev.to(ct) - x0_hat)
    x_tau = None
    if noise is not None:
        a, b = renoise_coefficients(s_next, tau, B, x.device, ct)
        x_tau = (_bcast(a, xf) * x_next + _bcast(b, xf) * noise.to(ct)).to(x.dtype)
    return x_next.to(x.dtype), x0_hat.to(x.dtype), x_tau


def renoise_ref(x: Tensor, noise: Tensor, s: Tensor | float, tau: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """Re-noise a state at s to tau >= s: (x_tau = a x + b n, a [B], b [B]), see `renoise_coefficients`.

    Computed in fp32 (a, b fp32), or in float64 (a, b float64) when an input is float64.
    """
    ct = elementwise_dtype(x, noise)
    a, b = renoise_coefficients(s, tau, x.shape[0], x.device, ct)
    x_tau = _bcast(a, x) * x.to(ct) + _bcast(b, x) * noise.to(ct)
    return x_tau.to(x.dtype), a, b


def velocity_target_mse_ref(x: Tensor, noise: Tensor, s: Tensor | float, tau: Tensor | float, v_pred: Tensor) -> Tensor:
    """Per-sample mean (v* - v_pred)^2 over non-batch dims, fp32 [B].

    x is the stored state at s, noise n the draw that re-noised it to x_tau = a x + b n (renoise), and
    v_pred the model's velocity at (x_tau, tau). v* = -x/(1-s) + (n/b)(tau + s^2 a/(1-s)); at s = 0, v* = n - x.
    v* is a target, so only v_pred receives a gradient.
    """
    cx, cn = velocity_target_coefficients(s, tau, x.shape[0], x.device)
    v_star = (_bcast(cx, x) * x.float() + _bcast(cn, x) * noise.float()).detach()  # a target: no gradient
    return (v_star - v_pred.float()).square().flatten(1).mean(1)


RevisedX0Weights = tuple[float, float, float] | Tensor  # (w_kl, w_cfg, w_reward), [3] or [B, 3]


def revised_x0_weights(weights: RevisedX0Weights, batch: int, device: torch.device, with_reward: bool = True) -> Tensor:
    """Per-sample fp32 term weights [B, 3] for (KL, CFG, reward), no gradient.

    `weights` is the caller's (w_kl, w_cfg, w_reward): a tuple or [3] tensor for every sample, or a [B, 3]
    tensor per sample. The op applies them as given; which weights a step gets (TDM-R1, truncated steps,
    distillation, ablations) is the training loop's decision. Without a reward term (with_reward False)
    L_reward is 0, and a nonzero python w_reward is an error (a tensor is not inspected: that would sync).
    """
    if not with_reward and not isinstance(weights, Tensor) and float(weights[2]) != 0.0:
        raise ValueError(f"w_reward = {weights[2]} needs target_reward and ref_reward")
    w = torch.as_tensor(weights, dtype=torch.float32, device=device).detach()
    if w.shape == (3,):
        w = w.expand(batch, 3)
    if w.shape != (batch, 3):
        raise ValueError(f"weights must be (w_kl, w_cfg, w_reward) or have shape [{batch}, 3], got {tuple(w.shape)}")
    return w.contiguous()


def revised_x0_loss_ref(
    x0_hat: Tensor,
    target_kl: Tensor,
    target_cfg: Tensor,
    target_reward: Tensor | None,
    ref_real: Tensor,
    ref_reward: Tensor | None,
    weights: RevisedX0Weights,
    eps: float = REVISED_X0_EPS,
) -> tuple[Tensor, Tensor]:
    """Per-sample generator loss, fp32 (loss [B], terms [B, 3] = unweighted (L_kl, L_cfg, L_reward)).

    L_term = mean((x0_hat - target)^2) / w, w = mean|x0_hat - ref| + eps with no gradient; ref is
    x0_real^cfg for KL and CFG, x0_sur^cfg (ref_reward) for the reward term.
    loss = w_kl L_kl + w_cfg L_cfg + w_rew L_reward with the caller's weights (see `revised_x0_weights`).
    target_reward and ref_reward are both given or both None (reward term off: L_reward = 0).
    """
    if (target_reward is None) != (ref_reward is None):
        raise ValueError("target_reward and ref_reward must be given together")
    x = x0_hat.float()
    sq = lambda t: (x - t.float()).square().flatten(1).mean(1)
    with torch.no_grad():
        w_real = (x - ref_real.float()).abs().flatten(1).mean(1) + eps
    l_kl = sq(target_kl) / w_real
    l_cfg = sq(target_cfg) / w_real
    if target_reward is not None:
        with torch.no_grad():
            w_sur = (x - ref_reward.float()).abs().flatten(1).mean(1) + eps
        l_rew = sq(target_reward) / w_sur
    else:
        l_rew = torch.zeros_like(l_kl)
    w = revised_x0_weights(weights, x.shape[0], x.device, target_reward is not None)
    terms = torch.stack([l_kl, l_cfg, l_rew], dim=1)
    loss = (terms * w).sum(1)
    return loss, terms.detach()


class GroupPreference(NamedTuple):
    """Output of group_preference: per-sample weights and gate masks (True = sample excluded)."""

    weights: Tensor  # [N] fp32, sigmoid(S_g(i))
    scores: Tensor  # [num_groups] fp32, S_g
    ppo_mask: Tensor  # [N] bool
    ref_mask: Tensor  # [N] bool


def group_preference_scores_ref(
    l: Tensor,
    l_ref: Tensor,
    advantages: Tensor,
    group: Tensor,
    num_groups: int,
    beta_dpo: float,
    group_size: int,
) -> Tensor:
    """Local group scores S_g = sum_{i in g} A_i * beta_dpo * (l_i - l_ref_i) / G, fp32 [num_groups].

    `group` holds int ids in [0, num_groups). A group may span ranks: all-reduce (sum) these before
    `group_preference_weights_ref`.
    """
    contrib = advantages.float() * (beta_dpo / group_size) * (l.float() - l_ref.float())
    scores = torch.zeros(num_groups, dtype=torch.float32, device=l.device)
    return scores.index_add_(0, group.long(), contrib.detach())


def group_preference_weights_ref(
    scores: Tensor,
    l: Tensor,
    l_ref: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    group: Tensor,
    clip: float,
    ref_div: Tensor | float | None = None,
    ref_div_threshold: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (w = sigmoid(S_g(i)), ppo_mask, ref_mask); masks are True where the sample is excluded.

    PPO gate with ratio = exp(l_old - l): (A > 0 and ratio > 1 + clip) or (A <= 0 and ratio < 1 - clip).
    Reference gate: ref_div (batch mean (v_sur - v_ref)^2) > ref_div_threshold and the sample has already
    moved past the reference in its advantage direction: (A > 0 and l < l_ref) or (A <= 0 and l > l_ref).
    """
    lf, lr, lo, A = (t.detach().float() for t in (l, l_ref, l_old, advantages))
    w = torch.sigmoid(scores.float()[group.long()])
    ratio = torch.exp(lo - lf)
    pos = A > 0
    ppo = torch.where(pos, ratio > 1 + clip, ratio < 1 - clip)
    moved = torch.where(pos, lf < lr, lf > lr)
    if ref_div is None:
        ref = torch.zeros_like(moved)
    else:  # a tensor comparison, not a python bool: no host sync for device tensors
        ref = moved & (torch.as_tensor(ref_div, device=lf.device).float().reshape(()) > ref_div_threshold)
    return w, ppo, ref


def group_preference_ref(
    l: Tensor,
    l_ref: Tensor,
    l_old: Tensor,
    advantages: Tensor,
    group: Tensor,
    num_groups: int,
    beta_dpo: float,
    group_size: int,
    clip: float,
    ref_div: Tensor | float | None = None,
    ref_div_threshold: float = 0.05,
) -> GroupPreference:
    """Single-process group preference: scores, then weights and gates (no cross-rank sum)."""
    scores = group_preference_scores_ref(l, l_ref, advantages, group, num_groups, beta_dpo, group_size)
    w, ppo, ref = group_preference_weights_ref(
        scores, l, l_ref, l_old, advantages, group, clip, ref_div, ref_div_threshold
    )
    return GroupPreference(w, scores, ppo, ref)
