"""Distribution over ranks (DESIGN section 7): the only module that imports deepspeed or torch.distributed.

A process started by `deepspeed` or `torchrun` joins the process group (`init`) and its roles run through DeepSpeed
engines (`wrap_roles`). `full` mode: one engine per trainable role, and under ZeRO-3 the frozen reference and the EMA
copies are partitioned too (optimizer-less engines). `lora` mode: one engine over the shared base, which must be
partitioned once, with one AdamW parameter group per trainable adapter (own lr / betas); DeepSpeed clips that
engine's joint gradient norm. A plain process gets `LOCAL`, on which every collective is the identity, so the
single-process trainer runs the same code and draws the same numbers.

Rows: an epoch's P x G samples are split so that each rank holds an equal contiguous slice of every global
micro-batch (`Split`); a prompt group may span ranks, so group sums are all-reduced. Every random draw is made for
the whole global micro-batch from a generator in the same state on every rank and then sliced (`Shard`): a sample's
noise does not depend on the number of ranks, and shared draws (step indices j, k) agree without communication.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from tdm_r1.config import ConfigError, DistributedConfig, OptimConfig, TrainConfig

if TYPE_CHECKING:
    from tdm_r1.roles import Roles

# -- rows: which samples a rank holds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Rows [lo, hi) of one global micro-batch of `size` samples in `groups` prompt groups, the first of which is
    group `first_group` of the epoch."""

    lo: int
    hi: int
    size: int
    groups: int
    first_group: int

    def take(self, t: Tensor) -> Tensor:
        """This rank's rows of a tensor drawn for the whole micro-batch."""
        return t if (self.lo, self.hi) == (0, self.size) else t[self.lo : self.hi]

    def full(self, value: float, device: torch.device | None = None) -> Tensor:
        """[size] filled with `value`: a per-sample schedule tensor of the whole micro-batch."""
        return torch.full((self.size,), float(value), device=device)

    def randn(self, shape: tuple[int, ...], gen: torch.Generator, device: torch.device | None = None) -> Tensor:
        """[hi - lo, *shape]: this rank's rows of one standard-normal draw for the whole micro-batch."""
        t = self.take(torch.randn((self.size, *shape), generator=gen))
        return t if device is None else t.to(device)


@dataclass(frozen=True)
class Split:
    """An epoch of `n` samples (prompt-major, `group` per prompt) in global micro-batches of `chunk` samples; this
    rank holds rows [rank * m, (rank + 1) * m) of each micro-batch of size world * m."""

    n: int
    chunk: int
    group: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        sizes = sorted({b - a for a, b in self._bounds()})
        if any(s % self.world for s in sizes):
            raise ConfigError(
                f"global micro-batches of {' and '.join(map(str, sizes))} samples (train.micro_batch_groups x "
                f"train.group_size, and the rest of train.prompts_per_epoch) do not split over {self.world} ranks"
            )

    def _bounds(self) -> list[tuple[int, int]]:
        return [(a, min(a + self.chunk, self.n)) for a in range(0, self.n, self.chunk)]

    def micro_batches(self) -> list[tuple[slice, Shard]]:
        """(this rank's rows of the micro-batch in its local batch, the micro-batch's Shard), in order."""
        out, start = [], 0
        for a, b in self._bounds():
            m = (b - a) // self.world
            shard = Shard(self.rank * m, (self.rank + 1) * m, b - a, -(-(b - a) // self.group), a // self.group)
            out.append((slice(start, start + m), shard))
            start += m
        return out

    def rows(self, rank: int | None = None) -> Tensor:
        """Epoch indices of a rank's samples, in its local order."""
        r = self.rank if rank is None else rank
        w = self.world
        return torch.cat([torch.arange(a + r * (b - a) // w, a + (r + 1) * (b - a) // w) for a, b in self._bounds()])

    def take(self, t: Tensor) -> Tensor:
        return t if self.world == 1 else t[self.rows()]

    def take_list(self, items: list) -> list:
        return items if self.world == 1 else [items[i] for i in self.rows().tolist()]


def epoch_split(tc: TrainConfig, dist: Dist, micro_batch_per_gpu: int = 0) -> Split:
    """The epoch layout of a TDM-R1 run on `dist`; checks distributed.micro_batch_per_gpu when it is set."""
    chunk = tc.micro_batch_groups * tc.group_size
    if micro_batch_per_gpu and chunk != micro_batch_per_gpu * dist.world:
        raise ConfigError(
            f"distributed.micro_batch_per_gpu={micro_batch_per_gpu} on {dist.world} ranks needs global micro-batches "
            f"of {micro_batch_per_gpu * dist.world} samples, but train.micro_batch_groups x train.group_size = {chunk} "
            "(--set distributed.micro_batch_per_gpu=0 to run it anyway)"
        )
    return Split(tc.prompts_per_epoch * tc.group_size, chunk, tc.group_size, dist.rank, dist.world)


# -- the process group --------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """Rank, world size, device and collectives of this process. `LOCAL` (one process, no DeepSpeed) makes every
    collective the identity."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ds_config: dict | None = None  # the engines' DeepSpeed config; None = no DeepSpeed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def deepspeed(self) -> bool:
        return self.ds_config is not None

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config["zero_optimization"].get("stage", 0)) if self.ds_config else 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.ds_config and self.ds_config.get("bf16", {}).get("enabled") else torch.float32

    def print(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks (a new tensor; `t` itself when there is one rank)."""
        if self.world == 1:
            return t
        buf = t.detach().to(self.device, copy=True)
        tdist.all_reduce(buf)
        return buf.to(t.device)

    def mean(self, t: Tensor) -> Tensor:
        """Mean over ranks of a per-rank mean over equally many samples = the mean over all of them."""
        return t if self.world == 1 else self.all_reduce_sum(t) / self.world

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's `t` (same shape on every rank), in rank order."""
        if self.world == 1:
            return [t]
        buf = t.detach().to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world)]
        tdist.all_gather(out, buf.contiguous())
        return [o.to(t.device) for o in out]

    def broadcast_object(self, obj, src: int = 0):
        """Rank `src`'s picklable value on every rank (decisions that must agree, e.g. whether a cache exists)."""
        if self.world == 1:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def check_same(self, t: Tensor, what: str) -> None:
        """Fail loudly when ranks disagree on a value they must share (e.g. the state of the shared random stream)."""
        if self.world > 1 and any(not torch.equal(o, t) for o in self.all_gather(t)):
            raise RuntimeError(f"ranks disagree on {what}; the run would silently diverge")

    def gather_rows(self, local: Tensor, split: Split) -> Tensor:
        """[n, ...] in epoch order from every rank's rows [n / world, ...] (the inverse of split.take)."""
        if self.world == 1:
            return local
        parts = self.all_gather(local)
        out = torch.empty((split.n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        for r, part in enumerate(parts):
            out[split.rows(r).to(local.device)] = part
        return out

    def group_score_sum(self, groups: int) -> Callable[[Tensor], Tensor] | None:
        """The cross-rank sum of a micro-batch's [<= groups] partial group scores (None on one rank: no-op)."""
        if self.world == 1:
            return None

        def total(partial: Tensor) -> Tensor:
            padded = torch.zeros(groups, dtype=partial.dtype, device=partial.device)
            padded[: partial.numel()] = partial
            return self.all_reduce_sum(padded)[: partial.numel()]

        return total

    def mean_metrics(self, rec: dict[str, float]) -> dict[str, float]:
        """Per-rank means of equally many samples -> means over all samples (values equal on every rank stay)."""
        if self.world == 1:
            return rec
        keys = sorted(rec)
        mean = self.mean(torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, mean.tolist())}

    def place(self, module: nn.Module) -> nn.Module:
        """Partition a freshly built role module right away under ZeRO-3 (so no rank holds every role whole)."""
        if self.zero_stage != 3:
            return module
        import deepspeed

        module.to(dtype=self.dtype)  # zero.Init partitions a built module as it is; the engines do not cast it later
        deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config)
        return module


LOCAL = Dist()


def device_for(requested: str, local_rank: int, cuda_count: int) -> torch.device:
    """Where this rank runs a model or reward: requested "auto" = the rank's own GPU when there are GPUs
    (cuda:local_rank when each rank sees them all; cuda:0 when each sees only its own, as with one
    CUDA_VISIBLE_DEVICES per rank), else the CPU; "cuda" the same but a GPU is required; "cuda:N" exactly that one;
    "cpu". Errors name what is missing."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested in ("auto", "cuda"):
        if cuda_count == 0:
            if requested == "cuda":
                raise ConfigError("device cuda: no CUDA device is visible to this process")
            return torch.device("cpu")
        if local_rank < cuda_count:
            return torch.device("cuda", local_rank)
        if cuda_count == 1:
            return torch.device("cuda", 0)
        raise ConfigError(
            f"local rank {local_rank} has no GPU of its own: {cuda_count} are visible (launch at most {cuda_count} "
            "ranks per node, or give each rank one device with CUDA_VISIBLE_DEVICES)"
        )
    if requested.startswith("cuda:") and requested[5:].isdigit():
        index = int(requested[5:])
        if index >= cuda_count:
            raise ConfigError(f"device {requested}: only {cuda_count} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise ConfigError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N")


def rank_device(requested: str = "auto") -> torch.device:
    """`device_for` this process: its LOCAL_RANK (0 without a launcher) and the CUDA devices it sees."""
    return device_for(requested, int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())


def launched() -> bool:
    """Started by `deepspeed` / `torchrun` (their environment names this process's rank)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def init(cfg: DistributedConfig, optim: OptimConfig) -> Dist:
    """Join the process group of a `deepspeed` / `torchrun` launch; LOCAL without a launcher."""
    if not launched():
        return LOCAL
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    cuda = get_accelerator().device_name() == "cuda"
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
    if not cuda:
        _skip_cpu_shm_op()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=cfg.timeout_minutes))
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return Dist(rank, world, local_rank, device, deepspeed_config(cfg, optim.grad_clip))


def _skip_cpu_shm_op() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (7 minutes on a 2-core CI
    # machine); only inference_all_reduce uses it, never training, whose collectives go through gloo.
    import importlib

    # by module name: `deepspeed.comm.torch` as an attribute is the torch package (star-imported into deepspeed.comm)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def deepspeed_config(cfg: DistributedConfig, grad_clip: float) -> dict:
    """The `distributed:` section (or its ds_config JSON) as a DeepSpeed config for the role engines."""
    if cfg.ds_config:
        path = Path(cfg.ds_config)
        if not path.is_file():
            raise ConfigError(f"distributed.ds_config: file not found: {path}")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"distributed.ds_config: {path} is not valid JSON: {e}") from e
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigError(
                    f"distributed.ds_config: {path} has an '{key}' section; each role's AdamW comes from `optim:`"
                )
        if ds.get("fp16", {}).get("enabled"):
            raise ConfigError(f"distributed.ds_config: {path} enables fp16; use bf16 (no loss scaling here)")
    else:
        zero: dict = {"stage": cfg.zero_stage, "reduce_bucket_size": cfg.reduce_bucket_size}
        if cfg.zero_stage == 3:
            zero |= {
                "stage3_param_persistence_threshold": cfg.param_persistence_threshold,
                "stage3_prefetch_bucket_size": cfg.prefetch_bucket_size,
                "stage3_max_live_parameters": cfg.max_live_parameters,
                "stage3_max_reuse_distance": cfg.max_reuse_distance,
            }
        if cfg.zero_stage == 1:
            zero["overlap_comm"] = False  # with caller-owned accumulation, overlap needs partitioned gradients
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.offload_params:
            if cfg.zero_stage != 3:
                raise ConfigError("distributed.offload_params needs distributed.zero_stage: 3")
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds = {"zero_optimization": zero, "bf16": {"enabled": cfg.bf16}}
    ds.setdefault("zero_optimization", {"stage": 0})
    stage = int(ds["zero_optimization"].get("stage", 0))
    fp32_plain = stage == 0 and not ds.get("bf16", {}).get("enabled", False)
    return ds | {
        # One engine step per role per accumulation window, whenever the trainer calls it (the trainer scales losses).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        # Plain fp32 without ZeRO: DeepSpeed reports no gradient norm, so the optimizer clips (_ClipAdamW).
        "gradient_clipping": 0.0 if fp32_plain else grad_clip,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def run_script(fn, *args) -> None:
    """Entry point of a launched script (a benchmark, a test worker): run fn(*args); an exception is printed with
    its traceback and becomes exit code 1; then `finish` ends the process."""
    code = 0
    try:
        fn(*args)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.exit(finish(code))


def finish(code: int) -> int:
    """End a process: in a process group, barrier (after success), destroy the group, flush and os._exit(code),
    since DeepSpeed can abort at interpreter exit; without one, return `code`."""
    if not tdist.is_initialized():
        return code
    try:
        if code == 0:
            tdist.barrier()
        tdist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- parameters: partitions, gathering ----------------------------------------------------------------------------


def is_partitioned(p: Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def local_views(p: nn.Parameter) -> list[Tensor]:
    """The tensors that hold this rank's values of `p`: its ZeRO-3 partition, plus the whole tensor while it is
    gathered (parameters under stage3_param_persistence_threshold stay gathered between uses); else `p` itself."""
    if not is_partitioned(p):
        return [p.data]
    return [p.ds_tensor] + ([p.data] if p.data.numel() > 0 else [])


def local_partition(p: nn.Parameter) -> Tensor:
    """This rank's values of `p` as stored: its ZeRO-3 partition, else the whole tensor."""
    return p.ds_tensor if is_partitioned(p) else p.data


def regather(params: Iterable[nn.Parameter]) -> None:
    """After partitions were written: re-gather the ZeRO-3 parameters that are kept whole (persistent ones) from
    them. Collective (every rank holds the same parameters whole); a no-op otherwise."""
    stale = [p for p in params if is_partitioned(p) and p.data.numel() > 0]
    if stale:  # release without writing back (the partitions are newer), then gather again
        stale[0].partition(stale)
        stale[0].all_gather(stale)


@contextlib.contextmanager
def gathered(params: Iterable[nn.Parameter]):
    """Every rank sees whole tensors inside (ZeRO-3 all-gather; a no-op otherwise). Read-only."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def full_state(named: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Tensor]:
    """Whole CPU copies of (possibly partitioned) parameters, gathered one tensor at a time."""
    out = {}
    for name, p in named:
        with gathered([p]):
            out[name] = p.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def load_local(params: dict[str, nn.Parameter], tensors: dict[str, Tensor]) -> None:
    """Write this rank's saved values (partitions under ZeRO-3) back into the parameters. Collective."""
    for key, p in params.items():
        local_partition(p).copy_(tensors[key])
    regather(params.values())


def local_state(params: dict[str, nn.Parameter], dist: Dist) -> dict[str, Tensor]:
    """This rank's values of the parameters: ZeRO-3 partitions on every rank; whole tensors on rank 0 otherwise."""
    if dist.zero_stage == 3:
        return {k: p.ds_tensor.detach().to("cpu", copy=True) for k, p in params.items()}
    return {k: p.detach().to("cpu", copy=True) for k, p in params.items()} if dist.is_main else {}


# -- measurement --------------------------------------------------------------------------------------------------


def memory_bytes(roles: Roles) -> dict[str, int]:
    """This rank's bytes of every role's parameters (its partitions; `params_gathered`: whole copies gathered right
    now), of the trainable ones' gradients and of their optimizer states (fp32 master partitions + AdamW moments), as
    held now: gradients exist between backward and step, AdamW moments from the first step on. `whole_*` are the same
    for unpartitioned tensors (what one rank holds without ZeRO)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_get_local_optimizer_state

    def nbytes(t: Tensor | None) -> int:
        return 0 if t is None else t.numel() * t.element_size()

    def state(p: nn.Parameter, key: str) -> Tensor | None:
        try:
            return safe_get_local_optimizer_state(p, key)
        except KeyError:  # AdamW allocates its moments at the first step
            return None

    keys = ("params", "params_gathered", "grads", "optim", "whole_params", "whole_grads", "whole_optim")
    out = dict.fromkeys(keys, 0)
    seen = set()
    for role in roles.active().values():
        params = roles.host.model.parameters() if roles.host is not None else role.module.parameters()
        for p in params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            numel = getattr(p, "ds_numel", p.numel())
            held = local_views(p)  # ZeRO-3: [partition] or [partition, whole copy while gathered]
            out["params"] += nbytes(held[0])
            out["params_gathered"] += sum(nbytes(v) for v in held[1:])
            out["whole_params"] += numel * p.element_size()
            if p.requires_grad:
                states = [state(p, k) for k in ("exp_avg", "exp_avg_sq")]
                out["grads"] += nbytes(safe_get_local_grad(p))
                out["optim"] += nbytes(safe_get_local_fp32_param(p)) + sum(nbytes(t) for t in states)
                out["whole_grads"] += numel * 4
                out["whole_optim"] += numel * 4 * 3
    return out
