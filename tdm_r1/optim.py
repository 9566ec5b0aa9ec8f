"""Per-role optimizers (DESIGN section 5.5): AdamW per trainable role with its own lr / betas, the clipped step, and
the shadow copies that follow a role: the generator's EMA (used for eval and export) and the slow surrogate."""

from __future__ import annotations

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
    """Clip, step, zero; returns the pre-clip gradient norm. A role's DeepSpeed engine (tdm_r1.distributed) reduces
    the gradients across ranks, clips and steps by itself."""
    if not isinstance(opt, torch.optim.Optimizer):
        return opt.step()
    norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def update_shadow(roles: Roles, shadow: str, decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * source (generator_ema, slow_surrogate)."""
    dst, src = getattr(roles, shadow), getattr(roles, SHADOWS[shadow])
    for pd, ps in zip(dst.parameters(), src.parameters(), strict=True):
        # ZeRO-3: both are partitioned alike, so each rank updates its own partition
        local_partition(pd).lerp_(local_partition(ps), 1.0 - decay)
    regather(dst.parameters())
