"""Model roles (DESIGN section 4): generator, fake score, surrogate, slow surrogate, reference.

A role is a view on a model: `role.velocity(x, s, cond)` runs the model with that role's weights. Two
ways to hold them:

- `lora`: one frozen base (the teacher) carries peft adapters `generator`, `fake`, `surrogate` (trained)
  and `generator_ema`, `slow_surrogate` (frozen copies of adapter tensors, updated by EMA). The
  reference is the base with every adapter disabled. Only adapter tensors are role state.
- `full`: every role is its own module: trainable copies of the teacher (the generator from a few-step
  checkpoint when given), frozen EMA / slow copies, and the frozen teacher as reference.

`build_roles` is the only constructor; the trainer never switches adapters itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tdm_r1 import timing
from tdm_r1.config import ConfigError, RolesConfig
from tdm_r1.models.base import Cond

TRAINABLE = ("generator", "fake", "surrogate")
# frozen copy -> the trainable role it follows by EMA
SHADOWS = {"generator_ema": "generator", "slow_surrogate": "surrogate"}
Placement = Callable[[nn.Module], nn.Module]


class _AdapterHost:
    """One peft-wrapped base model; activates one adapter (or none) per call, keeping requires_grad
    fixed to each role's own setting (peft's set_adapter / disable_adapter would otherwise toggle it)."""

    def __init__(self, peft_model, trainable: set[str]):
        self.peft = peft_model
        self.model = peft_model.base_model.model  # the wrapped module, adapters injected in place
        self.trainable = trainable
        self._params = {
            a: [p for n, p in self.model.named_parameters() if f".{a}." in n and "lora_" in n]
            for a in peft_model.peft_config
        }
        self._active: str | None = None
        self._merged: _MergedForward | None = None
        self._merged_built = False

    def adapter_params(self, adapter: str) -> list[nn.Parameter]:
        return self._params[adapter]

    def merged_forward(self) -> _MergedForward | None:
        """The host's no-grad forward without peft's wrappers (built on first use), or None where the adapters are not
        all plain LoRA linears."""
        if not self._merged_built:
            self._merged, self._merged_built = _MergedForward.build(self.model), True
        return self._merged

    def _fix_grads(self) -> None:
        for name, params in self._params.items():
            for p in params:
                p.requires_grad_(name in self.trainable)

    def _activate(self, adapter: str) -> None:
        if self._active == adapter:
            return
        self.peft.base_model.set_adapter(adapter)
        self._fix_grads()
        self._active = adapter

    @contextlib.contextmanager
    def use(self, adapter: str | None) -> Iterator[nn.Module]:
        if adapter is not None:
            self._activate(adapter)
            yield self.model
            return
        try:
            with self.peft.disable_adapter():
                yield self.model
        finally:
            self._active = None
            self._fix_grads()


class _Velocity(nn.Module):
    """module.velocity as forward, so torch.func.functional_call can run it with replaced weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        return self.m.velocity(x, s, cond)


class _MergedForward:
    """No-grad forwards of a LoRA host without peft's per-layer wrappers (perf.lora_forward=merged): a plain copy of the
    model's structure holding the host's own tensors (nothing is copied), run with every adapted weight replaced for
    the call by W + scaling * B @ A (peft's get_delta_weight). One merge costs d_in x d_out x rank per layer, about 1%
    of a forward at the toy's micro-batch; nothing is cached, so an optimizer step or an EMA write is seen at the next
    call. The result equals peft's forward up to float rounding (the sum is taken in another order)."""

    def __init__(self, plain: nn.Module, targets: dict[str, nn.Module]):
        self.plain = _Velocity(plain)
        self.targets = targets  # "m.<path>.weight" in the plain copy -> the peft layer holding base and adapters

    @classmethod
    def build(cls, model: nn.Module) -> _MergedForward | None:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear

        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        if any(type(m) is not LoraLinear or any(m.use_dora.values()) for m in layers.values()):
            return None  # conv / embedding adapters or DoRA: peft's own forward
        shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        plain = copy.deepcopy(model, memo=dict(shared))  # new modules, the same tensors
        for name in layers:
            parent, _, child = name.rpartition(".")
            owner = plain.get_submodule(parent) if parent else plain
            setattr(owner, child, getattr(owner, child).base_layer)
        return cls(plain, {f"m.{n}.weight": m for n, m in layers.items()})

    def __call__(self, adapter: str | None, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        if adapter is None:
            return self.plain(x, s, cond)
        weights = {
            k: m.base_layer.weight + m.get_delta_weight(adapter) for k, m in self.targets.items() if adapter in m.lora_A
        }
        return torch.func.functional_call(self.plain, weights, (x, s, cond), strict=False)


@dataclass
class Role:
    """A FlowModel view: velocity() runs `module` (full mode) or the shared base with `adapter` (lora)."""

    name: str
    trainable: bool
    module: nn.Module | None = None
    host: _AdapterHost | None = None
    adapter: str | None = None
    # Distributed runs: the callable (x, s, cond) -> v that runs this role's module through its DeepSpeed engine,
    # with .backward(loss) on trainable roles (tdm_r1.distributed.engines.wrap_roles). None: call the module directly.
    engine: Callable | None = field(default=None, repr=False)
    # CFG pairs as two forwards (the reference loop structure) instead of one batched call; the same numbers up to
    # float rounding (perf.cfg_batching).
    separate_cfg: bool = False
    # lora mode, one process: no-grad forwards with the adapter merged into the weights for the call, without peft's
    # wrappers (perf.lora_forward=merged); the same numbers up to float rounding.
    merged_no_grad: bool = False
    skipped: int = 0  # backwards skipped because their loss was not finite

    def _ctx(self):
        if self.host is None:
            return contextlib.nullcontext(self.module)
        return self.host.use(self.adapter)

    def velocity(self, x: Tensor, s: Tensor, cond: Cond) -> Tensor:
        timing.count_forward(x.shape[0], grad=torch.is_grad_enabled() and self.trainable)
        if self.merged_no_grad and not torch.is_grad_enabled() and self.engine is None and self.host is not None:
            merged = self.host.merged_forward()
            if merged is not None:
                return merged(self.adapter, x, s, cond)
        with self._ctx() as m:
            return m.velocity(x, s, cond) if self.engine is None else self.engine(x, s, cond)

    def backward(self, loss: Tensor) -> None:
        """loss.backward(), or the engine's backward, which also reduces the gradients across ranks. In one process a
        non-finite loss is skipped (counted in `skipped`): its gradients would make the role's weights non-finite."""
        if self.engine is None:
            if not bool(torch.isfinite(loss.detach()).all()):
                self.skipped += 1
                return
            loss.backward()
        else:
            self.engine.backward(loss)

    def velocity_cfg(self, x: Tensor, s: Tensor, cond: Cond) -> tuple[Tensor, Tensor]:
        """(v_cond, v_uncond) in one batched call (or two, separate_cfg)."""
        if self.separate_cfg:
            return self.velocity(x, s, cond), self.velocity(x, s, cond.uncond())
        v = self.velocity(torch.cat([x, x]), torch.cat([s, s]), Cond.cat([cond, cond.uncond()]))
        return v.chunk(2)

    def parameters(self) -> list[nn.Parameter]:
        """The tensors this role owns (trainable or EMA copies); empty for the reference."""
        if self.host is not None:
            return [] if self.adapter is None else self.host.adapter_params(self.adapter)
        return [] if self.name == "reference" else list(self.module.parameters())

    # The rest of the FlowModel protocol: shared by every role.
    def _base(self) -> nn.Module:
        return self.host.model if self.host is not None else self.module

    def encode_prompts(self, prompts: list[str]) -> Cond:
        return self._base().encode_prompts(prompts)

    def decode(self, x0: Tensor) -> Tensor:
        return self._base().decode(x0)

    def latent_shape(self, height: int, width: int) -> tuple[int, ...]:
        return self._base().latent_shape(height, width)


@dataclass
class Roles:
    mode: str
    reference: Role
    generator: Role
    generator_ema: Role
    fake: Role | None = None
    surrogate: Role | None = None
    slow_surrogate: Role | None = None
    host: _AdapterHost | None = field(default=None, repr=False)

    def active(self) -> dict[str, Role]:
        """Every role that exists in this run, by name (reference included)."""
        names = ("reference", "generator", "generator_ema", "fake", "surrogate", "slow_surrogate")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def trainable(self) -> dict[str, list[nn.Parameter]]:
        return {n: r.parameters() for n, r in self.active().items() if r.trainable}

    def state_params(self) -> dict[str, nn.Parameter]:
        """Every role-owned parameter (not the frozen teacher), keyed `<role>/<param name>`."""
        out = {}
        for n, r in self.active().items():
            if n == "reference":
                continue
            named = r.host.model.named_parameters() if r.host is not None else r.module.named_parameters()
            own = {id(p) for p in r.parameters()}
            out.update({f"{n}/{k}": p for k, p in named if id(p) in own})
        return out

    def state_tensors(self) -> dict[str, Tensor]:
        """Every role-owned tensor (not the frozen teacher), keyed `<role>/<param name>`."""
        return {k: p.detach() for k, p in self.state_params().items()}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        mine = self.state_tensors()
        missing, unexpected = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        if missing or unexpected:
            raise KeyError(f"role tensors do not match this run: missing {missing[:4]}, unexpected {unexpected[:4]}")
        for k, t in mine.items():
            if t.shape != tensors[k].shape:
                raise KeyError(f"role tensor {k}: shape {tuple(tensors[k].shape)}, expected {tuple(t.shape)}")
            t.copy_(tensors[k])

    @torch.no_grad()
    def export(self, role: str = "generator_ema") -> dict[str, Tensor]:
        """Plain model weights of one role (adapters merged into the base in lora mode)."""
        r = getattr(self, role)
        if r.host is None:
            return {k: v.detach().clone() for k, v in r.module.state_dict().items()}
        peft = copy.deepcopy(self.host.peft)
        merged = peft.merge_and_unload(adapter_names=[r.adapter])
        return {k: v.detach().clone() for k, v in merged.state_dict().items()}

    def adapter_tensors(self, role: str = "generator_ema") -> dict[str, Tensor]:
        """lora mode: one role's adapter tensors keyed by module path with the adapter name removed."""
        r = getattr(self, role)
        if r.host is None:
            raise ValueError("adapter_tensors needs roles.mode=lora")
        named = dict(self.host.model.named_parameters())
        own = {id(p) for p in r.parameters()}
        return {k.replace(f".{r.adapter}.", "."): p.detach().clone() for k, p in named.items() if id(p) in own}


def _lora_config(cfg: RolesConfig, role: str = "generator"):
    """The adapter settings of one role: the surrogate and its slow copy may have their own rank."""
    from peft import LoraConfig

    rank = cfg.lora_rank
    if role in ("surrogate", "slow_surrogate") and cfg.surrogate_lora_rank is not None:
        rank = cfg.surrogate_lora_rank
        if rank < 1:
            raise ConfigError(f"roles.surrogate_lora_rank must be >= 1 (or unset: roles.lora_rank), got {rank}")
    alpha = cfg.lora_alpha * rank / cfg.lora_rank
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=cfg.lora_targets, lora_dropout=0.0)


def _build_lora(
    cfg: RolesConfig,
    teacher: nn.Module,
    names: list[str],
    generator_adapter: dict[str, Tensor] | None,
    place: Placement,
    fake_adapter: dict[str, Tensor] | None = None,
) -> Roles:
    from peft import get_peft_model

    base = copy.deepcopy(teacher).eval()
    peft = get_peft_model(base, _lora_config(cfg, names[0]), adapter_name=names[0])
    for n in names[1:]:
        peft.add_adapter(n, _lora_config(cfg, n))
    for p in peft.parameters():
        p.requires_grad_(False)
    host = _AdapterHost(peft, {n for n in names if n in TRAINABLE})
    roles = {n: Role(n, n in TRAINABLE, host=host, adapter=n) for n in names}
    if generator_adapter is not None:
        _load_adapter(host, "generator", generator_adapter)
    if fake_adapter is not None:
        if "fake" not in roles:
            raise ValueError("fake_init given but this run has no fake score")
        _load_adapter(host, "fake", fake_adapter)
    with torch.no_grad():
        for shadow, src in SHADOWS.items():  # shadows start equal to their source
            if shadow in roles:
                for pd, ps in zip(host.adapter_params(shadow), host.adapter_params(src), strict=True):
                    pd.copy_(ps)
    host._activate(names[0])
    place(host.model)
    return Roles("lora", Role("reference", False, host=host, adapter=None), host=host, **roles)


@torch.no_grad()
def _load_adapter(host: _AdapterHost, adapter: str, tensors: dict[str, Tensor]) -> None:
    named = {k.replace(f".{adapter}.", "."): p for k, p in host.model.named_parameters() if f".{adapter}." in k}
    if set(named) != set(tensors):
        diff = sorted(set(named) ^ set(tensors))
        raise KeyError(f"{adapter} adapter does not match roles.lora_* (rank/targets); differing keys: {diff[:4]}")
    for k, p in named.items():
        p.copy_(tensors[k])


def _build_full(
    cfg: RolesConfig,
    teacher: nn.Module,
    names: list[str],
    generator: nn.Module | None,
    place: Placement,
    fake: nn.Module | None = None,
) -> Roles:
    if fake is not None and "fake" not in names:
        raise ValueError("fake_init given but this run has no fake score")
    roles: dict[str, Role] = {}
    for n in names:
        # a shadow starts equal to its source role: a copy of the same model
        src = generator if n in ("generator", "generator_ema") and generator is not None else teacher
        src = fake if n == "fake" and fake is not None else src
        m = place(copy.deepcopy(src).eval().requires_grad_(n in TRAINABLE))
        roles[n] = Role(n, n in TRAINABLE, module=m)
    reference = place(copy.deepcopy(teacher).eval().requires_grad_(False))
    return Roles("full", Role("reference", False, module=reference), **roles)


def build_roles(
    cfg: RolesConfig,
    teacher: nn.Module,
    *,
    surrogate: bool = True,
    fake: bool = True,
    generator_init: nn.Module | dict[str, Tensor] | None = None,
    place: Placement | None = None,
    fake_init: nn.Module | dict[str, Tensor] | None = None,
) -> Roles:
    """Wire the roles around a teacher model.

    generator_init: full mode, a model with the few-step generator's weights; lora mode, the generator
    adapter tensors (`Roles.adapter_tensors`). None starts the generator at the teacher. `fake_init`: the same
    for the fake score (None = the teacher). `surrogate`
    adds the surrogate and its slow copy (TDM-R1); `fake` the fake score (both TDM and TDM-R1).
    `place` is applied to each module as soon as it is built (ZeRO-3 partitions it there: Dist.place).
    The teacher itself is never modified.
    """
    place = place or (lambda m: m)
    names = (
        ["generator", "generator_ema"]
        + (["fake"] if fake else [])
        + (["surrogate", "slow_surrogate"] if surrogate else [])
    )
    if cfg.mode == "lora":
        if isinstance(generator_init, nn.Module) or isinstance(fake_init, nn.Module):
            raise TypeError("roles.mode=lora starts the generator / fake from adapter tensors, not a model")
        return _build_lora(cfg, teacher, names, generator_init, place, fake_init)
    if cfg.mode == "full":
        for init in (generator_init, fake_init):
            if init is not None and not isinstance(init, nn.Module):
                raise TypeError("roles.mode=full starts the generator / fake from a model, not adapter tensors")
        return _build_full(cfg, teacher, names, generator_init, place, fake_init)
    raise ValueError(f"unknown roles.mode {cfg.mode!r}")
