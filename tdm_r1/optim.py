"""Per-role optimizers (DESIGN section 5.5): AdamW per trainable role with its own lr / betas, the clipped step, and
the shadow copies that follow a role: the generator's EMA (used for eval and export) and the slow surrogate."""

from __future__ import annotations

import math

import torch

from tdm_r1.config import OptimConfig
from tdm_r1.distributed import local_partition, regather
from tdm_r1.roles import SHADOWS, Roles


def build_optimizers(roles: Roles, ocfg: OptimConfig) -> dict[str, torch.optim.AdamW]:
    settings = {
        "generator": (ocfg.generator_lr, ocfg.generator_betas),
        "fake": (ocfg.fake_lr, ocfg.fake_betas),
        "surrogate": (ocfg.surrogate_lr, ocfg.surrogate_betas),
    }
    return {
        name: torch.optim.AdamW(
            params, lr=settings[name][0], betas=tuple(settings[name][1]), weight_decay=ocfg.weight_decay
        )
        for name, params in roles.trainable().items()
    }


def optimizer_step(opt, params: list[torch.nn.Parameter], clip: float) -> float:
    """Clip, step, zero; returns the pre-clip gradient norm. A non-finite norm skips the step (the gradients are
    dropped, the weights and moments stay as they were) and is returned as it is, for the caller to count. A role's
    DeepSpeed engine (tdm_r1.distributed) reduces the gradients across ranks, clips and steps by itself."""
    if not isinstance(opt, torch.optim.Optimizer):
        return opt.step()
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    if math.isfinite(norm):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


class NonFiniteError(RuntimeError):
    """Weights became non-finite; nothing non-finite is saved or exported."""


def check_finite(roles: Roles, what: str, dist=None) -> None:
    """Before a state is saved or a model exported: every trainable and shadow weight is finite (collective when `dist`
    is a distributed run: each rank checks its partitions)."""
    bad = [
        name
        for name, r in roles.active().items()
        for p in r.parameters()
        if not bool(local_partition(p).isfinite().all())
    ]
    flag = torch.tensor(float(bool(bad)))
    if dist is not None and dist.world > 1:
        flag = dist.all_reduce_sum(flag)
    if float(flag) > 0:
        raise NonFiniteError(
            f"{what}: the weights of {', '.join(sorted(set(bad))) or 'a role on another rank'} are not finite; nothing "
            "was written. Resume from the last training state (finite when written), e.g. with lower learning rates"
        )


@torch.no_grad()
def update_shadow(roles: Roles, shadow: str, decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * source (generator_ema, slow_surrogate)."""
    dst, src = getattr(roles, shadow), getattr(roles, SHADOWS[shadow])
    for pd, ps in zip(dst.parameters(), src.parameters(), strict=True):
        # ZeRO-3: both are partitioned alike, so each rank updates its own partition
        local_partition(pd).lerp_(local_partition(ps), 1.0 - decay)
    regather(dst.parameters())
