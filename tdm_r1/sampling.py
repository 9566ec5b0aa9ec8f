"""Samplers and timestep schedules (rectified flow: x_s = (1 - s) x0 + s eps, v = eps - x0).

- `sample_cfg`: multi-step Euler with classifier-free guidance (the teacher's sampler).
- `rollout`: the deterministic few-step sampler returning the whole trajectory (all K + 1 states,
  the s values and the model outputs), with a DPM-Solver++(2M) option and an `eta` stochastic
  re-noising option (ablation only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tdm_r1.models.base import Cond, FlowModel


def shift_time(u: Tensor, k: float) -> Tensor:
    """shift(u) = k u / (1 + (k - 1) u); k = 1 is the identity."""
    return k * u / (1.0 + (k - 1.0) * u)


def schedule(steps: int, shift: float = 3.0) -> Tensor:
    """s values [steps + 1] from 1 to 0: shifted uniform pre-shift points u = 1, (K-1)/K, ..., 0.
    With steps=4, shift=3 this is s = {1, .9, .75, .5, 0}."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    u = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(u, shift).float()


def euler_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor) -> tuple[Tensor, Tensor]:
    """x_next = x - (s - s_next) v and x0_hat = x - s v, per-sample s [B]."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, s_next = s.view(shape).to(x.dtype), s_next.view(shape).to(x.dtype)
    return x - (s - s_next) * v, x - s * v


def dpmpp2m_step(
    x: Tensor, x0: Tensor, x0_prev: Tensor | None, s_prev: float | None, s: float, s_next: float
) -> Tensor:
    """DPM-Solver++(2M) in data prediction for alpha = 1 - s, sigma = s; first order when there is no
    history and at the final step (s_next = 0, where lambda is infinite)."""
    if s_next <= 0.0:
        return x0
    lam = lambda t: torch.log(torch.tensor((1.0 - t) / t, dtype=torch.float64))  # noqa: E731
    h = float(lam(s_next) - lam(s))
    d = x0
    if x0_prev is not None and s_prev is not None and s_prev < 1.0:
        r = float(lam(s) - lam(s_prev)) / h
        d = (1.0 + 1.0 / (2.0 * r)) * x0 - (1.0 / (2.0 * r)) * x0_prev
    # x_next = (sigma_next / sigma) x - alpha_next (e^{-h} - 1) D
    return (s_next / s) * x - (1.0 - s_next) * (torch.exp(torch.tensor(-h)).item() - 1.0) * d


def guided_velocity(model: FlowModel, x: Tensor, s: Tensor, cond: Cond, cfg: float) -> Tensor:
    if cfg == 1.0:
        return model.velocity(x, s, cond)
    both = model.velocity(torch.cat([x, x]), torch.cat([s, s]), Cond.cat([cond, cond.uncond()]))
    v_c, v_u = both.chunk(2)
    return v_u + cfg * (v_c - v_u)


@dataclass
class Trajectory:
    xs: Tensor  # [K + 1, B, ...]: x_{s_0} (noise) ... x_{s_K} (sample)
    s: Tensor  # [K + 1]
    v: Tensor  # [K, B, ...]: model outputs at x_{s_0..s_{K-1}}

    @property
    def sample(self) -> Tensor:
        return self.xs[-1]


@torch.no_grad()
def rollout(
    model: FlowModel,
    cond: Cond,
    noise: Tensor,
    steps: int = 4,
    shift: float = 3.0,
    cfg: float = 1.0,
    solver: str = "euler",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Few-step sampler from pure noise; returns the whole trajectory. Deterministic unless eta > 0:
    then x_next = (1 - s') x0_hat + s' (sqrt(1 - eta^2) eps_hat + eta n) with fresh noise n."""
    if solver not in ("euler", "dpmpp2m"):
        raise ValueError(f"unknown solver {solver!r}; expected 'euler' or 'dpmpp2m'")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    sched = schedule(steps, shift)
    b = noise.shape[0]
    x = noise
    xs, vs = [x], []
    x0_prev = None
    for i in range(steps):
        s, s_next = float(sched[i]), float(sched[i + 1])
        s_b = torch.full((b,), s, device=x.device)
        v = guided_velocity(model, x, s_b, cond, cfg)
        x_next, x0_hat = euler_step(x, v, s_b, torch.full((b,), s_next, device=x.device))
        if solver == "dpmpp2m":
            x_next = dpmpp2m_step(x, x0_hat, x0_prev, float(sched[i - 1]) if i > 0 else None, s, s_next)
        if eta > 0.0 and s_next > 0.0:
            eps_hat = x + (1.0 - s) * v
            n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_next = (1.0 - s_next) * x0_hat + s_next * ((1.0 - eta**2) ** 0.5 * eps_hat + eta * n)
        vs.append(v)
        xs.append(x_next)
        x0_prev, x = x0_hat, x_next
    return Trajectory(torch.stack(xs), sched.to(noise.device), torch.stack(vs))


@torch.no_grad()
def sample_cfg(
    model: FlowModel, cond: Cond, noise: Tensor, nfe: int, cfg: float, shift: float = 3.0, solver: str = "euler"
) -> Tensor:
    """Multi-step sampler with CFG (the teacher's); returns x at s = 0."""
    return rollout(model, cond, noise, steps=nfe, shift=shift, cfg=cfg, solver=solver).sample
