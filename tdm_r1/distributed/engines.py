"""DeepSpeed engines for the roles (DESIGN section 7): one engine per trainable role in full mode, one engine over the
shared base and every adapter in lora mode (their training states: `tdm_r1.checkpoint.sharded`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tdm_r1.config import OptimConfig
from tdm_r1.distributed import Dist

if TYPE_CHECKING:
    from tdm_r1.models.base import Cond
    from tdm_r1.roles import Roles


class VelocityModule(nn.Module):
    """forward(x, s, cond) = model.velocity(x, s, cond): the module an engine wraps, so that calls go through the
    engine (ZeRO's backward needs that) and reach the FlowModel protocol; x is cast to the engine's dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        return self.model.velocity(x.to(self.dtype), s, cond)


class RoleEngine:
    """A DeepSpeed engine as roles see it: velocity through the engine, backward, and step() = one optimizer step per
    accumulation window however many roles share the engine (lora mode); returns the pre-clip gradient norm."""

    def __init__(self, engine):
        self.engine = engine
        self.grad_norm = 0.0
        self._pending = False

    def __call__(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        return self.engine(x, s, cond)

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self._pending = True

    def step(self) -> float:
        if self._pending:
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else math.nan
            self._pending = False
            # ZeRO-3 copies a gradient partition on the first backward after a step and adds on later ones, but never
            # clears it: a parameter whose first gradient comes from a later backward (lora mode: each role's adapter
            # is reached by that role's backward only) would add to the previous step's gradient.
            stale = getattr(self.engine.optimizer, "grad_partitions_flat_buffer", None)
            if stale is not None:
                stale.zero_()
        return self.grad_norm


class _ClipAdamW(torch.optim.AdamW):
    """AdamW that clips the global norm of its (already all-reduced) gradients: for stage 0 in fp32, where DeepSpeed
    passes the plain optimizer through and reports no norm."""

    def __init__(self, groups: list[dict], clip: float, **kwargs):
        super().__init__(groups, **kwargs)
        self.clip = clip
        self._global_grad_norm = 0.0

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        self._global_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        return super().step(closure)


def _param_groups(roles: Roles, ocfg: OptimConfig) -> dict[str, dict]:
    settings = {
        "generator": (ocfg.generator_lr, ocfg.generator_betas),
        "fake": (ocfg.fake_lr, ocfg.fake_betas),
        "surrogate": (ocfg.surrogate_lr, ocfg.surrogate_betas),
    }
    return {
        name: {"params": params, "lr": settings[name][0], "betas": tuple(settings[name][1])}
        for name, params in roles.trainable().items()
    }


def _engine(module: nn.Module, groups: list[dict], dist: Dist, ocfg: OptimConfig):
    import deepspeed

    zero = dist.ds_config["zero_optimization"]
    if "offload_optimizer" in zero and zero["offload_optimizer"].get("device", "none") != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, weight_decay=ocfg.weight_decay, adamw_mode=True)
    elif dist.ds_config["gradient_clipping"] == 0.0:
        opt = _ClipAdamW(groups, ocfg.grad_clip, weight_decay=ocfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, weight_decay=ocfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=dist.ds_config)
    return engine


def _frozen(module: nn.Module, dist: Dist):
    """A frozen role: under ZeRO-3 an optimizer-less engine (its parameters stay partitioned, gathered per use);
    otherwise the module itself on the device, in the engines' dtype."""
    if dist.zero_stage == 3:
        import deepspeed

        cfg = {k: v for k, v in dist.ds_config.items() if k != "gradient_clipping"}
        engine, *_ = deepspeed.initialize(model=module, config=cfg)
        return RoleEngine(engine)
    return module.to(device=dist.device, dtype=dist.dtype)


def wrap_roles(roles: Roles, ocfg: OptimConfig, dist: Dist) -> dict[str, RoleEngine]:
    """Route every role through DeepSpeed; returns {trainable role: its engine}, a distributed run's optimizers."""
    groups = _param_groups(roles, ocfg)
    if roles.mode == "lora":
        engine = RoleEngine(_engine(VelocityModule(roles.host.model, dist.dtype), list(groups.values()), dist, ocfg))
        for role in roles.active().values():
            role.engine = engine
        return dict.fromkeys(groups, engine)
    out = {}
    for name, role in roles.active().items():
        module = VelocityModule(role.module, dist.dtype)
        if role.trainable:
            role.engine = out[name] = RoleEngine(_engine(module, [groups[name]], dist, ocfg))
        else:
            role.engine = _frozen(module, dist)
    return out
