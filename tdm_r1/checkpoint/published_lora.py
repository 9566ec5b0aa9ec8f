"""LoRA files in the formats people publish, as a starting point of a diffusers run's generator or fake score
(`roles.generator_init` / `roles.fake_init` in lora mode), mapped onto the run's adapter (`roles.lora_*`).

Formats read (besides the adapters `tdm-r1 distill` / `train` write, which `read_adapter` reads):
- **peft folder**: `adapter_config.json` + `adapter_model.safetensors` (peft's `save_pretrained` of a LoRA on the
  transformer); keys `base_model.model.<module>.lora_A.weight`; rank and alpha (and rank / alpha patterns, rsLoRA)
  from the config;
- **diffusers**: `pytorch_lora_weights.safetensors` (a pipeline's `save_lora_weights`, the form most published
  few-step LoRAs take, e.g. TDM's SD3.5 LoRA), or its folder; keys `transformer.<module>.lora_A.weight`; alpha from the
  file's `lora_adapter_metadata` when present, else alpha = rank (diffusers' own assumption);
- **kohya**: keys `lora_unet_<module with dots as _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (also with the
  prefix `lora_transformer_`), alpha per module (missing: alpha = rank).

`<module>` is a module path inside the transformer (`transformer_blocks.0.attn.to_q`). Each layer's update
scale * B @ A is kept exactly: B is rescaled from the file's scale (alpha / rank, or alpha / sqrt(rank) with rsLoRA)
to the run's (roles.lora_alpha / roles.lora_rank). The file's rank must equal roles.lora_rank, and its modules must
be exactly the run's targets: a layer of the file outside them or a target it lacks is an error naming the modules
(and what to set). DoRA and fused-QKV checkpoints (SAI's original SD3 key names) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from tdm_r1.checkpoint import ADAPTER_FORMAT, CheckpointError

PREFIX = "transformer."  # the transformer's path inside our flow models: adapter keys start with it
_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
_KOHYA = ("lora_unet_", "lora_transformer_")


@dataclass
class Layer:
    a: Tensor  # [rank, in]
    b: Tensor  # [out, rank]
    scale: float  # the file's multiplier of B @ A


@dataclass
class PublishedLora:
    path: Path
    kind: str  # peft | diffusers | kohya
    layers: dict[str, Layer]  # module path inside the transformer -> its update


def is_own_adapter(path: str | Path) -> bool:
    """A file written by `tdm-r1 distill` / `train` (its metadata names the adapter format)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with safe_open(str(p), "pt") as f:
            return (f.metadata() or {}).get("format") == ADAPTER_FORMAT
    except Exception:  # not a safetensors file: the published reader names what it is
        return False


def _pattern_value(name: str, patterns: dict, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _scales(config: dict, names: list[str], ranks: dict[str, int], where: Path) -> dict[str, float]:
    if config.get("use_dora"):
        raise CheckpointError(f"{where}: a DoRA adapter (use_dora: true); only plain LoRA can start a run")
    out = {}
    for n in names:
        alpha = float(_pattern_value(n, config.get("alpha_pattern"), config.get("lora_alpha", ranks[n])))
        out[n] = alpha / (math.sqrt(ranks[n]) if config.get("use_rslora") else ranks[n])
    return out


def _lora_pairs(tensors: dict[str, Tensor], prefix: str, down: str, up: str, where: Path) -> dict[str, tuple]:
    pairs: dict[str, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if not k.startswith(prefix):
            continue
        for part, suffix in (("a", f".{down}.weight"), ("b", f".{up}.weight")):
            if k.endswith(suffix):
                pairs.setdefault(k[len(prefix) : -len(suffix)], {})[part] = v
    half = sorted(n for n, p in pairs.items() if len(p) != 2)
    if half:
        raise CheckpointError(f"{where}: {len(half)} layers have only one of {down} / {up}: {half[:4]}")
    return {n: (p["a"], p["b"]) for n, p in pairs.items()}


def _resolve(path: Path) -> tuple[Path, dict | None]:
    """The weights file of `path` (a file or a folder) and the peft config beside it (None without one)."""
    if path.is_dir():
        found = [path / n for n in _FILES if (path / n).is_file()]
        if not found:
            raise CheckpointError(
                f"{path}: no LoRA weights in this folder (looked for {', '.join(_FILES)}); pass the .safetensors file"
            )
        weights = found[0]
    elif path.is_file():
        weights = path
    else:
        raise CheckpointError(f"{path}: no such LoRA file or folder")
    cfg_file = weights.parent / "adapter_config.json"
    config = json.loads(cfg_file.read_text()) if weights.name == _FILES[0] and cfg_file.is_file() else None
    return weights, config


def read_published_lora(path: str | Path) -> PublishedLora:
    """A published LoRA file or folder, as per-module (A, B, scale); the format is told from the keys."""
    weights, config = _resolve(Path(path))
    try:
        tensors = load_file(str(weights))
        with safe_open(str(weights), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{weights}: not a readable .safetensors LoRA file ({e})") from None
    if any("dora_scale" in k or "magnitude_vector" in k for k in tensors):
        raise CheckpointError(f"{weights}: a DoRA adapter (magnitude vectors); only plain LoRA can start a run")
    if any(re.search(r"joint_blocks_\d+_[xc]_block_attn_qkv|joint_blocks\.\d+\.[xc]_block\.attn\.qkv", k)
           for k in tensors):  # fmt: skip
        raise CheckpointError(
            f"{weights}: SAI's original SD3 key names (fused qkv in joint_blocks); convert it to diffusers key names "
            "first (diffusers' pipe.load_lora_weights + save_lora_weights)"
        )
    if any(k.startswith(_KOHYA) for k in tensors):
        prefix = next(p for p in _KOHYA if any(k.startswith(p) for k in tensors))
        pairs = _lora_pairs(tensors, prefix, "lora_down", "lora_up", weights)
        scales = {}
        for n, (a, _) in pairs.items():
            alpha = tensors.get(f"{prefix}{n}.alpha")
            scales[n] = (float(alpha) if alpha is not None else a.shape[0]) / a.shape[0]
        return PublishedLora(weights, "kohya", {n: Layer(a, b, scales[n]) for n, (a, b) in pairs.items()})
    if any(k.startswith("base_model.model.") for k in tensors):
        kind, prefix = "peft", "base_model.model."
        if config is None:
            raise CheckpointError(f"{weights}: peft keys (base_model.model.*) without adapter_config.json beside the "
                                  "file: its rank and alpha are unknown")  # fmt: skip
    elif any(k.startswith(PREFIX) for k in tensors):
        kind, prefix = "diffusers", PREFIX
        packed = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
        config = {k[len(PREFIX) :]: v for k, v in packed.items() if k.startswith(PREFIX)}
    else:
        sample = sorted(tensors)[:3]
        raise CheckpointError(
            f"{weights}: not a LoRA format tdm-r1 reads (keys like {sample}); it reads its own adapters, peft "
            "folders, diffusers' pytorch_lora_weights.safetensors and kohya files"
        )
    pairs = _lora_pairs(tensors, prefix, "lora_A", "lora_B", weights)
    if kind == "peft":  # a peft model wrapping a whole flow model has the transformer one level down
        pairs = {n.removeprefix(PREFIX): ab for n, ab in pairs.items()}
    ranks = {n: a.shape[0] for n, (a, _) in pairs.items()}
    scales = _scales(config, list(pairs), ranks, weights)
    return PublishedLora(weights, kind, {n: Layer(a, b, scales[n]) for n, (a, b) in pairs.items()})


def target_modules(model: nn.Module, roles_cfg) -> dict[str, nn.Module]:
    """The modules of a flow model that roles.lora_targets selects (peft's own matching), by path inside the
    transformer."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=roles_cfg.lora_rank, lora_alpha=roles_cfg.lora_alpha, target_modules=roles_cfg.lora_targets)
    return {
        name.removeprefix(PREFIX): m
        for name, m in model.named_modules()
        if name.startswith(PREFIX) and isinstance(m, nn.Linear) and check_target_module_exists(config, name)
    }


def _names(names: list[str]) -> str:
    return f"{len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})"


def map_onto_roles(lora: PublishedLora, model: nn.Module, roles_cfg) -> dict[str, Tensor]:
    """The published layers as the run's adapter tensors (keys as `Roles.adapter_tensors` writes them), with each
    layer's update scale * B @ A unchanged under the run's scale."""
    targets = target_modules(model, roles_cfg)
    where = f"{lora.path} ({lora.kind} LoRA)"
    if lora.kind == "kohya":  # its names lost the dots: match them against the targets' names
        by_flat = {n.replace(".", "_"): n for n in targets}
        layers = {by_flat.get(n, n): layer for n, layer in lora.layers.items()}
    else:
        layers = lora.layers
    unmatched = sorted(set(layers) - set(targets))
    missing = sorted(set(targets) - set(layers))
    if unmatched or missing:
        parts = []
        if unmatched:
            parts.append(f"layers outside roles.lora_targets: {_names(unmatched)}")
        if missing:
            parts.append(f"roles.lora_targets modules the file lacks: {_names(missing)}")
        raise CheckpointError(f"{where}: {'; '.join(parts)}. Set roles.lora_targets to exactly the file's modules "
                              f"(roles.lora_targets = {roles_cfg.lora_targets!r} selects {len(targets)})")  # fmt: skip
    ours = roles_cfg.lora_alpha / roles_cfg.lora_rank
    out = {}
    for name, layer in sorted(layers.items()):
        m = targets[name]
        rank = layer.a.shape[0]
        if rank != roles_cfg.lora_rank:
            raise CheckpointError(
                f"{where}: rank {rank} at {name}, roles.lora_rank is {roles_cfg.lora_rank}: set roles.lora_rank: "
                f"{rank} (and roles.lora_alpha to keep the scale you want)"
            )
        if tuple(layer.a.shape) != (rank, m.in_features) or tuple(layer.b.shape) != (m.out_features, rank):
            raise CheckpointError(
                f"{where}: {name} has A {tuple(layer.a.shape)} and B {tuple(layer.b.shape)}, the model's layer maps "
                f"{m.in_features} -> {m.out_features}: a LoRA of another model"
            )
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.a.float().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = (layer.b.double() * (layer.scale / ours)).float().contiguous()
    return out


def read_lora_init(path: str | Path, roles_cfg, model: nn.Module) -> dict[str, Tensor]:
    """roles.generator_init / fake_init in lora mode on a diffusers model: our own adapter file, or a published LoRA
    mapped onto the run's targets."""
    from tdm_r1.checkpoint import read_adapter

    if is_own_adapter(path):
        return read_adapter(path, roles_cfg)
    return map_onto_roles(read_published_lora(path), model, roles_cfg)
