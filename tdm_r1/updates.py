"""Update phases shared by `tdm-r1 distill` and `tdm-r1 train` (DESIGN section 5.4a): the fake-score update."""

from __future__ import annotations

import torch
from torch import Tensor

from tdm_r1.config import TDMConfig
from tdm_r1.distributed import Shard
from tdm_r1.losses import fake_score_loss, sample_tau
from tdm_r1.models.base import Cond
from tdm_r1.roles import Role
from tdm_r1.sampling import Trajectory
from tdm_r1_kernels import fused_sampler_step


def fill_samples(value: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), value, device=like.device)


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
