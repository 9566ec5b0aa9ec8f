"""`tdm-r1 plan`: what a config costs on N GPUs before it is launched: memory per GPU by component, FLOPs per epoch
by phase, time per epoch at an MFU, and what to change when it does not fit.

Parameter counts are exact: the transformer is built on the meta device from its config (the diffusers folder's
`transformer/config.json`, or the published architecture with `published=True`; the toy from `model:`), and the
VAE and text encoders are counted from their folders' safetensors headers. A forward's FLOPs are counted by
torch.utils.flop_counter over one sample's forward on the meta device (the ops' shapes, no arithmetic); an epoch's
are that times the forward-equivalents DESIGN section 5 prescribes per image and phase.

Memory per GPU, bytes (b = 2 for bf16 / fp16 weights, 4 for fp32):
  weights      b per parameter of every role's copy (lora: one base + 5 adapters; full: 6 models)
  gradients    4 per trainable parameter (fp32 accumulation over the epoch)
  optimizer    8 (Adam m, v) + 4 (DeepSpeed's fp32 partition; the fp32 master of 16-bit weights) per trainable one
  ZeRO stage 3 divides the weights, 2 and up the gradients, 1 and up the optimizer states, by the world size
  gathered     stage 3: whole copies of the parameters a forward gathers, kept while reused within
               distributed.max_reuse_distance (the default: all of them): one base (lora), four models (full: the
               generator phase runs generator, reference, fake and surrogate), each at most max_live_parameters
  gather buffers  stage 3: 3 x prefetch_bucket_size parameters (measured)
  activations  what one differentiable forward saves per sample, counted on the meta device with attention as a
               fused kernel saves it (q, k, v, output), times the per-GPU micro-batch; with gradient checkpointing
               every block's input plus one block's saved tensors
  backward work   a third of the activations (measured: gradients of the block being differentiated)
  VAE, and on CUDA ~2 GB of context and allocator slack; text encoders are reported as the encode-phase peak (they
  leave the GPU afterwards) and are resident on CPU runs.
The constants marked measured come from benchmarks/plan_check.py (2 CPU ranks, ZeRO-3, a ~200M-parameter
Z-Image-shaped model); docs/benchmarks.md has its predicted-vs-measured table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from tdm_r1.config import Config, ConfigError, is_diffusers
from tdm_r1.models import published as arch

GB = 1024**3
# name -> (memory GiB, dense bf16 peak TFLOP/s)
GPUS = {"h100": (80.0, 989.0), "h200": (141.0, 989.0), "a100": (80.0, 312.0), "l40s": (48.0, 362.0)}
CONTEXT_B = 2 * GB  # CUDA context + allocator slack per GPU
# Used when no --mfu is given, and labelled "assumed" in every plan: measure one with `tdm-r1 bench` on the card.
MFU_ASSUMED = 0.3
# Measured on a 2-rank CPU ZeRO-3 run (benchmarks/plan_check.py, docs/benchmarks.md): the peak grows by 3 prefetch
# buckets of parameters (DeepSpeed's flat gather buffer, the collective's copy, the next bucket prefetched) and by a
# third of the saved activations (the gradients of the block being differentiated, beside its saved tensors).
GATHER_BUFFERS = 3
GATHERED_FULL_ROLES = 4
BACKWARD_WORK = 1 / 3
ZIMAGE_CAPTION_TOKENS = 128  # a typical chat-templated caption (Z-Image drops the padding before its transformer)


@dataclass
class Shape:
    """What the memory and FLOP formulas need of a model."""

    params: int  # transformer (the toy: the whole model)
    lora: int  # one adapter at roles.lora_rank (lora mode)
    lora_surrogate: int  # the surrogate's adapter (roles.surrogate_lora_rank)
    gathered_block: int  # largest transformer block
    blocks: int
    width: int
    tokens: int  # per sample and forward: image patches + text tokens
    vae: int
    text: int
    forward_flops: float  # one sample's transformer forward
    activation_bytes: int = 0  # what one sample's differentiable forward saves for its backward, in fp32


def _count(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _lora_count(model: torch.nn.Module, pattern: str, rank: int, prefix: str = "") -> int:
    rx = re.compile(pattern)
    return sum(
        rank * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and rx.fullmatch(prefix + n)
    )


def _safetensors_params(folder: Path) -> int:
    """Parameters of every *.safetensors under folder, from their headers (nothing loaded)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                numel = 1
                for d in v["shape"]:
                    numel *= d
                total += numel
    return total


def _counted_flops(forward) -> float:
    """FLOPs of forward() on meta tensors, counted by torch.utils.flop_counter from the ops' shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()  # under the meta device too: tensors a model builds lazily (rotary tables) must not be real
    return float(counter.get_total_flops())


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention while saved activations are counted: it saves what a fused (flash / memory-
    efficient) kernel keeps, q, k, v and the output, not the tokens^2 probabilities of the math path meta tensors would
    otherwise take."""

    @staticmethod
    def forward(ctx, q, k, v, attend):
        out = attend()
        ctx.save_for_backward(q, k, v, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the count needs the forward only
        raise NotImplementedError


def saved_activation_bytes(model: torch.nn.Module, forward, grad_input: Tensor) -> int:
    """Bytes autograd saves for the backward of forward() (parameters excluded, each storage once), with the model's
    parameters frozen and `grad_input` requiring grad: what a LoRA role's differentiable forward keeps (full mode keeps
    the same inputs for its weight gradients). Attention counts as a fused kernel's. Works on the meta device."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):  # the names callers pass them by
        q, k, v = query.detach(), key.detach(), value.detach()
        return _FusedAttention.apply(query, key, value, lambda: sdpa(q, k, v, *args, **kwargs))

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    model.requires_grad_(False)
    grad_input.requires_grad_(True)
    F.scaled_dot_product_attention = attention
    try:
        with torch.device(grad_input.device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        F.scaled_dot_product_attention = sdpa
    return sum(seen.values())


def shape_of(cfg: Config, published: bool = False) -> Shape:
    """The Shape of cfg's model: built on the meta device from its config, or the published one (`published`)."""
    rc = cfg.roles
    sur_rank = rc.surrogate_lora_rank or rc.lora_rank
    if not is_diffusers(cfg):
        from tdm_r1.models.tiny_dit import build_tiny_dit

        with torch.device("meta"):
            m = build_tiny_dit(cfg.model, cfg.world)
            x, s = torch.zeros(1, cfg.world.channels, cfg.world.height, cfg.world.width), torch.zeros(1)
            tokens = torch.zeros(1, cfg.model.text_len + 1, dtype=torch.long)
        n_tokens = cfg.model.text_len + 1 + m.grid[0] * m.grid[1]
        block = max(_count(b) for b in m.blocks)
        lora, lora_s = (_lora_count(m, rc.lora_targets, r) for r in (rc.lora_rank, sur_rank))
        flops = _counted_flops(lambda: m(x, s, tokens))
        act = saved_activation_bytes(m, lambda: m(x, s, tokens), x)
        return Shape(_count(m), lora, lora_s, block, cfg.model.depth, cfg.model.dim, n_tokens, 0, 0, flops, act)
    return _diffusers_shape(cfg, published, sur_rank)


def _diffusers_shape(cfg: Config, published: bool, sur_rank: int) -> Shape:
    dc, rc = cfg.diffusers, cfg.roles
    folder = Path(dc.path)
    factor = 8  # VAE downsampling
    if published:
        config = dict(arch.TRANSFORMER[cfg.model.kind])
        vae, text = arch.vae_params(cfg.model.kind), arch.text_encoder_params(cfg.model.kind)
    else:
        cfg_file = folder / "transformer" / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(
                f"plan: {cfg_file} not found (diffusers.path={dc.path!r}); download the model or pass --published"
            )
        config = {k: v for k, v in json.loads(cfg_file.read_text()).items() if not k.startswith("_")}
        vae = _safetensors_params(folder / "vae")
        vae_cfg = folder / "vae" / "config.json"
        if vae_cfg.is_file():
            factor = 2 ** (len(json.loads(vae_cfg.read_text()).get("block_out_channels", [0] * 4)) - 1)
        text = sum(_safetensors_params(d) for d in sorted(folder.glob("text_encoder*")))
    if cfg.model.kind == "sd3":
        from diffusers import SD3Transformer2DModel as cls
    else:
        from diffusers import ZImageTransformer2DModel as cls
    with torch.device("meta"):
        m = cls(**config)
    blocks = [b for b in m.modules() if type(b).__name__.endswith("TransformerBlock")]
    width = config.get("dim") or config["num_attention_heads"] * config["attention_head_dim"]
    patch = (config.get("all_patch_size") or [config.get("patch_size", 2)])[0]
    h, w = dc.height // factor, dc.width // factor
    with torch.device("meta"):
        if cfg.model.kind == "sd3":  # CLIP's 77 tokens, then T5's (padded to max_sequence_length)
            text_tokens = 77 + (dc.max_sequence_length or 256)
            args = dict(
                hidden_states=torch.zeros(1, config["in_channels"], h, w),
                encoder_hidden_states=torch.zeros(1, text_tokens, config["joint_attention_dim"]),
                pooled_projections=torch.zeros(1, config["pooled_projection_dim"]),
                timestep=torch.zeros(1),
            )
            forward = lambda: m(**args, return_dict=False)  # noqa: E731
            grad_input = args["hidden_states"]
        else:  # only a caption's real tokens reach Z-Image's transformer: a typical caption's, at most the maximum
            text_tokens = min(dc.max_sequence_length or 512, ZIMAGE_CAPTION_TOKENS)
            latents = [torch.zeros(config["in_channels"], 1, h, w)]
            captions = [torch.zeros(text_tokens, config["cap_feat_dim"])]
            forward = lambda: m(latents, torch.zeros(1), captions, return_dict=False)  # noqa: E731
            grad_input = latents[0]
    tokens = (h // patch) * (w // patch) + text_tokens
    lora, lora_s = (_lora_count(m, rc.lora_targets, r, "transformer.") for r in (rc.lora_rank, sur_rank))
    flops = _counted_flops(forward)
    act = saved_activation_bytes(m, forward, grad_input)  # without checkpointing (memory() divides it by blocks)
    return Shape(_count(m), lora, lora_s, max(_count(b) for b in blocks), len(blocks), width, tokens, vae, text,
                 flops, act)  # fmt: skip


@dataclass
class Setup:
    """How the run is laid out: what the formulas vary when they look for a layout that fits."""

    gpus: int
    mode: str  # lora / full
    zero_stage: int
    micro_batch: int  # samples per GPU per differentiable forward
    weight_bytes: int  # 2 (bf16 / fp16) or 4
    checkpointing: bool
    offload_optimizer: bool
    max_live: int  # stage 3: gathered parameters kept live (elements)
    cuda: bool
    prefetch: int = 50_000_000  # stage 3: distributed.prefetch_bucket_size (elements)


def setup_of(cfg: Config, gpus: int, cuda: bool = True) -> Setup:
    tc, d = cfg.train, cfg.distributed
    if is_diffusers(cfg):
        wb, ckpt = (4 if cfg.diffusers.dtype == "fp32" else 2), cfg.diffusers.gradient_checkpointing
    else:
        wb, ckpt = 4, False
    if gpus > 1 and d.bf16 and is_diffusers(cfg):
        wb = 2
    mb = max(1, tc.micro_batch_groups * tc.group_size // gpus)
    stage = d.zero_stage if gpus > 1 else 0
    return Setup(
        gpus,
        cfg.roles.mode,
        stage,
        mb,
        wb,
        ckpt,
        d.offload_optimizer,
        d.max_live_parameters,
        cuda,
        d.prefetch_bucket_size,
    )


def memory(shape: Shape, s: Setup) -> dict[str, float]:
    """Bytes per GPU by component (and `total`); `text_encoders` is the encode-phase peak, not in the total."""
    if s.mode == "lora":
        trainable = 2 * shape.lora + shape.lora_surrogate
        weights = s.weight_bytes * (shape.params + 3 * shape.lora + 2 * shape.lora_surrogate)
        model = shape.params
    else:
        trainable = 3 * shape.params
        weights = 6 * s.weight_bytes * shape.params
        model = shape.params
    grad_b = 4
    # Adam's two moments, and DeepSpeed's fp32 partition of the weights (kept at any stage >= 1, also for fp32 weights;
    # measured) or the fp32 master of 16-bit weights without it
    opt_b = 8 + (4 if s.weight_bytes == 2 or s.zero_stage >= 1 else 0)
    n = s.gpus
    out = {
        "weights": weights / (n if s.zero_stage >= 3 else 1),
        "gradients": grad_b * trainable / (n if s.zero_stage >= 2 else 1),
        "optimizer": 0.0 if s.offload_optimizer else opt_b * trainable / (n if s.zero_stage >= 1 else 1),
    }
    # A gathered parameter is a whole copy beside the rank's own partition, and stays gathered while it is used again
    # within max_reuse_distance: one base in lora mode; in full mode every role the generator phase runs (generator,
    # reference, fake, surrogate) is its own model, each up to max_live of it.
    copies = 1 if s.mode == "lora" else GATHERED_FULL_ROLES
    out["gathered"] = copies * s.weight_bytes * min(model, s.max_live) if s.zero_stage >= 3 else 0.0
    act_b = s.weight_bytes
    saved = shape.activation_bytes * act_b / 4  # counted in fp32
    # checkpointing keeps each block's input and recomputes one block at a time in the backward
    per_sample = shape.blocks * shape.tokens * shape.width * act_b + saved / shape.blocks if s.checkpointing else saved
    out["gather_buffers"] = GATHER_BUFFERS * s.weight_bytes * min(s.prefetch, model) if s.zero_stage >= 3 else 0.0
    out["activations"] = float(s.micro_batch * per_sample)
    out["backward_work"] = BACKWARD_WORK * out["activations"]
    out["vae"] = float(s.weight_bytes * shape.vae)
    out["context"] = float(CONTEXT_B if s.cuda else 0)
    out["total"] = sum(out.values())
    out["text_encoders"] = float(s.weight_bytes * shape.text)
    return out


def flops_per_epoch(shape: Shape, cfg: Config, checkpointing: bool) -> dict[str, float]:
    """Transformer FLOPs of one epoch by phase (DESIGN section 5's forward counts; a backward = 2 forwards, plus one
    recompute with gradient checkpointing)."""
    tc, k, m = cfg.train, cfg.tdm.steps, cfg.tdm.steps_per_batch
    images = tc.prompts_per_epoch * tc.group_size
    grad = 3 if checkpointing else 2
    per_image = {"rollout": k, "fake": m * (2 + grad), "surrogate": m * (3 + grad), "generator": m * (7 + grad)}
    return {p: images * f * shape.forward_flops for p, f in per_image.items()}


def plan(cfg: Config, gpus: int, gpu: str = "h100", mfu: float | None = None, published: bool = False) -> dict:
    if gpus < 1:
        raise ConfigError(f"plan: --gpus must be >= 1, got {gpus}")
    if gpu not in GPUS:
        raise ConfigError(f"plan: unknown --gpu {gpu!r}; choose from {', '.join(GPUS)}")
    capacity_gib, peak = GPUS[gpu]
    shape = shape_of(cfg, published)
    setup = setup_of(cfg, gpus)
    mem = memory(shape, setup)
    flops = flops_per_epoch(shape, cfg, setup.checkpointing)
    used_mfu = MFU_ASSUMED if mfu is None else mfu
    seconds = sum(flops.values()) / (gpus * peak * 1e12 * used_mfu)
    fits = mem["total"] <= capacity_gib * GB
    return {
        "gpu": gpu,
        "gpus": gpus,
        "capacity_gib": capacity_gib,
        "shape": asdict(shape),
        "setup": asdict(setup),
        "memory_gib": {k: v / GB for k, v in mem.items()},
        "fits": fits,
        "flops_per_epoch": flops,
        "mfu": used_mfu,
        "mfu_source": "assumed" if mfu is None else "given",
        "epoch_s": seconds,
        "suggestions": [] if fits else suggestions(shape, setup, capacity_gib * GB),
    }


def suggestions(shape: Shape, s: Setup, capacity: float) -> list[dict]:
    """Layouts that change one thing (or add GPUs) and their totals, the ones that fit first."""
    tries = [
        ("LoRA roles (roles.mode: lora)", replace(s, mode="lora")),
        ("ZeRO stage 3 (distributed.zero_stage: 3)", replace(s, zero_stage=3 if s.gpus > 1 else s.zero_stage)),
        ("optimizer states in CPU memory (distributed.offload_optimizer: true)", replace(s, offload_optimizer=True)),
        ("gradient checkpointing (diffusers.gradient_checkpointing: true)", replace(s, checkpointing=True)),
        ("half the micro-batch (train.micro_batch_groups)", replace(s, micro_batch=max(1, s.micro_batch // 2))),
        ("fewer live gathered parameters (distributed.max_live_parameters: 1e8)", replace(s, max_live=10**8)),
    ]
    out = []
    for what, t in tries:
        if t != s:
            total = memory(shape, t)["total"]
            out.append({"change": what, "total_gib": total / GB, "fits": total <= capacity})
    for n in (2, 4, 8, 16, 32, 64, 128):
        if n > s.gpus:
            t = replace(s, gpus=n, zero_stage=3, micro_batch=max(1, s.micro_batch * s.gpus // n))
            total = memory(shape, t)["total"]
            if total <= capacity:
                out.append({"change": f"{n} GPUs with ZeRO-3", "total_gib": total / GB, "fits": True})
                break
    return sorted(out, key=lambda r: (not r["fits"], r["total_gib"]))


def render(result: dict) -> str:
    sh, st = result["shape"], result["setup"]
    lines = [
        f"{result['gpus']} x {result['gpu']} ({result['capacity_gib']:.0f} GiB), roles {st['mode']}, "
        f"ZeRO {st['zero_stage']}, "
        f"{st['micro_batch']} samples per GPU per forward; transformer {sh['params'] / 1e6:.1f}M parameters, "
        f"one adapter {sh['lora'] / 1e6:.2f}M, {sh['tokens']} tokens per sample",
        "",
        "| memory per GPU | GiB |",
        "|---|---:|",
    ]
    for k, v in result["memory_gib"].items():
        names = {"total": "**total**", "text_encoders": "text encoders (encode phase, not in total)"}
        name = names.get(k, k)
        lines.append(f"| {name} | {v:.2f} |")
    lines += ["", "| FLOPs per epoch | TFLOP |", "|---|---:|"]
    lines += [f"| {k} | {v / 1e12:.1f} |" for k, v in result["flops_per_epoch"].items()]
    lines += [
        "",
        f"epoch: {result['epoch_s']:.1f} s at MFU {result['mfu']:.2f} ({result['mfu_source']}); "
        + ("fits" if result["fits"] else "DOES NOT FIT"),
    ]
    for sug in result["suggestions"]:
        lines.append(f"- {sug['change']}: {sug['total_gib']:.1f} GiB{'' if sug['fits'] else ' (still too much)'}")
    return "\n".join(lines) + "\n"
