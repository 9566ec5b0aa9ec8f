"""Samplers and timestep schedules (rectified flow: x_s = (1 - s) x0 + s eps, v = eps - x0).

- `sample_cfg`: multi-step Euler with classifier-free guidance (the teacher's sampler).
- `rollout`: the deterministic few-step sampler returning the whole trajectory (all K + 1 states,
  the s values and the model outputs), with a DPM-Solver++(2M) option and an `eta` stochastic
  re-noising option (ablation only).
Every update runs the fused `tdm_r1_kernels.fused_sampler_step`, the op the training losses differentiate through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tdm_r1.models.base import Cond, FlowModel
from tdm_r1_kernels import fused_sampler_step


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


def eta_ray_point(s_next: float, eta: float) -> float:
    """The point s_mid of the deterministic ray from which re-noising to s_next gives the eta step.

    The eta step x_next = (1 - s') x0_hat + s' (sqrt(1 - eta^2) eps_hat + eta n) equals renoise(x_mid, n, s_mid, s')
    for x_mid = (1 - s_mid) x0_hat + s_mid eps_hat (the Euler step to s_mid): with c = sqrt(1 - eta^2),
    a = (1 - s')/(1 - s_mid) and b = sqrt(s'^2 - (a s_mid)^2) match when s_mid = s' c / (1 - s' + s' c), and then
    b = s' eta. eta = 0 gives s_mid = s' (no re-noising), eta = 1 gives s_mid = 0 (x_mid = x0_hat).
    """
    c = (1.0 - eta * eta) ** 0.5
    return s_next * c / (1.0 - s_next + s_next * c)


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
    """Few-step sampler from pure noise; returns the whole trajectory, written step by step into its storage.

    Euler: x_next = x - (s - s_next) v; DPM-Solver++(2M) adds its second-order term from the previous x0_hat.
    Deterministic unless eta > 0: then every step but the last is x_next = (1 - s') x0_hat +
    s' (sqrt(1 - eta^2) eps_hat + eta n) with fresh noise n (the Euler step to `eta_ray_point`, re-noised).
    """
    if solver not in ("euler", "dpmpp2m"):
        raise ValueError(f"unknown solver {solver!r}; expected 'euler' or 'dpmpp2m'")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    sched = schedule(steps, shift)
    xs = torch.empty((steps + 1, *noise.shape), dtype=noise.dtype, device=noise.device)
    xs[0] = noise
    x0_bufs = [torch.empty_like(xs[0]), torch.empty_like(xs[0])]  # this step's x0_hat and the previous one
    vs = []
    for i in range(steps):
        s, s_next = float(sched[i]), float(sched[i + 1])
        x, x0_hat, x0_prev = xs[i], x0_bufs[i % 2], x0_bufs[(i + 1) % 2]
        v = guided_velocity(model, x, torch.full((x.shape[0],), s, device=x.device), cond, cfg)
        if eta > 0.0 and s_next > 0.0:
            n = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_mid = torch.empty_like(x)  # the Euler step to the ray point, re-noised into xs[i + 1]
            fused_sampler_step(x, v, s, eta_ray_point(s_next, eta), noise=n, tau=s_next, out=(x_mid, x0_hat, xs[i + 1]))
        elif solver == "dpmpp2m" and i > 0:
            fused_sampler_step(x, v, s, s_next, x0_prev=x0_prev, s_prev=float(sched[i - 1]), out=(xs[i + 1], x0_hat))
        else:
            fused_sampler_step(x, v, s, s_next, out=(xs[i + 1], x0_hat))
        vs.append(v)
    return Trajectory(xs, sched.to(noise.device), torch.stack(vs))


@torch.no_grad()
def sample_cfg(
    model: FlowModel, cond: Cond, noise: Tensor, nfe: int, cfg: float, shift: float = 3.0, solver: str = "euler"
) -> Tensor:
    """Multi-step sampler with CFG (the teacher's); returns x at s = 0."""
    return rollout(model, cond, noise, steps=nfe, shift=shift, cfg=cfg, solver=solver).sample
